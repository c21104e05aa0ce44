"""The head after the last block: final norm, pooling (class-token Gather or Slice, or a token
mean), the norm after pooling, and the classifier(s)."""
from __future__ import annotations

from collections import deque

import numpy as np

from .vit_graph import Head
from ...errors import NotAViTError
from .linear import linear_from_matmul
from .lookup import GraphIndex, Observed


def read_head(g: GraphIndex, shapes: Observed, last_output: str) -> Head:
    """Everything computed from the last block's output `last_output`."""
    start = g.tensor(last_output)
    nodes, queue, seen = [], deque([start]), set()
    while queue:
        t = queue.popleft()
        for node in g.consumers(t):
            if id(node) not in seen:
                seen.add(id(node))
                nodes.append(node)
                queue.extend(node.outputs)
    nodes.sort(key=g.position)
    pool_nodes, token_index = [], []
    pooling = None
    for node in nodes:
        if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 1:
            idx = g.const_value(node.inputs[1])
            if idx is not None and not g.is_static(node.inputs[0]):
                pooling = pooling or "token"
                pool_nodes.append(node.name)
                token_index.extend(int(i) for i in np.asarray(idx).reshape(-1))
        elif node.op == "ReduceMean":
            axes = node.attrs.get("axes")
            if axes is None and len(node.inputs) > 1:
                axes = g.const_value(node.inputs[1])
            if axes is not None and [int(a) for a in np.asarray(axes).reshape(-1)] in ([1], [-2]):
                pooling = "avg"
                pool_nodes.append(node.name)
        elif node.op == "Slice" and pooling is None and len(node.inputs) >= 4:
            axes = g.const_value(node.inputs[3])
            starts = g.const_value(node.inputs[1])
            ends = g.const_value(node.inputs[2])
            if axes is not None and [int(a) for a in np.asarray(axes).reshape(-1)] == [1] and starts is not None \
                    and ends is not None and int(np.asarray(ends).reshape(-1)[0]) - int(np.asarray(starts).reshape(-1)[0]) == 1:
                pooling = "token"
                pool_nodes.append(node.name)
                token_index.append(int(np.asarray(starts).reshape(-1)[0]))
    if pooling is None:
        raise NotAViTError(g.not_vit("no pooling (class-token Gather or token mean) after the last block"))
    first_pool = min(g.position(g.node(n)) for n in pool_nodes)
    norms = [n for n in nodes if n.op == "LayerNormalization"]
    final_norm = next((n.name for n in norms if g.position(n) < first_pool), None)
    fc_norm = next((n.name for n in norms if g.position(n) > first_pool), None)
    linears = [l for l in (linear_from_matmul(g, shapes, n) for n in nodes) if l is not None]
    return Head(final_norm=final_norm, pooling=pooling, pool_nodes=pool_nodes, token_index=token_index,
                fc_norm=fc_norm, linears=linears, num_classes=linears[0].out_features if linears else 0)
