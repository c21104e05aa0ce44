"""Shared fixtures: small exports of the foundation matrix, cached for the whole session."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

# Triton kernels run on CPU tensors under Triton's interpreter; it must be chosen before import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import onnxruntime as ort  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker: the workers are the parallelism; two threads each would fight for the cores
    # (OpenMP's spin-waits make that several times slower, not twice). Commands that train or time ask
    # torch for every core; under xdist they get one, and heal's subprocesses read OMP_NUM_THREADS.
    os.environ["OMP_NUM_THREADS"] = "1"
    _set_torch_threads = torch.set_num_threads
    torch.set_num_threads = lambda threads: _set_torch_threads(1)
    torch.set_num_threads(1)
    _session_init = ort.InferenceSession.__init__

    def _one_thread_session(self, source, sess_options=None, *args, **kwargs):
        sess_options = sess_options or ort.SessionOptions()
        if sess_options.intra_op_num_threads == 0:   # ONNX Runtime's default: every core
            sess_options.intra_op_num_threads = 1
        _session_init(self, source, sess_options, *args, **kwargs)

    ort.InferenceSession.__init__ = _one_thread_session

import numpy as np
import pytest


def _temporary_folders_in_memory() -> None:
    """The suite writes some 5 GB of graphs to its temporary folders. On this project's machines the disk
    takes them at about 80 MB/s (a minute of the run) and memory at over 1 GB/s, so where /dev/shm has room
    pytest's temporary root goes there; passed tests' folders are removed as they finish (pyproject)."""
    shm = Path("/dev/shm")
    if "PYTEST_DEBUG_TEMPROOT" in os.environ or not (shm.is_dir() and os.access(shm, os.W_OK)):
        return
    stat = os.statvfs(shm)
    if stat.f_bavail * stat.f_frsize >= 12 * 2 ** 30:
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(shm)


_temporary_folders_in_memory()


def _reuse_torchlib_registry() -> None:
    """torch.onnx's dynamo exporter rebuilds its table of ATen-to-ONNX functions on every export (about
    a second each, for some 45 exports in this suite). The table depends only on the opset, so build it
    once per opset. Private API: if torch moves it, exports simply stay as slow as before."""
    try:
        from torch.onnx._internal.exporter import _registration
        build = _registration.ONNXRegistry.from_torchlib.__func__
    except (ImportError, AttributeError):
        return
    built: dict = {}

    def from_torchlib(cls, *args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = build(cls, *args, **kwargs)
        return built[key]

    _registration.ONNXRegistry.from_torchlib = classmethod(from_torchlib)


_reuse_torchlib_registry()

from vit2trt.converter.deploy.export import export_model

HF_TINY = {"num_hidden_layers": 2, "hidden_size": 192, "num_attention_heads": 3,
           "intermediate_size": 768, "num_labels": 10}

# (id, spec, constructor arguments). Depth is cut to 2 where the full depth adds nothing;
# widths, patch and image sizes stay as named, since they are what the reader must find.
MATRIX = [
    ("vit_tiny", "timm:vit_tiny_patch16_224", {}),
    ("vit_small", "timm:vit_small_patch16_224", {}),
    ("vit_base", "timm:vit_base_patch16_224", {}),
    ("vit_base_p32", "timm:vit_base_patch32_224", {}),
    ("vit_small_384", "timm:vit_small_patch16_384", {}),
    ("deit_small", "timm:deit_small_patch16_224", {}),
    ("deit_small_distilled", "timm:deit_small_distilled_patch16_224", {}),
    ("deit3_small_layerscale", "timm:deit3_small_patch16_224", {}),
    ("vit_small_gap_no_cls", "timm:vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}),
    ("dinov2_reg4", "timm:vit_small_patch14_reg4_dinov2", {"img_size": 126, "num_classes": 10}),
    ("vit_medium_gap_256", "timm:vit_medium_patch16_gap_256", {}),
    ("vit_small_no_qkv_bias", "timm:vit_small_patch16_224", {"qkv_bias": False}),
    ("hf_vit", "hf:ViTForImageClassification", HF_TINY),
]
EXPORTERS = ["torchscript", "dynamo"]

# The methods' equality tests share these exports: 96-pixel inputs (36 patches; dinov2 a 7x7 grid, odd) and
# 4 blocks are enough for per-image token counts, merges and every pruning form to differ, at a fifth of the
# work of 224 pixels; the matrix above proves that the reader finds the named sizes.
METHOD_MODELS = {
    "deit_small": ("timm:deit_small_patch16_224", {"depth": 4, "img_size": 96}),
    "deit_small_distilled": ("timm:deit_small_distilled_patch16_224", {"depth": 4, "img_size": 96}),
    "deit3_layerscale": ("timm:deit3_small_patch16_224", {"depth": 4, "img_size": 96}),
    "gap_no_cls": ("timm:vit_small_patch16_224", {"depth": 4, "img_size": 96, "class_token": False,
                                                  "global_pool": "avg"}),
    "dinov2_reg4": ("timm:vit_small_patch14_reg4_dinov2", {"depth": 4, "img_size": 98, "num_classes": 10}),
    "no_qkv_bias": ("timm:vit_small_patch16_224", {"depth": 4, "img_size": 96, "qkv_bias": False}),
    "hf_vit": ("hf:ViTForImageClassification", dict(HF_TINY, num_hidden_layers=4, image_size=96)),
}


def method_cases(*names: str) -> list:
    """(id, spec, args) of the named METHOD_MODELS, in order."""
    return [(name, *METHOD_MODELS[name]) for name in names]


def model_args(spec: str, args: dict) -> dict:
    return dict(args, depth=2) if spec.startswith("timm:") else dict(args)


def _exports_root(tmp_path_factory) -> Path:
    """Under pytest-xdist every worker shares one export folder (the run's temp root), so each model is
    exported once per run, not once per worker; alone, the session's own temp folder."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "exports"


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory):
    from filelock import FileLock

    from vit2trt.converter.deploy.export import ExportResult

    root = _exports_root(tmp_path_factory)
    root.mkdir(parents=True, exist_ok=True)
    cache: dict[tuple, object] = {}

    def get(spec: str, args: dict, exporter: str):
        """`exporter` is "torchscript", "dynamo" or "dynamo@23" (an opset; 23 writes ONNX Attention)."""
        key = (spec, json.dumps(args, sort_keys=True), exporter)
        if key not in cache:
            folder = root / hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
            done = folder / "export.json"
            with FileLock(str(folder) + ".lock"):   # another worker may be exporting this very model
                if not done.is_file():
                    name, _, opset = exporter.partition("@")
                    start = time.monotonic()
                    result = export_model(spec, folder / "model.onnx", exporter=name, model_args=args, seed=0,
                                          opset=int(opset) if opset else None)
                    fields = {k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items() if k != "files"}
                    done.write_text(json.dumps(dict(fields, key=key, seconds=round(time.monotonic() - start, 2))))
            fields = json.loads(done.read_text())
            cache[key] = ExportResult(onnx_path=Path(fields["onnx_path"]), record_path=Path(fields["record_path"]),
                                      files=sorted(p for p in folder.iterdir() if p.name != "export.json"),
                                      max_abs_diff=fields["max_abs_diff"], max_abs_ref=fields["max_abs_ref"])
        return cache[key]

    return get


@pytest.fixture
def deit_tiny_ts(export_cache):
    """A 2-block DeiT-Tiny, TorchScript export: the quick default for CLI tests."""
    return export_cache("timm:deit_tiny_patch16_224", {"depth": 2, "num_classes": 10}, "torchscript")


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_onnx(path, x: np.ndarray) -> np.ndarray:
    """First output of the graph at `path` (or an in-memory ModelProto) in ONNX Runtime (CPU)."""
    source = path.SerializeToString() if hasattr(path, "SerializeToString") else str(path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def run_onnx_each(path, x: np.ndarray) -> np.ndarray:
    """run_onnx on every image alone (batch 1), through one session."""
    source = path.SerializeToString() if hasattr(path, "SerializeToString") else str(path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def compressed_reference_outputs(exported, out_dir: Path, x: np.ndarray) -> np.ndarray:
    """The exported model in PyTorch, compressed as out_dir/decisions.json says, run on x."""
    from vit2trt.models.compressed_reference import compressed_reference
    from vit2trt.models.reference import ReferenceRecord, build_model

    decisions = json.loads((Path(out_dir) / "decisions.json").read_text())
    reference = compressed_reference(build_model(ReferenceRecord.load(exported.record_path)), decisions, out_dir)
    with torch.no_grad():
        return reference(torch.from_numpy(x)).numpy()


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| relative to max |want|."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def with_constant_mask(source, target, seed: int = 0) -> Path:
    """`source` with a constant, non-zero attention mask added to every block's scores before the
    Softmax (a fixed-size mask that token reduction cannot follow)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    rng = np.random.default_rng(seed)
    nodes = list(model.graph.node)
    for i, node in enumerate([n for n in nodes if n.op_type == "Softmax"]):
        scores = node.input[0]
        probe = helper.make_tensor_value_info(scores, onnx.TensorProto.FLOAT, None)
        model.graph.output.append(probe)
        tokens = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            [scores], {session.get_inputs()[0].name: np.zeros([1, *shape[1:]], np.float32)})[0].shape[-1]
        model.graph.output.remove(probe)
        mask = numpy_helper.from_array((rng.standard_normal((1, 1, tokens, tokens)) * 0.1).astype(np.float32),
                                       f"test_mask_{i}")
        model.graph.initializer.append(mask)
        node.input[0] = f"masked_scores_{i}"
        model.graph.node.insert(list(model.graph.node).index(node),
                                helper.make_node("Add", [scores, mask.name], [node.input[0]], name=f"test_mask_add_{i}"))
    onnx.save(model, str(target))
    return Path(target)


# The modules holding the longest tests run first: a worker that draws a 30-second test last keeps the
# other worker idle for as long (xdist balances the rest by stealing short tests at the end).
LONG_FIRST = ("test_digits.py", "test_heal.py", "test_plugins.py", "test_tune_thresholds.py", "test_asvit.py",
              "test_toast_tcs.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))   # stable: order kept within
