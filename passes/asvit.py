"""AS-ViT adaptive token pruning (Liu, Wu, Guo, "Adaptive Sparse ViT", arXiv 2209.13802).

Score of token j after a block's attention, from the class-token row of each head weighted by
how much that head's output for j weighs:

    s_j = Σ_h R_h,j · A_h[cls, j],   R_h,j = ‖(A_h V_h)_j‖₂ / Σ_h' ‖(A_h' V_h')_j‖₂

Before each stage block, tokens with s_j ≤ θ_stage (scores of the block just before) are dropped
for good; extra tokens (class, distillation, registers) always stay. Each image keeps as many
tokens as it needs.

Two graph forms, with identical outputs:
- "dynamic": the sequence really shrinks. Each stage keeps K = the batch's largest kept count
  (a TopK whose K is computed from the scores: ONNX Runtime runs it, TensorRT-RTX cannot), in
  original order; an image's tokens beyond its own count are masked out of attention. At batch 1
  K is the image's own count.
- "bounded": no shrinking; dropped tokens are masked out of attention (−10⁴ on their key columns,
  exp of which is exactly 0 in float32). Every runtime builds it, TensorRT-RTX included.
Masked tokens never influence kept ones and pooling reads the class token, so an image's output
does not depend on its batch neighbours.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from vit2trt.converter.graph_utils import GraphBuilder, export_like, open_for_surgery
from vit2trt.converter.vit_graph import ViTGraph
from vit2trt.errors import Vit2TrtError
from vit2trt.passes.base import PassResult
from vit2trt.passes.structured_prune import BlockKeep, rebuild_attention

MASKED = -1e4
FORMS = ("dynamic", "bounded")


def default_stages(depth: int) -> list[int]:
    """Blocks 4, 7, 10 of a 12-block model (the paper's DeiT stages), scaled to other depths."""
    return sorted({max(1, min(depth - 1, round(depth * s / 12))) for s in (4, 7, 10)})


@dataclass
class ASViTSettings:
    stages: list[int]          # blocks before which tokens are dropped
    thresholds: list[float]    # θ per stage
    form: str                  # "dynamic" or "bounded"
    protected: int             # leading extra tokens that always stay


def check_settings(vit: ViTGraph, stages: list[int], thresholds: list[float], form: str) -> ASViTSettings:
    if not any(t.kind == "class" for t in vit.extra_tokens):
        raise Vit2TrtError("AS-ViT scores tokens by class attention; this model has no class token.")
    if form not in FORMS:
        raise Vit2TrtError(f"unknown AS-ViT graph form '{form}'; choose {' or '.join(FORMS)}.")
    if form == "dynamic" and any(b.attn.mask_inputs for b in vit.blocks):
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
                form: str = "dynamic") -> PassResult:
    settings = check_settings(vit, stages, thresholds, form)
    surgery = open_for_surgery(model)
    graph, tensors, nodes, opset, dtype = (surgery.graph, surgery.tensors, surgery.nodes,
                                            surgery.opset, surgery.dtype)
    theta = dict(zip([s - 1 for s in settings.stages], settings.thresholds))  # scored after block s-1
    first_scored = min(theta)
    bias, keep = None, None      # attention bias [B,1,1,N] and keep mask [B,N] (bool) once pruning began
    for block in vit.blocks:
        b = GraphBuilder(graph, f"vit2trt/blocks.{block.index}/asvit", dtype, opset)
        if block.index < first_scored and bias is None:
            continue  # untouched until the first scored block
        _, handles = rebuild_attention(graph, tensors, nodes, block, BlockKeep(block.index), dtype, score_bias=bias)
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
        if settings.form == "dynamic":
            x, keep = _shrink(b, out, keep, vit.embed_dim)
            for consumer in list(out.outputs):
                if consumer.name.startswith(b.prefix):
                    continue
                consumer.inputs = [x if t is out else t for t in consumer.inputs]
        as_float = b.op("Cast", [keep], "keep_float", to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        penalty = b.op("Mul", [b.op("Sub", [as_float, b.f("one", 1.0)], "dropped"), b.f("masked", -MASKED)],
                       "penalty")
        bias = b.op("Reshape", [penalty, b.i64("bias_shape", [0, 1, 1, -1])], "bias")
    report = {"pass": "asvit", "stages": settings.stages, "thresholds": settings.thresholds, "form": settings.form,
              "protected_tokens": settings.protected}
    return PassResult(export_like(graph, model), report)


def _scores(b: GraphBuilder, probs, context):
    """s_j = Σ_h R_h,j · A_h[cls, j] from probs [B,H,N,N] and per-head outputs [B,H,N,d]."""
    norms = b.op("Sqrt", [b.reduce("ReduceSumSquare", context, [-1], False, "ctx_sq")], "ctx_norm")   # [B,H,N]
    share = b.op("Div", [norms, b.reduce("ReduceSum", norms, [1], True, "ctx_norm_sum")], "head_share")
    cls_row = b.op("Gather", [probs, b.i64("cls_query", 0)], "cls_attention", axis=2)                  # [B,H,N]
    return b.reduce("ReduceSum", b.op("Mul", [share, cls_row], "weighted"), [1], False, "score")


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
