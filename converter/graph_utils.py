"""Small onnx-graphsurgeon helpers shared by the reader and the passes."""
from __future__ import annotations

from typing import Optional

import numpy as np
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
