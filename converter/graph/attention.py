"""Attention: its core in either form (MatMul -> Softmax -> MatMul with scale, masks and SDPA's NaN
guard, or one ONNX Attention node), the Q, K and V projections behind it, the head reshapes, the
output projection, and the layer scale and residual Add that end the attention half of a block."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from .vit_graph import Attention, HeadReshape, LayerScale, Linear
from ...errors import NotAViTError
from .linear import linear_from_matmul, trace_back_to_linear
from .lookup import LINEAR_OPS, GraphIndex, Observed, is_onnx_attention, residual_after

# Ops the A·V result passes through on its way to the output projection.
_OUTPUT_PATH_OPS = {"Transpose", "Reshape", "Flatten", "Identity", "Cast", "MatMul", "Gemm", "Gather", "Unsqueeze"}


@dataclass
class Scale:
    """The product of the constant scale factors on the score path, and the nodes that apply them."""
    value: float = 1.0
    from_shape: bool = False   # a factor is computed at run time from q's shape (TorchScript SDPA)
    nodes: list[str] = field(default_factory=list)

    def fold(self, g: GraphIndex, node: gs.Node) -> None:
        """Take in a Mul or Div by a constant (or by a value computed from a shape)."""
        self.nodes.append(node.name)
        others = [t for t in node.inputs if g.is_static(t)]
        if len(others) != 1:
            return
        value = g.const_value(others[0])
        if value is None or value.size != 1:
            self.from_shape = True
            return
        value = float(np.asarray(value).reshape(-1)[0])
        self.value = self.value * value if node.op == "Mul" else self.value / value


@dataclass
class AttentionCore:
    """What computes softmax(Q·Kᵀ·scale + mask)·V, in either form."""
    where: str                 # names the block and the anchor in messages
    q: gs.Tensor
    k: gs.Tensor
    v: gs.Tensor
    out: gs.Tensor             # the per-head result
    heads: int
    head_dim_qk: int
    head_dim_v: int
    tokens: int
    scale: Scale
    mask_nodes: list[str]
    mask_inputs: list[str]
    qk_matmul: str = ""        # explicit form
    softmax: str = ""
    av_matmul: str = ""
    nan_guard_nodes: list[str] = field(default_factory=list)
    fused_op: str = ""         # the ONNX Attention node


@dataclass
class AttentionBranch:
    """The attention half of a block: from the block input through the residual Add."""
    attn: Attention
    block_input: str           # the residual stream entering the block
    norm1: Optional[str]
    layer_scale: Optional[LayerScale]
    residual: gs.Node          # the Add after the output projection
    tokens: int                # tokens the attention sees


def read_attention(g: GraphIndex, shapes: Observed, index: int, anchor: gs.Node) -> AttentionBranch:
    """Block `index`'s attention around `anchor` (its Softmax or ONNX Attention node)."""
    core = fused_core(g, shapes, index, anchor) if is_onnx_attention(anchor) else explicit_core(g, shapes, index, anchor)
    return _branch_around(g, shapes, core)


def explicit_core(g: GraphIndex, shapes: Observed, index: int, softmax: gs.Node) -> AttentionCore:
    """Q·Kᵀ MatMul → (scale, mask) → Softmax → (Cast, NaN guard) → A·V MatMul."""
    where = f"block {index} (Softmax '{softmax.name}')"
    scale, mask_nodes, mask_inputs = Scale(), [], []
    t = softmax.inputs[0]
    qk = None
    for _ in range(6):  # scale ops between the score MatMul and Softmax (HF divides here)
        node = g.producer(t)
        if node is None:
            break
        if node.op == "MatMul" and g.const_value(node.inputs[1]) is None:
            qk = node
            break
        if node.op == "Add":  # an attention mask (HF adds an all-zero one; ToMe adds log(size))
            t = g.data_input(node)
            if t is None:  # both inputs computed: the scores are the full-shaped one
                full = shapes.shape(softmax.inputs[0])
                same = [i for i in node.inputs if shapes.shape_or_none(i) == full]
                t = same[0] if len(same) == 1 else None
            if t is None:
                break
            mask_nodes.append(node.name)
            mask_inputs.extend(i.name for i in node.inputs if i is not t and not zero_mask(g, shapes, i))
            continue
        if node.op in ("Mul", "Div", "Cast", "Identity"):
            if node.op in ("Mul", "Div"):
                scale.fold(g, node)
            t = g.data_input(node)
            if t is None:
                break
            continue
        break
    if qk is None:
        raise NotAViTError(g.not_vit(f"{where}: no Q·Kᵀ MatMul feeds the Softmax"))
    probs, av, guard = softmax.outputs[0], None, []
    for _ in range(4):  # HF casts the probabilities (to the same dtype) before A·V; SDPA guards NaN
        av = _probs_consumer(g, probs)
        if av is None or av.op == "MatMul":
            break
        if av.op == "Where":
            guard += [g.producer(av.inputs[0]).name, av.name]
        probs = av.outputs[0]
    if av is None or av.op != "MatMul" or av.inputs[0] is not probs:
        raise NotAViTError(g.not_vit(f"{where}: the Softmax output does not feed an A·V MatMul"))
    s_shape = shapes.shape(softmax.inputs[0])
    if len(s_shape) != 4:
        raise NotAViTError(g.not_vit(
            f"{where}: attention scores have shape {list(s_shape)}, expected [batch, heads, tokens, tokens]"))
    return AttentionCore(
        where=where, q=qk.inputs[0], k=qk.inputs[1], v=av.inputs[1], out=av.outputs[0], heads=s_shape[1],
        head_dim_qk=shapes.shape(qk.inputs[0])[-1], head_dim_v=shapes.shape(av.inputs[1])[-1],
        tokens=s_shape[-1], scale=scale, mask_nodes=mask_nodes, mask_inputs=mask_inputs,
        qk_matmul=qk.name, softmax=softmax.name, av_matmul=av.name, nan_guard_nodes=guard)


def fused_core(g: GraphIndex, shapes: Observed, index: int, node: gs.Node) -> AttentionCore:
    """One ONNX Attention node: Q, K, V as [B, heads, N, dim] (or [B, N, heads·dim] with head counts
    as attributes), an optional constant mask, the scale as an attribute (default 1/√dim)."""
    where = f"block {index} (Attention '{node.name}')"
    given = [t.name if t is not None and t.name else "" for t in node.inputs]
    if any(given[4:]) or any(o.name and g.consumers(o) for o in node.outputs[1:]):
        raise NotAViTError(g.not_vit(f"{where}: a key/value cache (past or present key and value) is "
                                     "not part of a ViT"))
    if int(node.attrs.get("is_causal", 0)) or float(node.attrs.get("softcap", 0.0) or 0.0):
        raise NotAViTError(g.not_vit(f"{where}: causal or soft-capped attention is not a ViT's"))
    mask_inputs = []
    if len(given) > 3 and given[3]:
        mask_inputs = [] if zero_mask(g, shapes, node.inputs[3]) else [given[3]]
    q, k, v = node.inputs[:3]
    q_shape, k_shape, v_shape = (shapes.shape(t) for t in (q, k, v))
    if len(q_shape) == 4:
        heads, kv_heads, tokens = q_shape[1], k_shape[1], q_shape[2]
        head_dim_qk, head_dim_v = q_shape[3], v_shape[3]
    elif len(q_shape) == 3:
        heads = int(node.attrs.get("q_num_heads", 0))
        kv_heads = int(node.attrs.get("kv_num_heads", heads))
        if heads <= 0:
            raise NotAViTError(g.not_vit(f"{where}: 3-D inputs without a q_num_heads attribute"))
        tokens, head_dim_qk, head_dim_v = q_shape[1], q_shape[2] // heads, v_shape[2] // kv_heads
    else:
        raise NotAViTError(g.not_vit(f"{where}: Q has shape {list(q_shape)}, expected 3-D or 4-D"))
    if kv_heads != heads:
        raise NotAViTError(g.not_vit(f"{where}: grouped-query attention ({heads} query heads, {kv_heads} "
                                     "key/value heads) is not part of a ViT"))
    scale = node.attrs.get("scale")
    scale = float(scale) if scale is not None else head_dim_qk ** -0.5
    return AttentionCore(
        where=where, q=q, k=k, v=v, out=node.outputs[0], heads=heads, head_dim_qk=head_dim_qk,
        head_dim_v=head_dim_v, tokens=tokens, scale=Scale(scale), mask_nodes=[], mask_inputs=mask_inputs,
        fused_op=node.name)


def zero_mask(g: GraphIndex, shapes: Observed, tensor) -> bool:
    """A constant mask that masks nothing: zeros added to the scores, or an all-True boolean mask
    (Hugging Face's dynamo export writes one when no mask is given). The passes may drop it, and
    the token count may change under it."""
    value = shapes.value(tensor)
    if value is None and isinstance(tensor, gs.Constant):
        value = tensor.values
    if value is None or not g.is_static(tensor):
        return False
    value = np.asarray(value)
    return bool(value.all()) if value.dtype == np.bool_ else value.dtype.kind == "f" and not np.any(value)


def _probs_consumer(g: GraphIndex, probs) -> Optional[gs.Node]:
    """The A·V MatMul (or a Cast before it); other readers of the probabilities (TCS) are ignored."""
    candidates = [n for n in g.consumers(probs) if n.op in ("MatMul", "Cast", "Identity") and n.inputs[0] is probs]
    if len(candidates) == 1:
        return candidates[0]
    return nan_guard(g, probs) if not candidates else None


def nan_guard(g: GraphIndex, probs) -> Optional[gs.Node]:
    """SDPA's Where(IsNaN(p), 0, p) after the Softmax (the dynamo exporter writes it for rows that
    a mask could empty): the probabilities pass through it unchanged in a ViT."""
    for node in g.consumers(probs):
        if node.op != "Where" or len(node.inputs) != 3 or node.inputs[2] is not probs:
            continue
        test = g.producer(node.inputs[0])
        if test is not None and test.op == "IsNaN" and test.inputs[0] is probs and g.is_static(node.inputs[1]):
            return node
    return None


def _branch_around(g: GraphIndex, shapes: Observed, core: AttentionCore) -> AttentionBranch:
    """From the attention core: the projections, the output path and the residual."""
    where = core.where
    scale = Scale(core.scale.value, core.scale.from_shape, list(core.scale.nodes))
    trace_q, trace_k, trace_v = (trace_back_to_linear(g, shapes, t) for t in (core.q, core.k, core.v))
    lin_q, lin_k, lin_v = trace_q.linear, trace_k.linear, trace_v.linear
    missing = [n for n, l in (("Q", lin_q), ("K", lin_k), ("V", lin_v)) if l is None]
    if missing:
        raise NotAViTError(g.not_vit(f"{where}: no projection found for {', '.join(missing)}"))
    for node in trace_q.path + trace_k.path:
        if node.op in ("Mul", "Div"):
            scale.fold(g, node)

    fused = lin_q.node == lin_k.node == lin_v.node
    if not fused and len({lin_q.node, lin_k.node, lin_v.node}) != 3:
        raise NotAViTError(g.not_vit(f"{where}: Q, K and V come from a mix of shared and separate projections"))
    chunks = {}
    if fused:
        third = lin_q.out_features // 3
        # A Slice start counts channels; an index below 3 already counts thirds.
        chunks = {role: (c // third if c is not None and c >= 3 else c)
                  for role, c in (("q", trace_q.chunk), ("k", trace_k.chunk), ("v", trace_v.chunk))}
        if sorted(v for v in chunks.values() if v is not None) != [0, 1, 2]:
            raise NotAViTError(g.not_vit(
                f"{where}: could not tell which part of the fused projection is Q, K and V (found {chunks})"))

    proj, out_path = _output_projection(g, shapes, core.out)
    if proj is None:
        raise NotAViTError(g.not_vit(f"{where}: no output projection after the A·V MatMul"))

    reshapes = []
    seen = set()
    for role, trace in (("q", trace_q), ("k", trace_k), ("v", trace_v)):
        for node in trace.path:
            if node.op == "Reshape" and node.name not in seen and _is_head_split(shapes, node):
                seen.add(node.name)
                reshapes.append(head_reshape(g, shapes, node, "qkv" if fused else role))
    for node in out_path:
        if node.op == "Reshape" and _is_head_merge(shapes, node):
            reshapes.append(head_reshape(g, shapes, node, "merge"))
    split_nodes = sorted({n.name for n in trace_q.path + trace_k.path + trace_v.path
                          if n.op in ("Split", "Slice", "Gather")},
                         key=lambda name: g.position(g.node(name)))

    attn_input = g.node(lin_v.node).inputs[0]
    norm1 = g.producer(attn_input)
    residual = residual_after(g, g.tensor(proj.output))
    if residual.add is None:
        raise NotAViTError(g.not_vit(f"{where}: no residual Add after the attention output projection"))

    attn = Attention(
        layout="fused_qkv" if fused else "split_qkv", heads=core.heads, head_dim_qk=core.head_dim_qk,
        head_dim_v=core.head_dim_v, qkv_bias=all(l.bias is not None for l in (lin_q, lin_k, lin_v)),
        proj=proj, qkv=lin_q if fused else None, q=None if fused else lin_q,
        k=None if fused else lin_k, v=None if fused else lin_v,
        scale=None if scale.from_shape else float(scale.value), scale_from_shape=scale.from_shape,
        scale_nodes=scale.nodes, mask_nodes=core.mask_nodes, head_reshapes=reshapes,
        qkv_split_nodes=split_nodes, qkv_chunks=chunks, mask_inputs=core.mask_inputs,
        qk_matmul=core.qk_matmul, softmax=core.softmax, av_matmul=core.av_matmul,
        fused_op=core.fused_op, nan_guard_nodes=core.nan_guard_nodes,
    )
    return AttentionBranch(
        attn=attn, block_input=residual.stream.name,
        norm1=norm1.name if norm1 is not None and norm1.op == "LayerNormalization" else None,
        layer_scale=residual.layer_scale, residual=residual.add, tokens=core.tokens)


def _output_projection(g: GraphIndex, shapes: Observed, tensor) -> tuple[Optional[Linear], list[gs.Node]]:
    """Follow the A·V result through layout ops to the next projection: (it or None, the ops passed)."""
    out_path: list[gs.Node] = []
    for _ in range(8):
        # Other readers of the per-head outputs (AS-ViT's scores) are not on this path.
        candidates = [n for n in g.consumers(tensor) if n.op in _OUTPUT_PATH_OPS]
        node = candidates[0] if len(candidates) == 1 else None
        if node is None:
            break
        if node.op in LINEAR_OPS:
            return linear_from_matmul(g, shapes, node), out_path
        out_path.append(node)
        tensor = node.outputs[0]
    return None, out_path


def _is_head_split(shapes: Observed, node: gs.Node) -> bool:
    """[batch, tokens, features] -> [batch, tokens, ..., heads, head_dim], not a layout-only reshape."""
    before, after = shapes.shape(node.inputs[0]), shapes.shape(node.outputs[0])
    return (len(before) == 3 and len(after) >= 4 and before[:2] == after[:2]
            and int(np.prod(after[2:])) == before[2])


def _is_head_merge(shapes: Observed, node: gs.Node) -> bool:
    before, after = len(shapes.shape(node.inputs[0])), len(shapes.shape(node.outputs[0]))
    return before >= 4 and after == 3


def head_reshape(g: GraphIndex, shapes: Observed, node: gs.Node, role: str) -> HeadReshape:
    """A Reshape that carries the head count: its target shape as observed, and where its fixed dims come from."""
    shape_t = node.inputs[1]
    value = g.const_value(shape_t)
    if value is None:
        value = shapes.value(shape_t)
    sources: list[str] = []
    if g.const_value(shape_t) is not None:
        sources.append(shape_t.name)
    else:
        producer = g.producer(shape_t)
        if producer is not None and producer.op == "Concat":
            sources = [t.name for t in producer.inputs if g.const_value(t) is not None]
    observed = [int(v) for v in np.asarray(value).reshape(-1)] if value is not None else []
    return HeadReshape(node=node.name, role=role, shape_input=shape_t.name, shape_value=observed,
                       output_shape=list(shapes.shape(node.outputs[0])), constant_sources=sources)
