"""ToaSt Token Channel Selection (TCS) as a dense, deterministic ONNX subgraph.

Per block, a fixed number K of FC1 input channels and of FC2 input channels (hidden units) is
kept, chosen on every forward pass by

    I_c = λ_cls·|x_cls,c| + λ_patch · mean_{i∈S} (A_cls,i · |x_i,c|)     (no class token: mean_{i∈S} |x_i,c|)

where A_cls is the block's class-attention row averaged over heads, S a token sample, λ_cls = 2 and
λ_patch = the number of patch tokens (the official code's 2 : P weighting; dividing both by 1 + P
does not change the top-K). FC1's input channels are those of norm2's output, which FC1 reads. The graph
computes the scores, takes TopK (constant K), gathers the kept activations and weight rows, and
runs the smaller MatMuls: real compute cut, no masks. Departures from the official code (see
docs/methods/toast.md): S is a fixed stride over the patch tokens, not random; selection is per
image unless `shared=True`, which reproduces the official batch-shared choice.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..converter.graph.surgery import GraphBuilder, const_value, export_like, open_for_surgery
from ..converter.graph.vit_graph import ViTGraph
from ..errors import Vit2TrtError
from .base import PassResult
from .structured_prune import BlockKeep, rebuild_attention

LAMBDA_CLS = 2.0
SAMPLE_FRACTION = 0.02


@dataclass
class TCSBlock:
    index: int
    fc1_keep: Optional[int] = None   # FC1 input channels kept (None: no selection)
    fc2_keep: Optional[int] = None   # hidden units kept


@dataclass
class TCSSettings:
    sample: list[int]                # token positions of S
    use_class_token: bool
    shared: bool = False
    lambda_cls: float = LAMBDA_CLS
    lambda_patch: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def kept_channels(channels: int, drop_ratio: float) -> int:
    """The official count: floor of the kept fraction, at least one (1536 at 0.9 -> 153)."""
    return min(channels, max(1, int(channels * (1.0 - drop_ratio) + 1e-9)))


def token_sample(num_extra: int, num_patches: int, fraction: float = SAMPLE_FRACTION) -> list[int]:
    """A fixed stride over the patch tokens; |S| = floor(fraction · patches), at least 1, as officially."""
    count = max(1, int(fraction * num_patches))
    stride = num_patches / count
    return [num_extra + int((k + 0.5) * stride) for k in range(count)]


def tcs_blocks(vit: ViTGraph, fc1_ratios: list[float], fc2_ratios: list[float]) -> list[TCSBlock]:
    if len(fc1_ratios) != vit.depth or len(fc2_ratios) != vit.depth:
        raise Vit2TrtError(f"TCS ratios need one value per block ({vit.depth}); got {len(fc1_ratios)} fc1 "
                           f"and {len(fc2_ratios)} fc2 values.")
    blocks = []
    for block, r1, r2 in zip(vit.blocks, fc1_ratios, fc2_ratios):
        for name, r in (("fc1", r1), ("fc2", r2)):
            if not 0.0 <= r < 1.0:
                raise Vit2TrtError(f"block {block.index}: TCS {name} ratio must be in [0, 1), got {r}.")
        fc1 = kept_channels(block.ffn.fc1.in_features, r1) if r1 > 0 else None
        fc2 = kept_channels(block.ffn.hidden, r2) if r2 > 0 else None
        if fc1 or fc2:
            blocks.append(TCSBlock(block.index, fc1, fc2))
    return blocks


def apply_tcs(model: onnx.ModelProto, vit: ViTGraph, blocks: list[TCSBlock], shared: bool = False) -> PassResult:
    surgery = open_for_surgery(model)
    graph, nodes, opset, dtype = surgery.graph, surgery.nodes, surgery.opset, surgery.dtype
    use_cls = any(t.kind == "class" for t in vit.extra_tokens)
    # The official score weighs the patch term by the patch count (class attention is ~1/N per token).
    settings = TCSSettings(sample=token_sample(vit.num_extra_tokens, vit.num_patches), use_class_token=use_cls,
                           shared=shared, lambda_patch=float(vit.num_patches))
    done = []
    for spec in blocks:
        block = vit.blocks[spec.index]
        builder = _Builder(graph, f"vit2trt/blocks.{block.index}/tcs", dtype, opset)
        if block.attn.fused_op:   # the scores need the probabilities, which a fused Attention node hides
            _, handles = rebuild_attention(graph, surgery.tensors, nodes, block, BlockKeep(block.index), dtype,
                                           need_probs=True)
            probs = handles["probs"]
        else:
            probs = nodes[block.attn.softmax].outputs[0]
        cls_attention = None
        if use_cls:  # class row of the attention, averaged over heads: [B, N]
            row = builder.op("Gather", [probs, builder.i64("cls_index", 0)], "cls_row", axis=2)
            cls_attention = builder.reduce_mean(row, [1], keepdims=False, name="cls_row_mean")
        for which, keep in (("fc1", spec.fc1_keep), ("fc2", spec.fc2_keep)):
            if keep is None:
                continue
            lin = getattr(block.ffn, which)
            matmul = nodes[lin.node]
            if matmul.op != "MatMul" or const_value(matmul.inputs[1]) is None:
                raise Vit2TrtError(f"block {block.index}: {which} '{lin.node}' is not a MatMul with constant weight.")
            weight = np.asarray(const_value(matmul.inputs[1]))
            x = matmul.inputs[0]
            score = builder.scores(x, cls_attention, settings, which)
            selected_x, selected_w = builder.select(x, weight, score, keep, shared, which)
            out = matmul.outputs[0]
            matmul.outputs = []
            graph.nodes.append(gs.Node("MatMul", name=f"{builder.prefix}/{which}/MatMul",
                                       inputs=[selected_x, selected_w], outputs=[out]))
        done.append(asdict(spec))
    return PassResult(export_like(graph, model), {"pass": "tcs", "blocks": done, "settings": settings.to_dict()})


class _Builder(GraphBuilder):
    """Appends named nodes for one block's TCS subgraph."""

    def scores(self, x, cls_attention, settings: TCSSettings, which: str):
        """I_c for every channel of x ([B, N, C]) -> [B, C]."""
        sample = self.i64(f"{which}/sample_index", settings.sample)
        sampled = self.op("Abs", [self.op("Gather", [x, sample], f"{which}/sample", axis=1)], f"{which}/sample_abs")
        if cls_attention is None:
            return self.reduce_mean(sampled, [1], keepdims=False, name=f"{which}/score")
        weights = self.op("Gather", [cls_attention, sample], f"{which}/sample_attention", axis=1)   # [B, |S|]
        weights = self.op("Unsqueeze", [weights, self.i64(f"{which}/last_axis", [-1])], f"{which}/attention_col")
        patch = self.reduce_mean(self.op("Mul", [sampled, weights], f"{which}/weighted"), [1], keepdims=False,
                                 name=f"{which}/patch_term")
        cls = self.op("Abs", [self.op("Gather", [x, self.i64(f"{which}/cls_token", 0)], f"{which}/cls", axis=1)],
                      f"{which}/cls_abs")
        cls = self.op("Mul", [cls, self.f(f"{which}/lambda_cls", settings.lambda_cls)], f"{which}/cls_term")
        patch = self.op("Mul", [patch, self.f(f"{which}/lambda_patch", settings.lambda_patch)], f"{which}/patch_scaled")
        return self.op("Add", [cls, patch], f"{which}/score")

    def select(self, x, weight: np.ndarray, score, keep: int, shared: bool, which: str):
        """Gather the kept channels of x and the matching weight rows."""
        w = gs.Constant(f"{self.prefix}/{which}/weight", values=np.ascontiguousarray(weight.astype(self.dtype)))
        if shared:  # one channel set for the whole batch, as the official code does
            score = self.reduce_mean(score, [0], keepdims=False, name=f"{which}/batch_score")
        _, index = self.op("TopK", [score, self.i64(f"{which}/k", [keep])], f"{which}/TopK", n_out=2,
                           axis=-1, largest=1, sorted=1)
        index.dtype = np.int64
        if shared:
            return (self.op("Gather", [x, index], f"{which}/select_x", axis=2),
                    self.op("Gather", [w, index], f"{which}/select_w", axis=0))
        lead = self.op("Shape", [x], f"{which}/lead_shape", out_dtype=np.int64, start=0, end=2)
        target = self.op("Concat", [lead, self.i64(f"{which}/k_dim", [keep])], f"{which}/index_shape",
                         out_dtype=np.int64, axis=0)
        index = self.op("Unsqueeze", [index, self.i64(f"{which}/token_axis", [1])], f"{which}/index_row",
                        out_dtype=np.int64)
        index = self.op("Expand", [index, target], f"{which}/index", out_dtype=np.int64)
        selected_x = self.op("GatherElements", [x, index], f"{which}/select_x", axis=2)        # [B, N, K]
        index2d = self.op("Squeeze", [self.op("Gather", [index, self.i64(f"{which}/first_token", [0])],
                                              f"{which}/index_first", out_dtype=np.int64, axis=1),
                                      self.i64(f"{which}/squeeze_axis", [1])], f"{which}/index_2d", out_dtype=np.int64)
        selected_w = self.op("Gather", [w, index2d], f"{which}/select_w", axis=0)              # [B, K, out]
        return selected_x, selected_w
