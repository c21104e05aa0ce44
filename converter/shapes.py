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

from vit2trt.errors import NotAViTError

_PROTOBUF_LIMIT = 2**31 - 1 - 64 * 2**20  # leave headroom for the graph itself


def observe_shapes(
    model: onnx.ModelProto, tensor_names: list[str], input_shape: tuple[int, ...]
) -> tuple[dict[str, tuple[int, ...]], dict[str, np.ndarray]]:
    """Run `model` on one seeded random input.

    Returns the shapes of `tensor_names` and the values of those that are small integer tensors
    (reshape targets and the like).
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph_outputs = {o.name for o in probe.graph.output}
    for name in tensor_names:
        if name not in graph_outputs:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
            graph_outputs.add(name)
    elem_type = model.graph.input[0].type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    data = np.random.default_rng(0).standard_normal(input_shape).astype(dtype)
    options = ort.SessionOptions()
    # Keep node and tensor names exactly as in the file.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        if probe.ByteSize() < _PROTOBUF_LIMIT:
            session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
            results = session.run(list(tensor_names), {model.graph.input[0].name: data})
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "probe.onnx")
                onnx.save(probe, path, save_as_external_data=True, location="probe.onnx.data")
                session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                results = session.run(list(tensor_names), {model.graph.input[0].name: data})
    except Exception as exc:  # ORT raises many exception types for a graph it cannot run
        raise NotAViTError(
            f"ONNX Runtime could not run the graph at batch 1 with input shape {list(input_shape)}: "
            f"{str(exc).splitlines()[0][:300]}"
        ) from exc
    shapes = {name: tuple(int(d) for d in np.shape(value)) for name, value in zip(tensor_names, results)}
    small_ints = {name: np.asarray(value) for name, value in zip(tensor_names, results)
                  if np.asarray(value).dtype.kind in "iu" and np.size(value) <= 16}
    return shapes, small_ints
