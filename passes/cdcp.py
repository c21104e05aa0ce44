"""CAIT's consistent channel pruning (CDCP) of attention channels: the same channels in every head.

Index c of a head's QK dims goes from W_Q and W_K together; index c of its V dims goes from W_V
together with the output projection's input row. Consistent: one set of kept indices serves every
head of a block, so the heads stay equal in width. The training-free criterion scores a channel by
the weight norms on its path, summed over heads:

    s_qk(c) = Σ_h ‖W_Q[:, h, c]‖ · ‖W_K[:, h, c]‖        s_v(c) = Σ_h ‖W_V[:, h, c]‖ · ‖W_proj[h, c, :]‖

(the first bounds the channel's share of the attention logits, the second its share of the block's
output). Channels pruned in training (zeroed in the checkpoint) are removed beforehand by the
strip_zeros pass. Removal is physical: structured_prune rebuilds the attention with smaller weights.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..converter.graph.surgery import open_for_surgery
from ..converter.graph.vit_graph import ViTGraph
from ..errors import Vit2TrtError
from .base import PassResult
from .scwp import kept_count, rounded_count
from .structured_prune import BlockKeep, attention_weights, prune_structure


def _top_channels(scores: np.ndarray, keep: int) -> list[int]:
    """The `keep` best channels in index order (ties: lower index)."""
    order = np.argsort(-scores, kind="stable")
    return sorted(int(c) for c in order[:keep])


def channel_scores(wa: np.ndarray, wb: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """Σ_h ‖wa[:, h·d + c]‖ · ‖wb[:, h·d + c]‖ for column-per-channel weights wa, wb ([in, heads·d])."""
    na = np.linalg.norm(wa.astype(np.float64), axis=0).reshape(heads, head_dim)
    nb = np.linalg.norm(wb.astype(np.float64), axis=0).reshape(heads, head_dim)
    return (na * nb).sum(0)


def cdcp_keep(model: onnx.ModelProto, vit: ViTGraph, ratio: float, skip_blocks: tuple[int, ...] = (),
              multiple: int = 1) -> list[BlockKeep]:
    if not 0.0 <= ratio < 1.0:
        raise Vit2TrtError(f"--channel-ratio is the fraction of attention channels to remove, in [0, 1); got {ratio}.")
    bad = [b for b in skip_blocks if not 0 <= b < vit.depth]
    if bad:
        raise Vit2TrtError(f"blocks {bad} are outside the model's depth ({vit.depth}).")
    if ratio == 0.0:
        return []
    tensors = open_for_surgery(model).tensors
    keeps = []
    for block in vit.blocks:
        if block.index in skip_blocks:
            continue
        w = attention_weights(tensors, block.attn)
        n_qk = rounded_count(kept_count(w.head_dim_qk, ratio), multiple, w.head_dim_qk)
        n_v = rounded_count(kept_count(w.head_dim_v, ratio), multiple, w.head_dim_v)
        qk = _top_channels(channel_scores(w.wq, w.wk, w.heads, w.head_dim_qk), n_qk)
        v = _top_channels(channel_scores(w.wv, w.wproj.T, w.heads, w.head_dim_v), n_v)
        keeps.append(BlockKeep(block.index, [qk] * w.heads, [v] * w.heads, None))
    return keeps


def cdcp(model: onnx.ModelProto, vit: ViTGraph, ratio: float,
         skip_blocks: tuple[int, ...] = ()) -> tuple[PassResult, list[BlockKeep]]:
    keeps = cdcp_keep(model, vit, ratio, skip_blocks)
    if not keeps:
        return PassResult(model, {"pass": "cdcp", "channel_ratio": ratio, "blocks": []}), []
    result = prune_structure(model, vit, keeps)
    return PassResult(result.model, {"pass": "cdcp", "channel_ratio": ratio, "blocks": result.report["blocks"]}), keeps
