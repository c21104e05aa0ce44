"""PyTorch reference of ToMe token merging on a timm or HF ViT, as vit2trt's graph computes it.

Written from the algorithm (bipartite soft matching on head-averaged keys, size-weighted merge,
proportional attention), op for op in the order the ONNX pass uses, so that the two select and
merge exactly the same tokens.
"""
from __future__ import annotations

import torch
from torch import nn

from vit2trt.models.vit_parts import attention_parts, vit_parts
from vit2trt.passes.tome import PROTECT


def _merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, protect_cls: bool):
    n = x.shape[1]
    metric = metric / metric.pow(2).sum(-1, keepdim=True).sqrt()
    a, b = metric[:, 0::2], metric[:, 1::2]
    scores = a @ b.transpose(1, 2)
    if protect_cls:
        guard = torch.zeros(scores.shape[1], 1, dtype=scores.dtype)
        guard[0, 0] = PROTECT
        scores = scores + guard
    node_max, node_idx = scores.max(-1)
    edges = node_max.topk(node_max.shape[1], dim=-1).indices
    src_idx, unm_idx = edges[:, :r], edges[:, r:]
    if protect_cls:
        unm_idx = unm_idx.sort(dim=-1).values
    dst_idx = node_idx.gather(1, src_idx)
    y = torch.cat([x * size, size], dim=2)
    y_a, y_b = y[:, 0::2], y[:, 1::2]
    width = y.shape[2]
    unmerged = y_a.gather(1, unm_idx[..., None].expand(-1, -1, width))
    sources = y_a.gather(1, src_idx[..., None].expand(-1, -1, width))
    onehot = (dst_idx[..., None] == torch.arange(y_b.shape[1])).to(y.dtype)          # [B, r, nb]
    y = torch.cat([unmerged, y_b + onehot.transpose(1, 2) @ sources], dim=1)
    assert y.shape[1] == n - r
    return y[..., :-1] / y[..., -1:], y[..., -1:]


class ToMeViT(nn.Module):
    """A timm or Hugging Face ViT with ToMe merging r[i] tokens after block i's attention."""

    def __init__(self, model: nn.Module, r: list[int], merge=None):
        super().__init__()
        self.model, self.r = model.eval(), r
        self.parts = vit_parts(model)
        self.merge = merge or _merge   # plugins/tome_triton.tome_merge runs the fused kernels instead

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.parts
        x = p.embed(images)
        size = None
        for block, r in zip(p.blocks, self.r):
            out, metric, _, _ = attention_parts(block, block.norm1(x), size)
            x = x + block.ls1(out)
            if r:
                if size is None:
                    size = torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype)
                x, size = self.merge(x, size, metric, r, p.has_class_token)
            x = x + block.ls2(block.mlp(block.norm2(x)))
        return p.head(x)
