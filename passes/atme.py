"""CAIT's asymmetric token merging (ATME) of neighbouring tokens, in native ONNX.

Before each stage block, the patch tokens, laid out on their grid, are merged in neighbouring
pairs along one axis (columns at the first stage, rows at the next, alternating), so the result is
again a regular grid in raster order and the spatial layout is kept. The merge is asymmetric: the
pair's tokens are weighted by how much attention they received in the block just before (class
attention averaged over heads; without a class token, the attention received averaged over heads
and queries), so the token the model looks at dominates the merged one. Extra tokens (class,
distillation, registers) are never merged and keep their positions. Later blocks add log(size)
to the attention scores (proportional attention; sizes are structural, so this is a constant).

Every shape is static but the batch, each image is merged on its own, and the graph is Slice,
Reshape, ReduceSum, Mul and Concat only, so every runtime builds it. With `restore_grid`, the
final tokens are copied back onto the full token grid (a constant Gather) as an extra output,
for dense heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..converter.graph.surgery import GraphBuilder, export_like, open_for_surgery
from ..converter.graph.vit_graph import ViTGraph
from ..errors import Vit2TrtError
from .base import PassResult
from .structured_prune import BlockKeep, rebuild_attention

EPS = 1e-9   # keeps a pair's weights defined when both attentions underflow to zero
RESTORED_OUTPUT = "restored_tokens"


def default_stages(depth: int) -> list[int]:
    """Merge before the blocks at one and two thirds of the depth (4 and 8 of 12)."""
    return sorted({s for s in (depth // 3, 2 * depth // 3) if 1 <= s < depth})


@dataclass
class ATMEPlan:
    stages: list[int]               # blocks before which tokens merge
    axes: list[str]                 # "width" or "height", per stage
    grids: list[tuple[int, int]]    # patch grid entering each stage, then the final one
    tokens: list[int]               # tokens seen by each block
    sizes: np.ndarray               # patches each final token stands for (extra tokens: 1)
    owner: np.ndarray               # for every original token, the final token that holds it
    extra: int
    use_class_token: bool


def plan_atme(vit: ViTGraph, stages: list[int]) -> ATMEPlan:
    if any(b.attn.mask_inputs for b in vit.blocks):
        raise Vit2TrtError("ATME cannot merge tokens under a fixed-size attention mask (this graph adds one to its "
                           "attention scores, as Hugging Face dynamo exports do); export with --exporter torchscript.")
    stages = list(stages)
    if not stages or any(not 1 <= s < vit.depth for s in stages) or sorted(set(stages)) != stages:
        raise Vit2TrtError(f"CAIT stages must be increasing block indices in [1, {vit.depth - 1}] "
                           f"(tokens merge before these blocks), got {stages}.")
    extra = vit.num_extra_tokens
    grid = tuple(vit.patch_embed.grid)
    if grid[0] * grid[1] != vit.num_patches:
        raise Vit2TrtError(f"the patch grid {grid} does not match the {vit.num_patches} patch tokens.")
    # Structural bookkeeping: which original patch each grid cell holds, and how many.
    cells = np.arange(vit.num_patches).reshape(grid)
    members = [[[int(c)] for c in row] for row in cells]
    axes, grids = [], [grid]
    for i, stage in enumerate(stages):
        axis = "width" if i % 2 == 0 else "height"
        h, w = len(members), len(members[0])
        if (w if axis == "width" else h) < 2:
            raise Vit2TrtError(f"stage {i + 1} (before block {stage}) would merge along a grid {axis} of 1 "
                               f"(grid {h}x{w}); use fewer stages.")
        if axis == "width":
            members = [[row[j] + row[j + 1] if j + 1 < w else row[j] for j in range(0, w, 2)] for row in members]
        else:
            members = [[members[r][j] + members[r + 1][j] if r + 1 < h else members[r][j] for j in range(w)]
                       for r in range(0, h, 2)]
        axes.append(axis)
        grids.append((len(members), len(members[0])))
    flat = [cell for row in members for cell in row]
    owner = np.arange(extra + vit.num_patches, dtype=np.int64)
    for t, cell in enumerate(flat):
        owner[extra + np.array(cell)] = extra + t
    sizes = np.array([1] * extra + [len(c) for c in flat], dtype=np.int64)
    tokens, n = [], extra + vit.num_patches
    boundaries = dict(zip(stages, [extra + g[0] * g[1] for g in grids[1:]]))
    for block in range(vit.depth):
        n = boundaries.get(block, n)
        tokens.append(n)
    use_class = any(t.kind == "class" for t in vit.extra_tokens)
    return ATMEPlan(stages, axes, grids, tokens, sizes, owner, extra, use_class)


def stage_sizes(plan: ATMEPlan, upto: int) -> np.ndarray:
    """Token sizes after the first `upto` stages (structural: the same for every image)."""
    extra = plan.extra
    h0, w0 = plan.grids[0]
    sizes = np.ones((h0, w0), dtype=np.int64)
    for axis in plan.axes[:upto]:
        h, w = sizes.shape
        if axis == "width":
            sizes = np.stack([sizes[:, j:j + 2].sum(1) for j in range(0, w, 2)], axis=1)
        else:
            sizes = np.stack([sizes[r:r + 2].sum(0) for r in range(0, h, 2)], axis=0)
    return np.concatenate([np.ones(extra, dtype=np.int64), sizes.reshape(-1)])


def apply_atme(model: onnx.ModelProto, vit: ViTGraph, stages: list[int], restore_grid: bool = False) -> PassResult:
    plan = plan_atme(vit, stages)
    surgery = open_for_surgery(model)
    graph, tensors, nodes, opset, dtype = (surgery.graph, surgery.tensors, surgery.nodes,
                                            surgery.opset, surgery.dtype)
    merge_after = {s - 1: i for i, s in enumerate(plan.stages)}   # merged with the scores of block s-1
    done = 0
    restored_name = None
    for block in vit.blocks:
        if block.index < plan.stages[0] - 1:
            continue
        b = GraphBuilder(graph, f"vit2trt/blocks.{block.index}/atme", dtype, opset)
        bias = None
        if done:   # proportional attention: log(size) of every key, a constant once merged
            log_size = np.log(stage_sizes(plan, done).astype(np.float64)).reshape(1, 1, 1, -1)
            bias = b.f("size_bias", log_size)
        _, handles = rebuild_attention(graph, tensors, nodes, block, BlockKeep(block.index), dtype, score_bias=bias,
                                       need_probs=block.index in merge_after)
        if block.index not in merge_after:
            continue
        i = merge_after[block.index]
        importance = _importance(b, handles["probs"], plan.use_class_token)
        out = nodes[block.residual_ffn].outputs[0]
        merged = _merge_pairs(b, out, importance, plan.extra, plan.grids[i], plan.axes[i], vit.embed_dim)
        for consumer in list(out.outputs):
            if not consumer.name.startswith(b.prefix):
                consumer.inputs = [merged if t is out else t for t in consumer.inputs]
        done += 1
    if restore_grid:
        last_block = vit.blocks[-1]
        source = (nodes[vit.head.final_norm].outputs[0] if vit.head.final_norm
                  else nodes[last_block.residual_ffn].outputs[0])
        b = GraphBuilder(graph, "vit2trt/atme_restore", dtype, opset)
        restored = b.op("Gather", [source, b.i64("owner", plan.owner)], "restored", axis=1)
        restored.name = RESTORED_OUTPUT
        restored.dtype = dtype
        restored.shape = [source.shape[0] if source.shape else "batch", len(plan.owner), vit.embed_dim]
        graph.outputs.append(restored)
        restored_name = RESTORED_OUTPUT
    report = {"pass": "atme", "stages": plan.stages, "axes": plan.axes, "grids": [list(g) for g in plan.grids],
              "tokens": plan.tokens, "use_class_token": plan.use_class_token, "restored_output": restored_name}
    return PassResult(export_like(graph, model), report)


def _importance(b: GraphBuilder, probs, use_class_token: bool):
    """[B, N]: the attention each token received, averaged over heads (class query, or all queries)."""
    if use_class_token:
        cls_row = b.op("Gather", [probs, b.i64("cls_query", 0)], "cls_attention", axis=2)     # [B, H, N]
        return b.reduce_mean(cls_row, [1], keepdims=False, name="importance")
    return b.reduce_mean(probs, [1, 2], keepdims=False, name="importance")


def _merge_pairs(b: GraphBuilder, x, importance, extra: int, grid: tuple[int, int], axis: str, channels: int):
    """Merge neighbouring patch tokens in pairs along one grid axis, weighted by importance."""
    h, w = grid
    patches = x
    weights = importance
    if extra:
        prefix = b.op("Slice", [x, b.i64("extra_start", [0]), b.i64("extra_end", [extra]), b.i64("tok_axis", [1])],
                      "extra_tokens")
        patches = b.op("Slice", [x, b.i64("patch_start", [extra]), b.i64("patch_end", [extra + h * w]),
                                 b.i64("tok_axis2", [1])], "patch_tokens")
        weights = b.op("Slice", [importance, b.i64("imp_start", [extra]), b.i64("imp_end", [extra + h * w]),
                                 b.i64("imp_axis", [1])], "patch_importance")
    grid_axis = 2 if axis == "width" else 1
    length = w if axis == "width" else h
    paired = length // 2 * 2
    cells = b.op("Reshape", [patches, b.i64("grid_shape", [-1, h, w, channels])], "grid")
    weights = b.op("Reshape", [weights, b.i64("weight_grid_shape", [-1, h, w])], "weight_grid")
    leftover = None
    if paired != length:   # an odd axis: the last column (row) stays as it is
        leftover = b.op("Slice", [cells, b.i64("left_start", [paired]), b.i64("left_end", [length]),
                                  b.i64("left_axis", [grid_axis])], "leftover")
        cells = b.op("Slice", [cells, b.i64("pair_start", [0]), b.i64("pair_end", [paired]),
                               b.i64("pair_axis", [grid_axis])], "paired_cells")
        weights = b.op("Slice", [weights, b.i64("wpair_start", [0]), b.i64("wpair_end", [paired]),
                                 b.i64("wpair_axis", [grid_axis])], "paired_weights")
    if axis == "width":
        pair_shape, pair_axis = [-1, h, paired // 2, 2], 3
    else:
        pair_shape, pair_axis = [-1, paired // 2, 2, w], 2
    weights = b.op("Reshape", [weights, b.i64("weight_pairs_shape", pair_shape)], "weight_pairs")
    weights = b.op("Add", [weights, b.f("eps", EPS)], "weight_eps")
    weights = b.op("Div", [weights, b.reduce("ReduceSum", weights, [pair_axis], True, "weight_total")], "pair_weights")
    cells = b.op("Reshape", [cells, b.i64("cell_pairs_shape", pair_shape + [channels])], "cell_pairs")
    weighted = b.op("Mul", [cells, b.op("Unsqueeze", [weights, b.i64("chan_axis", [-1])], "pair_weights_col")],
                    "weighted_cells")
    merged = b.reduce("ReduceSum", weighted, [pair_axis], False, "merged_cells")   # [B, h', w', C]
    if leftover is not None:
        merged = b.op("Concat", [merged, leftover], "merged_grid", axis=grid_axis)
    merged = b.op("Reshape", [merged, b.i64("tokens_shape", [0, -1, channels])], "merged_tokens")
    if extra:
        merged = b.op("Concat", [prefix, merged], "tokens", axis=1)
    return merged
