"""Loaders and runners, kept apart as polygraphy keeps them: one loader for ONNX Runtime CPU sessions,
runners that take a batch and return outputs (a session's, a PyTorch module's on CPU or replayed as a
CUDA graph), and one batched loop over images. Every command opens a graph and runs images this way.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Optional, Union

import numpy as np
import onnx

_PROTOBUF_LIMIT = 2**31 - 1 - 64 * 2**20   # leave headroom for the graph itself

Source = Union[str, os.PathLike, onnx.ModelProto, bytes]


def serialized(model: onnx.ModelProto) -> Optional[bytes]:
    """The graph's bytes, or None when it is too large for one protobuf (it must travel as external data).

    Under upb, ByteSize() costs a whole serialization; a graph whose weights are far below the limit is
    serialized at once, and only one near it is measured first."""
    if _weight_bytes(model) < _PROTOBUF_LIMIT // 2:
        try:
            return model.SerializeToString()
        except Exception:   # weights the estimate missed (huge Constant nodes): measure below
            pass
    return model.SerializeToString() if model.ByteSize() < _PROTOBUF_LIMIT else None


def _weight_bytes(model: onnx.ModelProto) -> int:
    """The initializers' size from their shapes and types (reads no data); a huge number where unknown."""
    total = 0
    for tensor in model.graph.initializer:
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            return _PROTOBUF_LIMIT
        count = 1
        for dim in tensor.dims:
            count *= int(dim)
        total += count * max(itemsize, 1)
    return total


def ort_session(source: Source, threads: Optional[int] = None, optimize: bool = True,
                profile_prefix: Optional[str] = None):
    """A quiet ONNX Runtime CPU session of a file or an in-memory graph.

    `threads`: intra-op threads (None: ONNX Runtime's default) with one inter-op thread, as timings need;
    `optimize=False` keeps node and tensor names exactly as in the graph (taps on inner tensors)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3   # its warnings are not the user's problem
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = ["CPUExecutionProvider"]
    if isinstance(source, bytes):
        return ort.InferenceSession(source, options, providers=providers)
    if not isinstance(source, onnx.ModelProto):
        return ort.InferenceSession(str(source), options, providers=providers)
    data = serialized(source)
    if data is not None:
        return ort.InferenceSession(data, options, providers=providers)
    # Beyond protobuf's 2 GB a graph travels as a file with external data (read whole at creation).
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save(source, path, save_as_external_data=True, location="model.onnx.data")
        try:
            return ort.InferenceSession(path, options, providers=providers)
        finally:   # saving moved the caller's weights out to the file: read them back before it goes
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(source, tmp)


Runner = Callable[[np.ndarray], list]


def session_runner(session) -> Runner:
    """x -> every output of the session for one batch x."""
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def ort_runner(source: Source, threads: Optional[int] = None) -> Runner:
    return session_runner(ort_session(source, threads))


def run_batched(run: Callable[[np.ndarray], object], x: np.ndarray, batch: int = 8) -> np.ndarray:
    """The first output of `run` over x in batches of `batch`, concatenated (runners return a list of
    outputs; a PyTorch module returns a tensor)."""
    outs = []
    for i in range(0, len(x), batch):
        out = run(x[i:i + batch])
        out = out[0] if isinstance(out, (list, tuple)) else out
        outs.append(out.detach().cpu().numpy() if hasattr(out, "detach") else np.asarray(out))
    return np.concatenate(outs)


def torch_batched(module, x: np.ndarray, batch: int = 8) -> np.ndarray:
    """A PyTorch module's outputs over x in batches, without gradients."""
    import torch

    device = next(module.parameters(), torch.empty(0)).device
    with torch.no_grad():
        return run_batched(lambda b: module(torch.from_numpy(b).to(device)), x, batch)


def fixed_batch(session) -> Optional[int]:
    """The batch a graph was exported at, where its input fixes one (None: dynamic)."""
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else None


def torch_runner(module, device: str, threads: int = 2) -> Callable[[np.ndarray], object]:
    """Run `module` on `device`; on CUDA, capture one CUDA graph per batch size and replay it."""
    import torch

    torch.set_num_threads(threads)

    module = module.to(device).eval()
    if device == "cpu":
        def run_cpu(x):
            with torch.no_grad():
                return module(torch.from_numpy(x))
        return run_cpu
    graphs: dict[tuple, tuple] = {}

    def run_cuda(x):
        key = x.shape
        if graphs.get(key) == "eager":
            with torch.no_grad():
                out = module(torch.from_numpy(x).to(device))
            torch.cuda.synchronize()
            return out
        if key not in graphs:
            static_in = torch.from_numpy(x).to(device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.no_grad(), torch.cuda.stream(stream):
                for _ in range(3):   # warm up outside the capture, as CUDA graphs require
                    module(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.no_grad(), torch.cuda.graph(graph):
                    static_out = module(static_in)
            except RuntimeError:   # data-dependent shapes (AS-ViT) cannot be captured: run eagerly
                graphs[key] = "eager"
                return run_cuda(x)
            graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = graphs[key]
        static_in.copy_(torch.from_numpy(x))
        graph.replay()
        torch.cuda.synchronize()
        return static_out
    return run_cuda
