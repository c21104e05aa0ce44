"""Loading an untrusted ONNX file: every way it can be broken becomes one clear message."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from ...errors import BadModelFileError


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model with its external data, checking that every weight is complete."""
    path = Path(path)
    if not path.exists():
        raise BadModelFileError(f"{path}: no such file.")
    if not path.is_file():
        raise BadModelFileError(f"{path}: is not a file.")
    if path.stat().st_size == 0:
        raise BadModelFileError(f"{path}: the file is empty, not an ONNX model.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise BadModelFileError(
            f"{path}: not a readable ONNX model (protobuf parsing failed: {_first_line(exc)}). "
            "The file may be truncated or not ONNX at all; export it again."
        ) from exc
    if not model.graph.node:
        raise BadModelFileError(
            f"{path}: parsed as protobuf but holds no ONNX graph nodes; it is not an ONNX model "
            "or it is truncated."
        )
    _load_external_data(model, path)
    _check_initializers_complete(model, path)
    try:
        onnx.checker.check_model(model, full_check=False)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise BadModelFileError(f"{path}: the ONNX graph is invalid: {_first_line(exc)}") from exc
    return model


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    base = path.parent
    missing: list[str] = []
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = Path(info.location)
        if location.is_absolute() or ".." in location.parts:
            raise BadModelFileError(
                f"{path}: weight '{tensor.name}' points outside the model's folder "
                f"({info.location}); refusing to read it."
            )
        if not (base / location).is_file():
            missing.append(info.location)
    if missing:
        files = ", ".join(sorted(set(missing)))
        raise BadModelFileError(
            f"{path}: the graph keeps its weights in external data file(s) {files}, which were not "
            f"found in {base.resolve()}. Copy them next to the .onnx file."
        )
    try:
        external_data_helper.load_external_data_for_model(model, str(base))
    except (OSError, ValueError) as exc:
        raise BadModelFileError(f"{path}: could not read external data: {_first_line(exc)}") from exc


def _check_initializers_complete(model: onnx.ModelProto, path: Path) -> None:
    """A truncated weights file loads without error but leaves short tensors: catch that here."""
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.STRING or not tensor.HasField("raw_data"):
            continue
        expected = int(np.prod(tensor.dims, dtype=np.int64)) * _itemsize(tensor.data_type)
        if len(tensor.raw_data) != expected:
            raise BadModelFileError(
                f"{path}: weight '{tensor.name}' has {len(tensor.raw_data)} bytes, expected "
                f"{expected}; the model or its external data file is truncated."
            )


def _itemsize(data_type: int) -> int:
    return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
