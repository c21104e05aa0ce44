"""Export a timm or Hugging Face ViT to ONNX (dynamic batch) with its reference record."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..runtime import ort_runner
from ...errors import ExportError
from ...models.reference import (
    ReferenceRecord, build_model, parse_model_spec, preprocessing_of, sha256_of,
)

EXPORTERS = ("torchscript", "dynamo")
TORCHSCRIPT_OPSET = 17
_TWO_GB = 2**31


@dataclass
class ExportResult:
    onnx_path: Path
    record_path: Path
    files: list[Path]
    max_abs_diff: float       # ONNX Runtime vs PyTorch on one seeded batch of 2
    max_abs_ref: float


def export_model(
    spec: str,
    out: str | os.PathLike,
    weights: Optional[str] = None,
    exporter: str = "torchscript",
    img_size: Optional[int] = None,
    seed: int = 0,
    model_args: Optional[dict[str, Any]] = None,
    opset: Optional[int] = None,
) -> ExportResult:
    """Build the model named by `spec`, export it to `out`, and check ORT against PyTorch."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter '{exporter}'; choose one of {', '.join(EXPORTERS)}.")
    record, model = reference_model(spec, weights, model_args, img_size, seed, exporter,
                                    TORCHSCRIPT_OPSET if exporter == "torchscript" and opset is None else opset)
    in_chans, height, width = record.preprocessing["input_size"]
    sample = torch.from_numpy(
        np.random.default_rng(seed).standard_normal((2, in_chans, height, width)).astype(np.float32))
    out = Path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"--out must name a .onnx file, not '{out}'.")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary folder beside the target, then move: nothing half-written on failure.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".vit2trt-export-") as tmp:
        tmp_onnx = Path(tmp) / out.name
        _torch_export(model, sample, tmp_onnx, exporter, record.opset)
        diff, ref = _check_with_ort(model, sample, tmp_onnx)
        record_path = ReferenceRecord.path_for(out)
        (Path(tmp) / record_path.name).write_text(record.to_json())
        moved = []
        for produced in sorted(Path(tmp).iterdir()):
            target = out.parent / produced.name
            os.replace(produced, target)
            moved.append(target)
    return ExportResult(onnx_path=out, record_path=record_path, files=moved, max_abs_diff=diff, max_abs_ref=ref)


def reference_model(spec: str, weights: Optional[str] = None, model_args: Optional[dict[str, Any]] = None,
                    img_size: Optional[int] = None, seed: int = 0, exporter: Optional[str] = None,
                    opset: Optional[int] = None) -> tuple[ReferenceRecord, torch.nn.Module]:
    """The PyTorch model `spec` names (timm:NAME or hf:...) and the record that rebuilds it, as
    `vit2trt export` makes them (weights are read without unpickling code)."""
    family, name = parse_model_spec(spec)
    kwargs = dict(model_args or {})
    if img_size is not None:
        kwargs["img_size" if family == "timm" else "image_size"] = int(img_size)
    record = ReferenceRecord(
        family=family, name=name, kwargs=kwargs, preprocessing={},
        weights=str(Path(weights).resolve()) if weights else None,
        weights_sha256=sha256_of(weights) if weights and Path(weights).is_file() else None,
        seed=None if weights else int(seed), exporter=exporter or "none", opset=opset,
    )
    if weights:
        torch.manual_seed(seed)  # modules the checkpoint does not cover still init the same way
    model = build_model(record)
    record.preprocessing = preprocessing_of(model, family)
    return record, model


def _torch_export(model: torch.nn.Module, sample: torch.Tensor, path: Path, exporter: str, opset: Optional[int]):
    big = sum(p.numel() * p.element_size() for p in model.parameters()) >= _TWO_GB
    captured = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), torch.no_grad():
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                # Above 2 GB the TorchScript exporter spills one file per tensor; export into a
                # scratch folder and re-save below with a single external data file.
                target = path.parent / "scratch" / path.name if big else path
                target.parent.mkdir(exist_ok=True)
                torch.onnx.export(
                    model, (sample,), str(target), dynamo=False, opset_version=opset or TORCHSCRIPT_OPSET,
                    input_names=["input"], output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                )
            else:
                batch = torch.export.Dim("batch", min=1, max=4096)
                program = torch.onnx.export(
                    model, (sample,), dynamo=True, opset_version=opset, input_names=["input"],
                    output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False,
                )
                program.save(str(path), external_data=True)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"torch.onnx ({exporter}) failed: {str(exc).splitlines()[0][:400]}") from exc
    if exporter == "torchscript" and big:
        import onnx

        onnx.save(onnx.load(str(target)), str(path), save_as_external_data=True, location=path.name + ".data")
        shutil.rmtree(target.parent)


def _check_with_ort(model: torch.nn.Module, sample: torch.Tensor, path: Path) -> tuple[float, float]:
    got = ort_runner(path)(sample.numpy())[0]
    with torch.no_grad():
        want = model(sample).numpy()
    if got.shape != want.shape:
        raise ExportError(f"exported graph returns shape {got.shape}, PyTorch {want.shape}.")
    return float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
