"""Find the Vision Transformer inside an exported ONNX graph and describe it (`ViTGraph`).

The reader anchors on what every ViT export has whatever the exporter: one attention per block,
written either as a Softmax between two activation MatMuls (TorchScript, eager attention, SDPA
decomposed; the dynamo exporter's SDPA adds an IsNaN -> Where guard after the Softmax) or as one
ONNX `Attention` node (opset 23+, the dynamo exporter's SDPA). From each anchor it walks back
through layout ops (Reshape, Transpose, Split, Slice, Gather, Squeeze, scale Muls) to the
projections that feed Q, K and V, forward to the output projection and the residual Add, and from
there through the FFN. Shapes come from one real run at batch 1 (converter.shapes), so head counts
computed by Shape ops are read as the runtime sees them.
"""
from __future__ import annotations

import os
from collections import deque
from typing import Iterable, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph_utils import const_value, name_nodes
from .loading import load_onnx
from .shapes import observe_shapes
from .vit_graph import (
    FFN, Attention, Block, BlockFlops, ExtraToken, GraphFlops, Head, HeadReshape, LayerScale,
    Linear, PatchEmbed, ViTGraph,
)
from ..errors import NotAViTError, Vit2TrtError

# Ops that only move data around (or scale it) between a projection and the attention MatMuls.
_LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Split", "Slice", "Gather", "Pad",
               "Identity", "Cast", "Flatten", "Mul", "Div"}
_LINEAR_OPS = {"MatMul", "Gemm"}
_FUSED_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "PackedAttention", "GroupQueryAttention"}


def _is_onnx_attention(node: gs.Node) -> bool:
    """The standard ONNX Attention op (opset 23+), not ONNX Runtime's contrib op of the same name."""
    return node.op == "Attention" and node.domain in ("", "ai.onnx", None)


def read_vit(path: str | os.PathLike, img_size: Optional[int] = None) -> ViTGraph:
    """Load `path` and describe the ViT in it; raises BadModelFileError or NotAViTError."""
    model = load_onnx(path)
    return describe_vit(model, str(path), img_size=img_size)


def describe_vit(model: onnx.ModelProto, path: str = "<memory>", img_size: Optional[int] = None) -> ViTGraph:
    try:
        return _Reader(model, path, img_size).read()
    except Vit2TrtError:
        raise
    except Exception as exc:  # a malformed graph must end in a message, never a crash
        raise NotAViTError(
            f"{path}: the graph could not be read as a ViT ({type(exc).__name__}: {str(exc)[:300]}); "
            "rerun with --debug for the traceback.") from exc


class _Reader:
    def __init__(self, model: onnx.ModelProto, path: str, img_size: Optional[int]):
        self.model = model
        self.path = path
        self.graph = gs.import_onnx(model)
        name_nodes(self.graph)
        self.order = {id(n): i for i, n in enumerate(self.graph.nodes)}
        self._static: dict[str, bool] = {}
        self.img_size = img_size
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.int_values: dict[str, np.ndarray] = {}

    # ---------------------------------------------------------------- entry point
    def read(self) -> ViTGraph:
        input_var, input_shape = self._image_input()
        anchors = [n for n in self.graph.nodes if n.op == "Softmax" or _is_onnx_attention(n)]
        if not anchors:
            fused = sorted({n.op for n in self.graph.nodes if n.op in _FUSED_ATTENTION_OPS})
            hint = (f"; the graph has runtime-fused {', '.join(fused)} ops (ONNX Runtime's contrib ops), which "
                    "vit2trt does not read: export without runtime graph optimizations (vit2trt export does)"
                    ) if fused else ""
            raise NotAViTError(self._not_vit(
                "no attention (MatMul → Softmax → MatMul, or an ONNX Attention node) was found" + hint))
        self._observe(input_shape)
        blocks = []
        for index, anchor in enumerate(anchors):
            blocks.append(self._block(index, anchor))
        for prev, nxt in zip(blocks, blocks[1:]):
            if prev.output != nxt.input and not self._derives_from(
                    self._tensor_by_name(nxt.input), self._tensor_by_name(prev.output)):
                raise NotAViTError(self._not_vit(
                    f"blocks {prev.index} and {nxt.index} are not chained (block {prev.index} ends in "
                    f"'{prev.output}', block {nxt.index} starts from '{nxt.input}')"))
        patch = self._patch_embed(input_var)
        n_tokens = blocks[0].tokens
        num_patches = patch.grid[0] * patch.grid[1]
        num_extra = n_tokens - num_patches
        if num_extra < 0:
            raise NotAViTError(self._not_vit(
                f"attention sees {n_tokens} tokens but the patch embedding makes {num_patches}"))
        extra, pos_embed, pos_covers_extra = self._token_prefix(patch, blocks[0].input, n_tokens)
        if sum(t.count for t in extra) != num_extra:
            found = ", ".join(f"{t.tensor} ({t.count})" for t in extra) or "none"
            raise NotAViTError(self._not_vit(
                f"attention sees {num_extra} tokens besides the {num_patches} patches, but the learned "
                f"tokens concatenated before block 0 add up differently (found: {found})"))
        head = self._head(blocks[-1].output)
        if head.pooling == "token" and num_extra == 0:
            raise NotAViTError(self._not_vit("token pooling without any extra token"))
        flops = self._graph_flops(patch, blocks, head)
        opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0)
        return ViTGraph(
            path=self.path, opset=opset, input_name=input_var.name,
            output_names=[o.name for o in self.graph.outputs],
            in_chans=int(input_shape[1]), img_size=(int(input_shape[2]), int(input_shape[3])),
            patch_size=patch.patch_size, embed_dim=patch.embed_dim, num_patches=num_patches,
            num_extra_tokens=num_extra, extra_tokens=extra, pos_embed=pos_embed,
            pos_embed_covers_extra_tokens=pos_covers_extra, pooling=head.pooling,
            patch_embed=patch, blocks=blocks, head=head, flops=flops,
        )

    # ---------------------------------------------------------------- input and shapes
    def _image_input(self):
        inputs = [t for t in self.graph.inputs if isinstance(t, gs.Variable)]
        if len(inputs) != 1:
            raise NotAViTError(self._not_vit(
                f"expected one image input, found {len(inputs)}: {[t.name for t in inputs]}"))
        var = inputs[0]
        shape = list(var.shape or [])
        if len(shape) != 4:
            raise NotAViTError(self._not_vit(f"input '{var.name}' has shape {shape}, expected [N, C, H, W]"))
        for axis in (2, 3):
            if not isinstance(shape[axis], int) or shape[axis] <= 0:
                if self.img_size is None:
                    raise NotAViTError(
                        f"{self.path}: input '{var.name}' has a dynamic image size {shape}; "
                        "pass --img-size to read it at a fixed size.")
                shape[axis] = self.img_size
        if not isinstance(shape[1], int) or shape[1] <= 0:
            raise NotAViTError(self._not_vit(f"input '{var.name}' has no fixed channel count: {shape}"))
        shape[0] = 1
        return var, tuple(shape)

    def _observe(self, input_shape):
        wanted: list[str] = []
        for node in self.graph.nodes:
            tensors = []
            if node.op in _LINEAR_OPS or node.op == "Conv":
                tensors = [node.inputs[0], node.inputs[1], node.outputs[0]]
            elif _is_onnx_attention(node):
                tensors = [t for t in node.inputs[:4] if t is not None and t.name] + [node.outputs[0]]
            elif node.op == "Softmax":
                tensors = [node.inputs[0]]
                pre = self._producer(node.inputs[0])
                for _ in range(4):  # inputs of Adds on the scores (masks, ToMe's size bias)
                    if pre is None or pre.op not in ("Add", "Mul", "Div", "Cast"):
                        break
                    if pre.op == "Add":
                        tensors.extend(pre.inputs)
                    dynamic = [t for t in pre.inputs if not self._is_static(t)]
                    pre = self._producer(dynamic[0]) if dynamic else None
            elif node.op == "Reshape":
                tensors = [node.inputs[0], node.inputs[1], node.outputs[0]]
            for t in tensors:
                if isinstance(t, gs.Variable) and t.name and t.name not in wanted:
                    wanted.append(t.name)
        tensors = self.graph.tensors()
        masks = tuple(name for name in wanted if self._is_static(tensors[name])
                      and tensors[name].dtype not in (np.int64, np.int32))
        self.shapes, self.int_values = observe_shapes(self.model, wanted, input_shape, keep_values=masks)

    def _tensor_shape(self, tensor) -> tuple[int, ...]:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        value = self.shapes.get(tensor.name)
        if value is None:
            raise NotAViTError(f"{self.path}: internal: no observed shape for tensor '{tensor.name}'")
        return tuple(value)

    def _linear_macs(self, lin: Linear) -> int:
        """Batch-1 multiply-accumulates of a projection, from the shape of what it really reads."""
        shape = self._tensor_shape(self._node(lin.node).inputs[0])
        return int(np.prod(shape[:-1])) * int(shape[-1]) * lin.out_features

    def _shape_or_none(self, tensor):
        try:
            return self._tensor_shape(tensor)
        except NotAViTError:
            return None

    def _derives_from(self, tensor, ancestor, limit: int = 64) -> bool:
        """True when `tensor` is computed from `ancestor` (token merging sits between them)."""
        queue, seen = deque([tensor]), set()
        while queue and len(seen) < limit:
            t = queue.popleft()
            if t is ancestor:
                return True
            node = self._producer(t)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            queue.extend(i for i in node.inputs if not self._is_static(i))
        return False

    def _node(self, name: str) -> gs.Node:
        for node in self.graph.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    # ---------------------------------------------------------------- tensor helpers
    @staticmethod
    def _producer(tensor) -> Optional[gs.Node]:
        return tensor.inputs[0] if tensor.inputs else None

    @staticmethod
    def _const_value(tensor) -> Optional[np.ndarray]:
        return const_value(tensor)

    def _is_static(self, tensor) -> bool:
        """True for constants and tensors computed only from constants and Shape ops."""
        if isinstance(tensor, gs.Constant):
            return True
        if tensor.name in self._static:
            return self._static[tensor.name]
        node = self._producer(tensor)
        if node is None:
            result = False  # a graph input
        elif node.op in ("Shape", "Constant", "Size"):
            result = True
        else:
            self._static[tensor.name] = False  # guards cycles in malformed graphs
            result = all(self._is_static(t) for t in node.inputs if t is not None and t.name != "")
        self._static[tensor.name] = result
        return result

    def _data_input(self, node: gs.Node):
        """The one input of a layout/scale op that carries activations, or None."""
        if node.op in ("Mul", "Div", "Add"):
            dynamic = [t for t in node.inputs if not self._is_static(t)]
            return dynamic[0] if len(dynamic) == 1 else None
        return node.inputs[0] if node.inputs else None

    def _linear_at(self, node: gs.Node) -> Optional[Linear]:
        """The projection whose output `node` produces (MatMul/Gemm with constant weight ± bias Add)."""
        if node.op == "Add":
            consts = [t for t in node.inputs if self._const_value(t) is not None]
            dynamic = [t for t in node.inputs if self._const_value(t) is None]
            if len(consts) == 1 and len(dynamic) == 1:
                inner = self._producer(dynamic[0])
                if inner is not None and inner.op == "MatMul":
                    lin = self._linear_from_matmul(inner, with_bias=False)
                    bias = self._const_value(consts[0])
                    if lin and bias is not None and bias.size == lin.out_features:
                        lin.bias, lin.bias_node, lin.output = consts[0].name, node.name, node.outputs[0].name
                        return lin
            return None
        if node.op in _LINEAR_OPS:
            lin = self._linear_from_matmul(node, with_bias=False)
            return lin
        return None

    def _linear_from_matmul(self, node: gs.Node, with_bias: bool = True) -> Optional[Linear]:
        if node.op not in _LINEAR_OPS or len(node.inputs) < 2:
            return None
        weight_t = node.inputs[1]
        weight = self._const_value(weight_t)
        selected = None
        gather = self._producer(weight_t)
        if weight is None and gather is not None and gather.op == "Gather" and int(gather.attrs.get("axis", 0)) == 0:
            # Token Channel Selection: the weight rows are gathered per image at run time.
            weight_t = gather.inputs[0]
            weight = self._const_value(weight_t)
            selected = self._tensor_shape(node.inputs[0])[-1] if node.op == "MatMul" else None
        if weight is None or weight.ndim != 2 or self._const_value(node.inputs[0]) is not None:
            return None
        if selected is not None:
            lin = Linear(node.name, weight_t.name, "in_out", int(weight.shape[0]), int(weight.shape[1]),
                         output=node.outputs[0].name, selected_in=int(selected))
            if with_bias:
                out = node.outputs[0]
                if len(out.outputs) == 1 and out.outputs[0].op == "Add":
                    add = out.outputs[0]
                    bias = [t for t in add.inputs if self._const_value(t) is not None]
                    if len(bias) == 1 and self._const_value(bias[0]).size == lin.out_features:
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
            out = node.outputs[0]
            if len(out.outputs) == 1 and out.outputs[0].op == "Add":
                with_b = self._linear_at(out.outputs[0])
                if with_b is not None:
                    return with_b
        return lin

    def _trace_back_to_linear(self, tensor):
        """Walk back through layout ops to a projection; returns (Linear, nodes on the way).

        Also remembers, for a fused projection, which chunk (q=0, k=1, v=2 in timm) the walk
        left through: the index of the Split output, Gather index or Slice start nearest it.
        """
        path: list[gs.Node] = []
        self._last_chunk = None
        for _ in range(40):
            node = self._producer(tensor)
            if node is None:
                return None, path
            lin = self._linear_at(node)
            if lin is not None:
                return lin, path
            if node.op not in _LAYOUT_OPS:
                return None, path
            data = self._data_input(node)
            if data is None:
                return None, path
            chunk = self._chunk_index(node, tensor)
            if chunk is not None:
                self._last_chunk = chunk
            path.append(node)
            tensor = data
        return None, path

    def _chunk_index(self, node: gs.Node, out_tensor) -> Optional[int]:
        if node.op == "Split":
            return next(i for i, t in enumerate(node.outputs) if t is out_tensor)
        if node.op == "Gather":
            idx = self._const_value(node.inputs[1])
            return int(np.asarray(idx).reshape(-1)[0]) if idx is not None and idx.size == 1 else None
        if node.op == "Slice":
            start = self._const_value(node.inputs[1])
            return int(np.asarray(start).reshape(-1)[0]) if start is not None and start.size == 1 else None
        return None

    def _probs_consumer(self, probs) -> Optional[gs.Node]:
        """The A·V MatMul (or a Cast before it); other readers of the probabilities (TCS) are ignored."""
        candidates = [n for n in probs.outputs if n.op in ("MatMul", "Cast", "Identity")
                      and n.inputs[0] is probs]
        if len(candidates) == 1:
            return candidates[0]
        return self._nan_guard(probs) if not candidates else None

    def _zero_mask(self, tensor) -> bool:
        """A constant mask that masks nothing: zeros added to the scores, or an all-True boolean mask
        (Hugging Face's dynamo export writes one when no mask is given). The passes may drop it, and
        the token count may change under it."""
        value = self.int_values.get(tensor.name)
        if value is None and isinstance(tensor, gs.Constant):
            value = tensor.values
        if value is None or not self._is_static(tensor):
            return False
        value = np.asarray(value)
        return bool(value.all()) if value.dtype == np.bool_ else value.dtype.kind == "f" and not np.any(value)

    def _nan_guard(self, probs) -> Optional[gs.Node]:
        """SDPA's Where(IsNaN(p), 0, p) after the Softmax (the dynamo exporter writes it for rows that
        a mask could empty): the probabilities pass through it unchanged in a ViT."""
        for node in probs.outputs:
            if node.op != "Where" or len(node.inputs) != 3 or node.inputs[2] is not probs:
                continue
            test = self._producer(node.inputs[0])
            if test is not None and test.op == "IsNaN" and test.inputs[0] is probs and self._is_static(node.inputs[1]):
                return node
        return None

    def _single_consumer(self, tensor, ops: Iterable[str]) -> Optional[gs.Node]:
        consumers = [n for n in tensor.outputs]
        if len(consumers) == 1 and consumers[0].op in ops:
            return consumers[0]
        return None

    def _layer_scale_and_residual(self, tensor):
        """After a branch output: an optional constant Mul (layer scale), then the residual Add."""
        scale = None
        mul = self._single_consumer(tensor, {"Mul"})
        if mul is not None:
            other = [t for t in mul.inputs if t is not tensor]
            value = self._const_value(other[0]) if other else None
            if value is not None and value.size > 1:
                scale = LayerScale(mul.name, other[0].name)
                tensor = mul.outputs[0]
        add = self._single_consumer(tensor, {"Add"})
        if add is None:
            return scale, None, None
        others = [t for t in add.inputs if t is not tensor]
        if len(others) != 1 or self._is_static(others[0]):
            return scale, None, None
        return scale, add, others[0]

    # ---------------------------------------------------------------- blocks
    def _block(self, index: int, anchor: gs.Node) -> Block:
        core = (self._fused_core(index, anchor) if _is_onnx_attention(anchor)
                else self._explicit_core(index, anchor))
        return self._block_around(index, core)

    def _explicit_core(self, index: int, softmax: gs.Node) -> dict:
        """Q·Kᵀ MatMul → (scale, mask) → Softmax → (Cast, NaN guard) → A·V MatMul."""
        where = f"block {index} (Softmax '{softmax.name}')"
        scale, scale_nodes, scale_from_shape, mask_nodes, mask_inputs = 1.0, [], False, [], []
        t = softmax.inputs[0]
        qk = None
        for _ in range(6):  # scale ops between the score MatMul and Softmax (HF divides here)
            node = self._producer(t)
            if node is None:
                break
            if node.op == "MatMul" and self._const_value(node.inputs[1]) is None:
                qk = node
                break
            if node.op == "Add":  # an attention mask (HF adds an all-zero one; ToMe adds log(size))
                t = self._data_input(node)
                if t is None:  # both inputs computed: the scores are the full-shaped one
                    full = self._tensor_shape(softmax.inputs[0])
                    same = [i for i in node.inputs if self._shape_or_none(i) == full]
                    t = same[0] if len(same) == 1 else None
                if t is None:
                    break
                mask_nodes.append(node.name)
                mask_inputs.extend(i.name for i in node.inputs if i is not t and not self._zero_mask(i))
                continue
            if node.op in ("Mul", "Div", "Cast", "Identity"):
                if node.op in ("Mul", "Div"):
                    scale, from_shape = self._fold_scale(node, scale)
                    scale_from_shape |= from_shape
                    scale_nodes.append(node.name)
                t = self._data_input(node)
                if t is None:
                    break
                continue
            break
        if qk is None:
            raise NotAViTError(self._not_vit(f"{where}: no Q·Kᵀ MatMul feeds the Softmax"))
        probs, av, guard = softmax.outputs[0], None, []
        for _ in range(4):  # HF casts the probabilities (to the same dtype) before A·V; SDPA guards NaN
            av = self._probs_consumer(probs)
            if av is None or av.op == "MatMul":
                break
            if av.op == "Where":
                guard += [self._producer(av.inputs[0]).name, av.name]
            probs = av.outputs[0]
        if av is None or av.op != "MatMul" or av.inputs[0] is not probs:
            raise NotAViTError(self._not_vit(f"{where}: the Softmax output does not feed an A·V MatMul"))
        s_shape = self._tensor_shape(softmax.inputs[0])
        if len(s_shape) != 4:
            raise NotAViTError(self._not_vit(
                f"{where}: attention scores have shape {list(s_shape)}, expected [batch, heads, tokens, tokens]"))
        return dict(where=where, q=qk.inputs[0], k=qk.inputs[1], v=av.inputs[1], out=av.outputs[0],
                    heads=s_shape[1], head_dim_qk=self._tensor_shape(qk.inputs[0])[-1],
                    head_dim_v=self._tensor_shape(av.inputs[1])[-1], tokens=s_shape[-1],
                    scale=scale, scale_from_shape=scale_from_shape, scale_nodes=scale_nodes,
                    mask_nodes=mask_nodes, mask_inputs=mask_inputs,
                    names=dict(qk_matmul=qk.name, softmax=softmax.name, av_matmul=av.name, nan_guard_nodes=guard))

    def _fused_core(self, index: int, node: gs.Node) -> dict:
        """One ONNX Attention node: Q, K, V as [B, heads, N, dim] (or [B, N, heads·dim] with head counts
        as attributes), an optional constant mask, the scale as an attribute (default 1/√dim)."""
        where = f"block {index} (Attention '{node.name}')"
        given = [t.name if t is not None and t.name else "" for t in node.inputs]
        if any(given[4:]) or any(o.name and o.outputs for o in node.outputs[1:]):
            raise NotAViTError(self._not_vit(f"{where}: a key/value cache (past or present key and value) is "
                                             "not part of a ViT"))
        if int(node.attrs.get("is_causal", 0)) or float(node.attrs.get("softcap", 0.0) or 0.0):
            raise NotAViTError(self._not_vit(f"{where}: causal or soft-capped attention is not a ViT's"))
        mask_inputs = []
        if len(given) > 3 and given[3]:
            mask_inputs = [] if self._zero_mask(node.inputs[3]) else [given[3]]
        q, k, v = node.inputs[:3]
        q_shape, k_shape, v_shape = (self._tensor_shape(t) for t in (q, k, v))
        if len(q_shape) == 4:
            heads, kv_heads, tokens = q_shape[1], k_shape[1], q_shape[2]
            head_dim_qk, head_dim_v = q_shape[3], v_shape[3]
        elif len(q_shape) == 3:
            heads = int(node.attrs.get("q_num_heads", 0))
            kv_heads = int(node.attrs.get("kv_num_heads", heads))
            if heads <= 0:
                raise NotAViTError(self._not_vit(f"{where}: 3-D inputs without a q_num_heads attribute"))
            tokens, head_dim_qk, head_dim_v = q_shape[1], q_shape[2] // heads, v_shape[2] // kv_heads
        else:
            raise NotAViTError(self._not_vit(f"{where}: Q has shape {list(q_shape)}, expected 3-D or 4-D"))
        if kv_heads != heads:
            raise NotAViTError(self._not_vit(f"{where}: grouped-query attention ({heads} query heads, {kv_heads} "
                                             "key/value heads) is not part of a ViT"))
        scale = node.attrs.get("scale")
        scale = float(scale) if scale is not None else head_dim_qk ** -0.5
        return dict(where=where, q=q, k=k, v=v, out=node.outputs[0], heads=heads, head_dim_qk=head_dim_qk,
                    head_dim_v=head_dim_v, tokens=tokens, scale=scale, scale_from_shape=False, scale_nodes=[],
                    mask_nodes=[], mask_inputs=mask_inputs, names=dict(fused_op=node.name))

    def _block_around(self, index: int, core: dict) -> Block:
        """From the attention core: the projections, the output path, the residuals and the FFN."""
        where, scale, scale_from_shape = core["where"], core["scale"], core["scale_from_shape"]
        scale_nodes = list(core["scale_nodes"])
        lin_q, path_q = self._trace_back_to_linear(core["q"])
        chunk_q = self._last_chunk
        lin_k, path_k = self._trace_back_to_linear(core["k"])
        chunk_k = self._last_chunk
        lin_v, path_v = self._trace_back_to_linear(core["v"])
        chunk_v = self._last_chunk
        missing = [n for n, l in (("Q", lin_q), ("K", lin_k), ("V", lin_v)) if l is None]
        if missing:
            raise NotAViTError(self._not_vit(f"{where}: no projection found for {', '.join(missing)}"))
        for node in path_q + path_k:
            if node.op in ("Mul", "Div"):
                scale, from_shape = self._fold_scale(node, scale)
                scale_from_shape |= from_shape
                scale_nodes.append(node.name)

        fused = lin_q.node == lin_k.node == lin_v.node
        if not fused and len({lin_q.node, lin_k.node, lin_v.node}) != 3:
            raise NotAViTError(self._not_vit(f"{where}: Q, K and V come from a mix of shared and separate projections"))
        chunks = {}
        if fused:
            third = lin_q.out_features // 3
            chunks = {role: (c // third if c is not None and c >= 3 else c)
                      for role, c in (("q", chunk_q), ("k", chunk_k), ("v", chunk_v))}
            if sorted(v for v in chunks.values() if v is not None) != [0, 1, 2]:
                raise NotAViTError(self._not_vit(
                    f"{where}: could not tell which part of the fused projection is Q, K and V (found {chunks})"))

        heads, head_dim_qk, head_dim_v = core["heads"], core["head_dim_qk"], core["head_dim_v"]

        # Output projection: follow the A·V result through layout ops to the next projection.
        t, out_path, proj = core["out"], [], None
        for _ in range(8):
            # Other readers of the per-head outputs (AS-ViT's scores) are not on this path.
            candidates = [n for n in t.outputs
                          if n.op in ("Transpose", "Reshape", "Flatten", "Identity", "Cast", "MatMul", "Gemm",
                                      "Gather", "Unsqueeze")]
            node = candidates[0] if len(candidates) == 1 else None
            if node is None:
                break
            if node.op in _LINEAR_OPS:
                proj = self._linear_from_matmul(node)
                break
            out_path.append(node)
            t = node.outputs[0]
        if proj is None:
            raise NotAViTError(self._not_vit(f"{where}: no output projection after the A·V MatMul"))

        reshapes = []
        seen = set()
        for role, path in (("q", path_q), ("k", path_k), ("v", path_v)):
            for node in path:
                if node.op == "Reshape" and node.name not in seen and self._is_head_split(node):
                    seen.add(node.name)
                    reshapes.append(self._head_reshape(node, "qkv" if fused else role))
        for node in out_path:
            if node.op == "Reshape" and self._is_head_merge(node):
                reshapes.append(self._head_reshape(node, "merge"))
        split_nodes = sorted({n.name for n in path_q + path_k + path_v if n.op in ("Split", "Slice", "Gather")},
                             key=lambda name: self.order[id(self._node(name))])

        attn_input = self._node(lin_v.node).inputs[0]
        norm1 = self._producer(attn_input)
        ls_attn, res_attn, block_input = self._layer_scale_and_residual(self._tensor_by_name(proj.output))
        if res_attn is None:
            raise NotAViTError(self._not_vit(f"{where}: no residual Add after the attention output projection"))
        block_in = block_input.name

        ffn, norm2, ls_ffn, res_ffn = self._ffn(index, res_attn)

        attn = Attention(
            layout="fused_qkv" if fused else "split_qkv", heads=heads, head_dim_qk=head_dim_qk,
            head_dim_v=head_dim_v, qkv_bias=all(l.bias is not None for l in (lin_q, lin_k, lin_v)),
            proj=proj, qkv=lin_q if fused else None, q=None if fused else lin_q,
            k=None if fused else lin_k, v=None if fused else lin_v,
            scale=None if scale_from_shape else float(scale), scale_from_shape=scale_from_shape,
            scale_nodes=scale_nodes, mask_nodes=core["mask_nodes"], head_reshapes=reshapes,
            qkv_split_nodes=split_nodes, qkv_chunks=chunks, mask_inputs=core["mask_inputs"], **core["names"],
        )
        n = core["tokens"]
        flops = BlockFlops(
            attn_proj=sum(self._linear_macs(l) for l in {x.node: x for x in (lin_q, lin_k, lin_v, proj)}.values()),
            attn_matmul=heads * n * n * head_dim_qk + heads * n * n * head_dim_v,
            ffn=self._linear_macs(ffn.fc1) + self._linear_macs(ffn.fc2),  # tokens as the FFN sees them
        )
        return Block(
            index=index, input=block_in, output=res_ffn.outputs[0].name,
            norm1=norm1.name if norm1 is not None and norm1.op == "LayerNormalization" else None,
            norm2=norm2, attn=attn, ffn=ffn, layer_scale_attn=ls_attn, layer_scale_ffn=ls_ffn,
            residual_attn=res_attn.name, residual_ffn=res_ffn.name, flops=flops, tokens=n,
        )

    def _fold_scale(self, node: gs.Node, scale: float):
        others = [t for t in node.inputs if self._is_static(t)]
        if len(others) != 1:
            return scale, False
        value = self._const_value(others[0])
        if value is None or value.size != 1:
            return scale, True  # computed from a shape at run time
        value = float(np.asarray(value).reshape(-1)[0])
        return (scale * value if node.op == "Mul" else scale / value), False

    def _ffn(self, index: int, res_attn: gs.Node):
        where = f"block {index} FFN"
        r1 = res_attn.outputs[0]
        fc1, norm2 = None, None
        queue = deque((n, 0) for n in r1.outputs if n is not res_attn)
        while queue and fc1 is None:
            node, depth = queue.popleft()
            lin = self._linear_from_matmul(node)
            if lin is not None:
                fc1 = lin
                break
            if node.op == "LayerNormalization":
                norm2 = node.name
            if node.op == "Add" and any(t is r1 for t in node.inputs):
                continue  # the FFN residual itself
            if depth < 40:  # token reduction may sit between the residual and norm2
                queue.extend((n, depth + 1) for t in node.outputs for n in t.outputs)
        if fc1 is None:
            raise NotAViTError(self._not_vit(f"{where}: no first FFN projection after the attention residual"))
        t = self._tensor_by_name(fc1.output)
        act_nodes: list[gs.Node] = []
        fc2 = None
        queue = deque(t.outputs)
        visited = set()
        while queue:
            node = queue.popleft()
            if id(node) in visited:
                continue
            visited.add(id(node))
            lin = self._linear_from_matmul(node)
            if lin is not None:
                fc2 = lin
                break
            act_nodes.append(node)
            if len(act_nodes) > 24:
                break
            for out in node.outputs:
                queue.extend(out.outputs)
        if fc2 is None:
            raise NotAViTError(self._not_vit(f"{where}: no second FFN projection after '{fc1.node}'"))
        ls, res, other = self._layer_scale_and_residual(self._tensor_by_name(fc2.output))
        if res is None or not (other is r1 or self._derives_from(other, r1)):
            raise NotAViTError(self._not_vit(f"{where}: no residual Add after '{fc2.node}'"))
        ffn = FFN(fc1=fc1, fc2=fc2, hidden=fc1.out_features, activation=self._activation_name(act_nodes),
                  activation_nodes=[n.name for n in act_nodes])
        return ffn, norm2, ls, res

    def _activation_name(self, nodes: list[gs.Node]) -> str:
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
                    v = self._const_value(t)
                    if v is not None and v.size == 1 and abs(float(v.reshape(-1)[0]) - 1.702) < 1e-3:
                        return "quick_gelu"
            return "silu"
        if "Relu" in ops:
            return "relu"
        return "+".join(sorted(ops)) or "identity"

    def _tensor_by_name(self, name: str):
        return self.graph.tensors()[name]

    def _rank_change(self, node: gs.Node):
        return len(self._tensor_shape(node.inputs[0])), len(self._tensor_shape(node.outputs[0]))

    def _is_head_split(self, node: gs.Node) -> bool:
        """[batch, tokens, features] -> [batch, tokens, ..., heads, head_dim], not a layout-only reshape."""
        before, after = self._tensor_shape(node.inputs[0]), self._tensor_shape(node.outputs[0])
        return (len(before) == 3 and len(after) >= 4 and before[:2] == after[:2]
                and int(np.prod(after[2:])) == before[2])

    def _is_head_merge(self, node: gs.Node) -> bool:
        before, after = self._rank_change(node)
        return before >= 4 and after == 3

    def _head_reshape(self, node: gs.Node, role: str) -> HeadReshape:
        shape_t = node.inputs[1]
        value = self._const_value(shape_t)
        if value is None:
            value = self.int_values.get(shape_t.name)
        sources: list[str] = []
        if self._const_value(shape_t) is not None:
            sources.append(shape_t.name)
        else:
            producer = self._producer(shape_t)
            if producer is not None and producer.op == "Concat":
                sources = [t.name for t in producer.inputs if self._const_value(t) is not None]
        observed = [int(v) for v in np.asarray(value).reshape(-1)] if value is not None else []
        return HeadReshape(node=node.name, role=role, shape_input=shape_t.name, shape_value=observed,
                           output_shape=list(self._tensor_shape(node.outputs[0])), constant_sources=sources)

    # ---------------------------------------------------------------- embedding and head
    def _patch_embed(self, input_var) -> PatchEmbed:
        for node in self.graph.nodes:
            if node.op != "Conv" or self._const_value(node.inputs[1]) is None:
                continue
            weight = self._const_value(node.inputs[1])
            kernel = tuple(int(k) for k in node.attrs.get("kernel_shape", weight.shape[2:]))
            strides = tuple(int(s) for s in node.attrs.get("strides", (1, 1)))
            if kernel != strides or len(kernel) != 2:
                continue
            out = self._tensor_shape(node.outputs[0])
            bias = node.inputs[2].name if len(node.inputs) > 2 and node.inputs[2].name else None
            return PatchEmbed(node=node.name, weight=node.inputs[1].name, bias=bias, patch_size=kernel,
                              in_chans=int(weight.shape[1]), embed_dim=int(weight.shape[0]),
                              grid=(int(out[2]), int(out[3])))
        raise NotAViTError(self._not_vit("no patch embedding (Conv with kernel = stride) was found"))

    def _token_prefix(self, patch: PatchEmbed, block_input: str, n_tokens: int):
        """Learned tokens concatenated to the patches, and the position embedding, before block 0."""
        conv_out = self._node(patch.node).outputs[0]
        from_patches = self._descendants(conv_out, stop=block_input)
        extra: list[ExtraToken] = []
        pos_embed, pos_covers = None, False
        queue, seen = deque([self._tensor_by_name(block_input)]), set()
        while queue:
            t = queue.popleft()
            node = self._producer(t)
            if node is None or id(node) in seen or node.op == "Conv":
                continue
            seen.add(id(node))
            if node.op == "Concat":
                for inp in node.inputs:
                    if inp.name in from_patches:
                        queue.append(inp)
                        continue
                    param = self._learned_tensor(inp)
                    if param is not None and param[1].ndim == 3:
                        name, value = param
                        extra.append(ExtraToken(self._token_kind(name, len(extra)), int(value.shape[1]), name))
                continue
            if node.op == "Add":
                for inp in node.inputs:
                    value = self._const_value(inp)
                    if value is not None and value.ndim == 3 and value.shape[-1] == patch.embed_dim:
                        pos_embed, pos_covers = inp.name, int(value.shape[1]) == n_tokens
            for inp in node.inputs:
                if inp.name in from_patches:
                    queue.append(inp)
        return extra, pos_embed, pos_covers

    def _learned_tensor(self, tensor):
        for _ in range(8):
            value = self._const_value(tensor)
            if value is not None:
                return tensor.name, value
            node = self._producer(tensor)
            if node is None or node.op not in ("Expand", "Tile", "Identity", "Cast", "Reshape", "Unsqueeze"):
                return None
            tensor = node.inputs[0]
        return None

    @staticmethod
    def _token_kind(name: str, position: int) -> str:
        lowered = name.lower()
        if "reg" in lowered:
            return "register"
        if "dist" in lowered:
            return "distillation"
        if "cls" in lowered or "class" in lowered:
            return "class"
        return "class" if position == 0 else "unknown"

    def _descendants(self, tensor, stop: str) -> set[str]:
        names, queue = {tensor.name}, deque([tensor])
        while queue:
            t = queue.popleft()
            if t.name == stop:
                continue
            for node in t.outputs:
                if node.op in ("Shape", "Size"):  # shape paths carry no token data
                    continue
                for out in node.outputs:
                    if out.name not in names:
                        names.add(out.name)
                        queue.append(out)
        return names

    def _head(self, last_output: str) -> Head:
        start = self._tensor_by_name(last_output)
        nodes, queue, seen = [], deque([start]), set()
        while queue:
            t = queue.popleft()
            for node in t.outputs:
                if id(node) not in seen:
                    seen.add(id(node))
                    nodes.append(node)
                    queue.extend(node.outputs)
        nodes.sort(key=lambda n: self.order[id(n)])
        pool_nodes, token_index = [], []
        pooling = None
        for node in nodes:
            if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 1:
                idx = self._const_value(node.inputs[1])
                if idx is not None and not self._is_static(node.inputs[0]):
                    pooling = pooling or "token"
                    pool_nodes.append(node.name)
                    token_index.extend(int(i) for i in np.asarray(idx).reshape(-1))
            elif node.op == "ReduceMean":
                axes = node.attrs.get("axes")
                if axes is None and len(node.inputs) > 1:
                    axes = self._const_value(node.inputs[1])
                if axes is not None and [int(a) for a in np.asarray(axes).reshape(-1)] in ([1], [-2]):
                    pooling = "avg"
                    pool_nodes.append(node.name)
            elif node.op == "Slice" and pooling is None and len(node.inputs) >= 4:
                axes = self._const_value(node.inputs[3])
                starts = self._const_value(node.inputs[1])
                ends = self._const_value(node.inputs[2])
                if axes is not None and [int(a) for a in np.asarray(axes).reshape(-1)] == [1] and starts is not None \
                        and ends is not None and int(np.asarray(ends).reshape(-1)[0]) - int(np.asarray(starts).reshape(-1)[0]) == 1:
                    pooling = "token"
                    pool_nodes.append(node.name)
                    token_index.append(int(np.asarray(starts).reshape(-1)[0]))
        if pooling is None:
            raise NotAViTError(self._not_vit("no pooling (class-token Gather or token mean) after the last block"))
        first_pool = min(self.order[id(self._node(n))] for n in pool_nodes)
        norms = [n for n in nodes if n.op == "LayerNormalization"]
        final_norm = next((n.name for n in norms if self.order[id(n)] < first_pool), None)
        fc_norm = next((n.name for n in norms if self.order[id(n)] > first_pool), None)
        linears = [l for l in (self._linear_from_matmul(n) for n in nodes) if l is not None]
        return Head(final_norm=final_norm, pooling=pooling, pool_nodes=pool_nodes, token_index=token_index,
                    fc_norm=fc_norm, linears=linears, num_classes=linears[0].out_features if linears else 0)

    # ---------------------------------------------------------------- FLOPs
    def _graph_flops(self, patch: PatchEmbed, blocks: list[Block], head: Head) -> GraphFlops:
        block_nodes = set()
        for b in blocks:
            a = b.attn
            for lin in (a.qkv, a.q, a.k, a.v, a.proj, b.ffn.fc1, b.ffn.fc2):
                if lin is not None:
                    block_nodes.add(lin.node)
            block_nodes.update((a.qk_matmul, a.av_matmul, a.fused_op))
        fused = {b.attn.fused_op: b.flops.attn_matmul for b in blocks if b.attn.fused_op}  # both products in one
        head_nodes = {l.node for l in head.linears}
        per_part = {"patch": 0, "blocks": 0, "head": 0, "other": 0}
        for node in self.graph.nodes:
            if node.op not in ("MatMul", "Gemm", "Conv") and node.name not in fused:
                continue
            macs = fused[node.name] if node.name in fused else self._node_macs(node)
            if node.name == patch.node:
                per_part["patch"] += macs
            elif node.name in block_nodes:
                per_part["blocks"] += macs
            elif node.name in head_nodes:
                per_part["head"] += macs
            else:
                per_part["other"] += macs
        described = sum(b.flops.total for b in blocks)
        if described != per_part["blocks"]:
            raise NotAViTError(self._not_vit(
                f"internal: block FLOPs from the description ({described}) differ from the graph's MatMuls "
                f"({per_part['blocks']})"))
        return GraphFlops(patch_embed=per_part["patch"], blocks=per_part["blocks"], head=per_part["head"],
                          other=per_part["other"])

    def _node_macs(self, node: gs.Node) -> int:
        out = self._tensor_shape(node.outputs[0])
        a = self._tensor_shape(node.inputs[0])
        if node.op == "MatMul":
            return int(np.prod(out)) * int(a[-1])
        if node.op == "Gemm":
            k = a[0] if int(node.attrs.get("transA", 0)) else a[1]
            return int(np.prod(out)) * int(k)
        weight = self._tensor_shape(node.inputs[1])
        return int(np.prod(out)) * int(np.prod(weight[1:]))

    # ---------------------------------------------------------------- messages
    def _not_vit(self, missing: str) -> str:
        counts: dict[str, int] = {}
        for node in self.graph.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        interesting = ["Conv", "MatMul", "Gemm", "Softmax", "LayerNormalization", "Concat"]
        found = ", ".join(f"{counts.get(op, 0)} {op}" for op in interesting)
        return (f"{self.path}: not a Vision Transformer this tool can read: {missing}. "
                f"Found {len(self.graph.nodes)} nodes ({found}).")
