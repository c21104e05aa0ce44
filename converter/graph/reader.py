"""Find the Vision Transformer inside an exported ONNX graph and describe it (`ViTGraph`).

The reader anchors on what every ViT export has whatever the exporter: one attention per block,
written either as a Softmax between two activation MatMuls (TorchScript, eager attention, SDPA
decomposed; the dynamo exporter's SDPA adds an IsNaN -> Where guard after the Softmax) or as one
ONNX `Attention` node (opset 23+, the dynamo exporter's SDPA). From each anchor it walks back
through layout ops (Reshape, Transpose, Split, Slice, Gather, Squeeze, scale Muls) to the
projections that feed Q, K and V, forward to the output projection and the residual Add, and from
there through the FFN. Shapes come from one real run at batch 1 (shapes.py), so head counts
computed by Shape ops are read as the runtime sees them.

This module ties the readers together: the image input, the shapes to observe, the blocks in order
(attention.py, ffn.py), the tokens before them (tokens.py), the head (head.py) and FLOPs (flops.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .loading import load_onnx
from .shapes import observe_shapes
from .vit_graph import Block, ViTGraph
from ...errors import NotAViTError, Vit2TrtError
from .attention import read_attention
from .ffn import read_ffn
from .flops import block_flops, graph_flops
from .head import read_head
from .lookup import FUSED_ATTENTION_OPS, LINEAR_OPS, GraphIndex, Observed, is_onnx_attention
from .tokens import read_patch_embed, read_token_prefix


def read_vit(path: str | os.PathLike, img_size: Optional[int] = None) -> ViTGraph:
    """Load `path` and describe the ViT in it; raises BadModelFileError or NotAViTError."""
    model = load_onnx(path)
    return describe_vit(model, str(path), img_size=img_size)


def describe_vit(model: onnx.ModelProto, path: str = "<memory>", img_size: Optional[int] = None) -> ViTGraph:
    """Describe the ViT in a loaded model; `path` names it in messages. Raises NotAViTError."""
    try:
        return _read(model, path, img_size)
    except Vit2TrtError:
        raise
    except Exception as exc:  # a malformed graph must end in a message, never a crash
        raise NotAViTError(
            f"{path}: the graph could not be read as a ViT ({type(exc).__name__}: {str(exc)[:300]}); "
            "rerun with --debug for the traceback.") from exc


@dataclass
class ImageInput:
    tensor: gs.Variable
    shape: tuple[int, ...]     # [1, C, H, W], the size to read the graph at


def _read(model: onnx.ModelProto, path: str, img_size: Optional[int]) -> ViTGraph:
    g = GraphIndex(model, path)
    image = _image_input(g, img_size)
    anchors = [n for n in g.graph.nodes if n.op == "Softmax" or is_onnx_attention(n)]
    if not anchors:
        fused = sorted(op for op in FUSED_ATTENTION_OPS if g.nodes_of(op))
        hint = (f"; the graph has runtime-fused {', '.join(fused)} ops (ONNX Runtime's contrib ops), which "
                "vit2trt does not read: export without runtime graph optimizations (vit2trt export does)"
                ) if fused else ""
        raise NotAViTError(g.not_vit(
            "no attention (MatMul → Softmax → MatMul, or an ONNX Attention node) was found" + hint))
    shapes = _observe(g, image.shape)
    blocks = [_block(g, shapes, index, anchor) for index, anchor in enumerate(anchors)]
    for prev, nxt in zip(blocks, blocks[1:]):
        if prev.output != nxt.input and not g.derives_from(g.tensor(nxt.input), g.tensor(prev.output)):
            raise NotAViTError(g.not_vit(
                f"blocks {prev.index} and {nxt.index} are not chained (block {prev.index} ends in "
                f"'{prev.output}', block {nxt.index} starts from '{nxt.input}')"))
    patch = read_patch_embed(g, shapes)
    n_tokens = blocks[0].tokens
    num_patches = patch.grid[0] * patch.grid[1]
    num_extra = n_tokens - num_patches
    if num_extra < 0:
        raise NotAViTError(g.not_vit(
            f"attention sees {n_tokens} tokens but the patch embedding makes {num_patches}"))
    prefix = read_token_prefix(g, patch, blocks[0].input, n_tokens)
    if sum(t.count for t in prefix.extra) != num_extra:
        found = ", ".join(f"{t.tensor} ({t.count})" for t in prefix.extra) or "none"
        raise NotAViTError(g.not_vit(
            f"attention sees {num_extra} tokens besides the {num_patches} patches, but the learned "
            f"tokens concatenated before block 0 add up differently (found: {found})"))
    head = read_head(g, shapes, blocks[-1].output)
    if head.pooling == "token" and num_extra == 0:
        raise NotAViTError(g.not_vit("token pooling without any extra token"))
    flops = graph_flops(g, shapes, patch, blocks, head)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ViTGraph(
        path=path, opset=opset, input_name=image.tensor.name,
        output_names=[o.name for o in g.graph.outputs],
        in_chans=int(image.shape[1]), img_size=(int(image.shape[2]), int(image.shape[3])),
        patch_size=patch.patch_size, embed_dim=patch.embed_dim, num_patches=num_patches,
        num_extra_tokens=num_extra, extra_tokens=prefix.extra, pos_embed=prefix.pos_embed,
        pos_embed_covers_extra_tokens=prefix.pos_covers_extra, pooling=head.pooling,
        patch_embed=patch, blocks=blocks, head=head, flops=flops,
    )


def _image_input(g: GraphIndex, img_size: Optional[int]) -> ImageInput:
    inputs = [t for t in g.graph.inputs if isinstance(t, gs.Variable)]
    if len(inputs) != 1:
        raise NotAViTError(g.not_vit(
            f"expected one image input, found {len(inputs)}: {[t.name for t in inputs]}"))
    var = inputs[0]
    shape = list(var.shape or [])
    if len(shape) != 4:
        raise NotAViTError(g.not_vit(f"input '{var.name}' has shape {shape}, expected [N, C, H, W]"))
    for axis in (2, 3):
        if not isinstance(shape[axis], int) or shape[axis] <= 0:
            if img_size is None:
                raise NotAViTError(
                    f"{g.path}: input '{var.name}' has a dynamic image size {shape}; export it at a fixed size "
                    "(`vit2trt export --img-size N`), or read it at one with `vit2trt inspect --img-size N`.")
            shape[axis] = img_size
    if not isinstance(shape[1], int) or shape[1] <= 0:
        raise NotAViTError(g.not_vit(f"input '{var.name}' has no fixed channel count: {shape}"))
    shape[0] = 1
    return ImageInput(var, tuple(shape))


def _observe(g: GraphIndex, input_shape: tuple[int, ...]) -> Observed:
    """Run the graph once at batch 1 for the shapes of every tensor a reader asks about."""
    wanted: dict[str, None] = {}   # ordered, without repeats
    for node in g.graph.nodes:
        tensors = []
        if node.op in LINEAR_OPS or node.op == "Conv":
            tensors = [node.inputs[0], node.inputs[1], node.outputs[0]]
        elif is_onnx_attention(node):
            tensors = [t for t in node.inputs[:4] if t is not None and t.name] + [node.outputs[0]]
        elif node.op == "Softmax":
            tensors = [node.inputs[0]]
            pre = g.producer(node.inputs[0])
            for _ in range(4):  # inputs of Adds on the scores (masks, ToMe's size bias)
                if pre is None or pre.op not in ("Add", "Mul", "Div", "Cast"):
                    break
                if pre.op == "Add":
                    tensors.extend(pre.inputs)
                dynamic = [t for t in pre.inputs if not g.is_static(t)]
                pre = g.producer(dynamic[0]) if dynamic else None
        elif node.op == "Reshape":
            tensors = [node.inputs[0], node.inputs[1], node.outputs[0]]
        for t in tensors:
            if isinstance(t, gs.Variable) and t.name:
                wanted[t.name] = None
    masks = tuple(name for name in wanted if g.is_static(g.tensor(name))
                  and g.tensor(name).dtype not in (np.int64, np.int32))
    observed, values = observe_shapes(g.model, list(wanted), input_shape, keep_values=masks)
    return Observed(g.path, observed, values)


def _block(g: GraphIndex, shapes: Observed, index: int, anchor: gs.Node) -> Block:
    """Block `index` around its attention `anchor`: the attention half, then the FFN half."""
    attention = read_attention(g, shapes, index, anchor)
    ffn = read_ffn(g, shapes, index, attention.residual)
    return Block(
        index=index, input=attention.block_input, output=ffn.residual.outputs[0].name,
        norm1=attention.norm1, norm2=ffn.norm2, attn=attention.attn, ffn=ffn.ffn,
        layer_scale_attn=attention.layer_scale, layer_scale_ffn=ffn.layer_scale,
        residual_attn=attention.residual.name, residual_ffn=ffn.residual.name,
        flops=block_flops(g, shapes, attention.attn, ffn.ffn, attention.tokens), tokens=attention.tokens,
    )
