"""AS-ViT: adaptive token pruning by class attention, thresholds given or calibrated for a FLOPs budget."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ...errors import Vit2TrtError
from . import register
from .base import Method, Run, option
from .parsing import index_list, thresholds_value
from .toast import TARGET_FLOPS_HELP

STAGES_HELP = ("AS-ViT: blocks before which tokens are dropped (default 4,7,10 for 12 blocks). CAIT: blocks before "
               "which neighbouring tokens merge (default 4,8).")
DEFAULT_TARGET = 0.65


@dataclass
class ASViTOptions:
    thresholds: Optional[list[float]] = option(
        None, "--thresholds", "AS-ViT: θ per stage, comma-separated or a JSON file ({\"thresholds\": [...]}, "
        "optional \"stages\"). Default: calibrated.", str, thresholds_value)
    stages: Optional[list[int]] = option(None, "--stages", STAGES_HELP, str, index_list("--stages", "4,7,10"))
    target_flops: Optional[float] = option(None, "--target-flops", TARGET_FLOPS_HELP, float)
    form: str = option(
        "packed", "--asvit-form", "AS-ViT graph: packed (the sequence shrinks; at batch > 1 the linear layers run on "
        "all images' kept tokens packed together), dynamic (the sequence shrinks to the batch's largest count) or "
        "bounded (masking only, no data-dependent shapes).")


def asvit_flops_model(vit) -> tuple[list[tuple], int]:
    """Per block (projections, attention matmuls, FFN) at full length, and the length-free rest."""
    block_flops = [(b.flops.attn_proj, b.flops.attn_matmul, b.flops.ffn) for b in vit.blocks]
    return block_flops, vit.flops.patch_embed + vit.flops.head + vit.flops.other


def asvit_inputs(vit, record: Optional[dict], calib, calib_limit: Optional[int], seed: int, model=None):
    """The PyTorch reference to calibrate on (the original's, unless `model` is given) and the
    calibration inputs (`calib`: a folder, an .npy file or an array): (model, images [N,C,H,W], description).
    `record`: the original's reference record (JSON), which `vit2trt export` writes beside the model."""
    import torch

    from ...models.reference import RECORD_SUFFIX, ReferenceRecord, build_model

    if record is None:
        raise Vit2TrtError(f"AS-ViT thresholds are calibrated on the PyTorch reference (MODEL.onnx{RECORD_SUFFIX}, "
                           "written by vit2trt export), which is missing; pass --thresholds instead.")
    record = ReferenceRecord(**record)
    if calib is not None:
        from ...converter.measure.calibration import load_calibration

        images = load_calibration(calib, (vit.in_chans, *vit.img_size), record.preprocessing, calib_limit)
        described = f"{len(images)} calibration inputs"
    else:
        images = np.random.default_rng(seed).standard_normal((16, vit.in_chans, *vit.img_size)).astype(np.float32)
        described = "16 seeded random images (pass --calib with real images for real thresholds)"
    return (model if model is not None else build_model(record)), torch.from_numpy(images), described


@register
class ASViT(Method):
    name, title, order, reduces_tokens = "asvit", "AS-ViT (tokens: adaptive pruning)", 30, True
    Options = ASViTOptions

    plan_key = "target_flops"

    def plan_levels(self, vit, has_record: bool, healing: bool = False) -> list[dict]:
        # Calibrates on the PyTorch reference and scores tokens by class attention.
        if not has_record or not any(t.kind == "class" for t in vit.extra_tokens) or vit.pooling != "token":
            return []
        return [{"target_flops": f} for f in (0.85, 0.7, 0.55, 0.45)]

    def plan_label(self, level: dict) -> str:
        return f"{level['target_flops']:g} FLOPs (mean)"

    def check(self, o: ASViTOptions, run: Run) -> None:
        from ..asvit import check_settings, default_stages

        if isinstance(o.thresholds, dict):   # a thresholds file that also names its stages
            o.stages = o.stages or o.thresholds["stages"]
            o.thresholds = o.thresholds["thresholds"]
        o.stages = o.stages or default_stages(run.vit.depth)
        check_settings(run.vit, o.stages, o.thresholds or [0.0] * len(o.stages), o.form)
        if o.target_flops is not None and not 0.0 < o.target_flops <= 1.0:
            raise Vit2TrtError(f"--target-flops is a fraction of the original model's FLOPs in (0, 1], "
                               f"got {o.target_flops}.")

    def apply(self, o: ASViTOptions, run: Run) -> dict:
        from ...models.asvit_reference import calibrate_thresholds
        from ..asvit import apply_asvit

        calibration = None
        thresholds = o.thresholds
        if thresholds is None:
            target = DEFAULT_TARGET if o.target_flops is None else o.target_flops
            reference = run.structured_reference() if run.keeps else None
            model, images, described = asvit_inputs(run.vit, run.reference_record, run.calib, run.calib_limit,
                                                    run.seed,
                                                    reference)
            run.progress(f"calibrating AS-ViT thresholds on {len(images)} inputs")
            block_flops, fixed = asvit_flops_model(run.vit)
            # The budget is a fraction of the original's FLOPs: of the graph in hand, that is more.
            relative = target * run.original_vit.flops.total / run.vit.flops.total
            if relative >= 1.0:
                raise Vit2TrtError(f"--target-flops {target:g} is already met before AS-ViT drops a token "
                                   f"({run.vit.flops.total / run.original_vit.flops.total:.3f} of the FLOPs); "
                                   "lower it.")
            thresholds, fraction = calibrate_thresholds(
                model, images, o.stages, block_flops, fixed, relative,
                progress=lambda step, total: run.progress(f"calibrating AS-ViT thresholds on {len(images)} inputs: "
                                                          f"step {step}/{total}"))
            fraction *= run.vit.flops.total / run.original_vit.flops.total
            calibration = {"inputs": described, "flops_fraction": fraction}
            if fraction > target + 1e-6:
                raise Vit2TrtError(f"--target-flops {target:g} cannot be met by dropping tokens at stages "
                                   f"{o.stages}: even dropping every patch token there leaves {fraction:.3f} of the "
                                   "FLOPs. Raise the target or prune at earlier stages (--stages).")
            run.notes.append(f"AS-ViT thresholds {[round(t, 5) for t in thresholds]} calibrated without training on "
                             f"{described} for {target:g} of the FLOPs (reached {fraction:.3f} on average); the "
                             "paper learns them with 30 epochs of budget-aware fine-tuning.")
            o.target_flops = target
        run.progress("inserting AS-ViT token pruning")
        result = apply_asvit(run.model, run.vit, o.stages, thresholds, o.form)
        run.apply(result, "graph with AS-ViT")
        run.notes.append("AS-ViT keeps as many tokens as each image needs: the FLOPs above are for the reader's seeded "
                         "probe image; report.json's calibration gives the mean over the calibration inputs.")
        return {"settings": {"stages": o.stages, "thresholds": thresholds, "form": o.form,
                             "target_flops": o.target_flops},
                "asvit": dict(result.report, calibration=calibration)}

    def reference(self, model, part: dict):
        from ...models.asvit_reference import ASViT as ASViTReference

        return ASViTReference(model, part["settings"]["stages"], part["settings"]["thresholds"]).eval()
