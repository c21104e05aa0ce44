"""Projections: a MatMul or Gemm with a constant weight (± a bias Add), found at a node or by
walking back from a tensor through layout ops; the walk also tells which chunk of a fused
projection (q, k or v) it left through."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from .vit_graph import Linear
from .lookup import LAYOUT_OPS, LINEAR_OPS, GraphIndex, Observed


@dataclass
class Trace:
    """A walk back from a tensor to the projection that computes it."""
    linear: Optional[Linear]                             # None when the walk found none
    path: list[gs.Node] = field(default_factory=list)    # layout ops passed, nearest the tensor first
    # For a fused projection, the chunk (q=0, k=1, v=2 in timm) the walk left through: the index of
    # the Split output, Gather index or Slice start nearest the projection.
    chunk: Optional[int] = None


def linear_at(g: GraphIndex, shapes: Observed, node: gs.Node) -> Optional[Linear]:
    """The projection whose output `node` produces (MatMul/Gemm with constant weight ± bias Add)."""
    if node.op == "Add":
        consts = [t for t in node.inputs if g.const_value(t) is not None]
        dynamic = [t for t in node.inputs if g.const_value(t) is None]
        if len(consts) == 1 and len(dynamic) == 1:
            inner = g.producer(dynamic[0])
            if inner is not None and inner.op == "MatMul":
                lin = linear_from_matmul(g, shapes, inner, with_bias=False)
                bias = g.const_value(consts[0])
                if lin and bias is not None and bias.size == lin.out_features:
                    lin.bias, lin.bias_node, lin.output = consts[0].name, node.name, node.outputs[0].name
                    return lin
        return None
    if node.op in LINEAR_OPS:
        return linear_from_matmul(g, shapes, node, with_bias=False)
    return None


def linear_from_matmul(g: GraphIndex, shapes: Observed, node: gs.Node, with_bias: bool = True) -> Optional[Linear]:
    """The projection `node` computes, with the bias Add after it when `with_bias`."""
    if node.op not in LINEAR_OPS or len(node.inputs) < 2:
        return None
    weight_t = node.inputs[1]
    weight = g.const_value(weight_t)
    selected = None
    gather = g.producer(weight_t)
    if weight is None and gather is not None and gather.op == "Gather" and int(gather.attrs.get("axis", 0)) == 0:
        # Token Channel Selection: the weight rows are gathered per image at run time.
        weight_t = gather.inputs[0]
        weight = g.const_value(weight_t)
        selected = shapes.shape(node.inputs[0])[-1] if node.op == "MatMul" else None
    if weight is None or weight.ndim != 2 or g.const_value(node.inputs[0]) is not None:
        return None
    if selected is not None:
        lin = Linear(node.name, weight_t.name, "in_out", int(weight.shape[0]), int(weight.shape[1]),
                     output=node.outputs[0].name, selected_in=int(selected))
        if with_bias:
            out = node.outputs[0]
            readers = g.consumers(out)
            if len(readers) == 1 and readers[0].op == "Add":
                add = readers[0]
                bias = [t for t in add.inputs if g.const_value(t) is not None]
                if len(bias) == 1 and g.const_value(bias[0]).size == lin.out_features:
                    lin.bias, lin.bias_node, lin.output = bias[0].name, add.name, add.outputs[0].name
        return lin
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)):
            return None
        trans_b = int(node.attrs.get("transB", 0))
        layout = "out_in" if trans_b else "in_out"
        in_f, out_f = (weight.shape[1], weight.shape[0]) if trans_b else weight.shape
        lin = Linear(node.name, weight_t.name, layout, int(in_f), int(out_f), output=node.outputs[0].name)
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            lin.bias, lin.bias_node = node.inputs[2].name, node.name
        return lin
    lin = Linear(node.name, weight_t.name, "in_out", int(weight.shape[0]), int(weight.shape[1]),
                 output=node.outputs[0].name)
    if with_bias:
        readers = g.consumers(node.outputs[0])
        if len(readers) == 1 and readers[0].op == "Add":
            with_b = linear_at(g, shapes, readers[0])
            if with_b is not None:
                return with_b
    return lin


def trace_back_to_linear(g: GraphIndex, shapes: Observed, tensor) -> Trace:
    """Walk back from `tensor` through layout ops to the projection that computes it."""
    trace = Trace(None)
    for _ in range(40):
        node = g.producer(tensor)
        if node is None:
            return trace
        lin = linear_at(g, shapes, node)
        if lin is not None:
            trace.linear = lin
            return trace
        if node.op not in LAYOUT_OPS:
            return trace
        data = g.data_input(node)
        if data is None:
            return trace
        chunk = _chunk_index(g, node, tensor)
        if chunk is not None:
            trace.chunk = chunk
        trace.path.append(node)
        tensor = data
    return trace


def _chunk_index(g: GraphIndex, node: gs.Node, out_tensor) -> Optional[int]:
    if node.op == "Split":
        return next(i for i, t in enumerate(node.outputs) if t is out_tensor)
    if node.op == "Gather":
        idx = g.const_value(node.inputs[1])
        return int(np.asarray(idx).reshape(-1)[0]) if idx is not None and idx.size == 1 else None
    if node.op == "Slice":
        start = g.const_value(node.inputs[1])
        return int(np.asarray(start).reshape(-1)[0]) if start is not None and start.size == 1 else None
    return None
