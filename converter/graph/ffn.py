"""The FFN half of a block: norm2, the two projections after the attention residual, the activation
between them, and the layer scale and residual Add after the second."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import onnx_graphsurgeon as gs

from .vit_graph import FFN, LayerScale
from ...errors import NotAViTError
from .linear import linear_from_matmul
from .lookup import GraphIndex, Observed, residual_after


@dataclass
class FFNBranch:
    ffn: FFN
    norm2: Optional[str]
    layer_scale: Optional[LayerScale]
    residual: gs.Node          # the Add after the second projection


def read_ffn(g: GraphIndex, shapes: Observed, index: int, attn_residual: gs.Node) -> FFNBranch:
    """Block `index`'s FFN, from the attention's residual Add `attn_residual` to its own residual."""
    where = f"block {index} FFN"
    r1 = attn_residual.outputs[0]
    fc1, norm2 = None, None
    queue = deque((n, 0) for n in g.consumers(r1) if n is not attn_residual)
    while queue and fc1 is None:
        node, depth = queue.popleft()
        lin = linear_from_matmul(g, shapes, node)
        if lin is not None:
            fc1 = lin
            break
        if node.op == "LayerNormalization":
            norm2 = node.name
        if node.op == "Add" and any(t is r1 for t in node.inputs):
            continue  # the FFN residual itself
        if depth < 40:  # token reduction may sit between the residual and norm2
            queue.extend((n, depth + 1) for t in node.outputs for n in g.consumers(t))
    if fc1 is None:
        raise NotAViTError(g.not_vit(f"{where}: no first FFN projection after the attention residual"))
    act_nodes: list[gs.Node] = []
    fc2 = None
    queue = deque(g.consumers(g.tensor(fc1.output)))
    visited = set()
    while queue:
        node = queue.popleft()
        if id(node) in visited:
            continue
        visited.add(id(node))
        lin = linear_from_matmul(g, shapes, node)
        if lin is not None:
            fc2 = lin
            break
        act_nodes.append(node)
        if len(act_nodes) > 24:
            break
        for out in node.outputs:
            queue.extend(g.consumers(out))
    if fc2 is None:
        raise NotAViTError(g.not_vit(f"{where}: no second FFN projection after '{fc1.node}'"))
    residual = residual_after(g, g.tensor(fc2.output))
    if residual.add is None or not (residual.stream is r1 or g.derives_from(residual.stream, r1)):
        raise NotAViTError(g.not_vit(f"{where}: no residual Add after '{fc2.node}'"))
    ffn = FFN(fc1=fc1, fc2=fc2, hidden=fc1.out_features, activation=activation_name(g, act_nodes),
              activation_nodes=[n.name for n in act_nodes])
    return FFNBranch(ffn=ffn, norm2=norm2, layer_scale=residual.layer_scale, residual=residual.add)


def activation_name(g: GraphIndex, nodes: list[gs.Node]) -> str:
    """The activation the nodes between fc1 and fc2 compute, by the ops that spell it."""
    ops = {n.op for n in nodes}
    for node in nodes:
        if node.op == "Gelu":
            return "gelu_tanh" if node.attrs.get("approximate", "none") == "tanh" else "gelu"
    if "Erf" in ops:
        return "gelu"
    if "Tanh" in ops:
        return "gelu_tanh"
    if "Sigmoid" in ops:
        for node in nodes:
            for t in node.inputs:
                v = g.const_value(t)
                if v is not None and v.size == 1 and abs(float(v.reshape(-1)[0]) - 1.702) < 1e-3:
                    return "quick_gelu"
        return "silu"
    if "Relu" in ops:
        return "relu"
    return "+".join(sorted(ops)) or "identity"
