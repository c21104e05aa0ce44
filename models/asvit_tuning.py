"""Budget-aware tuning of AS-ViT's thresholds alone, on the PyTorch reference (`vit2trt tune-thresholds`).

The paper learns the thresholds together with the backbone in 30 epochs of budget-aware
fine-tuning. Here the backbone stays frozen and only the thresholds learn, so the tuned model is
still the user's model and the result is a thresholds file that `convert --thresholds` reads.

Relaxation (our choice; the hard rule is s_j > θ):
- keep_j = σ((s_j − θ_stage) / τ_stage), times the keep of the previous stage (dropped tokens never
  return); extra tokens (class, distillation, registers) keep 1.
- A partly kept token enters later attention with log(keep_j) added to its key column: at keep = 0
  that is the hard form's masking, at keep = 1 nothing changes. Pooling reads the class token.
- Expected FLOPs per image follow from the expected counts Σ_j keep_j with the same per-block
  cost model as calibration (projections and FFN linear in the count, attention quadratic).
- Loss = KL(full model ‖ pruned model) + λ · (mean FLOPs fraction − target)². Distillation from the
  frozen model needs no labels.
- θ_stage = θ⁰_stage · exp(u_stage), u learned with Adam from 0: thresholds stay positive and all
  stages learn at the same relative rate. θ⁰ are the training-free calibrated thresholds and
  τ_stage = TAU_FRACTION · θ⁰_stage.
After training, a common factor on all thresholds is bisected until the hard (real) mean FLOPs
meet the target, so the budget holds exactly as with calibration. When the result agrees less
with the full model on the tuning images than the starting thresholds did, the start is kept
(and the result says so): a frozen backbone leaves thresholds little to gain, and tuning must
never hand back something worse than calibration.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .asvit_reference import ASViT, token_scores
from .vit_parts import attention_parts, vit_parts

TAU_FRACTION = 0.25    # sigmoid temperature as a fraction of each stage's starting threshold
BUDGET_WEIGHT = 20.0    # λ: the squared FLOPs gap is small (0.01 for a 10-point miss)
EPS = 1e-12       # keep floor: log(EPS) masks a dropped token (weight e^-27.6) without -inf


@dataclass
class TuningResult:
    stages: list[int]
    thresholds: list[float]
    start_thresholds: list[float]     # the starting thresholds, brought to the budget
    flops_fraction: float             # hard, mean over the tuning images
    start_flops_fraction: float
    agreement: float                  # top-1 agreement with the full model on the tuning images
    start_agreement: float
    losses: list[float] = field(default_factory=list)   # per epoch: distillation + budget
    kept_start: bool = False          # the tuned thresholds agreed less on the tuning images: start kept

    def to_dict(self) -> dict:
        return {"stages": self.stages, "thresholds": self.thresholds, "flops_fraction": self.flops_fraction,
                "top1_agreement": self.agreement, "losses": self.losses, "kept_start": self.kept_start,
                "start": {"thresholds": self.start_thresholds, "flops_fraction": self.start_flops_fraction,
                          "top1_agreement": self.start_agreement}}


class SoftASViT(nn.Module):
    """AS-ViT with sigmoid keep masks: differentiable in the thresholds, batched, shapes fixed."""

    def __init__(self, model: nn.Module, stages: list[int], start: list[float], block_flops: list[tuple],
                 fixed_flops: int, tau_fraction: float = TAU_FRACTION):
        super().__init__()
        self.tau_fraction = tau_fraction
        self.model = model   # registered, so that fine-tuning the backbone too sees its parameters
        self.parts = vit_parts(model.eval())
        self.stage_of = {s - 1: i for i, s in enumerate(stages)}   # scored after block s-1
        self.register_buffer("start", torch.tensor(start, dtype=torch.float32))
        self.log_scale = nn.Parameter(torch.zeros(len(stages)))
        self.block_flops = block_flops
        self.full_flops = fixed_flops + sum(sum(f) for f in block_flops)
        self.fixed_flops = fixed_flops

    def thresholds(self) -> torch.Tensor:
        return self.start * self.log_scale.exp()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, FLOPs fraction per image)."""
        p = self.parts
        x = p.embed(images)
        batch, tokens = x.shape[0], x.shape[1]
        protected = p.num_prefix_tokens
        keep = torch.ones(batch, tokens, 1)
        theta = self.thresholds()
        flops = torch.full((batch,), float(self.fixed_flops))
        for index, block in enumerate(p.blocks):
            ratio = keep.sum((1, 2)) / tokens
            proj, matmul, ffn = self.block_flops[index]
            flops = flops + proj * ratio + matmul * ratio * ratio + ffn * ratio
            out, _, probs, per_head = attention_parts(block, block.norm1(x), keep.clamp_min(EPS))
            x = x + block.ls1(out)
            x = x + block.ls2(block.mlp(block.norm2(x)))
            if index in self.stage_of:
                stage = self.stage_of[index]
                scores = token_scores(probs, per_head)                       # [B, N]
                soft = torch.sigmoid((scores - theta[stage]) / (self.tau_fraction * self.start[stage]))
                soft = torch.cat([torch.ones(batch, protected), soft[:, protected:]], dim=1)
                keep = keep * soft.unsqueeze(-1)
        return p.head(x), flops / self.full_flops


def hard_evaluation(model: nn.Module, images: torch.Tensor, stages: list[int], thresholds: list[float],
                    block_flops: list[tuple], fixed_flops: int, teacher_top1: torch.Tensor) -> tuple[float, float]:
    """(mean FLOPs fraction, top-1 agreement with the full model) of the real, per-image AS-ViT."""
    pruned = ASViT(model, stages, thresholds)
    with torch.no_grad():
        top1 = pruned(images).argmax(-1)
    full = fixed_flops + sum(sum(f) for f in block_flops)
    tokens = pruned.kept[0][0]
    fractions = []
    for counts in pruned.kept:
        total = fixed_flops
        for n, (proj, matmul, ffn) in zip(counts, block_flops):
            ratio = n / tokens
            total += proj * ratio + matmul * ratio * ratio + ffn * ratio
        fractions.append(total / full)
    return float(sum(fractions) / len(fractions)), float((top1 == teacher_top1).float().mean())


def tune_thresholds(model: nn.Module, images: torch.Tensor, stages: list[int], start: list[float],
                    block_flops: list[tuple], fixed_flops: int, target_fraction: float, epochs: int = 30,
                    batch: int = 32, lr: float = 0.05, seed: int = 0, bisection_steps: int = 12,
                    progress=lambda epoch, total, loss: None) -> TuningResult:
    """Learn the thresholds alone (backbone frozen) for `target_fraction` of the full FLOPs."""
    if any(t <= 0 for t in start):
        raise ValueError("starting thresholds must be positive")
    torch.manual_seed(seed)
    model = model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with torch.no_grad():
        teacher = torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])
    teacher_top1 = teacher.argmax(-1)
    soft = SoftASViT(model, stages, start, block_flops, fixed_flops)
    optimizer = torch.optim.Adam([soft.log_scale], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        total, seen = 0.0, 0
        for start_row in range(0, len(images), batch):
            rows = order[start_row:start_row + batch]
            logits, fraction = soft(images[rows])
            distill = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher[rows], -1), log_target=True,
                               reduction="batchmean")
            loss = distill + BUDGET_WEIGHT * (fraction.mean() - target_fraction) ** 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
            seen += len(rows)
        losses.append(total / seen)
        progress(epoch + 1, epochs, losses[-1])
    learned = [float(t) for t in soft.thresholds().detach()]
    # Both the start and the learned thresholds are brought to the budget, then compared.
    start, (start_flops, start_agreement) = _meet_budget(model, images, stages, list(start), block_flops, fixed_flops,
                                                         teacher_top1, target_fraction, bisection_steps)
    thresholds, (flops, agreement) = _meet_budget(model, images, stages, learned, block_flops, fixed_flops,
                                                  teacher_top1, target_fraction, bisection_steps)
    kept_start = agreement < start_agreement   # tuning made the real (hard) model worse: keep the start
    if kept_start:
        thresholds, flops, agreement = list(start), start_flops, start_agreement
    return TuningResult(list(stages), thresholds, list(start), flops, start_flops, agreement, start_agreement,
                        losses, kept_start)


def _meet_budget(model, images, stages, thresholds, block_flops, fixed_flops, teacher_top1, target, steps):
    """The smallest common factor on all thresholds whose hard FLOPs meet `target` (raising them when
    over budget, lowering them to the budget line when under), and its (FLOPs, agreement)."""
    def at(factor):
        scaled = [t * factor for t in thresholds]
        return scaled, hard_evaluation(model, images, stages, scaled, block_flops, fixed_flops, teacher_top1)

    within = at(1.0)
    within_factor, over_factor = 1.0, None
    if within[1][0] > target:
        within, within_factor, over_factor = None, None, 1.0
    # Bracket the budget line: double the factor while over budget, halve it while within.
    step, factor = (0.5, 1.0) if within is not None else (2.0, 1.0)
    while (within is None or over_factor is None) and 1e-4 < factor < 1e4:
        factor *= step
        candidate = at(factor)
        if candidate[1][0] <= target:
            within, within_factor = candidate, factor
        else:
            over_factor = factor
    if within is None:
        raise ValueError(f"no common factor on thresholds {thresholds} meets {target:g} of the FLOPs")
    if over_factor is None:
        return within
    for _ in range(steps):
        mid = (within_factor + over_factor) / 2
        candidate = at(mid)
        if candidate[1][0] <= target:
            within, within_factor = candidate, mid
        else:
            over_factor = mid
    return within
