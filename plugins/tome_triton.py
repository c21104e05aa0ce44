"""ToMe's bipartite matching and size-weighted merge as two fused Triton kernels.

The native ONNX form (passes/tome.py) spends about 35 small nodes per block on matching and
merging; here they are two kernels and one top-k:

- `_match_kernel`: one program per (image, A token): the similarity (cos − 1 on metrics centred
  in torch, as in the graph) with every B token, the best score and the best partner (the lowest
  index within TIE_TOLERANCE; the class token gets PROTECT added, as in the graph);
- the edge order: the reference's `split_edges` (torch): the r best become sources, ties at the
  r-th score in index order, the others stay in their original order;
- `_merge_kernel`: one program per (image, output token): unmerged A tokens are copied, B tokens
  add their sources (size-weighted); the output is divided by the summed size.

`tome_merge` has the signature of the PyTorch reference's merge (models/tome_reference.py), so the
same ToMeViT runs with either; tests compare a ViT merging with these kernels against the ONNX
graph in ONNX Runtime, on CPU under Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..models.tome_reference import split_edges
from ..passes.tome import PROTECT, TIE_TOLERANCE


@triton.jit
def _row_scores(base, half_sq_base, a_vec, offs_d, mask_d, start, n_b, stride_token, BLOCK_B: tl.constexpr):
    """c_a·c_b − ½|c_b|² (cos − 1 but the row term) for the B tokens start .. start + BLOCK_B, and their mask."""
    offs_b = start + tl.arange(0, BLOCK_B)
    mask_b = offs_b < n_b
    rows = tl.load(base + (2 * offs_b + 1)[:, None] * stride_token + offs_d[None, :],
                   mask=mask_b[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    b_half_sq = tl.load(half_sq_base + 2 * offs_b + 1, mask=mask_b, other=0.0)
    return tl.sum(rows * a_vec[None, :], axis=1) - b_half_sq, offs_b, mask_b


@triton.jit
def _match_kernel(centred_ptr, half_sq_ptr, node_max_ptr, node_idx_ptr, n, n_b, dim, stride_batch, stride_token,
                  protect, tolerance, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    image = tl.program_id(0)
    a = tl.program_id(1)
    n_a = tl.num_programs(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    base = centred_ptr + image * stride_batch
    half_sq_base = half_sq_ptr + image * n
    a_vec = tl.load(base + (2 * a) * stride_token + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    for start in range(0, n_b, BLOCK_B):      # the row's best score
        sims, offs_b, mask_b = _row_scores(base, half_sq_base, a_vec, offs_d, mask_d, start, n_b, stride_token,
                                           BLOCK_B)
        best = tl.maximum(best, tl.max(tl.where(mask_b, sims, float("-inf")), axis=0))
    floor = best - tolerance
    best_idx = tl.full((), n_b, tl.int64)
    for start in range(0, n_b, BLOCK_B):      # the partner: the lowest B index within the tolerance
        sims, offs_b, mask_b = _row_scores(base, half_sq_base, a_vec, offs_d, mask_d, start, n_b, stride_token,
                                           BLOCK_B)
        tied = tl.where(mask_b & (sims >= floor), offs_b.to(tl.int64), n_b)
        best_idx = tl.minimum(best_idx, tl.min(tied, axis=0))
    best = best - tl.load(half_sq_base + 2 * a)
    best = tl.where(a == 0, best + protect, best)
    tl.store(node_max_ptr + image * n_a + a, best)
    tl.store(node_idx_ptr + image * n_a + a, best_idx)


@triton.jit
def _merge_kernel(x_ptr, size_ptr, order_ptr, dst_ptr, out_ptr, out_size_ptr, n, n_a, r, channels,
                  BLOCK_C: tl.constexpr):
    image = tl.program_id(0)
    row = tl.program_id(1)            # output token: unmerged A tokens first, then the B tokens
    n_out = tl.num_programs(1)
    n_unm = n_a - r
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    x_base = x_ptr + image * n * channels
    size_base = size_ptr + image * n
    if row < n_unm:
        source = 2 * tl.load(order_ptr + image * n_a + row)
        size = tl.load(size_base + source)
        total = tl.load(x_base + source * channels + offs_c, mask=mask_c, other=0.0) * size
    else:
        j = row - n_unm
        size = tl.load(size_base + 2 * j + 1)
        total = tl.load(x_base + (2 * j + 1) * channels + offs_c, mask=mask_c, other=0.0) * size
        for s in range(0, r):
            if tl.load(dst_ptr + image * r + s) == j:
                source = 2 * tl.load(order_ptr + image * n_a + n_unm + s)
                src_size = tl.load(size_base + source)
                total += tl.load(x_base + source * channels + offs_c, mask=mask_c, other=0.0) * src_size
                size += src_size
    tl.store(out_ptr + (image * n_out + row) * channels + offs_c, total / size, mask=mask_c)
    tl.store(out_size_ptr + image * n_out + row, size)


def tome_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, protect_cls: bool):
    """Merge r of x's n tokens ([B, n, C]; sizes [B, n, 1]; metric [B, n, d]): (x, size) with n - r tokens."""
    batch, n, channels = x.shape
    n_a, n_b = (n + 1) // 2, n // 2
    x, size = x.contiguous().float(), size.reshape(batch, n).contiguous().float()
    unit = metric.float() / metric.float().pow(2).sum(-1, keepdim=True).sqrt()
    centred = (unit - unit.mean(1, keepdim=True)).contiguous()
    half_sq = (0.5 * centred.pow(2).sum(-1)).contiguous()
    node_max = torch.empty(batch, n_a, dtype=torch.float32, device=x.device)
    node_idx = torch.empty(batch, n_a, dtype=torch.int64, device=x.device)
    dim = metric.shape[-1]
    _match_kernel[(batch, n_a)](centred, half_sq, node_max, node_idx, n, n_b, dim, centred.stride(0),
                                centred.stride(1), PROTECT if protect_cls else 0.0, TIE_TOLERANCE,
                                BLOCK_B=min(64, triton.next_power_of_2(n_b)), BLOCK_D=triton.next_power_of_2(dim))
    src_idx, dst_idx, unm_idx = split_edges(node_max, node_idx, r)
    dst_idx = dst_idx.contiguous()
    order = torch.cat([unm_idx, src_idx], dim=1).contiguous()
    out = torch.empty(batch, n - r, channels, dtype=torch.float32, device=x.device)
    out_size = torch.empty(batch, n - r, dtype=torch.float32, device=x.device)
    _merge_kernel[(batch, n - r)](x, size, order, dst_idx, out, out_size, n, n_a, r, channels,
                                  BLOCK_C=triton.next_power_of_2(channels))
    return out, out_size[..., None]
