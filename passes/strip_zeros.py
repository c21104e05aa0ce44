"""Strip structure a masked fine-tune already zeroed: the main ToaSt deployment path.

A Q/K dim of a head is dead when its K weight column is all zero, whatever the biases: k_j is then
the same for every key, so q_j·k_j adds to each query's scores a term the softmax ignores. (Real
masked checkpoints keep their Q/K biases: the official ToaSt code zeroes weights, never biases.) It
is also dead when its Q weight column and Q bias are zero, so that q_j·k_j is zero. A V dim is dead when its V column
(and bias) or the matching input row of the output projection is zero. An FFN channel is dead when
its fc2 input row is zero, or its fc1 column and bias are zero and the activation maps 0 to 0.
Removing dead structure changes the output only by float rounding. Works for any masked-pruned
ViT, not only ToaSt.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx

from ..converter.graph.surgery import open_for_surgery
from ..converter.graph.vit_graph import ViTGraph
from .base import PassResult
from .structured_prune import (
    BlockKeep, attention_weights, linear_bias, linear_weight, prune_structure,
)

_ZERO_PRESERVING = {"gelu", "gelu_tanh", "relu", "silu", "quick_gelu"}


def _zero_columns(w: np.ndarray, b: Optional[np.ndarray]) -> np.ndarray:
    dead = np.all(w == 0, axis=0)
    return dead if b is None else dead & (b == 0)


def _per_head_keep(dead: np.ndarray, heads: int, head_dim: int) -> Optional[list[list[int]]]:
    """Live dims per head, padded with dead dims to one count (the reshape needs equal heads)."""
    dead = dead.reshape(heads, head_dim)
    if not dead.any():
        return None
    count = max(1, max(int((~d).sum()) for d in dead))
    keep = []
    for d in dead:
        live = [int(j) for j in np.flatnonzero(~d)]
        pad = [int(j) for j in np.flatnonzero(d)][: count - len(live)]
        keep.append(sorted(live + pad))
    return keep


def find_dead_structure(model: onnx.ModelProto, vit: ViTGraph) -> list[BlockKeep]:
    tensors = open_for_surgery(model).tensors
    keeps = []
    for block in vit.blocks:
        w = attention_weights(tensors, block.attn)
        qk_dead = _zero_columns(w.wq, w.bq) | _zero_columns(w.wk, None)
        v_dead = _zero_columns(w.wv, w.bv) | np.all(w.wproj == 0, axis=1)
        qk_keep = _per_head_keep(qk_dead, w.heads, w.head_dim_qk)
        v_keep = _per_head_keep(v_dead, w.heads, w.head_dim_v)
        ffn = block.ffn
        w1, b1, w2 = linear_weight(tensors, ffn.fc1), linear_bias(tensors, ffn.fc1), linear_weight(tensors, ffn.fc2)
        dead = np.all(w2 == 0, axis=1)
        if ffn.activation in _ZERO_PRESERVING:
            dead |= _zero_columns(w1, b1)
        ffn_keep = None
        if dead.any():
            live = [int(c) for c in np.flatnonzero(~dead)] or [0]
            ffn_keep = live
        if qk_keep or v_keep or ffn_keep:
            keeps.append(BlockKeep(block.index, qk_keep, v_keep, ffn_keep))
    return keeps


def strip_dead_structure(model: onnx.ModelProto, vit: ViTGraph) -> tuple[PassResult, list[BlockKeep]]:
    keeps = find_dead_structure(model, vit)
    if not keeps:
        return PassResult(model, {"pass": "strip_zeros", "blocks": []}), keeps
    result = prune_structure(model, vit, keeps)
    result.report["pass"] = "strip_zeros"
    return result, keeps
