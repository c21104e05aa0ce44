"""The output folder of a conversion as a type: what it holds, in memory or on disk.

An `Artifact` is the compressed graph with what proves and explains it: the decisions that rebuild
its PyTorch reference, the weights compensation fitted, the original's reference record and
description, and the report. `compress` makes one in memory; `save` writes it atomically (a failure
leaves the old folder or none); `open` reads one back. The file names live here and nowhere else.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx

from .files import write_atomically
from .runtime import serialized
from ..errors import Vit2TrtError

MODEL_FILE = "model.onnx"
MODEL_DATA_FILE = "model.onnx.data"          # the weights, when the graph is beyond protobuf's 2 GB
DECISIONS_FILE = "decisions.json"            # what each method decided: rebuilds the PyTorch reference
COMPENSATION_FILE = "compensation.safetensors"   # weights compensation fitted (decisions name them)
HEALED_FILE = "healed.safetensors"           # parameters `vit2trt heal` trained (decisions' 'heal' names them)
RECORD_FILE = "reference.json"               # the original's reference record, from `vit2trt export`
ORIGINAL_FILE = "original.json"              # what validate knows of the original without a record
REPORT_FILE = "report.json"                  # the machine-readable report; validate and bench add to it
ENGINE_FILE = "model.engine"
ENGINE_INFO_FILE = "model.engine.json"       # how the engine was built (module, profile, precision)


def read_json(path: Path) -> dict:
    """A JSON file of the folder, or {} where it is missing or unreadable (reports are optional)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def write_json(path: Path, data: dict) -> None:
    """Sorted, indented JSON, replacing the file atomically."""
    write_atomically(Path(path), (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


@dataclass
class Artifact:
    """A compressed model and its records. `model` loads from `folder` on first use when opened."""

    decisions: dict
    report: dict = field(default_factory=dict)
    compensation: dict[str, np.ndarray] = field(default_factory=dict)
    record: Optional[dict] = None      # the original's reference record (JSON), if it has one
    original: Optional[dict] = None    # the original's description (path, hash, exporter, shape)
    folder: Optional[Path] = None      # where it lies on disk; None while only in memory
    healed: dict[str, np.ndarray] = field(default_factory=dict)   # trained parameters, by state_dict name
    _model: Optional[onnx.ModelProto] = field(default=None, repr=False)

    # -- reading -------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike) -> "Artifact":
        """The folder `convert --out` wrote; the graph itself is read when first needed."""
        folder = Path(folder)
        if not (folder / MODEL_FILE).is_file():
            raise Vit2TrtError(f"{folder} holds no {MODEL_FILE}; give the folder `vit2trt convert --out` wrote.")
        decisions = read_json(folder / DECISIONS_FILE)
        compensation = {}
        entry = decisions.get("compensation")
        if entry:
            path = folder / entry.get("file", COMPENSATION_FILE)
            if not path.is_file():
                raise Vit2TrtError(f"{folder / DECISIONS_FILE} names compensated weights in {path}, which is "
                                   "missing; copy the whole convert output folder.")
            from safetensors.numpy import load_file

            compensation = load_file(str(path))
        healed = {}
        if decisions.get("heal"):
            path = folder / decisions["heal"].get("file", HEALED_FILE)
            if not path.is_file():
                raise Vit2TrtError(f"{folder / DECISIONS_FILE} says the model was healed, but {path} is missing; "
                                   "copy the whole output folder.")
            from safetensors.numpy import load_file

            healed = load_file(str(path))
        record = read_json(folder / RECORD_FILE) or None
        original = read_json(folder / ORIGINAL_FILE) or None
        return cls(decisions, read_json(folder / REPORT_FILE), compensation, record, original, folder, healed)

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            if self.folder is None:
                raise Vit2TrtError("this artifact holds no graph.")
            self._model = onnx.load(str(self.model_path))
        return self._model

    @model.setter
    def model(self, value: onnx.ModelProto) -> None:
        self._model = value

    @property
    def model_path(self) -> Path:
        if self.folder is None:
            raise Vit2TrtError("this artifact is not saved yet; save it to a folder first.")
        return self.folder / MODEL_FILE

    def path(self, name: str) -> Path:
        """A file of the saved folder (one of the *_FILE names)."""
        return self.model_path.parent / name

    @property
    def flops_ratio(self) -> Optional[float]:
        flops = self.decisions.get("flops") or {}
        return flops["before"] / max(flops["after"], 1) if {"before", "after"} <= set(flops) else None

    def reference_record(self):
        """The ReferenceRecord that rebuilds the original in PyTorch, or None without one."""
        if not self.record:
            return None
        from ..models.reference import ReferenceRecord

        try:
            return ReferenceRecord(**self.record)
        except TypeError as exc:
            raise Vit2TrtError(f"{RECORD_FILE}: not a reference record ({exc}).") from None

    # -- running -------------------------------------------------------------------------------
    def session(self, threads: Optional[int] = None):
        """An ONNX Runtime CPU session of the compressed graph (from the file when saved and not loaded,
        so that external weights stay out of memory)."""
        from .runtime import ort_session

        if self._model is None and self.folder is not None:
            return ort_session(self.model_path, threads)
        return ort_session(self.model, threads)

    def torch_model(self, record=None):
        """The PyTorch model compressed as decisions.json says, compensated and healed weights included:
        the reference the graph is proven against, and what healing trains. `record`: a ReferenceRecord
        of the original (default: the artifact's own)."""
        import torch

        from ..models.compressed_reference import compressed_reference
        from ..models.reference import build_model

        record = record or self.reference_record()
        if record is None:
            raise Vit2TrtError("no reference record for the original: give one (vit2trt export writes it).")
        weights = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.compensation.items()}
        model = compressed_reference(build_model(record), self.decisions, weights=weights or None)
        if self.healed:
            own = dict(model.named_parameters())
            strangers = sorted(set(self.healed) - set(own))
            if strangers:
                raise Vit2TrtError(f"{HEALED_FILE} holds '{strangers[0]}', which the compressed model does not have; "
                                   "it and decisions.json must come from the same heal.")
            with torch.no_grad():
                for name, value in self.healed.items():
                    if tuple(own[name].shape) != tuple(value.shape):
                        raise Vit2TrtError(f"{HEALED_FILE}: '{name}' is {list(value.shape)}, the compressed model's "
                                           f"is {list(own[name].shape)}; it and decisions.json must come from the same heal.")
                    own[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
        return model

    # -- writing -------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike, overwrite: bool = False, build_options=None,
             progress: Callable[[str], None] = lambda msg: None,
             extra: Optional[Callable[[Path], None]] = None):
        """Write the folder: stage everything beside it, then move it into place, so that a failure
        leaves the old folder or none. With `build_options` (not "none"), build a TensorRT engine too:
        a failed build keeps the rest (the report says what failed). `extra(staging)` adds files
        (plan.md, ...) before the move. Returns the build report or None."""
        from .deploy.engine import build_engine, report_dict
        from .planning.report import render_report

        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise Vit2TrtError(f"{folder} exists and is not empty; choose another --out or pass --overwrite.")
        folder.parent.mkdir(parents=True, exist_ok=True)
        build = None
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".vit2trt-out-") as staging:
            tmp = Path(staging) / "out"
            tmp.mkdir()
            data = serialized(self.model)
            big = data is None   # beyond protobuf's 2 GB: the weights go to a data file
            if big:
                onnx.save(self.model, str(tmp / MODEL_FILE), save_as_external_data=True, location=MODEL_DATA_FILE)
            else:
                (tmp / MODEL_FILE).write_bytes(data)   # what onnx.save writes, without serializing twice
            if self.compensation:
                from safetensors.numpy import save_file

                save_file(self.compensation, str(tmp / COMPENSATION_FILE))
            if self.healed:
                from safetensors.numpy import save_file

                save_file(self.healed, str(tmp / HEALED_FILE))
            write_json(tmp / DECISIONS_FILE, self.decisions)
            if self.record:   # lets `vit2trt validate OUT` rebuild the PyTorch reference
                write_json(tmp / RECORD_FILE, self.record)
            if self.original:   # without a record, validate names what it is missing from this
                write_json(tmp / ORIGINAL_FILE, self.original)
            report = dict(self.report)
            if build_options is not None and build_options.engine != "none":
                progress("building a TensorRT engine")
                build = build_engine(tmp / MODEL_FILE, engine_path=tmp / ENGINE_FILE, options=build_options)
                if build.status == "unavailable":
                    report["notes"] = [*report.get("notes", []), build.message]
            report["build"] = report_dict(build)
            write_json(tmp / REPORT_FILE, report)
            render_report(tmp)
            if extra is not None:
                extra(tmp)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        self.report, self.folder = report, folder
        if big:   # saving moved the weights out of the in-memory graph: read them back from the folder when needed
            self._model = None
        return build

    def update_report(self, key: str, value) -> dict:
        """Set one section of the saved report.json (validate, bench), atomically."""
        report = read_json(self.path(REPORT_FILE))
        report[key] = value
        write_json(self.path(REPORT_FILE), report)
        self.report = report
        return report
