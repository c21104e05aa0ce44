"""The PyTorch reference of an exported model: how to rebuild it, and its weights.

`vit2trt export` writes a ReferenceRecord beside the ONNX file; validation later rebuilds the
exact PyTorch model from it. Weights are read without unpickling arbitrary objects.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ExportError

RECORD_SUFFIX = ".reference.json"
HF_VIT = "ViTForImageClassification"


@dataclass
class ReferenceRecord:
    family: str                       # "timm" or "hf"
    name: str                         # timm model name, or "ViTForImageClassification"
    kwargs: dict[str, Any]            # constructor arguments (timm) or ViTConfig fields (hf)
    preprocessing: dict[str, Any]     # input_size, mean, std, interpolation, crop_pct
    weights: Optional[str] = None     # path of the weights file, as given
    weights_sha256: Optional[str] = None
    seed: Optional[int] = None        # seed of the random init when no weights are given
    exporter: str = "torchscript"
    opset: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def path_for(onnx_path: str | os.PathLike) -> Path:
        return Path(str(onnx_path) + RECORD_SUFFIX)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceRecord":
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise ExportError(f"{path}: not a readable vit2trt reference record ({exc})") from exc


def read_record(onnx_path: str | os.PathLike) -> Optional[dict]:
    """The reference record `vit2trt export` wrote beside `onnx_path` (JSON), or None where there is none."""
    try:
        return json.loads(ReferenceRecord.path_for(onnx_path).read_text())
    except (OSError, ValueError):
        return None


def parse_model_spec(spec: str) -> tuple[str, str]:
    """'timm:deit_small_patch16_224' -> ('timm', name); 'hf:ViTForImageClassification' -> ('hf', ...)."""
    family, sep, name = spec.partition(":")
    if not sep or family not in ("timm", "hf") or not name:
        raise ExportError(
            f"model '{spec}' is not understood: use timm:<model name> (e.g. timm:deit_small_patch16_224) "
            f"or hf:{HF_VIT}.")
    if family == "hf" and name != HF_VIT:
        raise ExportError(f"only hf:{HF_VIT} is supported, not hf:{name}.")
    if family == "timm" and ("." in name or name.startswith("hf-hub") or name.startswith("hf_hub")):
        raise ExportError(
            f"'{name}' names pretrained hub weights, which vit2trt never downloads. Use the bare model "
            f"name (timm:{name.split('.')[0].split(':')[-1]}) and pass the checkpoint with --weights FILE.")
    return family, name


def build_model(record: ReferenceRecord) -> torch.nn.Module:
    """Rebuild the PyTorch model of `record` in eval mode, with its weights or seeded init."""
    if record.seed is not None:
        torch.manual_seed(record.seed)
    if record.family == "graph":   # assembled from the original ONNX graph (graph_reference.py)
        from .graph_reference import model_from_graph

        if record.weights_sha256 and Path(record.weights).is_file() and sha256_of(record.weights) != record.weights_sha256:
            raise ExportError(f"{record.weights} changed since the reference was taken from it (sha256 differs).")
        return model_from_graph(record.weights)[0]
    if record.family not in ("timm", "hf"):
        raise ExportError(f"unknown model family '{record.family}' in reference record.")
    model = _initialized(record)
    if record.weights:
        state = load_state_dict(record.weights)
        _load_into(model, state, record)
    return model.eval()


# Random init costs more than the forward passes of a small model, and one process rebuilds the same
# reference many times (export, convert, validate, heal, every candidate of plan): the initialized model
# and the random-number state after its init are kept for the last few records and handed out as copies.
_INITIALIZED: "OrderedDict[str, tuple[torch.nn.Module, torch.Tensor]]" = OrderedDict()
_INITIALIZED_KEPT = 4


def _initialized(record: ReferenceRecord) -> torch.nn.Module:
    """The model of `record` as its constructor leaves it (weights not loaded yet), a fresh copy."""
    key = json.dumps([record.family, record.name, record.kwargs, record.seed], sort_keys=True, default=str)
    if key not in _INITIALIZED:
        model = _build_timm(record.name, record.kwargs) if record.family == "timm" else _build_hf(record.kwargs)
        _INITIALIZED[key] = (model, torch.get_rng_state())
        while len(_INITIALIZED) > _INITIALIZED_KEPT:
            _INITIALIZED.popitem(last=False)
    _INITIALIZED.move_to_end(key)
    model, rng_after_init = _INITIALIZED[key]
    if record.seed is not None:
        torch.set_rng_state(rng_after_init)   # what a fresh seeded init leaves to the caller
    return copy.deepcopy(model)


def _build_timm(name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ExportError(f"timm has no model '{name}'" + (f"; similar: {', '.join(close)}" if close else "."))
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise ExportError(f"timm model '{name}' does not accept the given arguments {kwargs}: {exc}") from exc


class HFLogits(torch.nn.Module):
    """Hugging Face classifiers return an output object; export and validation want the logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _build_hf(kwargs: dict[str, Any]) -> torch.nn.Module:
    try:
        from transformers import ViTConfig, ViTForImageClassification
    except ImportError as exc:
        raise ExportError("Hugging Face export needs transformers: pip install 'vit2trt[hf]'.") from exc
    config = ViTConfig(**kwargs)
    config._attn_implementation = kwargs.get("attn_implementation", "eager")
    return HFLogits(ViTForImageClassification(config))


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint without unpickling code: .safetensors, or .pth/.pt/.bin via weights_only."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"weights file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ExportError(f"{path}: not a readable safetensors file ({exc}).") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; none may run code here
        raise ExportError(
            f"{path}: could not be read as a weights-only PyTorch checkpoint "
            f"({str(exc).splitlines()[0][:200]}). Save it as a plain state_dict or .safetensors.") from exc
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_ema"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExportError(f"{path}: holds no state_dict of tensors (top level or under 'model').")
    return obj


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], record: ReferenceRecord) -> None:
    target = model.model if isinstance(model, HFLogits) else model
    if record.family == "timm":
        module = sys.modules.get(type(model).__module__)
        convert = getattr(module, "checkpoint_filter_fn", None)
        if convert is not None:  # official DeiT/ViT checkpoints, pos-embed resize
            try:
                state = convert(state, model)
            except Exception as exc:
                raise ExportError(f"{record.weights}: timm could not convert the checkpoint: {exc}") from exc
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ExportError(f"{record.weights}: weights do not fit model '{record.name}': "
                          f"{str(exc).splitlines()[1:3]}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"{record.weights}: weights do not fit model '{record.name}': "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
            + (" (more omitted)" if len(result.missing_keys) + len(result.unexpected_keys) > 10 else ""))


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def preprocessing_of(model: torch.nn.Module, family: str) -> dict[str, Any]:
    if family == "timm":
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
        # The pretrained config names the checkpoint's size; the model may be built for another.
        cfg["input_size"] = [int(model.patch_embed.proj.in_channels), *map(int, model.patch_embed.img_size)]
        return cfg
    config = model.model.config
    size = int(config.image_size)
    return {"input_size": [int(config.num_channels), size, size], "interpolation": "bilinear",
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0, "crop_mode": "center"}
