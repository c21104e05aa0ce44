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

from vit2trt.converter.graph_utils import GraphBuilder, export_like, open_for_surgery
from vit2trt.converter.vit_graph import ViTGraph
from vit2trt.errors import Vit2TrtError
from vit2trt.passes.base import PassResult
from vit2trt.passes.structured_prune import BlockKeep, rebuild_attention

PROTECT = -1e4   # added to the class token's similarities: cosine similarities lie in [-1, 1]


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
        b = GraphBuilder(graph, f"vit2trt/blocks.{block.index}/tome", dtype, opset)
        bias = None
        if size is not None:   # proportional attention: + log(size) on every key column
            log_size = b.op("Log", [size], "log_size")
            bias = b.op("Reshape", [log_size, b.i64("bias_shape", [0, 1, 1, -1])], "size_bias")
        keep_all = BlockKeep(block.index)
        _, handles = rebuild_attention(graph, tensors, nodes, block, keep_all, dtype, score_bias=bias)
        if r_block == 0:
            continue
        residual = nodes[block.residual_attn].outputs[0]
        heads, dim = block.attn.heads, block.attn.head_dim_qk
        keys = b.op("Reshape", [handles["k"], b.i64("key_heads", [0, 0, heads, dim])], "key_heads")
        metric = b.reduce_mean(keys, [2], keepdims=False, name="metric")                  # [B, N, d]
        metric = b.op("LpNormalization", [metric], "metric_unit", axis=-1, p=2)
        sizes_are_ones = size is None
        if sizes_are_ones:
            size, first_row = _first_merge_inputs(b, residual)
        merged_x, size = _merge(b, residual, size, sizes_are_ones, metric, n, r_block, vit.embed_dim,
                                schedule.protect_class_token, first_row)
        for consumer_name in (block.norm2, block.residual_ffn):
            consumer = nodes[consumer_name]
            consumer.inputs = [merged_x if t is residual else t for t in consumer.inputs]
    report = {"pass": "tome", "r": schedule.r, "tokens": schedule.tokens + [schedule.tokens[-1] - schedule.r[-1]],
              "protect_class_token": schedule.protect_class_token}
    return PassResult(export_like(graph, model), report)


def _first_merge_inputs(b: GraphBuilder, x):
    """Made once, before the first merge: token sizes (ones, [B, n, 1]) and each image's first row
    in a [B * rows] flattening divided by the row count ([B, 1]: 0, 1, 2, ...)."""
    batch = b.op("Shape", [x], "batch", out_dtype=np.int64, start=0, end=1)
    ones_shape = b.op("Concat", [b.op("Shape", [x], "xshape", out_dtype=np.int64, start=0, end=2),
                                 b.i64("one", [1])], "ones_shape", out_dtype=np.int64, axis=0)
    size = b.op("Expand", [b.f("one_size", np.ones((1, 1, 1))), ones_shape], "size_ones")
    ones = b.op("Expand", [b.i64("one_row", [[1]]), b.op("Concat", [batch, b.i64("one_col", [1])], "rows_shape",
                                                             out_dtype=np.int64, axis=0)], "row_ones", out_dtype=np.int64)
    counted = b.op("CumSum", [ones, b.i64("row_axis", 0)], "row_count", out_dtype=np.int64)
    return size, b.op("Sub", [counted, b.i64("row_one", 1)], "first_row", out_dtype=np.int64)


def _merge(b: GraphBuilder, x, size, sizes_are_ones: bool, metric, n: int, r: int, channels: int,
           protect_cls: bool, first_row):
    """Bipartite soft matching of n tokens, r merges: returns (x [B, n-r, C], size [B, n-r, 1])."""
    na, nb = (n + 1) // 2, n // 2

    def every_other(t, start, name):
        return b.op("Slice", [t, b.i64(f"{name}_start", [start]), b.i64(f"{name}_end", [n]),
                              b.i64(f"{name}_axis", [1]), b.i64(f"{name}_step", [2])], name)

    a_metric, b_metric = every_other(metric, 0, "metric_a"), every_other(metric, 1, "metric_b")
    scores = b.op("MatMul", [a_metric, b.op("Transpose", [b_metric], "metric_bT", perm=[0, 2, 1])], "similarity")
    if protect_cls:  # the class token (first of A) never merges
        guard = np.zeros((na, 1), dtype=b.dtype)
        guard[0, 0] = PROTECT
        scores = b.op("Add", [scores, b.f("protect_cls", guard)], "similarity_guarded")
    node_max = b.reduce("ReduceMax", scores, [-1], False, "node_max")                           # [B, na]
    node_idx = b.op("ArgMax", [scores], "node_idx", out_dtype=np.int64, axis=-1, keepdims=0)     # [B, na]
    _, edges = b.op("TopK", [node_max, b.i64("all_edges", [na])], "edge_order", n_out=2,
                    axis=-1, largest=1, sorted=1)
    edges.dtype = np.int64
    src_idx = b.op("Slice", [edges, b.i64("src_start", [0]), b.i64("src_end", [r]), b.i64("src_axis", [1])],
                   "src_idx", out_dtype=np.int64)
    unm_idx = b.op("Slice", [edges, b.i64("unm_start", [r]), b.i64("unm_end", [na]), b.i64("unm_axis", [1])],
                   "unm_idx", out_dtype=np.int64)
    if protect_cls:  # keep unmerged tokens in their original order, so the class token stays first
        unm_idx, _ = b.op("TopK", [unm_idx, b.i64("unm_count", [na - r])], "unm_sorted", n_out=2,
                          out_dtype=np.int64, axis=-1, largest=0, sorted=1)
        _.dtype = np.int64
    dst_idx = b.op("GatherElements", [node_idx, src_idx], "dst_idx", out_dtype=np.int64, axis=1)  # [B, r]

    # Merge x·size and size together: one set of gathers for [B, n, C + 1].
    weighted = x if sizes_are_ones else b.op("Mul", [x, size], "weighted")
    y = b.op("Concat", [weighted, size], "with_size", axis=2)
    y_a, y_b = every_other(y, 0, "y_a"), every_other(y, 1, "y_b")
    # One row Gather for the unmerged and the source rows of A, on A flattened to [B * na, C + 1]:
    # cheaper than GatherElements, whose index would be as large as the rows.
    rows = b.op("Concat", [unm_idx, src_idx], "a_order", out_dtype=np.int64, axis=1)
    rows = b.op("Add", [rows, b.op("Mul", [first_row, b.i64("a_count", na)], "a_offset", out_dtype=np.int64)],
                "a_rows_flat", out_dtype=np.int64)
    flat = b.op("Reshape", [y_a, b.i64("a_flat_shape", [-1, channels + 1])], "a_flat")
    gathered = b.op("Gather", [flat, rows], "a_rows", axis=0)
    unmerged, sources = b.op("Split", [gathered, b.i64("a_split", [na - r, r])], "unmerged_sources",
                             n_out=2, axis=1)                                                    # [B, na-r | r, C+1]
    # One-hot [B, nb, r]: column s marks the B token that source s merges into.
    hit = b.op("Equal", [b.i64("b_positions", np.arange(nb).reshape(nb, 1)),
                         b.op("Unsqueeze", [dst_idx, b.i64("dst_axis", [1])], "dst_row", out_dtype=np.int64)],
               "dst_hit", out_dtype=np.bool_)
    onehot = b.op("Cast", [hit], "dst_onehot", to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(b.dtype)))
    added = b.op("MatMul", [onehot, sources], "merged_sum")
    dst = b.op("Add", [y_b, added], "dst")                                                       # [B, nb, C+1]
    y = b.op("Concat", [unmerged, dst], "tokens", axis=1)                                        # [B, n-r, C+1]
    new_x = b.op("Slice", [y, b.i64("x_start", [0]), b.i64("x_end", [channels]), b.i64("x_axis", [2])], "sum_x")
    new_size = b.op("Slice", [y, b.i64("size_start", [channels]), b.i64("size_end", [channels + 1]),
                              b.i64("size_axis", [2])], "size")
    return b.op("Div", [new_x, new_size], "x"), new_size
