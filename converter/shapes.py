"""Observed tensor shapes: run the graph once at batch 1 in ONNX Runtime.

Exporters compute reshape targets from Shape ops, so static shape inference often leaves head
counts and token counts unknown; one real run at batch 1 knows them all.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import NotAViTError

_PROTOBUF_LIMIT = 2**31 - 1 - 64 * 2**20  # leave headroom for the graph itself


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the tensors `names`."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    present = {o.name for o in tapped.graph.output}
    for name in dict.fromkeys(names):
        if name not in present:
            tapped.graph.output.append(onnx.ValueInfoProto(name=name))
    return tapped


def memory_session(model: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of an in-memory model, through a temporary file with external
    data when the model is beyond protobuf's 2 GB limit (ONNX Runtime reads it all at creation)."""
    options = ort.SessionOptions()
    if not optimize:   # keep node and tensor names exactly as in the file
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if model.ByteSize() < _PROTOBUF_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save(model, path, save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def observe_shapes(
    model: onnx.ModelProto, tensor_names: list[str], input_shape: tuple[int, ...], keep_values: tuple[str, ...] = ()
) -> tuple[dict[str, tuple[int, ...]], dict[str, np.ndarray]]:
    """Run `model` on one seeded random input.

    Returns the shapes of `tensor_names` and the values of those that are small integer tensors
    (reshape targets and the like) or named in `keep_values` (attention masks).
    """
    probe = with_outputs(model, tensor_names)
    elem_type = model.graph.input[0].type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    data = np.random.default_rng(0).standard_normal(input_shape).astype(dtype)
    try:
        session = memory_session(probe, optimize=False)
        results = session.run(list(tensor_names), {model.graph.input[0].name: data})
    except Exception as exc:  # ORT raises many exception types for a graph it cannot run
        raise NotAViTError(
            f"ONNX Runtime could not run the graph at batch 1 with input shape {list(input_shape)}: "
            f"{str(exc).splitlines()[0][:300]}"
        ) from exc
    shapes = {name: tuple(int(d) for d in np.shape(value)) for name, value in zip(tensor_names, results)}
    small_ints = {name: np.asarray(value) for name, value in zip(tensor_names, results)
                  if (np.asarray(value).dtype.kind in "iu" and np.size(value) <= 16) or name in keep_values}
    return shapes, small_ints
