"""ToaSt's coupled structured weight pruning (SCWP) inside every attention head.

No head is removed; each keeps a smaller internal dimension. Index j of a head goes from W_Q and
W_K together (QK coupling) and from W_V together with the output projection's input row j (VO
coupling). A dim's importance is the L2 distance of its concatenated rows ([W_Q | W_K] or
[W_V | W_projᵀ]) to the head's geometric median, approximated as in the official code by the
coordinate-wise median; the dims nearest the median are the most redundant and go first.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..converter.graph.surgery import open_for_surgery
from ..converter.graph.vit_graph import ViTGraph
from ..errors import Vit2TrtError
from .structured_prune import BlockKeep, attention_weights


def kept_count(head_dim: int, sparsity: float) -> int:
    """The official count: floor of the kept fraction, at least one (64 dims at 90% -> 6)."""
    return max(1, int(head_dim * (1.0 - sparsity) + 1e-9))


def rounded_count(count: int, multiple: int, full: int) -> int:
    """`count` rounded to the nearest multiple of `multiple` (at least one multiple, at most `full`)."""
    if multiple <= 1:
        return count
    return min(full, max(multiple, int(round(count / multiple)) * multiple))


def lower_median(rows: np.ndarray) -> np.ndarray:
    """Coordinate-wise median as torch.median takes it: the lower middle value, never an average."""
    return np.sort(rows, axis=0)[(len(rows) - 1) // 2]


def _rank_dims(rows: np.ndarray, keep: int) -> list[int]:
    """Keep the `keep` rows farthest from the coordinate-wise median (ties: lower index). The distance
    is computed in the weights' own precision, as the official code does."""
    distance = np.sqrt(np.sum(np.square(rows - lower_median(rows)), axis=1))
    order = np.argsort(-distance, kind="stable")
    return sorted(int(j) for j in order[:keep])


def scwp_keep(model: onnx.ModelProto, vit: ViTGraph, head_sparsity: float,
              skip_blocks: tuple[int, ...] = (0,), multiple: int = 1) -> list[BlockKeep]:
    if not 0.0 <= head_sparsity < 1.0:
        raise Vit2TrtError(f"--head-sparsity must be in [0, 1), got {head_sparsity}.")
    tensors = open_for_surgery(model).tensors
    keeps = []
    for block in vit.blocks:
        if block.index in skip_blocks or head_sparsity == 0.0:
            continue
        w = attention_weights(tensors, block.attn)
        n_qk = rounded_count(kept_count(w.head_dim_qk, head_sparsity), multiple, w.head_dim_qk)
        n_v = rounded_count(kept_count(w.head_dim_v, head_sparsity), multiple, w.head_dim_v)
        qk_keep, v_keep = [], []
        for h in range(w.heads):
            qk = slice(h * w.head_dim_qk, (h + 1) * w.head_dim_qk)
            v = slice(h * w.head_dim_v, (h + 1) * w.head_dim_v)
            qk_rows = np.concatenate([w.wq[:, qk].T, w.wk[:, qk].T], axis=1)   # [dim, 2D]
            vo_rows = np.concatenate([w.wv[:, v].T, w.wproj[v, :]], axis=1)    # [dim, 2D]
            qk_keep.append(_rank_dims(qk_rows, n_qk))
            v_keep.append(_rank_dims(vo_rows, n_v))
        keeps.append(BlockKeep(block.index, qk_keep, v_keep, None))
    return keeps
