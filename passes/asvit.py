"""AS-ViT adaptive token pruning (Liu, Wu, Guo, "Adaptive Sparse ViT", arXiv 2209.13802).

Score of token j after a block's attention, from the class-token row of each head weighted by
how much that head's output for j weighs:

    s_j = Σ_h R_h,j · A_h[cls, j],   R_h,j = ‖(A_h V_h)_j‖₂ / Σ_h' ‖(A_h' V_h')_j‖₂

Before each stage block, tokens with s_j ≤ θ_stage (scores of the block just before) are dropped
for good; extra tokens (class, distillation, registers) always stay. Each image keeps as many
tokens as it needs.

Three graph forms, with identical outputs:
- "packed" (default): the sequence really shrinks, and at batch > 1 the linear layers (QKV,
  projection, FFN: most of the FLOPs) run on the kept tokens of all images packed into one
  sequence [1, T, C]; attention alone runs per image, padded to the batch's largest count with
  the padding masked. Each block gathers into and out of the padded layout once.
- "dynamic": the sequence shrinks to K = the batch's largest kept count for every layer, in
  original order; an image's tokens beyond its own count are masked out of attention.
- "bounded": no shrinking; dropped tokens are masked out of attention (−10⁴ on their key columns,
  exp of which is exactly 0 in float32). It uses no data-dependent shape.
At batch 1 "packed" and "dynamic" run the image's own count.
Masked tokens never influence kept ones and pooling reads the class token, so an image's output
does not depend on its batch neighbours.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..converter.graph.surgery import GraphBuilder, export_like, open_for_surgery
from ..converter.graph.vit_graph import ViTGraph
from ..errors import Vit2TrtError
from .base import PassResult
from .structured_prune import BlockKeep, rebuild_attention

MASKED = -1e4
FORMS = ("dynamic", "bounded", "packed")


def default_stages(depth: int) -> list[int]:
    """Blocks 4, 7, 10 of a 12-block model (the paper's DeiT stages), scaled to other depths."""
    return sorted({max(1, min(depth - 1, round(depth * s / 12))) for s in (4, 7, 10)})


@dataclass
class ASViTSettings:
    stages: list[int]          # blocks before which tokens are dropped
    thresholds: list[float]    # θ per stage
    form: str                  # "dynamic", "bounded" or "packed"
    protected: int             # leading extra tokens that always stay


def check_settings(vit: ViTGraph, stages: list[int], thresholds: list[float], form: str) -> ASViTSettings:
    if not any(t.kind == "class" for t in vit.extra_tokens):
        raise Vit2TrtError("AS-ViT scores tokens by class attention; this model has no class token.")
    if vit.pooling != "token":
        raise Vit2TrtError(f"AS-ViT drops tokens, and this model's head averages all of them ({vit.pooling} pooling), "
                           "so its output would change with every dropped token; AS-ViT supports models whose head "
                           "reads the class token (timm global_pool='token').")
    if form not in FORMS:
        raise Vit2TrtError(f"unknown AS-ViT graph form '{form}'; choose {' or '.join(FORMS)}.")
    if form != "bounded" and any(b.attn.mask_inputs for b in vit.blocks):
        raise Vit2TrtError("this graph adds a fixed-size mask to its attention scores (as Hugging Face dynamo "
                           "exports do), which cannot follow a shrinking sequence: use --asvit-form bounded, or "
                           "export with --exporter torchscript.")
    if any(not 1 <= s < vit.depth for s in stages) or sorted(set(stages)) != list(stages):
        raise Vit2TrtError(f"AS-ViT stages must be increasing block indices in [1, {vit.depth - 1}], got {stages}.")
    if len(thresholds) != len(stages):
        raise Vit2TrtError(f"AS-ViT needs one threshold per stage ({len(stages)}), got {len(thresholds)}.")
    if any(not np.isfinite(t) or t < 0 for t in thresholds):
        raise Vit2TrtError(f"AS-ViT thresholds must be finite and non-negative, got {thresholds}.")
    return ASViTSettings(list(stages), [float(t) for t in thresholds], form, vit.num_extra_tokens)


def apply_asvit(model: onnx.ModelProto, vit: ViTGraph, stages: list[int], thresholds: list[float],
                form: str = "packed") -> PassResult:
    settings = check_settings(vit, stages, thresholds, form)
    surgery = open_for_surgery(model)
    graph, tensors, nodes, opset, dtype = (surgery.graph, surgery.tensors, surgery.nodes,
                                            surgery.opset, surgery.dtype)
    theta = dict(zip([s - 1 for s in settings.stages], settings.thresholds))  # scored after block s-1
    first_scored = min(theta)
    bias, keep = None, None      # attention bias [B,1,1,N] and keep mask [B,N] (bool) once pruning began
    packing = None               # packed form, once pruning began: (pad_map [B,K], pack_index [T])
    for block in vit.blocks:
        b = GraphBuilder(graph, f"vit2trt/blocks.{block.index}/asvit", dtype, opset)
        if block.index < first_scored and bias is None:
            continue  # untouched until the first scored block
        hooks = {}
        if packing is not None:   # linear layers on the packed tokens, attention padded per image
            hooks = {"qkv_hook": lambda t, b=b, p=packing: _unpack(b, t, p, "qkv"),
                     "context_hook": lambda t, b=b, p=packing: _pack(b, t, p, "context")}
        _, handles = rebuild_attention(graph, tensors, nodes, block, BlockKeep(block.index), dtype, score_bias=bias,
                                       need_probs=block.index in theta, **hooks)
        if block.index not in theta:
            continue
        scores = _scores(b, handles["probs"], handles["context"])                        # [B, N]
        above = b.op("Greater", [scores, b.f("threshold", theta[block.index])], "above", out_dtype=np.bool_)
        # Extra tokens always stay: the first `protected` positions, whatever the current length.
        protected = np.zeros((1, vit.num_tokens), dtype=np.bool_)
        protected[0, :settings.protected] = True
        length = b.op("Shape", [scores], "length", out_dtype=np.int64, start=1, end=2)
        protected = b.op("Slice", [gs.Constant(f"{b.prefix}/protected", protected), b.i64("zero", [0]), length,
                                   b.i64("token_axis", [1])], "protected_mask", out_dtype=np.bool_)
        above = b.op("Or", [above, protected], "keep_new", out_dtype=np.bool_)
        keep = above if keep is None else b.op("And", [above, keep], "keep", out_dtype=np.bool_)
        out = nodes[block.residual_ffn].outputs[0]
        if settings.form in ("dynamic", "packed"):
            if settings.form == "dynamic":
                x, keep = _shrink(b, out, keep, vit.embed_dim)
            else:
                padded = out if packing is None else _unpack(b, out, packing, "tokens")
                x, packing, keep = _repack(b, padded, keep)
            _replace_uses(out, x, b.prefix)
        as_float = b.op("Cast", [keep], "keep_float", to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        penalty = b.op("Mul", [b.op("Sub", [as_float, b.f("one", 1.0)], "dropped"), b.f("masked", -MASKED)],
                       "penalty")
        bias = b.op("Reshape", [penalty, b.i64("bias_shape", [0, 1, 1, -1])], "bias")
    if packing is not None:   # the final norm and head read [B, K, C], class token first
        b = GraphBuilder(graph, "vit2trt/asvit_unpack", dtype, opset)
        last = nodes[vit.blocks[-1].residual_ffn].outputs[0]
        _replace_uses(last, _unpack(b, last, packing, "tokens"), b.prefix)
    report = {"pass": "asvit", "stages": settings.stages, "thresholds": settings.thresholds, "form": settings.form,
              "protected_tokens": settings.protected}
    return PassResult(export_like(graph, model), report)


def _scores(b: GraphBuilder, probs, context):
    """s_j = Σ_h R_h,j · A_h[cls, j] from probs [B,H,N,N] and per-head outputs [B,H,N,d]."""
    norms = b.op("Sqrt", [b.reduce("ReduceSumSquare", context, [-1], False, "ctx_sq")], "ctx_norm")   # [B,H,N]
    share = b.op("Div", [norms, b.reduce("ReduceSum", norms, [1], True, "ctx_norm_sum")], "head_share")
    cls_row = b.op("Gather", [probs, b.i64("cls_query", 0)], "cls_attention", axis=2)                  # [B,H,N]
    return b.reduce("ReduceSum", b.op("Mul", [share, cls_row], "weighted"), [1], False, "score")


def _replace_uses(old, new, own_prefix: str) -> None:
    """Consumers of `old` read `new`, except the nodes that made `new` (under `own_prefix`)."""
    for consumer in list(old.outputs):
        if not consumer.name.startswith(own_prefix):
            consumer.inputs = [new if t is old else t for t in consumer.inputs]


def _repack(b: GraphBuilder, padded, keep):
    """Packed form: the kept tokens of all images in one sequence [1, T, C] (image after image, each in
    its original order), and the maps between it and the per-image padded layout [B, K]:
    pad_map [B, K] (packed row; 0 for a padding row) and pack_index [T] (flat padded position).

    Every TopK ranks within one image (K ≤ its tokens; TensorRT caps K at 3840) and counts are
    int64, so an fp16 engine cannot round them."""
    keep_i = b.op("Cast", [keep], "keep_i", to=onnx.TensorProto.INT64, out_dtype=np.int64)          # [B, K_old]
    counts = b.reduce("ReduceSum", keep_i, [1], False, "counts", out_dtype=np.int64)                # [B]
    total = b.reduce("ReduceSum", counts, [0], False, "total", out_dtype=np.int64)                  # scalar
    longest = b.reduce("ReduceMax", counts, [0], True, "longest", out_dtype=np.int64)              # [1]
    offsets = b.op("CumSum", [counts, b.i64("count_axis", 0)], "offsets", out_dtype=np.int64, exclusive=1)
    # Packed row t: its image (how many images start at or before t, minus one) and its place there.
    t = b.op("Range", [b.i64("t_start", 0), total, b.i64("t_step", 1)], "packed_row", out_dtype=np.int64)  # [T]
    started = b.op("LessOrEqual", [b.op("Unsqueeze", [offsets, b.i64("offset_row", [0])], "offsets_row",
                                        out_dtype=np.int64),
                                   b.op("Unsqueeze", [t, b.i64("t_col", [1])], "t_col", out_dtype=np.int64)],
                   "started", out_dtype=np.bool_)                                                 # [T, B]
    image = b.op("Sub", [b.reduce("ReduceSum", b.op("Cast", [started], "started_i", to=onnx.TensorProto.INT64,
                                                     out_dtype=np.int64), [1], False, "images_started",
                                  out_dtype=np.int64), b.i64("one_i", 1)], "image", out_dtype=np.int64)
    local = b.op("Sub", [t, b.op("Gather", [offsets, image], "image_offset", out_dtype=np.int64, axis=0)], "local",
                 out_dtype=np.int64)                                                              # [T]
    # Each image's kept columns, ascending: TopK on keep · (K_old − column), K = the largest count.
    width = b.op("Shape", [keep_i], "old_width", out_dtype=np.int64, start=1, end=2)               # [1]
    rank = b.op("Range", [b.op("Squeeze", [width], "old_width_scalar", out_dtype=np.int64), b.i64("rank_end", 0),
                          b.i64("rank_step", -1)], "rank", out_dtype=np.int64)
    _, kept_columns = b.op("TopK", [b.op("Mul", [keep_i, rank], "ranked", out_dtype=np.int64), longest],
                           "kept_columns", n_out=2, out_dtype=np.int64, axis=1, largest=1, sorted=1)
    kept_columns.dtype = np.int64                                                                 # [B, longest]
    column = b.op("Gather", [b.op("Reshape", [kept_columns, b.i64("columns_flat", [-1])], "columns_flat",
                                  out_dtype=np.int64),
                             b.op("Add", [b.op("Mul", [image, longest], "image_base", out_dtype=np.int64), local],
                                  "column_index", out_dtype=np.int64)], "source_column", out_dtype=np.int64, axis=0)
    source = b.op("Add", [b.op("Mul", [image, width], "old_base", out_dtype=np.int64), column], "source_row",
                  out_dtype=np.int64)                                                             # [T]
    tokens = b.op("Gather", [b.op("Flatten", [padded], "padded_rows", axis=2), source], "packed_rows", axis=0)
    packed = b.op("Unsqueeze", [tokens, b.i64("packed_axis", [0])], "packed")                      # [1, T, C]
    # The new padded layout [B, longest]: image b's kept tokens in columns 0 .. count_b − 1.
    columns = b.op("Range", [b.i64("range_start", 0), b.op("Squeeze", [longest], "longest_scalar", out_dtype=np.int64),
                             b.i64("range_step", 1)], "column", out_dtype=np.int64)
    valid = b.op("Less", [b.op("Unsqueeze", [columns, b.i64("col_axis", [0])], "column_row", out_dtype=np.int64),
                          b.op("Unsqueeze", [counts, b.i64("count_col", [1])], "counts_col", out_dtype=np.int64)],
                 "valid", out_dtype=np.bool_)                                                    # [B, K]
    position = b.op("Add", [b.op("Unsqueeze", [offsets, b.i64("offset_col", [1])], "offsets_col", out_dtype=np.int64),
                            b.op("Unsqueeze", [columns, b.i64("col_axis2", [0])], "column_row2", out_dtype=np.int64)],
                    "position", out_dtype=np.int64)
    pad_map = b.op("Where", [valid, position, b.i64("padding_row", 0)], "pad_map", out_dtype=np.int64)
    pack_index = b.op("Add", [b.op("Mul", [image, longest], "new_base", out_dtype=np.int64), local], "pack_index",
                      out_dtype=np.int64)                                                         # [T]
    return packed, (pad_map, pack_index), valid


def _unpack(b: GraphBuilder, packed, packing, name: str):
    """[1, T, W] packed rows -> [B, K, W] per image. Padding rows repeat row 0: attention masks them
    as keys, and their own outputs are dropped when packing again, so no zero row is copied in."""
    pad_map, _ = packing
    padded = b.op("Gather", [packed, pad_map], f"{name}_gathered", axis=1)                      # [1, B, K, W]
    return b.op("Squeeze", [padded, b.i64(f"{name}_batch_axis", [0])], f"{name}_padded")


def _pack(b: GraphBuilder, padded, packing, name: str):
    """[B, K, W] per image -> [1, T, W] packed rows."""
    _, pack_index = packing
    rows = b.op("Gather", [b.op("Flatten", [padded], f"{name}_flat", axis=2), pack_index], f"{name}_packed_rows",
                axis=0)
    return b.op("Unsqueeze", [rows, b.i64(f"{name}_packed_axis", [0])], f"{name}_packed")


def _shrink(b: GraphBuilder, x, keep, channels: int):
    """Keep the batch's largest kept count of tokens per image, in original order."""
    keep_f = b.op("Cast", [keep], "keep_f", to=onnx.TensorProto.FLOAT, out_dtype=np.float32)
    count = b.reduce("ReduceMax", b.reduce("ReduceSum", keep_f, [1], False, "count"), [0], True, "batch_count")
    k = b.op("Cast", [count], "k", to=onnx.TensorProto.INT64, out_dtype=np.int64)                  # [1]
    _, chosen = b.op("TopK", [keep_f, k], "chosen", n_out=2, out_dtype=np.float32, axis=-1, largest=1, sorted=1)
    chosen.dtype = np.int64
    as_float = b.op("Cast", [chosen], "chosen_f", to=onnx.TensorProto.FLOAT, out_dtype=np.float32)
    ordered, _ = b.op("TopK", [as_float, k], "in_order", n_out=2, out_dtype=np.float32, axis=-1, largest=0, sorted=1)
    _.dtype = np.int64
    index = b.op("Cast", [ordered], "index", to=onnx.TensorProto.INT64, out_dtype=np.int64)          # [B, K]
    rows = b.op("Unsqueeze", [index, b.i64("col", [-1])], "rows", out_dtype=np.int64)
    shape = b.op("Concat", [b.op("Shape", [rows], "rows_shape", out_dtype=np.int64, start=0, end=2),
                            b.i64("width", [channels])], "gather_shape", out_dtype=np.int64, axis=0)
    rows = b.op("Expand", [rows, shape], "rows_expanded", out_dtype=np.int64)
    x = b.op("GatherElements", [x, rows], "tokens", axis=1)
    keep = b.op("GatherElements", [keep, index], "keep_kept", out_dtype=np.bool_, axis=1)
    return x, keep
