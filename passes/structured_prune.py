"""Physically remove attention dimensions and FFN channels, given what to keep.

The one place where pruning decisions become smaller weights. Attention of a pruned block is
rebuilt in a canonical form — one fused Q|K|V projection split three ways, Reshape to [0, 0, heads, dim] (0 copies
batch and tokens, so the batch stays dynamic), explicit score scale — whatever exporter made the
original. QK and V head dims may differ; the softmax scale stays the original one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..converter.graph.surgery import const_value, export_like, open_for_surgery
from ..converter.graph.vit_graph import Attention, Linear, ViTGraph
from ..errors import Vit2TrtError
from .base import PassResult


@dataclass
class BlockKeep:
    """What one block keeps; None keeps everything of that kind."""
    index: int
    qk_keep: Optional[list[list[int]]] = None   # per head, kept Q/K dims (equal count per head)
    v_keep: Optional[list[list[int]]] = None    # per head, kept V dims (= proj input rows)
    ffn_keep: Optional[list[int]] = None        # kept FFN hidden channels

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AttentionWeights:
    """Attention weights in (in, out) layout, columns ordered [head, dim]."""
    heads: int
    head_dim_qk: int
    head_dim_v: int
    wq: np.ndarray
    bq: Optional[np.ndarray]
    wk: np.ndarray
    bk: Optional[np.ndarray]
    wv: np.ndarray
    bv: Optional[np.ndarray]
    wproj: np.ndarray          # (heads * head_dim_v, embed_dim)


def _tensor(graph_tensors: dict, name: Optional[str]):
    return graph_tensors[name] if name else None


def linear_weight(tensors: dict, lin: Linear) -> np.ndarray:
    w = const_value(tensors[lin.weight])
    return np.asarray(w).T if lin.weight_layout == "out_in" else np.asarray(w)


def linear_bias(tensors: dict, lin: Linear) -> Optional[np.ndarray]:
    return None if lin.bias is None else np.asarray(const_value(tensors[lin.bias])).reshape(-1)


def attention_weights(tensors: dict, attn: Attention) -> AttentionWeights:
    h, dqk, dv = attn.heads, attn.head_dim_qk, attn.head_dim_v
    if attn.layout == "fused_qkv":
        w, b = linear_weight(tensors, attn.qkv), linear_bias(tensors, attn.qkv)
        width = {"q": h * dqk, "k": h * dqk, "v": h * dv}
        order = sorted(attn.qkv_chunks, key=attn.qkv_chunks.get)
        starts, pos = {}, 0
        for role in order:
            starts[role] = pos
            pos += width[role]
        part = {r: w[:, starts[r]:starts[r] + width[r]] for r in "qkv"}
        bias = {r: (None if b is None else b[starts[r]:starts[r] + width[r]]) for r in "qkv"}
    else:
        part = {r: linear_weight(tensors, getattr(attn, r)) for r in "qkv"}
        bias = {r: linear_bias(tensors, getattr(attn, r)) for r in "qkv"}
    return AttentionWeights(h, dqk, dv, part["q"], bias["q"], part["k"], bias["k"], part["v"], bias["v"],
                            linear_weight(tensors, attn.proj))


def _columns(keep: list[list[int]], head_dim: int) -> np.ndarray:
    return np.array([h * head_dim + j for h, dims in enumerate(keep) for j in dims], dtype=np.int64)


def _check_keep(keep: Optional[list[list[int]]], heads: int, head_dim: int, what: str, block: int):
    if keep is None:
        return [list(range(head_dim))] * heads
    if len(keep) != heads or len({len(k) for k in keep}) != 1 or not keep[0]:
        raise Vit2TrtError(f"block {block}: {what} keep lists must give the same non-zero count for each of "
                           f"{heads} heads, got counts {[len(k) for k in keep]}.")
    for dims in keep:
        if len(set(dims)) != len(dims) or min(dims) < 0 or max(dims) >= head_dim:
            raise Vit2TrtError(f"block {block}: {what} keep indices must be distinct and in [0, {head_dim}).")
    return [sorted(int(j) for j in dims) for dims in keep]


def prune_structure(model: onnx.ModelProto, vit: ViTGraph, keeps: list[BlockKeep]) -> PassResult:
    surgery = open_for_surgery(model)
    graph, tensors, nodes, dtype = surgery.graph, surgery.tensors, surgery.nodes, surgery.dtype
    done = []
    for keep in sorted(keeps, key=lambda k: k.index):
        block = vit.blocks[keep.index]
        record = {"index": keep.index}
        if keep.qk_keep is not None or keep.v_keep is not None:
            record.update(rebuild_attention(graph, tensors, nodes, block, keep, dtype)[0])
        if keep.ffn_keep is not None:
            record.update(_prune_ffn(graph, tensors, nodes, block, keep, dtype))
        done.append(record)
    return PassResult(export_like(graph, model), {"blocks": done})


def _const(name: str, value: np.ndarray, dtype=None) -> gs.Constant:
    value = np.ascontiguousarray(value if dtype is None else value.astype(dtype))
    return gs.Constant(name, values=value)


def rebuild_attention(graph, tensors, nodes, block, keep: BlockKeep, dtype, score_bias=None,
                      qkv_hook=None, context_hook=None, need_probs: bool = False) -> tuple[dict, dict]:
    """Rebuild one block's attention in canonical form with the kept dims.

    Where the graph wrote the block as one ONNX Attention node, the rebuilt block is one again
    (TensorRT parses it straight into its fused attention), with `score_bias` as its additive mask,
    unless the caller reads the probabilities (`need_probs`), re-lays the tokens (hooks), or the
    pruned Q·K and V head dims differ (TensorRT's fused attention wants K and V of one shape): then
    it is spelt out as MatMul → Softmax → MatMul. The record's "attention" says which.

    `score_bias` ([B, 1, 1, N]) is added to the scaled scores (ToMe's proportional attention).
    `score_bias` is also where AS-ViT masks dropped or padding tokens out as keys.
    `qkv_hook` and `context_hook` may re-lay the fused projection's output before the heads split
    and the merged heads before the output projection (AS-ViT's packed form pads and packs there);
    with them, the returned "k", "k_heads", "probs" and "context" are in the padded per-image
    layout, while "input" stays packed.
    Returns what was done and the new graph tensors of interest: "k" ([B, N, heads·dim], the keys
    before the head split), "input" (the attention's input), "probs" ([B, heads, N, N]; None where the
    fused op stays) and "context" ([B, heads, N, dim], each head's output before the heads are merged).
    """
    attn = block.attn
    w = attention_weights(tensors, attn)
    qk_keep = _check_keep(keep.qk_keep, w.heads, w.head_dim_qk, "QK", block.index)
    v_keep = _check_keep(keep.v_keep, w.heads, w.head_dim_v, "V", block.index)
    qk_cols, v_cols = _columns(qk_keep, w.head_dim_qk), _columns(v_keep, w.head_dim_v)
    h, dqk, dv = w.heads, len(qk_keep[0]), len(v_keep[0])
    scale = attn.scale if attn.scale is not None else attn.head_dim_qk ** -0.5
    prefix = f"vit2trt/blocks.{block.index}/attn"
    taken = {n.name for n in graph.nodes}
    rebuilds = 1
    while f"{prefix}/qkv/MatMul" in taken:   # rebuilt before (pruned, then merged): fresh, unique names
        rebuilds += 1
        prefix = f"vit2trt/blocks.{block.index}/attn_{rebuilds}"
    first = attn.qkv or attn.q
    x = nodes[first.node].inputs[0]

    def node(op, inputs, name, attrs=None):
        out = gs.Variable(f"{prefix}/{name}_out", dtype=dtype if op not in ("Shape",) else np.int64)
        graph.nodes.append(gs.Node(op, name=f"{prefix}/{name}", inputs=inputs, outputs=[out], attrs=attrs or {}))
        return out

    # One fused projection (one pass over x, one GEMM), split into Q, K and V of their own widths.
    weight = np.concatenate([w.wq[:, qk_cols], w.wk[:, qk_cols], w.wv[:, v_cols]], axis=1)
    qkv = node("MatMul", [x, _const(f"{prefix}/qkv.weight", weight, dtype)], "qkv/MatMul")
    if w.bq is not None or w.bk is not None or w.bv is not None:
        zeros = lambda n: np.zeros(n, dtype=dtype)  # noqa: E731 - a missing bias is a zero bias
        bias = np.concatenate([w.bq[qk_cols] if w.bq is not None else zeros(len(qk_cols)),
                               w.bk[qk_cols] if w.bk is not None else zeros(len(qk_cols)),
                               w.bv[v_cols] if w.bv is not None else zeros(len(v_cols))])
        qkv = node("Add", [qkv, _const(f"{prefix}/qkv.bias", bias, dtype)], "qkv/Add")
    if qkv_hook is not None:
        qkv = qkv_hook(qkv)
    widths = np.array([h * dqk, h * dqk, h * dv], dtype=np.int64)
    parts = [gs.Variable(f"{prefix}/qkv/Split_out{i}", dtype=dtype) for i in range(3)]
    graph.nodes.append(gs.Node("Split", name=f"{prefix}/qkv/Split", inputs=[qkv, _const(f"{prefix}/qkv.widths", widths)],
                               outputs=parts, attrs={"axis": -1}))

    def heads_of(role, y, dim, perm):
        shape = _const(f"{prefix}/{role}.heads_shape", np.array([0, 0, h, dim], dtype=np.int64))
        y = node("Reshape", [y, shape], f"{role}/Reshape")
        return node("Transpose", [y], f"{role}/Transpose", {"perm": perm})

    explicit_because = _explicit_attention_reason(attn, need_probs, qkv_hook, context_hook, dqk, dv)
    q = heads_of("q", parts[0], dqk, [0, 2, 1, 3])
    k = heads_of("k", parts[1], dqk, [0, 2, 3, 1] if explicit_because else [0, 2, 1, 3])
    v = heads_of("v", parts[2], dv, [0, 2, 1, 3])
    probs = None
    if explicit_because:
        scores = node("MatMul", [q, k], "scores/MatMul")
        scores = node("Mul", [scores, _const(f"{prefix}/scale", np.array(scale, dtype=dtype))], "scores/Mul")
        for i, mask_name in enumerate(attn.mask_inputs):  # constant masks stay as they were
            if tensors[mask_name].dtype == np.bool_:
                raise Vit2TrtError(f"block {block.index}: a boolean attention mask that masks some keys cannot be "
                                   "rewritten yet; export the model without an attention mask.")
            scores = node("Add", [scores, tensors[mask_name]], f"scores/mask_{i}")
        if score_bias is not None:
            scores = node("Add", [scores, score_bias], "scores/size_bias")
        probs = node("Softmax", [scores], "Softmax", {"axis": -1})
        heads_ctx = node("MatMul", [probs, v], "context/MatMul")
    else:
        inputs = [q, k, v]
        if score_bias is not None:   # [B|1, 1, 1, N] -> [B|1, 1, N, N]: the op wants one row per query
            inputs.append(node("Expand", [score_bias, _square_mask_shape(graph, prefix, score_bias)], "mask/Expand"))
        heads_ctx = node("Attention", inputs, "Attention", {"scale": float(scale)})
    ctx = node("Transpose", [heads_ctx], "context/Transpose", {"perm": [0, 2, 1, 3]})
    ctx = node("Reshape", [ctx, _const(f"{prefix}/context.shape", np.array([0, 0, h * dv], dtype=np.int64))],
               "context/Reshape")
    if context_hook is not None:
        ctx = context_hook(ctx)
    proj = nodes[attn.proj.node]
    if proj.op != "MatMul":
        raise Vit2TrtError(f"block {block.index}: output projection '{proj.name}' is a {proj.op}, expected MatMul.")
    proj.inputs[0] = ctx
    proj.inputs[1] = _const(f"{prefix}/proj.weight", w.wproj[v_cols, :], dtype)
    record = {"heads": h, "head_dim_qk": [w.head_dim_qk, dqk], "head_dim_v": [w.head_dim_v, dv], "scale": scale,
              "attention": f"explicit ({explicit_because})" if explicit_because else "onnx_attention"}
    return record, {"k": parts[1], "input": x, "probs": probs, "context": heads_ctx}


def _explicit_attention_reason(attn, need_probs: bool, qkv_hook, context_hook, dqk: int, dv: int) -> str:
    """Why a block must be written as MatMul → Softmax → MatMul; empty when the fused op can stay."""
    if not attn.fused_op:
        return "as exported"
    if need_probs:
        return "the pass reads the attention probabilities"
    if qkv_hook is not None or context_hook is not None:
        return "tokens are re-laid inside attention"
    if dqk != dv:
        return f"Q·K head dim {dqk} differs from V head dim {dv}"
    if attn.mask_inputs:
        return "the graph adds a constant attention mask"
    return ""


def _square_mask_shape(graph, prefix: str, score_bias) -> gs.Variable:
    """[1, 1, N, 1] from the bias's last dim, so that Expand gives every query row its own copy."""
    n = gs.Variable(f"{prefix}/mask/tokens", dtype=np.int64)
    graph.nodes.append(gs.Node("Shape", name=f"{prefix}/mask/Shape", inputs=[score_bias], outputs=[n],
                               attrs={"start": -1}))
    shape = gs.Variable(f"{prefix}/mask/shape", dtype=np.int64)
    graph.nodes.append(gs.Node("Concat", name=f"{prefix}/mask/Concat", outputs=[shape], attrs={"axis": 0},
                               inputs=[_const(f"{prefix}/mask/ones", np.array([1, 1], dtype=np.int64)), n,
                                       _const(f"{prefix}/mask/one", np.array([1], dtype=np.int64))]))
    return shape


def _prune_ffn(graph, tensors, nodes, block, keep: BlockKeep, dtype) -> dict:
    ffn = block.ffn
    channels = sorted(int(c) for c in keep.ffn_keep)
    if not channels or len(set(channels)) != len(channels) or channels[0] < 0 or channels[-1] >= ffn.hidden:
        raise Vit2TrtError(f"block {block.index}: FFN keep list must hold distinct channels in [0, {ffn.hidden}).")
    cols = np.array(channels, dtype=np.int64)
    prefix = f"vit2trt/blocks.{block.index}/ffn"
    fc1, fc2 = nodes[ffn.fc1.node], nodes[ffn.fc2.node]
    if fc1.op != "MatMul" or fc2.op != "MatMul":
        raise Vit2TrtError(f"block {block.index}: FFN projections must be MatMul nodes to prune them.")
    fc1.inputs[1] = _const(f"{prefix}/fc1.weight", linear_weight(tensors, ffn.fc1)[:, cols], dtype)
    if ffn.fc1.bias is not None:
        add = nodes[ffn.fc1.bias_node]
        slot = next(i for i, t in enumerate(add.inputs) if t.name == ffn.fc1.bias)
        add.inputs[slot] = _const(f"{prefix}/fc1.bias", linear_bias(tensors, ffn.fc1)[cols], dtype)
    fc2.inputs[1] = _const(f"{prefix}/fc2.weight", linear_weight(tensors, ffn.fc2)[cols, :], dtype)
    return {"ffn_hidden": [ffn.hidden, len(channels)]}
