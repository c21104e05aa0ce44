"""Small onnx-graphsurgeon helpers shared by the reader and the passes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def const_value(tensor) -> Optional[np.ndarray]:
    """The value of a constant tensor (initializer, Constant node, or Identity of one), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None:
        return None
    if node.op == "Constant":
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
        for key in ("value_float", "value_int", "value_floats", "value_ints"):
            if key in node.attrs:
                return np.asarray(node.attrs[key])
        return None
    if node.op == "Identity":
        return const_value(node.inputs[0])
    return None


def name_nodes(graph: gs.Graph) -> None:
    """Give unnamed nodes a stable name (op@first output): later stages address nodes by name."""
    for i, node in enumerate(graph.nodes):
        if not node.name:
            node.name = f"{node.op}@{node.outputs[0].name if node.outputs else i}"


def forget_inner_shapes(graph: gs.Graph) -> None:
    """Drop recorded shapes of inner tensors after surgery (dynamo exports annotate them all);
    stale ones make runtimes reject the graph. Graph inputs and outputs keep theirs."""
    ends = {id(t) for t in graph.inputs + graph.outputs}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in ends:
            tensor.shape = None


def export_like(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """Clean up after surgery and export with the original's IR version and opsets."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    forget_inner_shapes(graph)
    out = gs.export_onnx(graph, do_type_check=True)
    out.ir_version = original.ir_version
    del out.opset_import[:]
    out.opset_import.extend(original.opset_import)
    out.producer_name, out.producer_version = "vit2trt", original.producer_version
    return out


class GraphBuilder:
    """Appends named nodes (prefix/name) to a graph; constants and opset-aware reductions."""

    def __init__(self, graph: gs.Graph, prefix: str, dtype, opset: int):
        self.graph, self.prefix, self.dtype, self.opset = graph, prefix, dtype, opset

    def op(self, op: str, inputs, name: str, n_out: int = 1, out_dtype=None, **attrs):
        outs = [gs.Variable(f"{self.prefix}/{name}_out{'' if n_out == 1 else i}",
                            dtype=out_dtype if out_dtype is not None else self.dtype) for i in range(n_out)]
        self.graph.nodes.append(gs.Node(op, name=f"{self.prefix}/{name}", inputs=inputs, outputs=outs, attrs=attrs))
        return outs[0] if n_out == 1 else outs

    def i64(self, name: str, value) -> gs.Constant:
        return gs.Constant(f"{self.prefix}/{name}", values=np.array(value, dtype=np.int64))

    def f(self, name: str, value) -> gs.Constant:
        return gs.Constant(f"{self.prefix}/{name}", values=np.array(value, dtype=self.dtype))

    def reduce(self, op: str, x, axes: list[int], keepdims: bool, name: str, out_dtype=None):
        """ReduceMean/Max/Sum/SumSquare: axes are an input from opset 18 (13 for ReduceSum)."""
        if self.opset >= (13 if op == "ReduceSum" else 18):
            return self.op(op, [x, self.i64(f"{name}_axes", axes)], name, out_dtype=out_dtype, keepdims=int(keepdims))
        return self.op(op, [x], name, out_dtype=out_dtype, axes=axes, keepdims=int(keepdims))

    def reduce_mean(self, x, axes: list[int], keepdims: bool, name: str):
        return self.reduce("ReduceMean", x, axes, keepdims, name)


@dataclass
class Surgery:
    """A model opened for surgery: its graph, tensors and nodes by name, opset and float dtype."""
    graph: gs.Graph
    tensors: dict
    nodes: dict
    opset: int
    dtype: type


def open_for_surgery(model: onnx.ModelProto) -> Surgery:
    graph = gs.import_onnx(model)
    name_nodes(graph)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    return Surgery(graph, graph.tensors(), {n.name: n for n in graph.nodes}, opset, dtype)
