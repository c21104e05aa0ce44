"""PyTorch reference of vit2trt's CAIT on a timm or HF ViT: consistent channel pruning (from
decisions.json, through models/pruned_reference.py) and asymmetric merging of neighbouring tokens.

Written from the algorithm as docs/methods/cait.md states it, independent of the ONNX surgery:
token pairs are formed on the grid with tensor indexing, not with the graph's reshapes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .pruned_reference import apply_decisions
from .vit_parts import attention_parts, vit_parts
from ..passes.atme import EPS


def merge_neighbours(x: torch.Tensor, importance: torch.Tensor, sizes: torch.Tensor, extra: int,
                     grid: tuple[int, int], axis: str):
    """Merge patch-token pairs along `axis` of the grid: (x, sizes, grid) after the merge."""
    h, w = grid
    b, _, c = x.shape
    cells = x[:, extra:].reshape(b, h, w, c)
    weight = importance[:, extra:].reshape(b, h, w)
    size = sizes[extra:].reshape(h, w)
    if axis == "height":   # pair rows: the same as pairing columns of the transposed grid
        cells, weight, size = cells.transpose(1, 2), weight.transpose(1, 2), size.t()
    out_cells, out_sizes = [], []
    width = cells.shape[2]
    for j in range(0, width, 2):
        if j + 1 < width:
            wa, wb = weight[:, :, j] + EPS, weight[:, :, j + 1] + EPS
            total = wa + wb
            out_cells.append((wa / total)[..., None] * cells[:, :, j] + (wb / total)[..., None] * cells[:, :, j + 1])
            out_sizes.append(size[:, j] + size[:, j + 1])
        else:
            out_cells.append(cells[:, :, j])
            out_sizes.append(size[:, j])
    merged, merged_size = torch.stack(out_cells, dim=2), torch.stack(out_sizes, dim=1)
    if axis == "height":
        merged, merged_size = merged.transpose(1, 2), merged_size.t()
    new_grid = tuple(merged.shape[1:3])
    tokens = torch.cat([x[:, :extra], merged.reshape(b, -1, c)], dim=1)
    return tokens, torch.cat([sizes[:extra], merged_size.reshape(-1)]), new_grid


class CAITViT(nn.Module):
    """A timm or HF ViT with CAIT: pruned attention channels (`decisions`) and ATME before `stages`."""

    def __init__(self, model: nn.Module, stages: list[int], axes: list[str], decisions: Optional[dict] = None,
                 weights: Optional[dict] = None):
        super().__init__()
        self.model = apply_decisions(model, decisions, weights) if decisions else model.eval()
        self.stages, self.axes = dict(zip(stages, axes)), axes
        self.parts = vit_parts(self.model)
        self.restored: Optional[torch.Tensor] = None   # final normed tokens on the full grid, after forward

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.parts
        x = p.embed(images)
        extra = p.num_prefix_tokens
        side = int(round((x.shape[1] - extra) ** 0.5))
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None) or (side, side)
        sizes = torch.ones(x.shape[1], dtype=x.dtype)
        owner = torch.arange(x.shape[1])
        merged = False
        for index, block in enumerate(p.blocks):
            size = sizes.reshape(1, -1, 1) if merged else None
            out, _, probs, _ = attention_parts(block, block.norm1(x), size)
            x = x + block.ls1(out)
            x = x + block.ls2(block.mlp(block.norm2(x)))
            if index + 1 in self.stages:
                if p.has_class_token:
                    importance = probs[:, :, 0, :].mean(1)
                else:
                    importance = probs.mean(dim=(1, 2))
                n_before = x.shape[1]
                x, new_sizes, new_grid = merge_neighbours(x, importance, sizes, extra, grid, self.stages[index + 1])
                # Follow where every token went: merge one-hot token ids the same way.
                ones = torch.ones(1, n_before, dtype=x.dtype)
                ids, _, _ = merge_neighbours(torch.eye(n_before, dtype=x.dtype)[None], ones, sizes, extra, grid,
                                             self.stages[index + 1])
                owner = ids[0].argmax(0)[owner]
                sizes, grid, merged = new_sizes, new_grid, True
        self.restored = p.final_norm(x)[:, owner]
        return p.head(x)
