"""Multiply-accumulates at batch 1, from the observed shapes: per block (projections, the two
attention products, FFN) and for the whole graph by part (patch embedding, blocks, head, other)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .vit_graph import FFN, Attention, Block, BlockFlops, GraphFlops, Head, Linear, PatchEmbed
from ...errors import NotAViTError
from .lookup import GraphIndex, Observed


def linear_macs(g: GraphIndex, shapes: Observed, lin: Linear) -> int:
    """A projection's MACs, from the shape of what it really reads (fewer tokens after merging)."""
    shape = shapes.shape(g.node(lin.node).inputs[0])
    return int(np.prod(shape[:-1])) * int(shape[-1]) * lin.out_features


def block_flops(g: GraphIndex, shapes: Observed, attn: Attention, ffn: FFN, tokens: int) -> BlockFlops:
    projections = {l.node: l for l in (attn.qkv, attn.q, attn.k, attn.v, attn.proj) if l is not None}
    n = tokens
    return BlockFlops(
        attn_proj=sum(linear_macs(g, shapes, l) for l in projections.values()),
        attn_matmul=attn.heads * n * n * attn.head_dim_qk + attn.heads * n * n * attn.head_dim_v,
        ffn=linear_macs(g, shapes, ffn.fc1) + linear_macs(g, shapes, ffn.fc2),  # tokens as the FFN sees them
    )


def graph_flops(g: GraphIndex, shapes: Observed, patch: PatchEmbed, blocks: list[Block], head: Head) -> GraphFlops:
    """Every MatMul, Gemm, Conv and ONNX Attention node counted once, by the part it belongs to;
    the blocks' share must equal what their descriptions add up to."""
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
    for node in g.graph.nodes:
        if node.op not in ("MatMul", "Gemm", "Conv") and node.name not in fused:
            continue
        macs = fused[node.name] if node.name in fused else node_macs(shapes, node)
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
        raise NotAViTError(g.not_vit(
            f"internal: block FLOPs from the description ({described}) differ from the graph's MatMuls "
            f"({per_part['blocks']})"))
    return GraphFlops(patch_embed=per_part["patch"], blocks=per_part["blocks"], head=per_part["head"],
                      other=per_part["other"])


def node_macs(shapes: Observed, node: gs.Node) -> int:
    out = shapes.shape(node.outputs[0])
    a = shapes.shape(node.inputs[0])
    if node.op == "MatMul":
        return int(np.prod(out)) * int(a[-1])
    if node.op == "Gemm":
        k = a[0] if int(node.attrs.get("transA", 0)) else a[1]
        return int(np.prod(out)) * int(k)
    weight = shapes.shape(node.inputs[1])
    return int(np.prod(out)) * int(np.prod(weight[1:]))
