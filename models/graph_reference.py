"""A PyTorch ViT assembled from an ONNX graph alone: for a user who has only `model.onnx`.

The reader's description gives the architecture (widths, heads, tokens, pooling, layer scale,
activation, norm epsilon); timm's VisionTransformer is built to it, and every weight is copied from
the graph's initializers through the same canonical keys healing writes back (converter/healing/
weights.py). A Hugging Face ViT is the same architecture and is built the same way. The model is
then run against the graph in ONNX Runtime on seeded inputs: a graph that computes something
else (a custom attention scale, a norm before the blocks) is refused with what differed, never
used silently.

As a ReferenceRecord it is family "graph": `weights` names the ONNX file, `kwargs` the timm
constructor arguments (the norm epsilon under "norm_eps"), `name` "vit" or "vit_distilled".
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..errors import ExportError

GRAPH_FAMILY = "graph"
CHECK_TOLERANCE = 1e-5     # largest difference from the graph, relative to its largest logit
_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "relu": "relu", "silu": "silu", "quick_gelu": "quick_gelu"}


def graph_kwargs(vit, onnx_model) -> tuple[str, dict]:
    """(name, constructor arguments) of the timm ViT the described graph is, or ExportError naming what
    timm's VisionTransformer cannot be."""
    blocks = vit.blocks
    first = blocks[0]
    why = []
    if any(b.attn.heads != first.attn.heads or b.attn.head_dim_qk != b.attn.head_dim_v
           or b.attn.head_dim_qk * b.attn.heads != vit.embed_dim for b in blocks):
        why.append("its blocks' attention widths differ from the embedding width (a compressed graph?)")
    if any(b.ffn.hidden != first.ffn.hidden for b in blocks):
        why.append("its blocks' FFN widths differ")
    if first.ffn.activation not in _ACTIVATIONS:
        why.append(f"its activation ({first.ffn.activation}) is none timm builds")
    kinds = {t.kind: t.count for t in vit.extra_tokens}
    if set(kinds) - {"class", "distillation", "register"}:
        why.append(f"it has learned tokens of unknown kind ({', '.join(t.tensor for t in vit.extra_tokens)})")
    if why:
        raise ExportError("the graph cannot be rebuilt as a timm ViT: " + "; ".join(why) + ".")
    distilled = "distillation" in kinds
    layer_scale = first.layer_scale_attn is not None
    kwargs = {
        "img_size": list(vit.img_size), "patch_size": int(vit.patch_size[0]), "in_chans": vit.in_chans,
        "num_classes": vit.head.num_classes, "embed_dim": vit.embed_dim, "depth": vit.depth,
        "num_heads": first.attn.heads, "mlp_ratio": first.ffn.hidden / vit.embed_dim,
        "qkv_bias": first.attn.qkv_bias, "class_token": "class" in kinds, "reg_tokens": kinds.get("register", 0),
        "no_embed_class": bool(vit.pos_embed) and not vit.pos_embed_covers_extra_tokens,
        "pos_embed": "learn" if vit.pos_embed else "none",
        "global_pool": "token" if vit.pooling == "token" else "avg",
        # timm puts its one final norm before pooling (norm) or after it (fc_norm), never both
        "fc_norm": vit.head.fc_norm is not None,
        "final_norm": vit.head.final_norm is not None or vit.head.fc_norm is not None,
        "init_values": 1.0 if layer_scale else None, "act_layer": _ACTIVATIONS[first.ffn.activation],
        "norm_eps": _norm_eps(onnx_model, first.norm1),
    }
    return ("vit_distilled" if distilled else "vit"), kwargs


def _norm_eps(onnx_model, node_name: Optional[str]) -> float:
    for node in onnx_model.graph.node:
        if node.name == node_name:
            return float(next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5))
    return 1e-6


def build_graph_model(name: str, kwargs: dict) -> nn.Module:
    """The timm ViT of `graph_kwargs`, with its own initial weights."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(kwargs)
    eps = kwargs.pop("norm_eps", 1e-6)
    kwargs["img_size"] = tuple(kwargs["img_size"])
    cls = VisionTransformerDistilled if name == "vit_distilled" else VisionTransformer
    return cls(norm_layer=functools.partial(nn.LayerNorm, eps=eps), **kwargs).eval()


def model_from_graph(path: str | Path) -> tuple[nn.Module, str, dict]:
    """Build the PyTorch ViT of the graph at `path` and copy its weights in; check it against the graph.
    Returns (model, name, kwargs): a fresh copy each call (validate and heal ask several times)."""
    import copy

    stat = Path(path).stat()
    model, name, kwargs = _cached_model(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
    return copy.deepcopy(model), name, dict(kwargs)


@functools.lru_cache(maxsize=2)
def _cached_model(path: str, mtime_ns: int, size: int) -> tuple[nn.Module, str, dict]:
    from ..converter.graph import read_vit
    from ..converter.graph.loading import load_onnx

    onnx_model = load_onnx(path)
    vit = read_vit(path)
    name, kwargs = graph_kwargs(vit, onnx_model)
    model = build_graph_model(name, kwargs)
    load_graph_weights(model, vit, onnx_model)
    check_against_graph(model, onnx_model, vit)
    return model, name, kwargs


def load_graph_weights(model: nn.Module, vit, onnx_model) -> None:
    """Copy every weight the graph holds into `model`; a bias the exporter left out (it was zero) is zero."""
    from ..converter.graph.surgery import open_for_surgery
    from ..converter.healing.weights import graph_slots, model_slots, stored_value

    surgery = open_for_surgery(onnx_model)
    ours, theirs = model_slots(model), graph_slots(vit, surgery.nodes, surgery.tensors)
    missing = sorted(k for k in ours if k not in theirs and not k.endswith("bias"))
    extra = sorted(k for k in theirs if k not in ours)
    if missing or extra:
        raise ExportError("the graph cannot be rebuilt as a timm ViT: "
                          + (f"the graph has no {', '.join(missing[:4])}" if missing else "")
                          + ("; " if missing and extra else "")
                          + (f"timm has no place for {', '.join(extra[:4])}" if extra else "") + ".")
    with torch.no_grad():
        for key, slot in ours.items():
            if key not in theirs:
                slot.param.zero_()
                continue
            stored = stored_value(surgery.nodes, surgery.tensors, theirs[key])
            if stored is None:
                raise ExportError(f"the graph cannot be rebuilt as a timm ViT: {key} is computed, not stored.")
            slot.assign(slot.param, torch.from_numpy(np.ascontiguousarray(theirs[key].read(stored), dtype=np.float32)))


def check_against_graph(model: nn.Module, onnx_model, vit, images: int = 2) -> float:
    """Run the model and the graph on seeded inputs; ExportError when they differ beyond CHECK_TOLERANCE."""
    from ..converter.runtime import ort_session

    x = np.random.default_rng(0).standard_normal((images, vit.in_chans, *vit.img_size)).astype(np.float32)
    session = ort_session(onnx_model)
    fixed = session.get_inputs()[0].shape[0]
    rows = 1 if isinstance(fixed, int) and fixed == 1 else images
    got = np.concatenate([session.run(None, {session.get_inputs()[0].name: x[i:i + rows]})[0]
                          for i in range(0, images, rows)])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    error = float(np.abs(got - want).max() / max(float(np.abs(got).max()), 1e-30))
    if not error <= CHECK_TOLERANCE:
        raise ExportError(f"the PyTorch ViT assembled from the graph differs from it by {error:.3g} (relative): the "
                          "graph computes something timm's ViT does not. Give the PyTorch model with --reference "
                          "timm:NAME --weights FILE instead.")
    return error
