"""Activation statistics of every block on calibration inputs, for closed-form compensation.

One ONNX Runtime pass over the original graph, with the tensors that the fits need added as
outputs: each block's attention input (the QKV projection's input), the output projection's input
(the heads' merged context), the FFN's hidden activations (FC2's input) and the block output.
Moments are summed in float64 chunk by chunk (each chunk's products in float32), so memory does not grow with the number of
images; a few images' attention inputs are kept whole, to measure attention-output distortion.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import onnx

from ..converter.graph.surgery import open_for_surgery
from ..converter.runtime import ort_session
from ..converter.graph.shapes import with_outputs
from ..converter.graph.vit_graph import ViTGraph
from ..errors import Vit2TrtError
from .structured_prune import AttentionWeights, attention_weights

CHUNK = 16
PROBE_IMAGES = 32  # images on which end-to-end sensitivity is measured
KEPT_IMAGES = 8    # images whose attention inputs are kept for measuring attention distortion


@dataclass
class Moments:
    """Running sums of x and x xᵀ over rows (tokens)."""
    count: int = 0
    total: Optional[np.ndarray] = None
    outer: Optional[np.ndarray] = None

    def add(self, rows: np.ndarray) -> None:
        rows32 = np.ascontiguousarray(rows, dtype=np.float32)
        gram = (rows32.T @ rows32).astype(np.float64)
        sums = rows32.sum(0, dtype=np.float64)
        if self.total is None:
            self.total, self.outer = sums, gram
        else:
            self.total += sums
            self.outer += gram
        self.count += len(rows)

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.count

    @property
    def second(self) -> np.ndarray:
        """E[x xᵀ] (uncentered)."""
        return self.outer / self.count

    @property
    def cov(self) -> np.ndarray:
        m = self.mean
        return self.second - np.outer(m, m)


@dataclass
class BlockStats:
    index: int
    tokens: int
    hidden: Moments = field(default_factory=Moments)      # FFN hidden activations (FC2 input)
    context: Moments = field(default_factory=Moments)     # merged heads (output projection input)
    keys: list = field(default_factory=list)              # per head: keys centred within each image
    queries: list = field(default_factory=list)           # per head: queries, uncentered
    residual_energy: float = 0.0                          # E‖block output‖² per token
    attn_inputs: Optional[np.ndarray] = None              # [kept images, tokens, D]


@dataclass
class CalibrationStats:
    images: int
    blocks: list[BlockStats]
    probe: Optional[np.ndarray] = None   # the first calibration inputs, to measure end-to-end sensitivity


def _tap_names(surgery, vit: ViTGraph) -> list[tuple[int, str, str]]:
    taps = []
    for block in vit.blocks:
        first = block.attn.qkv or block.attn.q
        taps += [(block.index, "attn_in", surgery.nodes[first.node].inputs[0].name),
                 (block.index, "context", surgery.nodes[block.attn.proj.node].inputs[0].name),
                 (block.index, "hidden", surgery.nodes[block.ffn.fc2.node].inputs[0].name),
                 (block.index, "out", block.output)]
    return taps


def _qk(w: AttentionWeights, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Queries and keys [B, N, heads, dim] of attention inputs x [B, N, D]."""
    q = x @ w.wq + (0 if w.bq is None else w.bq)
    k = x @ w.wk + (0 if w.bk is None else w.bk)
    shape = (*x.shape[:2], w.heads, w.head_dim_qk)
    return q.reshape(shape), k.reshape(shape)


def collect_stats(model: onnx.ModelProto, vit: ViTGraph, inputs: np.ndarray,
                  progress: Callable[[int, int], None] = lambda done, total: None) -> CalibrationStats:
    """Moments of every block's activations over `inputs` [N, C, H, W] (one ONNX Runtime pass)."""
    check_enough(len(inputs), vit)
    surgery = open_for_surgery(model)
    weights = [attention_weights(surgery.tensors, b.attn) for b in vit.blocks]
    taps = _tap_names(surgery, vit)
    session = ort_session(with_outputs(model, [t[2] for t in taps]))
    blocks = [BlockStats(b.index, b.tokens or vit.num_tokens) for b in vit.blocks]
    for stats, w in zip(blocks, weights):
        stats.keys = [Moments() for _ in range(w.heads)]
        stats.queries = [Moments() for _ in range(w.heads)]
    name = session.get_inputs()[0].name
    wanted = [t[2] for t in taps]
    kept: dict[int, list] = {b.index: [] for b in vit.blocks}
    # With tokens to spare, every other one (alternating per chunk) is plenty for the wide layers' moments.
    widest = max(max(b.ffn.hidden, b.attn.heads * b.attn.head_dim_v) for b in vit.blocks)
    thin = len(inputs) * min(s.tokens for s in blocks) > 8 * widest
    for start in range(0, len(inputs), CHUNK):
        batch = np.ascontiguousarray(inputs[start:start + CHUNK], dtype=np.float32)
        values = dict(zip(wanted, session.run(wanted, {name: batch})))
        for index, role, tensor in taps:
            stats, w = blocks[index], weights[index]
            value = values[tensor].reshape(len(batch), stats.tokens, -1)
            rows = value[:, (start // CHUNK) % 2::2] if thin else value
            if role == "hidden":
                stats.hidden.add(rows.reshape(-1, value.shape[-1]))
            elif role == "context":
                stats.context.add(rows.reshape(-1, value.shape[-1]))
            elif role == "out":
                stats.residual_energy += float(np.square(value, dtype=np.float64).sum())
            else:
                q, k = _qk(w, value)
                k = k - k.mean(1, keepdims=True)   # softmax ignores what is the same for every key
                for h in range(w.heads):
                    stats.queries[h].add(q[:, :, h].reshape(-1, w.head_dim_qk))
                    stats.keys[h].add(k[:, :, h].reshape(-1, w.head_dim_qk))
                if sum(len(a) for a in kept[index]) < KEPT_IMAGES:
                    kept[index].append(value[:KEPT_IMAGES - sum(len(a) for a in kept[index])])
        progress(min(start + CHUNK, len(inputs)), len(inputs))
    for stats in blocks:
        stats.residual_energy /= max(len(inputs) * stats.tokens, 1)
        stats.attn_inputs = np.concatenate(kept[stats.index]).astype(np.float32)
    return CalibrationStats(len(inputs), blocks, np.ascontiguousarray(inputs[:PROBE_IMAGES], dtype=np.float32))


def check_enough(images: int, vit: ViTGraph) -> None:
    """A fit needs more calibration tokens than the widest layer it regresses on."""
    tokens = images * min(b.tokens or vit.num_tokens for b in vit.blocks)
    widest = max(max(b.ffn.hidden, b.attn.heads * b.attn.head_dim_v) for b in vit.blocks)
    if tokens <= widest:
        raise Vit2TrtError(f"compensation needs more calibration tokens than the {widest} channels it fits on, got "
                           f"{tokens} ({images} images); give more images with --calib, or --no-compensate.")


