"""CAIT: consistent attention-channel pruning (CDCP or a sensitivity budget) and ATME token merging."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...errors import Vit2TrtError
from . import register
from .asvit import STAGES_HELP
from .base import Method, Run, option
from .parsing import index_list
from .toast import (COMPENSATE_HELP, MULTIPLE_HELP, TARGET_FLOPS_HELP, TIE_HELP, budget_keeps,
                                          check_budget)

DEFAULT_RATIO = 0.25


@dataclass
class CAITOptions:
    stages: Optional[list[int]] = option(None, "--stages", STAGES_HELP, str, index_list("--stages", "4,8"))
    channel_ratio: Optional[float] = option(
        None, "--channel-ratio", "CAIT: fraction of every head's attention channels to remove, the same channels in "
        "every head (default 0.25).")
    restore_grid: bool = option(
        False, "--restore-grid", "CAIT: add an output with the final tokens copied back onto the full token grid, "
        "for dense heads.")
    target_flops: Optional[float] = option(None, "--target-flops", TARGET_FLOPS_HELP, float)
    multiple: int = option(1, "--multiple", MULTIPLE_HELP, shared=True)
    compensate: Optional[bool] = option(None, "--compensate", COMPENSATE_HELP, bool, shared=True,
                                        secondary="--no-compensate")
    tie_qk_v: Optional[bool] = option(None, "--tie-qk-v", TIE_HELP, bool, shared=True, secondary="--no-tie-qk-v")


@register
class CAIT(Method):
    name, title, order = "cait", "CAIT (structured channels + ATME token merging)", 20
    Options = CAITOptions

    plan_key = "target_flops"

    def plan_levels(self, vit, has_record: bool, healing: bool = False) -> list[dict]:
        # ATME before blocks depth/2 and 5/6 of the depth: on the real ViT-Ti, 6 and 10 kept 2 pt
        # more top-1 than the default 4 and 8 at the same FLOPs.
        depth = vit.depth
        late = sorted({max(1, depth // 2), max(1, min(depth - 1, round(depth * 5 / 6)))})
        budgets = (0.8, 0.67, 0.55, 0.45) + ((0.4, 0.33) if healing else ())
        return [{"target_flops": f, "stages": late} for f in budgets]

    def plan_label(self, level: dict) -> str:
        return f"{level['target_flops']:g} FLOPs, ATME {level['stages']}"

    def merges(self, run: Run) -> bool:
        """ATME runs unless another part reduces tokens (one token reducer per graph)."""
        return run.token_part in (None, self.name)

    def check(self, o: CAITOptions, run: Run) -> None:
        from ..atme import default_stages, plan_atme
        from ..sensitivity import check_multiple

        if o.target_flops is not None and o.channel_ratio is not None:
            raise Vit2TrtError("--target-flops chooses every block's channels itself; give it without --channel-ratio.")
        if not self.merges(run):
            if o.stages is not None or o.restore_grid:
                raise Vit2TrtError(f"in this composition {run.token_part} reduces the tokens, so CAIT contributes "
                                   "only its channel pruning: drop cait's --stages and --restore-grid.")
        else:
            o.stages = o.stages or default_stages(run.vit.depth)
            plan = plan_atme(run.vit, o.stages)   # refuse bad stages before any work
            run.token_part, run.token_schedule = self.name, plan.tokens
        check_budget(self.name, o.target_flops, run)
        check_multiple(run.vit, o.multiple)

    def apply(self, o: CAITOptions, run: Run) -> dict:
        from ..atme import apply_atme
        from ..cdcp import cdcp_keep

        ratio = DEFAULT_RATIO if o.channel_ratio is None else o.channel_ratio
        had_keeps = bool(run.keeps)
        run.strip_zeroed()
        if run.keeps and not had_keeps:
            run.notes.append("structure zeroed in the checkpoint (learned masks) was removed first.")
        budget = None
        if o.target_flops is not None:
            ratio = None
            keeps, budget, stats = budget_keeps(run, o.target_flops, o.multiple, consistent=True,
                                                tie_qk_v=o.tie_qk_v)
            run.prune(keeps, "sensitivity budget", stats, o.compensate)
            run.notes.append(f"channels allocated by measured sensitivity (the same channels in every head) for "
                             f"{o.target_flops:g} of the original FLOPs"
                             + (" with ATME" if self.merges(run) else f" with {run.token_part}")
                             + ", without training.")
        else:
            run.progress(f"CDCP: removing {ratio:g} of every head's attention channels, the same in every head")
            keeps = cdcp_keep(run.model, run.vit, ratio, multiple=o.multiple)
            stats = run.calibration_stats() if keeps and o.compensate is not False else None
            run.prune(keeps, "cdcp", stats, o.compensate)
            run.notes.append("CDCP chose channels without training (weight norms); CAIT learns them in fine-tuning, "
                             "so expect an accuracy drop until the pruned model is fine-tuned"
                             + (", which closed-form compensation reduces." if stats else "."))
        atme = None
        if self.merges(run):
            run.progress(f"ATME: merging neighbouring tokens before blocks {o.stages}")
            result = apply_atme(run.model, run.vit, o.stages, restore_grid=o.restore_grid)
            run.apply(result, "graph with ATME")
            atme = result.report
        else:
            run.notes.append(f"CAIT's ATME gives way to {run.token_part}, which reduces the tokens in this "
                             "composition; CAIT contributes its channel pruning.")
        return {"settings": {"stages": o.stages, "channel_ratio": ratio, "restore_grid": o.restore_grid,
                             "target_flops": o.target_flops, "multiple": o.multiple},
                "atme": atme, "budget": budget}

    def reference(self, model, part: dict):
        from ...models.cait_reference import CAITViT

        atme = part.get("atme")
        return CAITViT(model, atme["stages"], atme["axes"]).eval() if atme else model
