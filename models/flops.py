"""Analytical multiply-accumulate counts of a plain ViT from its configuration.

The convention of the ViT/DeiT/ToaSt papers: "FLOPs" are multiply-accumulates of the matrix
products (patch embedding, projections, attention matmuls, FFN, classifier); norms, softmax and
activations are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ViTConfig:
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    num_prefix_tokens: int
    num_classes: int
    num_classifiers: int = 1          # 2 for distilled models (head + head_dist)

    @property
    def num_patches(self) -> int:
        return (self.img_size[0] // self.patch_size[0]) * (self.img_size[1] // self.patch_size[1])

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens


@dataclass
class AnalyticalFlops:
    patch_embed: int
    attn_proj: int      # per block
    attn_matmul: int    # per block
    ffn: int            # per block
    head: int
    depth: int

    @property
    def block(self) -> int:
        return self.attn_proj + self.attn_matmul + self.ffn

    @property
    def total(self) -> int:
        return self.patch_embed + self.depth * self.block + self.head


def analytical_flops(cfg: ViTConfig) -> AnalyticalFlops:
    n, d = cfg.num_tokens, cfg.embed_dim
    return AnalyticalFlops(
        patch_embed=cfg.num_patches * d * cfg.in_chans * cfg.patch_size[0] * cfg.patch_size[1],
        attn_proj=n * d * 3 * d + n * d * d,
        attn_matmul=2 * n * n * d,
        ffn=2 * n * d * cfg.mlp_hidden,
        head=cfg.num_classifiers * d * cfg.num_classes,
        depth=cfg.depth,
    )


def config_from_timm(model: torch.nn.Module) -> ViTConfig:
    """Read the configuration of a timm VisionTransformer instance."""
    pe = model.patch_embed
    distilled = getattr(model, "head_dist", None) is not None and model.num_classes > 0
    return ViTConfig(
        img_size=tuple(pe.img_size), patch_size=tuple(pe.patch_size), in_chans=pe.proj.in_channels,
        embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=model.blocks[0].attn.num_heads,
        mlp_hidden=model.blocks[0].mlp.fc1.out_features, num_prefix_tokens=model.num_prefix_tokens,
        num_classes=model.num_classes, num_classifiers=2 if distilled else 1,
    )


def config_from_hf(config) -> ViTConfig:
    """Read a transformers ViTConfig (ViTForImageClassification)."""
    size, patch = int(config.image_size), int(config.patch_size)
    return ViTConfig(
        img_size=(size, size), patch_size=(patch, patch), in_chans=int(config.num_channels),
        embed_dim=int(config.hidden_size), depth=int(config.num_hidden_layers),
        num_heads=int(config.num_attention_heads), mlp_hidden=int(config.intermediate_size),
        num_prefix_tokens=1, num_classes=int(config.num_labels),
    )
