"""The PyTorch reference of a compressed model, rebuilt from the original and decisions.json.

One entry point for every method, so that validation and benchmarks can run the compressed model
in PyTorch (on a GPU where TensorRT is missing) without knowing how each method is written.
"""
from __future__ import annotations

from torch import nn

from vit2trt.errors import Vit2TrtError


def compressed_reference(model: nn.Module, decisions: dict) -> nn.Module:
    method = decisions.get("method")
    if method == "toast":
        from vit2trt.models.pruned_reference import apply_decisions

        return apply_decisions(model, decisions)
    if method == "tome":
        from vit2trt.models.tome_reference import ToMeViT

        return ToMeViT(model, decisions["tome"]["r"]).eval()
    if method == "asvit":
        from vit2trt.models.asvit_reference import ASViT

        return ASViT(model, decisions["settings"]["stages"], decisions["settings"]["thresholds"]).eval()
    if method == "cait":
        from vit2trt.models.cait_reference import CAITViT

        atme = decisions["atme"]
        return CAITViT(model, atme["stages"], atme["axes"], {"blocks": decisions.get("blocks", [])}).eval()
    raise Vit2TrtError(f"decisions.json names an unknown method '{method}'.")
