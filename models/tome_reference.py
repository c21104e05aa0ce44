"""PyTorch reference of ToMe token merging on a timm or HF ViT, as vit2trt's graph computes it.

Written from the algorithm (bipartite soft matching on head-averaged keys, size-weighted merge,
proportional attention) with the same decision rules as the ONNX pass (docs/methods/tome.md,
"Decisions that rounding cannot flip"), so that the two select and merge exactly the same tokens:

- similarities are cos − 1 computed on keys centred on their mean, which keeps the rounding error
  of near-parallel keys about ten times below that of a plain dot product near 1;
- a score within TIE_TOLERANCE of the best counts as tied, and ties go to the lower index: the
  best partner is the lowest-indexed B token within the tolerance of the row's best, and at the
  r-th place the A tokens within the tolerance of its score are taken in index order.

Rounding still decides where two scores lie within float32 noise (about 1e-8) of the tolerance's
edge, as it decides any discrete choice on floats. To check a graph's surgery regardless, ToMeViT can
`follow` the graph's decisions where its own scores put them within NEAR_TIE of its own choice
(adopt_near_ties), and counts how often it did.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .vit_parts import attention_parts, vit_parts
from ..passes.tome import PROTECT, TIE_TOLERANCE

# A graph's decision within this of the reference's own is rounding, not a different choice: ten times the
# tie tolerance, and far below the gaps that decide real photos (about 1e-3).
NEAR_TIE = 10 * TIE_TOLERANCE


def best_partners(metric: torch.Tensor, protect_cls: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the A (even) and B (odd) tokens of metric [B, n, d]: each A token's best similarity
    (cos − 1) [B, na] and partner [B, na], the lowest B index within the tolerance of the best; and the
    similarities [B, na, nb]. cos − 1 = c_a·c_b − ½|c_a|² − ½|c_b|² on unit metrics centred on their mean;
    the row term ½|c_a|² is subtracted after the row's max, as the graph does."""
    unit = metric / metric.pow(2).sum(-1, keepdim=True).sqrt()
    centred = unit - unit.mean(1, keepdim=True)
    a, b = centred[:, 0::2], centred[:, 1::2].transpose(1, 2)
    row_scores = a @ b - 0.5 * b.pow(2).sum(1, keepdim=True)                  # [B, na, nb]
    row_best = row_scores.max(-1, keepdim=True).values
    nb = row_scores.shape[-1]
    rank = nb - torch.arange(nb, device=metric.device)          # distinct, lower index higher
    tied = torch.where(row_scores < row_best - TIE_TOLERANCE, torch.zeros_like(rank), rank)
    a_half_sq = 0.5 * a.pow(2).sum(2, keepdim=True)
    best = row_best - a_half_sq
    if protect_cls:   # the class token (first of A) never merges
        guard = torch.zeros(best.shape[1], 1, dtype=best.dtype, device=best.device)
        guard[0, 0] = PROTECT
        best = best + guard
    return best[..., 0], tied.argmax(-1), row_scores - a_half_sq


def split_edges(node_max: torch.Tensor, node_idx: torch.Tensor, r: int):
    """(src, dst, unm) A/B indices: the r A tokens with the best scores merge (those tied at the r-th
    score in index order) into their partners; the others stay, in their original order."""
    na = node_max.shape[1]
    from_kth = node_max - node_max.topk(r, dim=-1).values[:, -1:]
    tier = 1 + (from_kth > TIE_TOLERANCE).long() - (from_kth < -TIE_TOLERANCE).long()
    key = tier * (na + 1) + (na - torch.arange(na, device=node_max.device))   # distinct integers
    edges = key.topk(na, dim=-1).indices
    src_idx, unm_idx = edges[:, :r], edges[:, r:].sort(dim=-1).values
    return src_idx, node_idx.gather(1, src_idx), unm_idx


def match(metric: torch.Tensor, r: int, protect_cls: bool):
    """ToMe's bipartite matching of the tokens' metrics [B, n, d]: (src, dst, unm) indices."""
    best, partner, _ = best_partners(metric, protect_cls)
    return split_edges(best, partner, r)


def graph_decisions(partner, edges, r: int):
    """(src, dst, unm) from a graph's partner and edge-order outputs ([B, na] or [B, na, 1])."""
    partner = torch.as_tensor(partner).reshape(len(partner), -1)
    edges = torch.as_tensor(edges).reshape(len(edges), -1)
    src = edges[:, :r]
    return src, partner.gather(1, src), edges[:, r:].sort(dim=-1).values


def adopt_near_ties(best: torch.Tensor, scores: torch.Tensor, own: tuple, graph: tuple,
                    r: int) -> tuple[tuple, int]:
    """Per image, the graph's (src, dst, unm) where they differ from `own` only by choices that the best
    similarities [B, na] and similarities [B, na, nb] put within NEAR_TIE of the best; otherwise `own`.
    Returns the decisions and how many images took the graph's."""
    kth = best.topk(r, dim=-1).values[:, -1:]
    g_src, g_dst, g_unm = graph
    merged_ok = (best.gather(1, g_src) >= kth - NEAR_TIE).all(1)
    kept_ok = (best.gather(1, g_unm) <= kth + NEAR_TIE).all(1)
    row_best = scores.max(-1).values.gather(1, g_src)
    partner_scores = scores.gather(1, g_src[..., None].expand(-1, -1, scores.shape[-1])).gather(2, g_dst[..., None])
    partner_ok = (partner_scores[..., 0] >= row_best - NEAR_TIE).all(1)
    differs = torch.tensor([_pairs(*(t[i] for t in own)) != _pairs(*(t[i] for t in graph)) for i in range(len(kth))])
    adopt = differs & merged_ok & kept_ok & partner_ok
    chosen = tuple(torch.where(adopt[:, None], g, o) for g, o in zip(graph, own))
    return chosen, int(adopt.sum())


def _pairs(src, dst, unm):
    return sorted(zip(src.tolist(), dst.tolist())), unm.tolist()


def merge_matched(x: torch.Tensor, size: torch.Tensor, src_idx, dst_idx, unm_idx):
    """Size-weighted merge of the sources into their destinations: (x, size) with n − r tokens."""
    y = torch.cat([x * size, size], dim=2)
    y_a, y_b = y[:, 0::2], y[:, 1::2]
    width = y.shape[2]
    unmerged = y_a.gather(1, unm_idx[..., None].expand(-1, -1, width))
    sources = y_a.gather(1, src_idx[..., None].expand(-1, -1, width))
    onehot = (dst_idx[..., None] == torch.arange(y_b.shape[1], device=y.device)).to(y.dtype)   # [B, r, nb]
    y = torch.cat([unmerged, y_b + onehot.transpose(1, 2) @ sources], dim=1)
    return y[..., :-1] / y[..., -1:], y[..., -1:]


def _merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, protect_cls: bool):
    """Match and merge r of x's tokens ([B, n, C]; sizes [B, n, 1]; metric [B, n, d])."""
    return merge_matched(x, size, *match(metric, r, protect_cls))


class ToMeViT(nn.Module):
    """A timm or Hugging Face ViT with ToMe merging r[i] tokens after block i's attention."""

    def __init__(self, model: nn.Module, r: list[int], merge=None):
        super().__init__()
        self.model, self.r = model.eval(), r
        self.parts = vit_parts(model)
        self.merge = merge or _merge   # plugins/tome_triton.tome_merge runs the fused kernels instead
        self.decisions: list[tuple] = []   # (src, dst, unm) of every merging block in the last forward
        # Set to a graph's (partner, edge order) per merging block to follow its near-tie choices (validate);
        # `near_ties` counts the (image, block) merges that did.
        self.follow: Optional[list[tuple]] = None
        self.near_ties = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.parts
        x = p.embed(images)
        size = None
        self.decisions = []
        for block, r in zip(p.blocks, self.r):
            out, metric, _, _ = attention_parts(block, block.norm1(x), size)
            x = x + block.ls1(out)
            if r:
                if size is None:
                    size = torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype, device=x.device)
                if self.merge is _merge:
                    best, partner, scores = best_partners(metric, p.has_class_token)
                    matched = split_edges(best, partner, r)
                    if self.follow is not None:
                        graph = graph_decisions(*self.follow[len(self.decisions)], r)
                        matched, adopted = adopt_near_ties(best, scores, matched, graph, r)
                        self.near_ties += adopted
                    self.decisions.append(matched)
                    x, size = merge_matched(x, size, *matched)
                else:
                    x, size = self.merge(x, size, metric, r, p.has_class_token)
            x = x + block.ls2(block.mlp(block.norm2(x)))
        return p.head(x)
