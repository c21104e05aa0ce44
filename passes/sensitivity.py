"""Per-block budgets from measured sensitivity: how many QK dims, V dims and FFN channels each block
keeps under a FLOPs target, chosen from the output distortion measured on calibration images
after compensation, and the compensated weights of what is kept.

Distortions are in the units of the residual stream (squared error per token, relative to the
block output's energy E‖x‖²): for V dims and FFN channels they follow exactly from the activation
moments (tr(G_RR Σ_{R|S}), passes/compensation.py); for QK dims they are measured by running the
block's attention on a few calibration images with the compensated queries. The allocation walks
down the lower convex hull of every (block, kind) curve, always taking the step that costs the least
distortion per FLOP saved, until the target is met.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import hashlib
from typing import Callable, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..converter.graph.surgery import const_value, export_like, open_for_surgery
from ..converter.graph.vit_graph import ViTGraph
from ..errors import Vit2TrtError
from .base import PassResult
from .calibration_stats import BlockStats, CalibrationStats
from .compensation import (
    compensate_inputs, compensate_queries, greedy_removal, query_columns, removal_error, write_linear,
)
from .structured_prune import AttentionWeights, BlockKeep, attention_weights, linear_bias, linear_weight

QK_PROBE_LEVELS = 8    # QK levels measured per head; the curve is interpolated in between


def _gamma(tensors, scale) -> np.ndarray | float:
    return 1.0 if scale is None else np.asarray(const_value(tensors[scale.gamma]), dtype=np.float64).reshape(-1)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    np.exp(x, out=x)
    return x / x.sum(-1, keepdims=True)


@dataclass
class BlockParts:
    """What the fits of one block need: weights (in, out), output-side weightings, statistics."""
    index: int
    w: AttentionWeights
    proj_bias: Optional[np.ndarray]
    fc2: np.ndarray
    fc2_bias: Optional[np.ndarray]
    gamma_attn: np.ndarray | float
    gamma_ffn: np.ndarray | float
    scale: float
    stats: BlockStats
    _heads: dict = field(default_factory=dict, repr=False)   # per-head tensors on the kept images

    def v_layer(self, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Head h's part of the output projection's input: mean, Σ and G."""
        cols = slice(h * self.w.head_dim_v, (h + 1) * self.w.head_dim_v)
        mean, cov, gram = self.proj_layer()
        return mean[cols], cov[cols, cols], gram[cols, cols]

    def proj_layer(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The whole output projection input's moments (mean, Σ) and G = (W_proj γ)(W_proj γ)ᵀ."""
        ctx = self.stats.context
        mean, cov = (ctx.mean, ctx.cov) if self.proj_bias is not None else (np.zeros(len(ctx.total)), ctx.second)
        wp = self.w.wproj.astype(np.float64) * self.gamma_attn
        return mean, cov, wp @ wp.T

    def ffn_layer(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        hid = self.stats.hidden
        mean, cov = (hid.mean, hid.cov) if self.fc2_bias is not None else (np.zeros(len(hid.total)), hid.second)
        w2 = self.fc2.astype(np.float64) * self.gamma_ffn
        return mean, cov, w2 @ w2.T

    def qk_layer(self, h: int) -> tuple[np.ndarray, np.ndarray]:
        """Head h's within-image key covariance and E[q qᵀ]."""
        return self.stats.keys[h].second, self.stats.queries[h].second

    def attention_error(self, h: int, keep: list[int], compensate: bool) -> float:
        """E‖Δ output‖² per token of head h's attention (through the output projection) when its
        QK dims shrink to `keep`, on the calibration images kept whole."""
        x, q, k, probs, vp = self._head(h)
        w, dqk = self.w, self.w.head_dim_qk
        if compensate:
            cols = slice(h * dqk, (h + 1) * dqk)
            wq, bq = compensate_queries(w.wq[:, cols], None if w.bq is None else w.bq[cols], self.qk_layer(h)[0], keep)
            q = x @ wq.astype(np.float32) + (0 if bq is None else bq.astype(np.float32))
        kept = np.asarray(keep)
        pruned = _softmax(q[..., kept] @ k[..., kept].transpose(0, 2, 1) * np.float32(self.scale))
        return float(np.square((pruned - probs) @ vp).sum(-1).mean(dtype=np.float64))

    def _head(self, h: int):
        """Head h on the kept images: inputs, queries, keys, probabilities, V through the projection."""
        if h not in self._heads:
            x = self.stats.attn_inputs.astype(np.float32)
            w, dqk, dv = self.w, self.w.head_dim_qk, self.w.head_dim_v
            cols, vcols = slice(h * dqk, (h + 1) * dqk), slice(h * dv, (h + 1) * dv)
            bias = lambda b, c: 0 if b is None else b[c].astype(np.float32)  # noqa: E731
            q = x @ w.wq[:, cols].astype(np.float32) + bias(w.bq, cols)
            k = x @ w.wk[:, cols].astype(np.float32) + bias(w.bk, cols)
            probs = _softmax(q @ k.transpose(0, 2, 1) * np.float32(self.scale))
            v = x @ w.wv[:, vcols].astype(np.float32) + bias(w.bv, vcols)
            vp = v @ (w.wproj[vcols].astype(np.float64) * self.gamma_attn).astype(np.float32)
            self._heads[h] = (x, q, k, probs, vp)
        return self._heads[h]


def measure_gains(model: onnx.ModelProto, vit: ViTGraph, parts: list[BlockParts], images: np.ndarray,
                  seed: int = 0) -> np.ndarray:
    """How much the outputs move per unit of error added to each block's output: KL divergence of the
    output distribution (or squared error of the outputs, when they are not class scores) per unit
    E‖e‖² per token, with e Gaussian noise shaped like the block's own FFN output (what pruning
    errors look like), measured on `images`."""
    from ..converter.runtime import ort_session

    surgery = open_for_surgery(model)
    graph, rng = surgery.graph, np.random.default_rng(seed)
    names = []
    for block in vit.blocks:   # noise_b is added to block b's output; zeros leave the model as it was
        out = surgery.tensors[block.output]
        noise = gs.Variable(f"vit2trt_noise_{block.index}", dtype=np.float32, shape=None)
        noised = gs.Variable(f"{block.output}_noised", dtype=out.dtype)
        for consumer in list(out.outputs):
            consumer.inputs[[i for i, t in enumerate(consumer.inputs) if t is out][0]] = noised
        graph.nodes.append(gs.Node("Add", name=f"vit2trt/noise_{block.index}", inputs=[out, noise], outputs=[noised]))
        graph.inputs.append(noise)
        names.append(noise.name)
    session = ort_session(export_like(graph, model))
    image_name = session.get_inputs()[0].name
    zeros = {name: np.zeros((len(images), tokens, vit.embed_dim), np.float32)
             for name, tokens in zip(names, [b.tokens or vit.num_tokens for b in vit.blocks])}
    clean = session.run(None, {image_name: images, **zeros})[0]
    gains = []
    for p, name in zip(parts, names):
        _, cov, _ = p.ffn_layer()
        w2 = p.fc2.astype(np.float64) * p.gamma_ffn
        out_cov = w2.T @ cov @ w2
        vals, vecs = np.linalg.eigh(out_cov)
        shape = vecs * np.sqrt(np.clip(vals, 0, None))
        noise = rng.standard_normal(zeros[name].shape) @ shape.T
        noise *= 0.1 / np.sqrt(max(np.square(noise).sum(-1).mean(), 1e-30) / max(np.trace(out_cov), 1e-30))
        energy = float(np.square(noise).sum(-1).mean())
        noised = session.run(None, {image_name: images, **zeros, name: noise.astype(np.float32)})[0]
        gains.append(_output_change(clean, noised) / max(energy, 1e-30))
    return np.array(gains)


def _output_change(clean: np.ndarray, noised: np.ndarray) -> float:
    if clean.ndim == 2 and clean.shape[1] > 1:
        logp = clean - clean.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        logq = noised - noised.max(1, keepdims=True)
        logq -= np.log(np.exp(logq).sum(1, keepdims=True))
        return float((np.exp(logp) * (logp - logq)).sum(1).mean())
    return float(np.square(clean - noised).mean())


def block_parts(model: onnx.ModelProto, vit: ViTGraph, stats: CalibrationStats) -> list[BlockParts]:
    tensors = open_for_surgery(model).tensors
    parts = []
    for block, s in zip(vit.blocks, stats.blocks):
        attn = block.attn
        parts.append(BlockParts(
            block.index, attention_weights(tensors, attn), linear_bias(tensors, attn.proj),
            linear_weight(tensors, block.ffn.fc2), linear_bias(tensors, block.ffn.fc2),
            _gamma(tensors, block.layer_scale_attn), _gamma(tensors, block.layer_scale_ffn),
            attn.scale if attn.scale is not None else attn.head_dim_qk ** -0.5, s))
    return parts


# --- compensation of given keep lists ---------------------------------------------------------------

def compensate_keeps(model: onnx.ModelProto, vit: ViTGraph, stats: CalibrationStats,
                     keeps: list[BlockKeep]) -> tuple[PassResult, dict[str, np.ndarray]]:
    """Rewrite the kept weights of `model` (same shapes) so that what `keeps` removes is
    reproduced from what stays. Returns the model, and the rewritten weights as they will be once
    pruned — (in, out) arrays of the kept rows or columns only, by `blocks.{i}.{q|proj|fc2}.{weight|bias}` —
    which the PyTorch reference sets after pruning the same way."""
    parts = block_parts(model, vit, stats)
    surgery = open_for_surgery(model)
    tensors, nodes, written, report = surgery.tensors, surgery.nodes, {}, []
    for keep in keeps:
        p, block = parts[keep.index], vit.blocks[keep.index]
        w, record = p.w, {"index": keep.index}
        if keep.qk_keep is not None:
            lin, cols = query_columns(block.attn)
            wq, bq = w.wq.copy(), None if w.bq is None else w.bq.copy()
            before = after = 0.0
            for h, dims in enumerate(keep.qk_keep):
                plain, fitted = p.attention_error(h, dims, False), p.attention_error(h, dims, True)
                before, after = before + plain, after + min(plain, fitted)
                if fitted < plain:   # measured on calibration images: never worse than no compensation
                    c = slice(h * w.head_dim_qk, (h + 1) * w.head_dim_qk)
                    new_w, new_b = compensate_queries(w.wq[:, c], None if w.bq is None else w.bq[c],
                                                      p.qk_layer(h)[0], dims)
                    wq[:, c] = new_w
                    if bq is not None:
                        bq[c] = new_b
            write_linear(nodes, tensors, lin, wq, bq, cols)
            kept = _head_columns(keep.qk_keep, w.head_dim_qk)
            written[f"blocks.{keep.index}.q.weight"] = wq[:, kept]
            if bq is not None:
                written[f"blocks.{keep.index}.q.bias"] = bq[kept]
            record["qk"] = _relative(before, after, p)
        if keep.v_keep is not None:
            # One fit over the whole projection input: a removed dim of one head is regressed on the
            # kept dims of every head (any linear function of the projection's input folds into it).
            kept = _head_columns(keep.v_keep, w.head_dim_v)
            mean, cov, gram = p.proj_layer()
            new_w, new_b = compensate_inputs(w.wproj, p.proj_bias, mean, cov, kept)
            write_linear(nodes, tensors, block.attn.proj, new_w, new_b)
            written[f"blocks.{keep.index}.proj.weight"] = new_w[kept]
            if new_b is not None:
                written[f"blocks.{keep.index}.proj.bias"] = new_b
            record["v"] = _relative(removal_error(cov, gram, kept, compensate=False, mean=mean),
                                    removal_error(cov, gram, kept), p)
        if keep.ffn_keep is not None:
            mean, cov, gram = p.ffn_layer()
            new_w, new_b = compensate_inputs(p.fc2, p.fc2_bias, mean, cov, keep.ffn_keep)
            write_linear(nodes, tensors, block.ffn.fc2, new_w, new_b)
            written[f"blocks.{keep.index}.fc2.weight"] = new_w[sorted(keep.ffn_keep)]
            if new_b is not None:
                written[f"blocks.{keep.index}.fc2.bias"] = new_b
            record["ffn"] = _relative(removal_error(cov, gram, keep.ffn_keep, compensate=False, mean=mean),
                                      removal_error(cov, gram, keep.ffn_keep), p)
        report.append(record)
    result = PassResult(export_like(surgery.graph, model), {"pass": "compensation", "images": stats.images,
                                                            "blocks": report})
    return result, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in written.items()}


def _head_columns(keep: list[list[int]], head_dim: int) -> list[int]:
    return [h * head_dim + j for h, dims in enumerate(keep) for j in sorted(dims)]


def _relative(before: float, after: float, p: BlockParts) -> dict:
    """Reconstruction error relative to the block output's energy, without and with the fit."""
    energy = max(p.stats.residual_energy, 1e-30)
    return {"without": before / energy, "with": after / energy}


# --- budgets from sensitivity ---------------------------------------------------------------------

@dataclass
class Knob:
    """One (block, kind) choice: the counts it may take, their distortion and FLOPs."""
    block: int
    kind: str                  # "qk", "v", "ffn", or "qkv" (Q·K and V dims tied to one count)
    counts: list[int]          # allowed counts, descending (counts[0] = everything)
    distortion: np.ndarray     # relative distortion at each count
    flops: np.ndarray          # multiply-accumulates at each count
    level: int = 0             # index into counts
    removals: list = field(default_factory=list)   # per head (qk, v) or one (ffn) Removal


def _counts(full: int, multiple: int, step: int = 1) -> list[int]:
    step = max(step, multiple)
    step = -(-step // multiple) * multiple
    counts = [c for c in range(full - full % step or full - step, 0, -step) if c % multiple == 0 and c < full]
    return [full] + counts


def measure_knobs(parts: list[BlockParts], vit: ViTGraph, tokens: list[int], gains: np.ndarray, multiple: int,
                  consistent: bool, progress: Callable[[str], None] = lambda msg: None) -> list[Knob]:
    knobs = []
    for p, block, n, gain in zip(parts, vit.blocks, tokens, gains):
        progress(f"measuring sensitivity of block {p.index + 1}/{len(parts)}")
        w, d = p.w, block.attn.proj.out_features
        per_dim = w.heads * (2 * n * d + n * n)         # one QK (or V) dim in every head
        # QK: greedy order per head (or one order for all heads), distortion measured through attention.
        qk_counts = _counts(w.head_dim_qk, multiple)
        if consistent:
            layers = [p.qk_layer(h) for h in range(w.heads)]
            shared = greedy_removal(layers, min_keep=qk_counts[-1])
            orders = [shared] * w.heads
        else:
            orders = [greedy_removal([p.qk_layer(h)], min_keep=qk_counts[-1]) for h in range(w.heads)]
        probe = sorted(set(np.linspace(0, len(qk_counts) - 1, QK_PROBE_LEVELS).round().astype(int).tolist()))
        measured = [sum(min(p.attention_error(h, orders[h].keep(qk_counts[i]), True),
                            p.attention_error(h, orders[h].keep(qk_counts[i]), False)) if i else 0.0
                        for h in range(w.heads)) for i in probe]
        qk_dist = np.interp(np.arange(len(qk_counts)), probe, measured) * gain
        knobs.append(Knob(p.index, "qk", qk_counts, qk_dist, np.array(qk_counts) * per_dim, removals=orders))
        # V: exact from the context moments, per head (or one order shared by all heads).
        v_counts = _counts(w.head_dim_v, multiple)
        layers = [p.v_layer(h)[1:] for h in range(w.heads)]
        if consistent:
            shared = greedy_removal(layers, min_keep=v_counts[-1])
            v_orders, v_dist = [shared] * w.heads, np.array([shared.error(c) for c in v_counts])
        else:
            v_orders = [greedy_removal([layer], min_keep=v_counts[-1]) for layer in layers]
            v_dist = np.array([sum(o.error(c) for o in v_orders) for c in v_counts])
        knobs.append(Knob(p.index, "v", v_counts, v_dist * gain, np.array(v_counts) * per_dim, removals=v_orders))
        # FFN channels: one greedy order, removed in chunks of the count step.
        hidden = block.ffn.hidden
        step = max(1, hidden // 64)
        f_counts = _counts(hidden, multiple, step)
        mean, cov, gram = p.ffn_layer()
        order = greedy_removal([(cov, gram)], min_keep=f_counts[-1], chunk=max(1, min(step, multiple * 4)))
        f_dist = np.array([order.error(c) for c in f_counts])
        knobs.append(Knob(p.index, "ffn", f_counts, f_dist * gain,
                          np.array(f_counts) * 2 * n * d, removals=[order]))
    return knobs


def tie_qk_and_v(knobs: list[Knob]) -> list[Knob]:
    """One knob per block for its Q·K and V dims, which then keep the same count (each with its own
    order): ONNX Attention and TensorRT's fused attention want K and V of one shape. Blocks whose
    dims differ already keep their separate knobs."""
    by_key = {(k.block, k.kind): k for k in knobs}
    tied = []
    for k in knobs:
        if k.kind == "v" and (k.block, "qk") in by_key and by_key[(k.block, "qk")].counts == k.counts:
            continue
        if k.kind == "qk" and (k.block, "v") in by_key and by_key[(k.block, "v")].counts == k.counts:
            v = by_key[(k.block, "v")]
            tied.append(Knob(k.block, "qkv", k.counts, k.distortion + v.distortion, k.flops + v.flops,
                             removals=[k.removals, v.removals]))
            continue
        tied.append(k)
    return tied


def allocate(knobs: list[Knob], fixed_flops: int, target: float) -> None:
    """Lower every knob's level until fixed + Σ FLOPs ≤ target, cheapest distortion per FLOP first."""
    def total() -> int:
        return fixed_flops + int(sum(k.flops[k.level] for k in knobs))

    floor = fixed_flops + int(sum(k.flops[-1] for k in knobs))
    if floor > target:
        raise Vit2TrtError(f"no allocation meets the FLOPs target: keeping the fewest dims and channels allowed "
                           f"still leaves {floor / 1e9:.3f} GFLOPs against the {target / 1e9:.3f} asked. Raise "
                           "--target-flops, or lower --multiple.")
    while total() > target:
        best = None
        for k in knobs:
            cur = k.level
            if cur + 1 >= len(k.counts):
                continue
            saved = k.flops[cur] - k.flops[cur + 1:]
            slope = (k.distortion[cur + 1:] - k.distortion[cur]) / saved
            j = int(np.argmin(slope))
            if best is None or slope[j] < best[0]:
                best = (float(slope[j]), k, cur + 1 + j)
        _, knob, level = best
        knob.level = level


def allocated_keeps(knobs: list[Knob], depth: int) -> list[BlockKeep]:
    keeps = {i: BlockKeep(i) for i in range(depth)}
    for k in knobs:
        if k.level == 0:
            continue
        count = k.counts[k.level]
        if k.kind == "qk":
            keeps[k.block].qk_keep = [r.keep(count) for r in k.removals]
        elif k.kind == "qkv":
            keeps[k.block].qk_keep = [r.keep(count) for r in k.removals[0]]
            keeps[k.block].v_keep = [r.keep(count) for r in k.removals[1]]
        elif k.kind == "v":
            keeps[k.block].v_keep = [r.keep(count) for r in k.removals]
        else:
            keeps[k.block].ffn_keep = k.removals[0].keep(count)
    return [k for k in keeps.values() if k.qk_keep or k.v_keep or k.ffn_keep]


def block_flops_at(tokens: list[int], qk: int, v: int, ffn: int, block) -> int:
    n, d, h = tokens[block.index], block.attn.proj.out_features, block.attn.heads
    return (qk + v) * h * (2 * n * d + n * n) + ffn * 2 * n * d


def plan_budget(model: onnx.ModelProto, vit: ViTGraph, stats: CalibrationStats, target: float,
                multiple: int = 1, consistent: bool = False, tokens: Optional[list[int]] = None,
                progress: Callable[[str], None] = lambda msg: None,
                cache: Optional[dict] = None, tie_qk_v: bool = False) -> tuple[list[BlockKeep], dict]:
    """Keep lists for every block such that the model does at most `target` multiply-accumulates.
    `tokens` are the tokens each block will see (fewer after token merging). `cache` keeps the
    measured gains of a graph for later budgets on the same graph and statistics (the planner).
    `tie_qk_v` keeps each block's Q·K and V head dims equal (fused attention stays fused)."""
    check_multiple(vit, multiple)
    tokens = tokens or [b.tokens or vit.num_tokens for b in vit.blocks]
    parts = block_parts(model, vit, stats)
    key = ("gains", hashlib.sha1(model.SerializeToString()).hexdigest(), stats.images) if cache is not None else None
    if key is not None and key in cache:
        gains = cache[key]
    else:
        progress("measuring how each block's errors reach the outputs")
        gains = measure_gains(model, vit, parts, stats.probe)
        if key is not None:
            cache[key] = gains
    knobs = measure_knobs(parts, vit, tokens, gains, multiple, consistent, progress)
    if tie_qk_v:
        knobs = tie_qk_and_v(knobs)
    full_blocks = sum(block_flops_at([b.tokens or vit.num_tokens for b in vit.blocks], b.attn.head_dim_qk, b.attn.head_dim_v,
                                     b.ffn.hidden, b) for b in vit.blocks)
    # What the blocks' prunable matmuls do not cover (patch embedding, head, token-pass extras).
    fixed = vit.flops.total - full_blocks
    allocate(knobs, fixed, target)
    chosen = {(k.block, kind): k.counts[k.level] for k in knobs
              for kind in (("qk", "v") if k.kind == "qkv" else (k.kind,))}
    record = {"target_macs": int(target), "multiple": multiple, "consistent": consistent, "tied_qk_v": tie_qk_v,
              "predicted_flops": fixed + int(sum(k.flops[k.level] for k in knobs)),
              "per_block": [{"index": b.index, "gain": float(gains[b.index]), "qk": chosen[(b.index, "qk")], "v": chosen[(b.index, "v")],
                             "ffn": chosen[(b.index, "ffn")],
                             "distortion": float(sum(k.distortion[k.level] for k in knobs if k.block == b.index))}
                            for b in vit.blocks]}
    return allocated_keeps(knobs, vit.depth), record


def check_multiple(vit: ViTGraph, multiple: int) -> None:
    smallest = min(min(b.attn.head_dim_qk, b.attn.head_dim_v) for b in vit.blocks)
    if multiple < 1 or multiple > smallest:
        raise Vit2TrtError(f"--multiple must be between 1 and the smallest head dim ({smallest}), got {multiple}.")
