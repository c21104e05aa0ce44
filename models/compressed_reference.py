"""The PyTorch reference of a compressed model, rebuilt from the original and decisions.json.

One entry point for every method, so that validation and benchmarks can run the compressed model
in PyTorch (on a GPU where TensorRT is missing) without knowing how each method is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import Vit2TrtError


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


def compressed_reference(model: nn.Module, decisions: dict, out_dir: Optional[Path] = None, *,
                         weights: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
    """`out_dir` is where decisions.json lies (compensated weights are read from there unless `weights`
    gives them). The pruned structure of every part (decisions' 'blocks', 'tcs' and compensated weights)
    is applied first, then each part wraps the model in the order it ran (a composition lists them under
    'parts')."""
    from ..passes.methods import REGISTRY

    if weights is None:
        weights = compensation_weights(decisions, out_dir)
    parts = decisions.get("parts") or [decisions]
    unknown = [p.get("method") for p in parts if p.get("method") not in REGISTRY]
    if unknown:
        raise Vit2TrtError(f"decisions.json names an unknown method '{unknown[0]}'.")
    if decisions.get("blocks") or decisions.get("tcs") or weights:
        from .pruned_reference import apply_decisions

        model = apply_decisions(model, decisions, weights)
    model = model.eval()
    for part in parts:
        model = REGISTRY[part["method"]].reference(model, part)
    return model
