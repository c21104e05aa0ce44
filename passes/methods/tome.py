"""ToMe: merge r tokens after every block's attention, training-free."""
from __future__ import annotations

from dataclasses import dataclass

from . import register
from .base import Method, Run, option


@dataclass
class ToMeOptions:
    r: int = option(13, "--r", "ToMe: tokens merged after each block's attention (clipped to half the tokens).")


@register
class ToMe(Method):
    name, title, order, reduces_tokens = "tome", "ToMe (tokens: merging)", 40, True
    Options = ToMeOptions

    def check(self, o: ToMeOptions, run: Run) -> None:
        from ..tome import tome_schedule

        run.token_schedule = tome_schedule(run.vit, o.r).tokens   # refuses bad r and token layouts early

    def apply(self, o: ToMeOptions, run: Run) -> dict:
        from ..tome import apply_tome

        run.progress(f"merging {o.r} tokens per block (ToMe)")
        vit = run.vit
        result = apply_tome(run.model, vit, o.r)
        run.apply(result, "graph with ToMe")
        run.notes.append(f"ToMe merges {sum(result.report['r'])} of {vit.num_tokens} tokens over {vit.depth} blocks "
                         f"({result.report['tokens'][-1]} leave the last block); training-free, as the paper.")
        return {"settings": {"r": o.r}, "tome": result.report}

    plan_key, plan_integer = "r", True

    def plan_levels(self, vit, has_record: bool, healing: bool = False) -> list[dict]:
        return [{"r": r} for r in (4, 8, 12, 16, 20)]

    def plan_label(self, level: dict) -> str:
        return f"r={level['r']}"

    def reference(self, model, part: dict):
        from ...models.tome_reference import ToMeViT

        return ToMeViT(model, part["tome"]["r"]).eval()
