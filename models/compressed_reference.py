"""The PyTorch reference of a compressed model, rebuilt from the original and decisions.json.

One entry point for every method, so that validation and benchmarks can run the compressed model
in PyTorch (on a GPU where TensorRT is missing) without knowing how each method is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from vit2trt.errors import Vit2TrtError


def compensation_weights(decisions: dict, out_dir: Optional[Path]) -> Optional[dict[str, torch.Tensor]]:
    """The compensated weights that `convert` wrote beside decisions.json, if it fitted any."""
    entry = decisions.get("compensation")
    if not entry:
        return None
    path = Path(out_dir or ".") / entry["file"]
    if not path.is_file():
        raise Vit2TrtError(f"decisions.json names compensated weights in {path}, which is missing; "
                           "copy the whole convert output folder.")
    from safetensors.torch import load_file

    return load_file(str(path))


def compressed_reference(model: nn.Module, decisions: dict, out_dir: Optional[Path] = None) -> nn.Module:
    """`out_dir` is where decisions.json lies (compensated weights are read from there)."""
    method = decisions.get("method")
    weights = compensation_weights(decisions, out_dir)
    if method == "toast":
        from vit2trt.models.pruned_reference import apply_decisions

        return apply_decisions(model, decisions, weights)
    if method == "tome":
        from vit2trt.models.tome_reference import ToMeViT

        return ToMeViT(model, decisions["tome"]["r"]).eval()
    if method == "asvit":
        from vit2trt.models.asvit_reference import ASViT

        return ASViT(model, decisions["settings"]["stages"], decisions["settings"]["thresholds"]).eval()
    if method == "cait":
        from vit2trt.models.cait_reference import CAITViT

        atme = decisions["atme"]
        return CAITViT(model, atme["stages"], atme["axes"], {"blocks": decisions.get("blocks", [])}, weights).eval()
    raise Vit2TrtError(f"decisions.json names an unknown method '{method}'.")
