"""ToMe token merging (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023) in native ONNX.

In every block, between attention and FFN, r tokens are merged by bipartite soft matching:
tokens alternate into sets A and B; each A token finds its most similar B token (cosine of the
keys averaged over heads); the r A tokens with the best matches are merged into their partners
by a size-weighted average; attention adds log(size) to its scores (proportional attention).

Written without scatter ops so that every runtime builds it: the edge order is a TopK with a
constant K, the merge is a one-hot MatMul (Equal(index, arange) -> Cast -> MatMul) and the
kept tokens are GatherElements. Token counts are fixed per block, so every shape is static
but the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..converter.graph.surgery import GraphBuilder, export_like, open_for_surgery
from ..converter.graph.vit_graph import ViTGraph
from ..errors import Vit2TrtError
from .base import PassResult
from .structured_prune import BlockKeep, rebuild_attention

PROTECT = -1e4   # added to the class token's similarities, which lie in [-2, 0] (cosine − 1)
# Scores closer than this count as tied and go to the lower index: above the rounding that tells ONNX
# Runtime from PyTorch (about 1e-8 near the best scores, a few 1e-7 between tokens equal up to rounding)
# and below nearly every gap that decides real photos (docs/methods/tome.md).
TIE_TOLERANCE = 1e-6


@dataclass
class ToMeSchedule:
    r: list[int]            # tokens merged after each block's attention
    tokens: list[int]       # tokens entering each block
    protect_class_token: bool


def tome_schedule(vit: ViTGraph, r: int | list[int]) -> ToMeSchedule:
    kinds = {t.kind for t in vit.extra_tokens}
    if kinds - {"class"}:
        raise Vit2TrtError(f"ToMe here supports a class token or no extra token; this model also has "
                           f"{', '.join(sorted(kinds - {'class'}))} tokens, whose positions merging would move.")
    if any(b.attn.mask_inputs for b in vit.blocks):
        raise Vit2TrtError("ToMe cannot merge tokens under a fixed-size attention mask (this graph adds one to "
                           "its attention scores, as Hugging Face exports do); export the model with timm.")
    rs = [r] * vit.depth if isinstance(r, int) else list(r)
    if len(rs) != vit.depth or any(v < 0 for v in rs):
        raise Vit2TrtError(f"ToMe r must be a non-negative number or one per block ({vit.depth}); got {r}.")
    protected = 1 if "class" in kinds else 0
    tokens, clipped = [], []
    n = vit.num_tokens
    for value in rs:
        tokens.append(n)
        value = min(value, (n - protected) // 2)   # as ToMe: at most half the unprotected tokens
        clipped.append(value)
        n -= value
    return ToMeSchedule(clipped, tokens, protected == 1)


def apply_tome(model: onnx.ModelProto, vit: ViTGraph, r: int | list[int]) -> PassResult:
    schedule = tome_schedule(vit, r)
    surgery = open_for_surgery(model)
    graph, tensors, nodes, opset, dtype = (surgery.graph, surgery.tensors, surgery.nodes,
                                            surgery.opset, surgery.dtype)
    size = None   # [B, N, 1] token sizes; all ones before the first merge
    for block, r_block, n in zip(vit.blocks, schedule.r, schedule.tokens):
        # Two scopes, so that profiles tell matching (scores, top-k, gathers) from merging arithmetic.
        b = GraphBuilder(graph, f"vit2trt/blocks.{block.index}/tome/match", dtype, opset)
        m = GraphBuilder(graph, f"vit2trt/blocks.{block.index}/tome/merge", dtype, opset)
        bias = None
        if size is not None:   # proportional attention: + log(size) on every key column
            log_size = m.op("Log", [size], "log_size")
            bias = m.op("Reshape", [log_size, m.i64("bias_shape", [0, 1, 1, -1])], "size_bias")
        keep_all = BlockKeep(block.index)
        _, handles = rebuild_attention(graph, tensors, nodes, block, keep_all, dtype, score_bias=bias)
        if r_block == 0:
            continue
        residual = nodes[block.residual_attn].outputs[0]
        # ToMe's metric: the keys averaged over heads (a sum has the same cosines), unit length.
        keys = b.op("Reshape", [handles["k"], b.i64("key_heads", [0, 0, block.attn.heads, block.attn.head_dim_qk])],
                    "key_heads")
        metric = b.reduce("ReduceSum", keys, [2], False, "metric")                               # [B, N, d]
        if size is None:
            size = _ones_like_tokens(m, residual)
            weighted = residual
        else:
            weighted = m.op("Mul", [residual, size], "weighted")
        merged_x, size = _merge(b, m, weighted, size, metric, n, r_block, vit.embed_dim,
                                schedule.protect_class_token)
        for consumer_name in (block.norm2, block.residual_ffn):
            consumer = nodes[consumer_name]
            consumer.inputs = [merged_x if t is residual else t for t in consumer.inputs]
    report = {"pass": "tome", "r": schedule.r, "tokens": schedule.tokens + [schedule.tokens[-1] - schedule.r[-1]],
              "protect_class_token": schedule.protect_class_token}
    return PassResult(export_like(graph, model), report)


def with_decision_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of a ToMe graph that also outputs, for every merging block in order, each A token's partner
    and the A tokens in merge order ([B, na, 1] each; the first r merge). Returns it and how many merging
    blocks it exposes (0: no ToMe in the graph)."""
    found: dict[str, dict[str, str]] = {}
    for node in model.graph.node:
        scope, _, step = node.name.rpartition("/tome/match/")
        if scope and step in ("best_match", "edge_order"):
            found.setdefault(scope, {})[step] = node.output[1]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for steps in found.values():
        for name in (steps["best_match"], steps["edge_order"]):
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    return exposed, len(found)


def _ones_like_tokens(b: GraphBuilder, x):
    """Token sizes before the first merge: ones, [B, n, 1]."""
    ones_shape = b.op("Concat", [b.op("Shape", [x], "xshape", out_dtype=np.int64, start=0, end=2),
                                 b.i64("one", [1])], "ones_shape", out_dtype=np.int64, axis=0)
    return b.op("Expand", [b.f("one_size", np.ones((1, 1, 1))), ones_shape], "size_ones")


def _every_other(b: GraphBuilder, t, start: int, n: int, name: str):
    """Tokens start, start + 2, ... of t [B, n, ...]: set A from 0, set B from 1."""
    return b.op("Slice", [t, b.i64(f"{name}_start", [start]), b.i64(f"{name}_end", [n]),
                          b.i64(f"{name}_axis", [1]), b.i64(f"{name}_step", [2])], name)


def _best_partners(b: GraphBuilder, metric, n: int, protect_cls: bool):
    """Each A token's best similarity (cos − 1) and its partner, [B, na, 1]: the lowest-indexed B token
    within TIE_TOLERANCE of the best. On unit metrics centred on their mean the products are small, so
    rounding errs about ten times less than a plain dot product near 1:
    cos − 1 = c_a·c_b − ½|c_a|² − ½|c_b|², whose row term ½|c_a|² is subtracted after the row's max."""
    unit = b.op("LpNormalization", [metric], "metric_unit", axis=-1, p=2)
    centred = b.op("Sub", [unit, b.reduce_mean(unit, [1], True, "metric_mean")], "metric_centred")
    a_centred = _every_other(b, centred, 0, n, "centred_a")                                   # [B, na, d]
    b_centred = _every_other(b, centred, 1, n, "centred_b")                                   # [B, nb, d]
    half = b.f("half", 0.5)
    a_half_sq = b.op("Mul", [b.reduce("ReduceSumSquare", a_centred, [2], True, "a_sq"), half], "a_half_sq")
    # [B, 1, nb] by a Reshape of [B, nb, 1]: the transposed B tokens then feed only the MatMul, which fuses it.
    b_sq = b.op("Reshape", [b.reduce("ReduceSumSquare", b_centred, [2], True, "b_sq"), b.i64("row", [0, 1, -1])],
                "b_sq_row")
    dots = b.op("MatMul", [a_centred, b.op("Transpose", [b_centred], "centred_bT", perm=[0, 2, 1])], "centred_dots")
    row_scores = b.op("Sub", [dots, b.op("Mul", [b_sq, half], "b_half_sq")], "row_scores")    # [B, na, nb]
    row_best = b.reduce("ReduceMax", row_scores, [2], True, "row_best")                        # [B, na, 1]
    floor = b.op("Sub", [row_best, b.f("tie_tolerance", TIE_TOLERANCE)], "tie_floor")
    below = b.op("Less", [row_scores, floor], "below_best", out_dtype=np.bool_)
    # Distinct integer keys, higher for lower indices: the top-1 is the first tied partner on any runtime.
    nb = n // 2
    key = b.op("Where", [below, b.f("not_tied", 0.0), b.f("b_rank", nb - np.arange(nb))], "partner_key")
    _, partner = b.op("TopK", [key, b.i64("best", [1])], "best_match", n_out=2, axis=-1, largest=1, sorted=1)
    partner.dtype = np.int64
    best = b.op("Sub", [row_best, a_half_sq], "best_similarity")
    if protect_cls:  # the class token (first of A) never merges
        guard = np.zeros(((n + 1) // 2, 1), dtype=b.dtype)
        guard[0, 0] = PROTECT
        best = b.op("Add", [best, b.f("protect_cls", guard)], "best_guarded")
    return best, partner


def _edge_order(b: GraphBuilder, node_max, na: int, r: int):
    """A tokens in merge order [B, na, 1]: the r first merge. Scores beyond TIE_TOLERANCE of the r-th
    come first, those tied with it next, the rest last, each group in index order (distinct integer keys)."""
    top, _ = b.op("TopK", [node_max, b.i64("r_best", [r])], "r_best", n_out=2, axis=1, largest=1, sorted=1)
    _.dtype = np.int64
    kth = b.op("Slice", [top, b.i64("kth_start", [r - 1]), b.i64("kth_end", [r]), b.i64("kth_axis", [1])], "kth")
    from_kth = b.op("Sub", [node_max, kth], "from_kth")
    above = b.op("Greater", [from_kth, b.f("tie_above", TIE_TOLERANCE)], "above_kth", out_dtype=np.bool_)
    below = b.op("Less", [from_kth, b.f("tie_below", -TIE_TOLERANCE)], "below_kth", out_dtype=np.bool_)
    rank = (na - np.arange(na)).reshape(na, 1)
    key = b.op("Where", [below, b.f("rank_below", rank - (na + 1)), b.f("rank_tied", rank)], "edge_key_low")
    key = b.op("Where", [above, b.f("rank_above", rank + (na + 1)), key], "edge_key")
    _, edges = b.op("TopK", [key, b.i64("all_edges", [na])], "edge_order", n_out=2, axis=1, largest=1, sorted=1)
    edges.dtype = np.int64
    return edges


def _merge(b: GraphBuilder, m: GraphBuilder, weighted, size, metric, n: int, r: int, channels: int, protect_cls: bool):
    """Bipartite soft matching of n tokens, r merges. `weighted` is x·size [B, n, C], `metric` the keys
    [B, n, d]. Returns (x [B, n-r, C], size [B, n-r, 1]). Indices keep a trailing axis of 1
    ([B, k, 1]) so that they feed GatherElements, GatherND and Equal without reshapes. Matching
    nodes go to builder b, merging arithmetic to builder m."""
    na, nb = (n + 1) // 2, n // 2
    node_max, node_idx = _best_partners(b, metric, n, protect_cls)                            # [B, na, 1]
    edges = _edge_order(b, node_max, na, r)
    # A token i is token 2i of the block: gathers read the tokens directly, not a copy of set A.
    rows = b.op("Mul", [edges, b.i64("a_stride", 2)], "a_rows", out_dtype=np.int64)

    def row_range(start, end, name):
        return b.op("Slice", [rows, b.i64(f"{name}_start", [start]), b.i64(f"{name}_end", [end]),
                              b.i64(f"{name}_axis", [1])], name, out_dtype=np.int64)

    src_rows, unm_rows = row_range(0, r, "src_rows"), row_range(r, na, "unm_rows")          # [B, r | na-r, 1]
    if na - r > 1:   # unmerged tokens keep their original order (the class token stays first)
        unm_rows, _ = b.op("TopK", [unm_rows, b.i64("unm_count", [na - r])], "unm_sorted", n_out=2,
                           out_dtype=np.int64, axis=1, largest=0, sorted=1)
        _.dtype = np.int64
    src_idx = b.op("Slice", [edges, b.i64("src_start", [0]), b.i64("src_end", [r]), b.i64("src_axis", [1])],
                   "src_idx", out_dtype=np.int64)
    dst_idx = b.op("GatherElements", [node_idx, src_idx], "dst_idx", out_dtype=np.int64, axis=1)  # [B, r, 1]

    # Merge x·size and size together: one set of gathers for [B, n, C + 1].
    y = m.op("Concat", [weighted, size], "with_size", axis=2)
    unmerged = b.op("GatherND", [y, unm_rows], "unmerged", batch_dims=1)                       # [B, na-r, C+1]
    sources = b.op("GatherND", [y, src_rows], "sources", batch_dims=1)                         # [B, r, C+1]
    y_b = _every_other(b, y, 1, n, "y_b")                                                      # [B, nb, C+1]
    # One-hot [B, r, nb]: row s marks the B token that source s merges into; the MatMul reads it transposed.
    hit = m.op("Equal", [dst_idx, m.i64("b_positions", np.arange(nb))], "dst_hit", out_dtype=np.bool_)
    onehot = m.op("Cast", [hit], "dst_onehot", to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(m.dtype)))
    onehot = m.op("Transpose", [onehot], "dst_onehotT", perm=[0, 2, 1])
    added = m.op("MatMul", [onehot, sources], "merged_sum")
    dst = m.op("Add", [y_b, added], "dst")                                                       # [B, nb, C+1]
    y = m.op("Concat", [unmerged, dst], "tokens", axis=1)                                        # [B, n-r, C+1]
    new_x, new_size = m.op("Split", [y, m.i64("x_size_split", [channels, 1])], "sum_x_size", n_out=2, axis=2)
    return m.op("Div", [new_x, new_size], "x"), new_size
