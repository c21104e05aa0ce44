"""`vit2trt tune-thresholds`: AS-ViT thresholds learned for a FLOPs budget, backbone frozen, on CPU.

Starts from the training-free calibrated thresholds, learns them by distillation from the full
model under the budget (models/asvit_tuning.py), and writes a JSON file that
`vit2trt convert --method asvit --thresholds FILE` reads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from .files import write_atomically
from .graph import read_vit
from ..errors import Vit2TrtError
from ..passes.methods.asvit import asvit_flops_model, asvit_inputs


def tune_asvit_thresholds(model_path: str | os.PathLike, out_path: str | os.PathLike, calib: Optional[str],
                          target_flops: float = 0.65, stages: Optional[list[int]] = None, epochs: int = 30,
                          seed: int = 0, calib_limit: Optional[int] = None, overwrite: bool = False,
                          progress: Callable[[str], None] = lambda message: None) -> dict:
    from ..models.asvit_reference import calibrate_thresholds
    from ..models.asvit_tuning import tune_thresholds
    from ..models.reference import ReferenceRecord, read_record
    from ..passes.asvit import check_settings, default_stages

    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise Vit2TrtError(f"{out_path} exists; pass --overwrite to replace it.")
    if not 0.0 < target_flops < 1.0:
        raise Vit2TrtError(f"--target-flops is a fraction of the full model's FLOPs in (0, 1), got {target_flops}.")
    if epochs < 1:
        raise Vit2TrtError(f"--epochs must be at least 1, got {epochs}.")
    vit = read_vit(model_path)
    stages = stages or default_stages(vit.depth)
    # Checked as the bounded form, which every graph allows: the thresholds serve every form, and convert checks
    # the form it writes (a masked graph's message there names convert's --asvit-form, which this command has not).
    check_settings(vit, stages, [0.0] * len(stages), "bounded")
    record = read_record(model_path)
    if record is None:   # asvit_inputs' message suggests convert's --thresholds instead, which this command has not
        raise Vit2TrtError(f"tune-thresholds learns from the PyTorch reference of {model_path}, the record "
                           f"{ReferenceRecord.path_for(model_path).name} that `vit2trt export` writes beside the "
                           "model; it is missing: export the model with `vit2trt export`.")
    model, images, described = asvit_inputs(vit, record, calib, calib_limit, seed)
    block_flops, fixed = asvit_flops_model(vit)
    progress(f"calibrating starting thresholds on {described}")
    start, fraction = calibrate_thresholds(model, images, stages, block_flops, fixed, target_flops)
    if fraction > target_flops + 1e-6:
        raise Vit2TrtError(f"--target-flops {target_flops:g} cannot be met by dropping tokens at stages {stages} "
                           f"(reached {fraction:.3f}); raise the target or prune at earlier stages.")
    if any(t <= 0 for t in start):
        raise Vit2TrtError(f"calibration for --target-flops {target_flops:g} already drops every patch token before "
                           f"some of stages {stages} (thresholds {start}), which leaves those stages nothing to "
                           "learn; raise the target or use fewer stages.")
    try:
        result = tune_thresholds(
            model, images, stages, start, block_flops, fixed, target_flops, epochs=epochs, seed=seed,
            progress=lambda epoch, total, loss: progress(f"tuning thresholds: epoch {epoch}/{total}, "
                                                         f"loss {loss:.4f}"))
    except ValueError as exc:
        raise Vit2TrtError(f"tuning could not meet --target-flops {target_flops:g}: {exc}.") from None
    record = {"thresholds": result.thresholds, "stages": result.stages, "target_flops": target_flops,
              "model": str(model_path), "inputs": described, "epochs": epochs, "seed": seed,
              "how": "AS-ViT thresholds learned alone (backbone frozen) by distillation under a FLOPs budget; "
                     "vit2trt tune-thresholds"}
    record.update({k: v for k, v in result.to_dict().items() if k not in record})
    write_atomically(out_path, json.dumps(record, indent=2).encode())
    return record
