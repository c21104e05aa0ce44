"""PyTorch reference of AS-ViT adaptive token pruning on a timm or HF ViT: each image alone, its
dropped tokens physically removed (the semantics both ONNX forms must reproduce)."""
from __future__ import annotations

import torch
from torch import nn

from .vit_parts import attention_parts, vit_parts


def token_scores(probs: torch.Tensor, per_head: torch.Tensor) -> torch.Tensor:
    """s_j = Σ_h R_h,j · A_h[cls, j] with R_h,j = ‖(A_h V_h)_j‖ / Σ_h' ‖(A_h' V_h')_j‖."""
    norms = per_head.pow(2).sum(-1).sqrt()                      # [B, H, N]
    share = norms / norms.sum(1, keepdim=True)
    return (share * probs[:, :, 0, :]).sum(1)                   # [B, N]


class ASViT(nn.Module):
    def __init__(self, model: nn.Module, stages: list[int], thresholds: list[float]):
        super().__init__()
        self.model = model.eval()
        self.parts = vit_parts(model)
        self.theta = {s - 1: t for s, t in zip(stages, thresholds)}
        self.protected = self.parts.num_prefix_tokens
        self.kept: list[list[int]] = []   # per image, tokens entering each block (for inspection)
        self.scores: list[list[torch.Tensor]] = []   # per image, the token scores at each stage

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.kept, self.scores = [], []
        return torch.cat([self._one(images[i:i + 1]) for i in range(images.shape[0])])

    def _one(self, image: torch.Tensor) -> torch.Tensor:
        p = self.parts
        x = p.embed(image)
        counts, stage_scores = [], []
        for index, block in enumerate(p.blocks):
            counts.append(x.shape[1])
            out, _, probs, per_head = attention_parts(block, block.norm1(x))
            x = x + block.ls1(out)
            x = x + block.ls2(block.mlp(block.norm2(x)))
            if index in self.theta:
                scores = token_scores(probs, per_head)[0]
                stage_scores.append(scores)
                keep = scores > self.theta[index]
                keep[: self.protected] = True
                x = x[:, keep]
        self.kept.append(counts)
        self.scores.append(stage_scores)
        return p.head(x)


def calibrate_thresholds(model: nn.Module, images: torch.Tensor, stages: list[int], block_flops: list[tuple],
                         fixed_flops: int, target_fraction: float, steps: int = 12,
                         progress=lambda step, total: None) -> tuple[list[float], float]:
    """Thresholds that keep the same fraction ρ of the tokens entering every stage, with ρ found by
    bisection so that the mean FLOPs over `images` meet `target_fraction` of the full model.

    block_flops[i] = (projection, attention matmul, FFN) multiply-accumulates of block i at full length.
    Returns (thresholds, achieved fraction)."""
    parts = vit_parts(model.eval())
    full_tokens = None

    def run(rho: float):
        nonlocal full_tokens
        with torch.no_grad():
            xs = [parts.embed(images[i:i + 1]) for i in range(images.shape[0])]
        full_tokens = xs[0].shape[1]
        protected = parts.num_prefix_tokens
        counts = [[] for _ in xs]
        thresholds = []
        for index, block in enumerate(parts.blocks):
            pending = []
            with torch.no_grad():
                for i, x in enumerate(xs):
                    counts[i].append(x.shape[1])
                    out, _, probs, per_head = attention_parts(block, block.norm1(x))
                    x = x + block.ls1(out)
                    xs[i] = x + block.ls2(block.mlp(block.norm2(x)))
                    pending.append(token_scores(probs, per_head)[0])
            if index + 1 in stages:
                pool = torch.cat([s[protected:] for s in pending])
                # An empty pool: every patch token is already gone, nothing is left to drop.
                theta = float(torch.quantile(pool, 1.0 - rho)) if rho < 1.0 and pool.numel() else 0.0
                thresholds.append(max(theta, 0.0))
                for i, s in enumerate(pending):
                    keep = s > thresholds[-1]
                    keep[:protected] = True
                    xs[i] = xs[i][:, keep]
        flops = []
        for per_image in counts:
            total = fixed_flops
            for n, (proj, mm, ffn) in zip(per_image, block_flops):
                ratio = n / full_tokens
                total += proj * ratio + mm * ratio * ratio + ffn * ratio
            flops.append(total)
        full = fixed_flops + sum(sum(f) for f in block_flops)
        return thresholds, float(sum(flops) / len(flops) / full)

    lo, hi = 0.0, 1.0
    best = run(1.0)
    if best[1] <= target_fraction:
        return best
    for step in range(steps):
        progress(step + 1, steps)
        mid = (lo + hi) / 2
        thresholds, fraction = run(mid)
        if fraction <= target_fraction:
            lo, best = mid, (thresholds, fraction)
        else:
            hi = mid
    if best[1] > target_fraction:
        best = run(lo)
    return best
