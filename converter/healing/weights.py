"""Where each weight of a ViT lives, in the PyTorch model and in its ONNX graph, by one key.

Healing trains the compressed PyTorch model and must put what it learned back into the graph, with
the same nodes and shapes. Both sides are described by the same canonical keys ("blocks.3.attn.q.weight",
"embed.pos", "head.0.bias", ...), each with a value in one canonical layout: a Linear's weight as
(in, out), vectors flat, the rest as stored. A key is *writable* when both sides have it and hold the
same value before training: that check, not a naming convention, proves the two point at the same
weight. Healing trains only the parameters whose every key is writable, so the written graph computes
what the trained model computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from ..graph.surgery import const_value, export_like, open_for_surgery
from ..graph.vit_graph import Linear, ViTGraph

# Values are equal when they agree to float32 rounding (the graph may hold a weight transposed).
_MATCH_RTOL = 1e-6


# -- the PyTorch side ----------------------------------------------------------------------------------
@dataclass
class ModelSlot:
    """A canonical key's place in the PyTorch model: `param`, how to read the key's value from it, and
    the rows of `param` it is (None: all of it, reshaped)."""
    param: nn.Parameter
    read: Callable[[torch.Tensor], torch.Tensor]
    rows: Optional[slice] = None
    transposed: bool = False

    def assign(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Set the key's part of `param` (under no_grad) to `value` in canonical layout."""
        if self.transposed:
            param[self.rows or slice(None)] = value.t()
        elif self.rows is not None:
            param[self.rows] = value
        else:
            param.copy_(value.reshape(param.shape))


def base_model(model: nn.Module) -> nn.Module:
    """The timm VisionTransformer or HFLogits inside the token-reduction wrappers (ToMe, CAIT, AS-ViT)."""
    from ...models.reference import HFLogits

    seen = 0
    while not (isinstance(model, HFLogits) or hasattr(model, "blocks") and hasattr(model, "patch_embed")):
        inner = getattr(model, "model", None)
        if not isinstance(inner, nn.Module) or seen > 8:
            raise TypeError(f"no timm or Hugging Face ViT inside {type(model).__name__}")
        model, seen = inner, seen + 1
    return model


def model_slots(model: nn.Module) -> dict[str, ModelSlot]:
    """Every canonical key the PyTorch model (timm or Hugging Face ViT, compressed or not) holds."""
    from ...models.pruned_reference import PrunedAttention
    from ...models.reference import HFLogits

    base = base_model(model)
    slots: dict[str, ModelSlot] = {}

    def linear(key: str, layer: Optional[nn.Module], rows: Optional[slice] = None) -> None:
        if not isinstance(layer, nn.Linear):
            return
        pick = rows or slice(None)
        slots[f"{key}.weight"] = ModelSlot(layer.weight, lambda w, p=pick: w[p].t(), rows, transposed=True)
        if layer.bias is not None:
            slots[f"{key}.bias"] = ModelSlot(layer.bias, lambda b, p=pick: b[p], rows)

    def vector(key: str, param: Optional[torch.Tensor]) -> None:
        if isinstance(param, nn.Parameter):
            slots[key] = ModelSlot(param, lambda t: t.reshape(-1))

    def norm(key: str, layer: Optional[nn.Module]) -> None:
        if isinstance(layer, nn.LayerNorm) and layer.elementwise_affine:
            vector(f"{key}.weight", layer.weight)
            vector(f"{key}.bias", layer.bias)

    def whole(key: str, param: Optional[torch.Tensor]) -> None:
        if isinstance(param, nn.Parameter):
            slots[key] = ModelSlot(param, lambda t: t)

    def attention(key: str, attn: nn.Module, q, k, v, proj) -> None:
        if isinstance(attn, PrunedAttention):
            q, k, v, proj = attn.q, attn.k, attn.v, attn.proj
        for role, layer in (("q", q), ("k", k), ("v", v)):
            if isinstance(layer, tuple):   # a fused projection and the rows of this role
                linear(f"{key}.{role}", *layer)
            else:
                linear(f"{key}.{role}", layer)
        linear(f"{key}.proj", proj)

    if isinstance(base, HFLogits):
        vit = base.model.vit
        emb = vit.embeddings
        whole("embed.patch.weight", emb.patch_embeddings.projection.weight)
        whole("embed.patch.bias", emb.patch_embeddings.projection.bias)
        whole("embed.tokens.class", emb.cls_token)
        whole("embed.pos", emb.position_embeddings)
        for i, layer in enumerate(vit.layers):
            a = layer.attention
            attention(f"blocks.{i}.attn", a, getattr(a, "q_proj", None), getattr(a, "k_proj", None),
                      getattr(a, "v_proj", None), getattr(a, "o_proj", None))
            norm(f"blocks.{i}.norm1", layer.layernorm_before)
            norm(f"blocks.{i}.norm2", layer.layernorm_after)
            linear(f"blocks.{i}.fc1", layer.mlp.fc1)
            linear(f"blocks.{i}.fc2", layer.mlp.fc2)
        norm("norm", vit.layernorm)
        linear("head.0", base.model.classifier)
        return slots

    whole("embed.patch.weight", base.patch_embed.proj.weight)
    whole("embed.patch.bias", base.patch_embed.proj.bias)
    whole("embed.tokens.class", getattr(base, "cls_token", None))
    whole("embed.tokens.distillation", getattr(base, "dist_token", None))
    whole("embed.tokens.register", getattr(base, "reg_token", None))
    whole("embed.pos", getattr(base, "pos_embed", None))
    for i, block in enumerate(base.blocks):
        a = block.attn
        qkv = getattr(a, "qkv", None)
        if isinstance(qkv, nn.Linear) and not isinstance(a, PrunedAttention):
            width = a.num_heads * a.head_dim
            q, k, v = ((qkv, slice(j * width, (j + 1) * width)) for j in range(3))
        else:
            q = k = v = None
        attention(f"blocks.{i}.attn", a, q, k, v, getattr(a, "proj", None))
        norm(f"blocks.{i}.norm1", block.norm1)
        norm(f"blocks.{i}.norm2", block.norm2)
        vector(f"blocks.{i}.ls1", getattr(block.ls1, "gamma", None))
        vector(f"blocks.{i}.ls2", getattr(block.ls2, "gamma", None))
        linear(f"blocks.{i}.fc1", block.mlp.fc1)
        linear(f"blocks.{i}.fc2", block.mlp.fc2)
    norm("norm", getattr(base, "norm", None))
    norm("fc_norm", getattr(base, "fc_norm", None))
    linear("head.0", getattr(base, "head", None))
    linear("head.1", getattr(base, "head_dist", None))
    return slots


def head_module(model: nn.Module) -> nn.Module:
    """The classifier whose input is the pooled feature (the first head of a distilled model)."""
    from ...models.reference import HFLogits

    base = base_model(model)
    return base.model.classifier if isinstance(base, HFLogits) else base.head


# -- the graph side ------------------------------------------------------------------------------------
@dataclass
class GraphSlot:
    """A canonical key's place in the graph: node `node` reads `tensor`; `columns` picks a Linear's output
    columns (a fused QKV); `kind` says how the canonical value is laid out in the stored tensor."""
    node: str
    tensor: str
    kind: str                      # "linear_out_in", "linear_in_out", "vector" or "whole"
    columns: Optional[slice] = None

    def read(self, stored: np.ndarray) -> np.ndarray:
        if self.kind.startswith("linear"):
            full = stored.T if self.kind == "linear_out_in" else stored
            return full[:, self.columns or slice(None)]
        if self.kind == "vector":
            return stored.reshape(-1)[self.columns or slice(None)]
        return stored

    def write(self, stored: np.ndarray, value: np.ndarray) -> np.ndarray:
        """`stored` with this slot's part replaced by `value` (canonical layout)."""
        if self.kind.startswith("linear"):
            full = stored.T.copy() if self.kind == "linear_out_in" else stored.copy()
            full[:, self.columns or slice(None)] = value
            return full.T if self.kind == "linear_out_in" else full
        if self.kind == "vector":
            flat = stored.reshape(-1).copy()
            flat[self.columns or slice(None)] = value
            return flat.reshape(stored.shape)
        return np.asarray(value).reshape(stored.shape)


def graph_slots(vit: ViTGraph, nodes: dict, tensors: dict) -> dict[str, GraphSlot]:
    """Every canonical key the described graph holds (norms only where written as LayerNormalization).
    `nodes` and `tensors`: the graph opened for surgery (its nodes named as the description names them)."""
    slots: dict[str, GraphSlot] = {}

    def linear(key: str, lin: Optional[Linear], columns: Optional[slice] = None) -> None:
        if lin is None:
            return
        slots[f"{key}.weight"] = GraphSlot(lin.node, lin.weight, f"linear_{lin.weight_layout}", columns)
        if lin.bias is not None and lin.bias_node:
            slots[f"{key}.bias"] = GraphSlot(lin.bias_node, lin.bias, "vector", columns)

    def norm(key: str, node_name: Optional[str]) -> None:
        node = nodes.get(node_name or "")
        if node is None or node.op != "LayerNormalization":
            return
        slots[f"{key}.weight"] = GraphSlot(node.name, node.inputs[1].name, "vector")
        if len(node.inputs) > 2 and node.inputs[2].name:
            slots[f"{key}.bias"] = GraphSlot(node.name, node.inputs[2].name, "vector")

    def consumer_of(tensor: Optional[str]) -> Optional[str]:
        """The one node that reads `tensor` (a learned token or position embedding)."""
        readers = tensors[tensor].outputs if tensor in tensors else []
        return readers[0].name if len(readers) == 1 else None

    patch = vit.patch_embed
    slots["embed.patch.weight"] = GraphSlot(patch.node, patch.weight, "whole")
    if patch.bias:
        slots["embed.patch.bias"] = GraphSlot(patch.node, patch.bias, "whole")
    for token in vit.extra_tokens:
        reader = consumer_of(token.tensor)
        if reader and token.kind in ("class", "distillation", "register"):
            slots[f"embed.tokens.{token.kind}"] = GraphSlot(reader, token.tensor, "whole")
    if vit.pos_embed and consumer_of(vit.pos_embed):
        slots["embed.pos"] = GraphSlot(consumer_of(vit.pos_embed), vit.pos_embed, "whole")
    for block in vit.blocks:
        key, attn = f"blocks.{block.index}", block.attn
        if attn.layout == "fused_qkv" and attn.qkv is not None:
            widths = {"q": attn.heads * attn.head_dim_qk, "k": attn.heads * attn.head_dim_qk,
                      "v": attn.heads * attn.head_dim_v}
            start = 0
            for role in sorted(attn.qkv_chunks, key=attn.qkv_chunks.get):
                linear(f"{key}.attn.{role}", attn.qkv, slice(start, start + widths[role]))
                start += widths[role]
        else:
            for role in ("q", "k", "v"):
                linear(f"{key}.attn.{role}", getattr(attn, role))
        linear(f"{key}.attn.proj", attn.proj)
        norm(f"{key}.norm1", block.norm1)
        norm(f"{key}.norm2", block.norm2)
        for name, scale in (("ls1", block.layer_scale_attn), ("ls2", block.layer_scale_ffn)):
            if scale is not None:
                slots[f"{key}.{name}"] = GraphSlot(scale.node, scale.gamma, "vector")
        linear(f"{key}.fc1", block.ffn.fc1)
        linear(f"{key}.fc2", block.ffn.fc2)
    norm("norm", vit.head.final_norm)
    norm("fc_norm", vit.head.fc_norm)
    for j, lin in enumerate(vit.head.linears):
        linear(f"head.{j}", lin)
    return slots


def stored_value(nodes: dict, tensors: dict, slot: GraphSlot) -> Optional[np.ndarray]:
    """The stored tensor `slot` reads, when its node reads it as a constant."""
    node = nodes.get(slot.node)
    if node is None or slot.tensor not in {t.name for t in node.inputs}:
        return None
    value = const_value(tensors[slot.tensor])
    return None if value is None else np.asarray(value)


# -- both sides ----------------------------------------------------------------------------------------
@dataclass
class WeightMap:
    """The keys both sides hold with equal values, and the parameters healing may train."""
    model_slots: dict[str, ModelSlot]
    graph_slots: dict[str, GraphSlot]
    writable: list[str]
    unmatched: list[str]                 # keys both sides name whose values differ (or that cannot be read)
    trainable: list[nn.Parameter]

    @property
    def frozen_count(self) -> int:
        return len(self.unmatched)


def match_weights(model: nn.Module, vit: ViTGraph, onnx_model: onnx.ModelProto) -> WeightMap:
    """Pair the model's and the graph's keys and keep those whose values agree now."""
    surgery = open_for_surgery(onnx_model)
    nodes, tensors = surgery.nodes, surgery.tensors
    ours, theirs = model_slots(model), graph_slots(vit, nodes, tensors)
    writable, unmatched = [], []
    for key in sorted(set(ours) & set(theirs)):
        stored = stored_value(nodes, tensors, theirs[key])
        want = ours[key].read(ours[key].param.detach()).cpu().numpy()
        got = None if stored is None else theirs[key].read(stored)
        if got is not None and got.shape == want.shape and np.allclose(
                got.astype(np.float64), want, rtol=_MATCH_RTOL, atol=_MATCH_RTOL * max(float(np.abs(want).max()), 1e-30)):
            writable.append(key)
        else:
            unmatched.append(key)
    keys_of: dict[int, list[str]] = {}
    for key, slot in ours.items():
        keys_of.setdefault(id(slot.param), []).append(key)
    ok = set(writable)
    trainable, seen = [], set()
    for key, slot in ours.items():
        pid = id(slot.param)
        if pid not in seen and all(k in ok for k in keys_of[pid]):
            trainable.append(slot.param)
        seen.add(pid)
    return WeightMap(ours, theirs, writable, unmatched, trainable)


def write_weights(onnx_model: onnx.ModelProto, weights: WeightMap) -> onnx.ModelProto:
    """A copy of the graph with every writable key set from the (trained) model: the same nodes and shapes;
    each written tensor becomes a constant of the node that reads it (never shared with another)."""
    surgery = open_for_surgery(onnx_model)
    nodes, tensors = surgery.nodes, surgery.tensors
    updates: dict[tuple[str, str], np.ndarray] = {}
    for key in weights.writable:
        slot = weights.graph_slots[key]
        where = (slot.node, slot.tensor)
        stored = updates.get(where)
        if stored is None:
            stored = stored_value(nodes, tensors, slot)
        ours = weights.model_slots[key]
        value = ours.read(ours.param.detach()).cpu().numpy()
        updates[where] = slot.write(stored, value.astype(stored.dtype))
    for (node_name, tensor_name), value in updates.items():
        node = nodes[node_name]
        for i, t in enumerate(node.inputs):
            if t.name == tensor_name:
                node.inputs[i] = gs.Constant(f"{tensor_name}/healed/{node_name}",
                                             values=np.ascontiguousarray(value))
    return export_like(surgery.graph, onnx_model)
