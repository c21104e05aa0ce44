"""ToaSt: strip zeroed structure, prune head dims (SCWP, or a sensitivity budget), Token Channel Selection."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...errors import Vit2TrtError
from . import register
from .base import Method, Run, option
from .parsing import fraction_list

TARGET_FLOPS_HELP = ("Fraction of the original FLOPs. toast, cait: every block's QK dims, V dims and FFN channels "
                     "are chosen by measured sensitivity (needs --calib); in a composition it counts the tokens ToMe "
                     "or ATME leaves each block (AS-ViT's depend on the image and are not counted). asvit: the thresholds are calibrated to meet it on average (default 0.65).")
MULTIPLE_HELP = ("Kept head dims and FFN channels are multiples of N (8 lets TensorRT fuse attention "
                 "for head dims 16-256).")
TIE_HELP = ("With --target-flops, keep each block's Q·K and V head dims equal, so that ONNX Attention "
            "nodes stay fused for TensorRT (default: on where the graph has them; costs some accuracy).")
COMPENSATE_HELP = ("Fit what pruning removes from what it keeps, in closed form on the --calib images, "
                   "and fold it into the kept weights (default: on with --calib).")


@dataclass
class ToastOptions:
    head_sparsity: Optional[float] = option(
        None, "--head-sparsity", "ToaSt SCWP: fraction of every head's QK and V dims to remove, e.g. 0.9 (all "
        "blocks but the first).")
    target_gflops: Optional[float] = option(
        None, "--target-gflops", "Use ToaSt's published schedule for this budget (DeiT-T/S/B, MAE-B/L/H), or solve "
        "back-loaded TCS ratios for other models.")
    fc1_ratios: Optional[list[float]] = option(
        None, "--fc1", "TCS: per-block fractions of FC1 input channels to drop, comma-separated.", str,
        fraction_list("--fc1"))
    fc2_ratios: Optional[list[float]] = option(
        None, "--fc2", "TCS: per-block fractions of FC2 input channels (hidden units) to drop.", str,
        fraction_list("--fc2"))
    tcs_shared: bool = option(
        False, "--tcs-shared", "TCS: one channel set per batch, as the official code (default: per image, "
        "batch-independent).")
    target_flops: Optional[float] = option(None, "--target-flops", TARGET_FLOPS_HELP, float)
    multiple: int = option(1, "--multiple", MULTIPLE_HELP, shared=True)
    compensate: Optional[bool] = option(None, "--compensate", COMPENSATE_HELP, bool, shared=True,
                                        secondary="--no-compensate")
    tie_qk_v: Optional[bool] = option(None, "--tie-qk-v", TIE_HELP, bool, shared=True, secondary="--no-tie-qk-v")
    skip_blocks: tuple = (0,)    # SCWP leaves the first block whole, as the paper


def check_budget(name: str, target_flops: Optional[float], run: Run) -> None:
    if target_flops is None:
        return
    if not 0.0 < target_flops <= 1.0:
        raise Vit2TrtError(f"--target-flops is a fraction of the original model's FLOPs in (0, 1], got {target_flops}.")
    if not run.has_calib:
        raise Vit2TrtError(f"--target-flops for --method {name} measures each block's sensitivity on calibration "
                           "images: give --calib DIR.")


def budget_keeps(run: Run, target_flops: float, multiple: int, consistent: bool, tokens=None,
                 tie_qk_v: Optional[bool] = None):
    """Keep lists meeting `target_flops` of the original FLOPs, allocated by measured sensitivity. Where the
    graph writes attention as ONNX Attention nodes, each block's Q·K and V dims are kept equal, so that the
    rebuilt blocks stay fused (TensorRT's fused attention wants K and V of one shape)."""
    from ..sensitivity import plan_budget

    stats = run.calibration_stats()
    tokens = tokens or run.token_schedule
    tie = any(b.attn.fused_op for b in run.vit.blocks) if tie_qk_v is None else tie_qk_v
    keeps, budget = plan_budget(run.model, run.vit, stats, target_flops * run.original_vit.flops.total, multiple,
                                consistent=consistent, tokens=tokens, progress=run.progress, cache=run.cache,
                                tie_qk_v=tie)
    if tie and tie_qk_v is None:
        run.notes.append("Q·K and V head dims were kept equal in every block, so that the fused ONNX Attention "
                         "nodes stay fused (TensorRT's fused attention wants K and V of one shape); "
                         "--no-tie-qk-v allocates them apart, for a little more accuracy and unfused attention.")
    return keeps, budget, stats


@register
class Toast(Method):
    name, title, order = "toast", "ToaSt (structured: head dims, FFN channels)", 10
    Options = ToastOptions

    plan_key = "target_flops"

    def plan_levels(self, vit, has_record: bool, healing: bool = False) -> list[dict]:
        return [{"target_flops": f} for f in (0.9, 0.8, 0.7, 0.55) + ((0.45, 0.4) if healing else ())]

    def plan_label(self, level: dict) -> str:
        return f"{level['target_flops']:g} FLOPs"

    def check(self, o: ToastOptions, run: Run) -> None:
        from ..sensitivity import check_multiple

        tcs = o.fc1_ratios is not None or o.fc2_ratios is not None or o.target_gflops is not None
        if o.target_flops is not None and (o.fc1_ratios is not None or o.fc2_ratios is not None):
            raise Vit2TrtError("--target-flops prunes FFN channels statically and counts no TCS; give it without "
                               "--fc1/--fc2 (or use --target-gflops for ToaSt's schedules with TCS).")
        if o.target_flops is not None and (o.head_sparsity is not None or o.target_gflops is not None):
            raise Vit2TrtError("--target-flops chooses every block's dims itself; give it without --head-sparsity "
                               "and --target-gflops (ToaSt's published schedules).")
        if tcs and run.token_part:
            raise Vit2TrtError(f"ToaSt's Token Channel Selection (--fc1/--fc2/--target-gflops) scores channels "
                               f"from attention that {run.token_part} rebuilds; in a composition give toast "
                               "--head-sparsity or --target-flops.")
        check_budget(self.name, o.target_flops, run)
        check_multiple(run.vit, o.multiple)

    def apply(self, o: ToastOptions, run: Run) -> dict:
        from ..scwp import scwp_keep
        from ..tcs import apply_tcs, tcs_blocks
        from ..toast_plan import ToastPlan, plan_toast

        run.strip_zeroed()
        pruned_before = bool(run.keeps)
        budget = None
        if o.target_flops is not None:
            plan = ToastPlan(None, None, None)   # the budget replaces SCWP and TCS
            keeps, budget, stats = budget_keeps(run, o.target_flops, o.multiple, consistent=False,
                                                tie_qk_v=o.tie_qk_v)
            run.prune(keeps, "sensitivity budget", stats, o.compensate)
            run.notes.append(f"dims and channels allocated by measured sensitivity for {o.target_flops:g} of the "
                             f"original FLOPs on {stats.images} calibration images, without training.")
        else:
            plan = plan_toast(run.vit, o.head_sparsity, o.fc1_ratios, o.fc2_ratios, o.target_gflops,
                              run.recorded_name())
            run.notes.extend(plan.notes)
        if plan.head_sparsity:
            run.progress(f"SCWP at head sparsity {plan.head_sparsity:g}")
            keeps = scwp_keep(run.model, run.vit, plan.head_sparsity, o.skip_blocks, o.multiple)
            if keeps:
                stats = run.calibration_stats() if o.compensate is not False else None
                run.prune(keeps, "scwp", stats, o.compensate)
                run.passes[-1].update({"head_sparsity": plan.head_sparsity, "skipped_blocks": list(o.skip_blocks)})
                run.notes.append("SCWP pruned weights without fine-tuning: ToaSt fine-tunes afterwards (about 300 "
                                 "epochs for DeiT) to recover accuracy" + (
                                     ", and closed-form compensation repaired what it could" if stats else "") + ".")
        tcs_record = None
        if plan.fc1_ratios is not None:
            run.progress("inserting Token Channel Selection")
            blocks = tcs_blocks(run.vit, plan.fc1_ratios, plan.fc2_ratios)
            if blocks:
                result = apply_tcs(run.model, run.vit, blocks, shared=o.tcs_shared)
                run.apply(result, "graph with TCS")
                tcs_record = {"blocks": result.report["blocks"], "settings": result.report["settings"],
                              "fc1_ratios": plan.fc1_ratios, "fc2_ratios": plan.fc2_ratios}
        if not run.keeps and tcs_record is None and not pruned_before:
            run.notes.append("nothing was compressed: no zeroed structure was found and no --head-sparsity, "
                             "--target-flops, --target-gflops or TCS ratios were given.")
        return {"settings": {"head_sparsity": plan.head_sparsity, "skip_blocks": list(o.skip_blocks),
                             "target_gflops": o.target_gflops, "schedule": plan.schedule,
                             "tcs_shared": o.tcs_shared, "target_flops": o.target_flops, "multiple": o.multiple},
                "tcs": tcs_record, "budget": budget}
