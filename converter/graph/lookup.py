"""The graph indexed once for every reader: tensors and nodes by name, the producer and consumers of
each tensor, constant values and static checks, the residual after a branch, and the shapes one run
at batch 1 observed (`Observed`)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .surgery import const_value, name_nodes
from .vit_graph import LayerScale
from ...errors import NotAViTError

# Ops that only move data around (or scale it) between a projection and the attention MatMuls.
LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Split", "Slice", "Gather", "Pad",
              "Identity", "Cast", "Flatten", "Mul", "Div"}
LINEAR_OPS = {"MatMul", "Gemm"}
FUSED_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "PackedAttention", "GroupQueryAttention"}


def is_onnx_attention(node: gs.Node) -> bool:
    """The standard ONNX Attention op (opset 23+), not ONNX Runtime's contrib op of the same name."""
    return node.op == "Attention" and node.domain in ("", "ai.onnx", None)


class GraphIndex:
    """The imported graph and dicts for every lookup the readers make (built once, read only)."""

    def __init__(self, model: onnx.ModelProto, path: str):
        self.model = model
        self.path = path
        self.graph = gs.import_onnx(model)
        name_nodes(self.graph)
        self.order = {id(n): i for i, n in enumerate(self.graph.nodes)}
        self.nodes: dict[str, gs.Node] = {}
        self.by_op: dict[str, list[gs.Node]] = {}
        # Keyed by tensor name: gs shares one tensor object per name. Unnamed tensors (omitted
        # optional inputs and outputs) are distinct objects that nothing reads, so they stay out.
        self._producers: dict[str, gs.Node] = {}
        self._consumers: dict[str, list[gs.Node]] = {}
        for node in self.graph.nodes:
            self.nodes.setdefault(node.name, node)  # the first of duplicate names, as a scan finds it
            self.by_op.setdefault(node.op, []).append(node)
            for t in node.outputs:
                if t.name:
                    self._producers.setdefault(t.name, node)
            for t in node.inputs:
                if t.name:
                    self._consumers.setdefault(t.name, []).append(node)  # once per use, as gs lists them
        self._static: dict[str, bool] = {}

    # ---------------------------------------------------------------- by name
    @cached_property
    def tensors(self) -> dict:
        # Built on first use: gs warns here about distinct tensors sharing a name, which a graph
        # refused earlier (no attention, bad input) should not print.
        return self.graph.tensors()

    def tensor(self, name: str):
        return self.tensors[name]

    def node(self, name: str) -> gs.Node:
        return self.nodes[name]

    def position(self, node: gs.Node) -> int:
        """Where `node` stands in the graph's node list."""
        return self.order[id(node)]

    def nodes_of(self, op: str) -> list[gs.Node]:
        """The nodes of one op type, in graph order."""
        return self.by_op.get(op, [])

    # ---------------------------------------------------------------- edges
    def producer(self, tensor) -> Optional[gs.Node]:
        return self._producers.get(tensor.name) if tensor.name else None

    def consumers(self, tensor) -> list[gs.Node]:
        return self._consumers.get(tensor.name, []) if tensor.name else []

    def single_consumer(self, tensor, ops: Iterable[str]) -> Optional[gs.Node]:
        consumers = self.consumers(tensor)
        if len(consumers) == 1 and consumers[0].op in ops:
            return consumers[0]
        return None

    # ---------------------------------------------------------------- values
    @staticmethod
    def const_value(tensor) -> Optional[np.ndarray]:
        return const_value(tensor)

    def is_static(self, tensor) -> bool:
        """True for constants and tensors computed only from constants and Shape ops."""
        if isinstance(tensor, gs.Constant):
            return True
        if tensor.name in self._static:
            return self._static[tensor.name]
        node = self.producer(tensor)
        if node is None:
            result = False  # a graph input
        elif node.op in ("Shape", "Constant", "Size"):
            result = True
        else:
            self._static[tensor.name] = False  # guards cycles in malformed graphs
            result = all(self.is_static(t) for t in node.inputs if t is not None and t.name != "")
        self._static[tensor.name] = result
        return result

    def data_input(self, node: gs.Node):
        """The one input of a layout/scale op that carries activations, or None."""
        if node.op in ("Mul", "Div", "Add"):
            dynamic = [t for t in node.inputs if not self.is_static(t)]
            return dynamic[0] if len(dynamic) == 1 else None
        return node.inputs[0] if node.inputs else None

    def derives_from(self, tensor, ancestor, limit: int = 64) -> bool:
        """True when `tensor` is computed from `ancestor` (token merging sits between them)."""
        queue, seen = deque([tensor]), set()
        while queue and len(seen) < limit:
            t = queue.popleft()
            if t is ancestor:
                return True
            node = self.producer(t)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            queue.extend(i for i in node.inputs if not self.is_static(i))
        return False

    # ---------------------------------------------------------------- messages
    def not_vit(self, missing: str) -> str:
        """The message of every NotAViTError about the graph's structure: what is missing, what is there."""
        interesting = ["Conv", "MatMul", "Gemm", "Softmax", "LayerNormalization", "Concat"]
        found = ", ".join(f"{len(self.nodes_of(op))} {op}" for op in interesting)
        return (f"{self.path}: not a Vision Transformer this tool can read: {missing}. "
                f"Found {len(self.graph.nodes)} nodes ({found}).")


@dataclass(frozen=True)
class Observed:
    """Shapes of the tensors the readers ask about, and the values of the small integer ones
    (reshape targets) and the masks, from one run at batch 1 (shapes.py)."""
    path: str
    shapes: dict[str, tuple[int, ...]]
    values: dict[str, np.ndarray]

    def shape(self, tensor) -> tuple[int, ...]:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        value = self.shapes.get(tensor.name)
        if value is None:
            raise NotAViTError(f"{self.path}: internal: no observed shape for tensor '{tensor.name}'")
        return tuple(value)

    def shape_or_none(self, tensor) -> Optional[tuple[int, ...]]:
        try:
            return self.shape(tensor)
        except NotAViTError:
            return None

    def value(self, tensor) -> Optional[np.ndarray]:
        return self.values.get(tensor.name)


@dataclass
class Residual:
    """What follows a branch's output: an optional layer scale, then the residual Add."""
    layer_scale: Optional[LayerScale]
    add: Optional[gs.Node]       # None when there is no residual
    stream: Optional[gs.Tensor]  # the Add's other input: the residual stream the branch joins


def residual_after(g: GraphIndex, tensor) -> Residual:
    """After a branch output (attention or FFN): a constant Mul (layer scale) if any, then the residual Add."""
    scale = None
    mul = g.single_consumer(tensor, {"Mul"})
    if mul is not None:
        other = [t for t in mul.inputs if t is not tensor]
        value = g.const_value(other[0]) if other else None
        if value is not None and value.size > 1:
            scale = LayerScale(mul.name, other[0].name)
            tensor = mul.outputs[0]
    add = g.single_consumer(tensor, {"Add"})
    if add is None:
        return Residual(scale, None, None)
    others = [t for t in add.inputs if t is not tensor]
    if len(others) != 1 or g.is_static(others[0]):
        return Residual(scale, None, None)
    return Residual(scale, add, others[0])
