"""A uniform view of timm and Hugging Face ViTs for the token-reduction references: embedding,
blocks (norms, attention weights, layer scales, MLP) and head, so one reference serves both."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .pruned_reference import PrunedAttention
from .reference import HFLogits


@dataclass
class BlockParts:
    norm1: nn.Module
    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    proj: nn.Module
    heads: int
    scale: float
    ls1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    ls2: nn.Module


@dataclass
class ViTParts:
    embed: Callable[[torch.Tensor], torch.Tensor]
    blocks: list[BlockParts]
    head: Callable[[torch.Tensor], torch.Tensor]
    num_prefix_tokens: int
    has_class_token: bool
    final_norm: Callable[[torch.Tensor], torch.Tensor]   # applied by `head` too; alone for dense outputs


def vit_parts(model: nn.Module) -> ViTParts:
    if isinstance(model, HFLogits):
        vit = model.model.vit
        blocks = []
        for layer in vit.layers:
            attn = layer.attention
            if isinstance(attn, PrunedAttention):
                qkv, proj, heads, scale = _separate(attn.q, attn.k, attn.v), attn.proj, attn.heads, attn.scale
            else:
                qkv, proj = _separate(attn.q_proj, attn.k_proj, attn.v_proj), attn.o_proj
                heads, scale = attn.num_attention_heads, attn.scaling
            blocks.append(BlockParts(layer.layernorm_before, qkv, proj, heads, scale, nn.Identity(),
                                     layer.layernorm_after, layer.mlp, nn.Identity()))
        return ViTParts(vit.embeddings, blocks, lambda x: model.model.classifier(vit.layernorm(x)[:, 0]), 1, True,
                        vit.layernorm)
    blocks = []
    for block in model.blocks:
        attn = block.attn
        if isinstance(attn, PrunedAttention):
            qkv, heads = _separate(attn.q, attn.k, attn.v), attn.heads
        else:
            qkv, heads = _fused(attn.qkv, attn.num_heads * attn.head_dim), attn.num_heads
        blocks.append(BlockParts(block.norm1, qkv, attn.proj, heads, attn.scale, block.ls1, block.norm2,
                                 block.mlp, block.ls2))
    return ViTParts(lambda im: model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(im)))),
                    blocks, lambda x: model.forward_head(model.norm(x)), model.num_prefix_tokens,
                    model.cls_token is not None, model.norm)


def _fused(layer: nn.Linear, width: int):
    return lambda x: layer(x).split(width, dim=-1)


def _separate(q: nn.Linear, k: nn.Linear, v: nn.Linear):
    return lambda x: (q(x), k(x), v(x))


def attention_parts(block: BlockParts, x: torch.Tensor, size: Optional[torch.Tensor] = None):
    """The attention written out: (output, head-averaged keys, probs, per-head output)."""
    b, n, _ = x.shape
    heads, dim = block.heads, -1   # head widths come from the tensors (channel pruning may narrow them)
    q, k, v = block.qkv(x)
    keys = k
    q = q.reshape(b, n, heads, dim).transpose(1, 2)
    k = k.reshape(b, n, heads, dim).permute(0, 2, 3, 1)
    v = v.reshape(b, n, heads, dim).transpose(1, 2)
    scores = (q @ k) * block.scale
    if size is not None:   # [B, N, 1] or [1, N, 1]: proportional attention
        scores = scores + size.log().reshape(size.shape[0], 1, 1, n)
    probs = scores.softmax(-1)
    per_head = probs @ v
    out = per_head.transpose(1, 2).reshape(b, n, -1)
    return block.proj(out), keys.reshape(b, n, heads, dim).mean(2), probs, per_head
