"""Observed tensor shapes: run the graph once at batch 1 in ONNX Runtime.

Exporters compute reshape targets from Shape ops, so static shape inference often leaves head
counts and token counts unknown; one real run at batch 1 knows them all.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import onnx

from ..runtime import ort_session, serialized
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


def _extra_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    """Bytes that, appended to `model`'s serialization, make it also return `names`: protobuf parses
    concatenated messages as one merged message, whose repeated fields (graph.output) are appended.
    This saves copying and serializing the weights a second time."""
    present = {o.name for o in model.graph.output}
    outputs = [onnx.ValueInfoProto(name=name) for name in dict.fromkeys(names) if name not in present]
    return onnx.ModelProto(graph=onnx.GraphProto(output=outputs)).SerializeToString()


def observe_shapes(
    model: onnx.ModelProto, tensor_names: list[str], input_shape: tuple[int, ...], keep_values: tuple[str, ...] = ()
) -> tuple[dict[str, tuple[int, ...]], dict[str, np.ndarray]]:
    """Run `model` on one seeded random input.

    Returns the shapes of `tensor_names` and the values of those that are small integer tensors
    (reshape targets and the like) or named in `keep_values` (attention masks).
    """
    data = None if _external(model) else serialized(model)
    key = None if data is None else _run_key(data, tensor_names, input_shape, keep_values)
    if key is not None and key in _OBSERVED:
        _OBSERVED.move_to_end(key)
        shapes, values = _OBSERVED[key]
        return dict(shapes), {name: value.copy() for name, value in values.items()}
    probe = with_outputs(model, tensor_names) if data is None else data + _extra_outputs(model, tensor_names)
    elem_type = model.graph.input[0].type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    x = np.random.default_rng(0).standard_normal(input_shape).astype(dtype)
    try:
        session = ort_session(probe, optimize=False)
        results = session.run(list(tensor_names), {model.graph.input[0].name: x})
    except Exception as exc:  # ORT raises many exception types for a graph it cannot run
        raise NotAViTError(
            f"ONNX Runtime could not run the graph at batch 1 with input shape {list(input_shape)}: "
            f"{str(exc).splitlines()[0][:300]}"
        ) from exc
    shapes = {name: tuple(int(d) for d in np.shape(value)) for name, value in zip(tensor_names, results)}
    small_ints = {name: np.asarray(value) for name, value in zip(tensor_names, results)
                  if (np.asarray(value).dtype.kind in "iu" and np.size(value) <= 16) or name in keep_values}
    if key is not None:
        _OBSERVED[key] = (dict(shapes), {name: value.copy() for name, value in small_ints.items()})
        while len(_OBSERVED) > _OBSERVED_KEPT:
            _OBSERVED.popitem(last=False)
    return shapes, small_ints


# A graph is read again and again (convert reads the original, plan every candidate, validate and heal
# both graphs); its observed shapes depend only on its bytes and the question, so each is run once.
_OBSERVED: OrderedDict = OrderedDict()
_OBSERVED_KEPT = 32


def _external(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _run_key(data: bytes, tensor_names: list[str], input_shape: tuple[int, ...], keep_values: tuple[str, ...]) -> str:
    digest = hashlib.sha256(data)
    digest.update(repr((list(tensor_names), tuple(input_shape), tuple(keep_values))).encode())
    return digest.hexdigest()
