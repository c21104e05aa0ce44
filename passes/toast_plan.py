"""What ToaSt will do to a graph: head sparsity and per-block TCS ratios, from the command line,
from a published schedule (--target-gflops on a model the paper covers), or from a budget solver."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..converter.graph.vit_graph import ViTGraph
from ..errors import Vit2TrtError
from .scwp import kept_count
from .tcs import kept_channels
from .toast_schedules import SCHEDULES

DEFAULT_HEAD_SPARSITY = 0.9
_FC2_STEPS = [0.5, 0.6, 0.7, 0.8, 0.9]
_FC1_STEPS = [0.3, 0.5]


@dataclass
class ToastPlan:
    head_sparsity: Optional[float]
    fc1_ratios: Optional[list[float]]
    fc2_ratios: Optional[list[float]]
    schedule: Optional[str] = None            # "<model>@<target>" when a published schedule is used
    predicted_gflops: Optional[float] = None
    notes: list[str] = field(default_factory=list)


def predicted_flops(vit: ViTGraph, head_sparsity: float, fc1: list[float], fc2: list[float],
                    skip_blocks: tuple[int, ...] = (0,)) -> int:
    """Multiply-accumulates after SCWP and TCS, counted the way the graph reader counts them."""
    total = vit.flops.patch_embed + vit.flops.head + vit.flops.other
    n = vit.num_tokens
    for block in vit.blocks:
        a = block.attn
        dqk, dv = a.head_dim_qk, a.head_dim_v
        if head_sparsity and block.index not in skip_blocks:
            dqk, dv = kept_count(dqk, head_sparsity), kept_count(dv, head_sparsity)
        d = block.attn.proj.out_features
        total += n * d * a.heads * (2 * dqk + dv) + n * a.heads * dv * d + a.heads * n * n * (dqk + dv)
        ffn = block.ffn
        k1 = kept_channels(ffn.fc1.in_features, fc1[block.index]) if fc1[block.index] > 0 else ffn.fc1.in_features
        k2 = kept_channels(ffn.hidden, fc2[block.index]) if fc2[block.index] > 0 else ffn.hidden
        total += n * k1 * ffn.hidden + n * k2 * ffn.fc2.out_features
    return total


def _matching_schedule(vit: ViTGraph, name: Optional[str]) -> Optional[str]:
    if name:
        bare = name.split(".")[0]
        for key in SCHEDULES:
            if key == name or key.split(".")[0] == bare and not key.endswith(".mae"):
                return key
    for key, entry in SCHEDULES.items():
        arch = entry["arch"]
        b = vit.blocks[0].attn
        if (vit.embed_dim, vit.depth, b.heads, vit.pooling) == (arch["embed_dim"], arch["depth"], arch["heads"],
                                                                arch["pooling"]) and vit.img_size == (224, 224):
            return key
    return None


def plan_toast(vit: ViTGraph, head_sparsity: Optional[float], fc1: Optional[list[float]],
               fc2: Optional[list[float]], target_gflops: Optional[float], model_name: Optional[str]) -> ToastPlan:
    if head_sparsity is not None and not 0.0 <= head_sparsity < 1.0:
        raise Vit2TrtError(f"--head-sparsity must be in [0, 1), got {head_sparsity}.")
    if (fc1 is None) != (fc2 is None):
        fc1 = fc1 if fc1 is not None else [0.0] * vit.depth
        fc2 = fc2 if fc2 is not None else [0.0] * vit.depth
    for name, ratios in (("--fc1", fc1), ("--fc2", fc2)):
        if ratios is not None:
            if len(ratios) != vit.depth:
                raise Vit2TrtError(f"{name} needs {vit.depth} comma-separated ratios (one per block), got {len(ratios)}.")
            if any(not 0.0 <= r < 1.0 for r in ratios):
                raise Vit2TrtError(f"{name} ratios must each be in [0, 1), got {ratios}.")
    if target_gflops is None:
        return ToastPlan(head_sparsity, fc1, fc2)
    if fc1 is not None:
        raise Vit2TrtError("--target-gflops picks the TCS ratios itself; give either it or --fc1/--fc2.")
    if target_gflops <= 0:
        raise Vit2TrtError(f"--target-gflops must be positive, got {target_gflops}.")
    key = _matching_schedule(vit, model_name)
    if key is not None:
        targets = SCHEDULES[key]["targets"]
        closest = min(targets, key=lambda t: abs(float(t) - target_gflops))
        match = closest if abs(float(closest) - target_gflops) <= 0.051 else None
        if match is None:
            raise Vit2TrtError(f"ToaSt publishes no {target_gflops:g} GFLOPs schedule for {key}; available: "
                               f"{', '.join(targets)} GFLOPs.")
        entry = targets[match]
        sparsity = entry["head_sparsity"] if head_sparsity is None else head_sparsity
        plan = ToastPlan(sparsity, list(entry["fc1"]), list(entry["fc2"]), schedule=f"{key}@{match}")
        plan.predicted_gflops = predicted_flops(vit, sparsity, plan.fc1_ratios, plan.fc2_ratios) / 1e9
        plan.notes.append(f"published ToaSt schedule {key} at {match} GFLOPs (official count "
                          f"{entry['computed_gflops']}, H100 speedup reported {entry['reported_speedup_h100']}x).")
        return plan
    return _solve_budget(vit, head_sparsity if head_sparsity is not None else DEFAULT_HEAD_SPARSITY, target_gflops)


def _solve_budget(vit: ViTGraph, sparsity: float, target_gflops: float) -> ToastPlan:
    """Back-loaded ratios, as the paper sets them by hand: raise FC2 drops from the last block
    backwards, then FC1 drops, until the predicted FLOPs meet the target."""
    depth = vit.depth
    fc1, fc2 = [0.0] * depth, [0.0] * depth
    target = target_gflops * 1e9

    def meets() -> bool:
        return predicted_flops(vit, sparsity, fc1, fc2) <= target

    steps = [(fc2, level, i) for level in _FC2_STEPS for i in range(depth - 1, 0, -1)] + \
            [(fc1, level, i) for level in _FC1_STEPS for i in range(depth - 1, 0, -1)]
    if not meets():
        for ratios, level, i in steps:
            ratios[i] = max(ratios[i], level)
            if meets():
                break
        else:
            floor = predicted_flops(vit, sparsity, fc1, fc2) / 1e9
            raise Vit2TrtError(f"no ToaSt setting reaches {target_gflops:g} GFLOPs on this model: the most the "
                               f"solver can cut gives {floor:.3f} GFLOPs (full: {vit.flops.total / 1e9:.3f}).")
    plan = ToastPlan(sparsity, fc1, fc2, predicted_gflops=predicted_flops(vit, sparsity, fc1, fc2) / 1e9)
    plan.notes.append(f"no published schedule for this model: the budget solver chose back-loaded TCS ratios for "
                      f"{target_gflops:g} GFLOPs (predicted {plan.predicted_gflops:.3f}).")
    return plan
