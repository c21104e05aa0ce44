"""Tokens before block 0: the patch embedding (a Conv with kernel = stride), the learned tokens
concatenated to the patches (class, distillation, registers) and the position embedding."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .vit_graph import ExtraToken, PatchEmbed
from ...errors import NotAViTError
from .lookup import GraphIndex, Observed

# Ops that carry a learned token unchanged to the Concat (broadcast to the batch, cast, reshaped).
_TOKEN_CARRIERS = ("Expand", "Tile", "Identity", "Cast", "Reshape", "Unsqueeze")


@dataclass
class TokenPrefix:
    """What is added to the patches before block 0."""
    extra: list[ExtraToken]
    pos_embed: Optional[str]       # the position embedding tensor
    pos_covers_extra: bool         # the position embedding spans the extra tokens too


def read_patch_embed(g: GraphIndex, shapes: Observed) -> PatchEmbed:
    """The first Conv with a constant weight whose kernel equals its stride."""
    for node in g.nodes_of("Conv"):
        if g.const_value(node.inputs[1]) is None:
            continue
        weight = g.const_value(node.inputs[1])
        kernel = tuple(int(k) for k in node.attrs.get("kernel_shape", weight.shape[2:]))
        strides = tuple(int(s) for s in node.attrs.get("strides", (1, 1)))
        if kernel != strides or len(kernel) != 2:
            continue
        out = shapes.shape(node.outputs[0])
        bias = node.inputs[2].name if len(node.inputs) > 2 and node.inputs[2].name else None
        return PatchEmbed(node=node.name, weight=node.inputs[1].name, bias=bias, patch_size=kernel,
                          in_chans=int(weight.shape[1]), embed_dim=int(weight.shape[0]),
                          grid=(int(out[2]), int(out[3])))
    raise NotAViTError(g.not_vit("no patch embedding (Conv with kernel = stride) was found"))


def read_token_prefix(g: GraphIndex, patch: PatchEmbed, block_input: str, n_tokens: int) -> TokenPrefix:
    """Learned tokens concatenated to the patches, and the position embedding, before block 0."""
    conv_out = g.node(patch.node).outputs[0]
    from_patches = _descendants(g, conv_out, stop=block_input)
    extra: list[ExtraToken] = []
    pos_embed, pos_covers = None, False
    queue, seen = deque([g.tensor(block_input)]), set()
    while queue:
        t = queue.popleft()
        node = g.producer(t)
        if node is None or id(node) in seen or node.op == "Conv":
            continue
        seen.add(id(node))
        if node.op == "Concat":
            for inp in node.inputs:
                if inp.name in from_patches:
                    queue.append(inp)
                    continue
                param = _learned_tensor(g, inp)
                if param is not None and param[1].ndim == 3:
                    name, value = param
                    extra.append(ExtraToken(token_kind(name, len(extra)), int(value.shape[1]), name))
            continue
        if node.op == "Add":
            for inp in node.inputs:
                value = g.const_value(inp)
                if value is not None and value.ndim == 3 and value.shape[-1] == patch.embed_dim:
                    pos_embed, pos_covers = inp.name, int(value.shape[1]) == n_tokens
        for inp in node.inputs:
            if inp.name in from_patches:
                queue.append(inp)
    return TokenPrefix(extra=extra, pos_embed=pos_embed, pos_covers_extra=pos_covers)


def _learned_tensor(g: GraphIndex, tensor) -> Optional[tuple[str, np.ndarray]]:
    """The parameter behind `tensor` (name, value), through ops that only carry it."""
    for _ in range(8):
        value = g.const_value(tensor)
        if value is not None:
            return tensor.name, value
        node = g.producer(tensor)
        if node is None or node.op not in _TOKEN_CARRIERS:
            return None
        tensor = node.inputs[0]
    return None


def token_kind(name: str, position: int) -> str:
    """What a learned token is, by its parameter's name (the first unnamed one is the class token)."""
    lowered = name.lower()
    if "reg" in lowered:
        return "register"
    if "dist" in lowered:
        return "distillation"
    if "cls" in lowered or "class" in lowered:
        return "class"
    return "class" if position == 0 else "unknown"


def _descendants(g: GraphIndex, tensor, stop: str) -> set[str]:
    """Names of the tensors computed from `tensor` (not past `stop`), shape paths left out."""
    names, queue = {tensor.name}, deque([tensor])
    while queue:
        t = queue.popleft()
        if t.name == stop:
            continue
        for node in g.consumers(t):
            if node.op in ("Shape", "Size"):  # shape paths carry no token data
                continue
            for out in node.outputs:
                if out.name not in names:
                    names.add(out.name)
                    queue.append(out)
    return names
