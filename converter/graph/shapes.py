"""Observed tensor shapes: run the graph once at batch 1 in ONNX Runtime.

Exporters compute reshape targets from Shape ops, so static shape inference often leaves head
counts and token counts unknown; one real run at batch 1 knows them all.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..runtime import ort_session
from ...errors import NotAViTError


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the tensors `names`."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    present = {o.name for o in tapped.graph.output}
    for name in dict.fromkeys(names):
        if name not in present:
            tapped.graph.output.append(onnx.ValueInfoProto(name=name))
    return tapped


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
        session = ort_session(probe, optimize=False)
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
