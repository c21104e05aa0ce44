"""Closed-form compensation of structured pruning, fitted on calibration activations.

When inputs R of a linear map y = x W + b are removed, what they carried is regressed on what is
kept (ridge, centred): x_R ≈ μ_R + (x_S − μ_S) B with B = (Σ_SS + λI)⁻¹ Σ_SR, and the fit is folded
into the kept weights, W'_S = W_S + B W_R and b' = b + (μ_R − μ_S B) W_R, so the pruned graph keeps
exactly the shape it has without compensation. Used for FC2's inputs (FFN hidden channels) and,
for the output projection's inputs (V dims of every head, in one fit). For QK dims the removed keys are regressed
on the kept keys (centred within each image: softmax ignores any term that is the same for every
key) and the fit moves into the kept query weights: q'_S = q_S + B q_R (docs/methods/compensation.md).

The same quantities rank what to remove: an optimal-brain-surgeon style greedy removal, whose
error after each step is tr(G_RR · Σ_{R|S}) with G = W Wᵀ (what the outputs weigh each input by).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from ..converter.graph.surgery import const_value
from ..converter.graph.vit_graph import Attention, Linear
from ..errors import Vit2TrtError

RIDGE = 1e-3   # λ = RIDGE · mean of the kept inputs' variances


def ridge(cov_kept: np.ndarray) -> float:
    return RIDGE * max(float(np.trace(cov_kept)) / max(len(cov_kept), 1), 1e-12)


def regression(cov: np.ndarray, keep: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """B (|S| × |R|) of the ridge fit x_R ≈ x_S B on centred inputs with covariance `cov`."""
    c_ss = cov[np.ix_(keep, keep)]
    lam = ridge(c_ss)
    return np.linalg.solve(c_ss + lam * np.eye(len(keep)), cov[np.ix_(keep, removed)])


def compensate_inputs(weight: np.ndarray, bias: Optional[np.ndarray], mean: np.ndarray, cov: np.ndarray,
                      keep: list[int]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Fold the removed inputs of y = x W + b into the kept ones. `weight` is (in, out); rows not in
    `keep` are left as they were (they are about to be removed). Without a bias the fit has no
    intercept: `mean` and `cov` must then be uncentred (mean 0, second moment)."""
    keep = np.asarray(sorted(keep), dtype=np.int64)
    removed = np.setdiff1d(np.arange(len(weight)), keep)
    if not len(removed):
        return weight, bias
    b = regression(cov, keep, removed)
    w64 = weight.astype(np.float64)
    new_w = w64.copy()
    new_w[keep] += b @ w64[removed]
    new_b = None
    if bias is not None:
        new_b = bias.astype(np.float64) + (mean[removed] - mean[keep] @ b) @ w64[removed]
    return new_w.astype(weight.dtype), None if new_b is None else new_b.astype(bias.dtype)


def compensate_queries(wq: np.ndarray, bq: Optional[np.ndarray], key_cov: np.ndarray,
                       keep: list[int]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """One head: query weights (D, dim) and bias such that q'_S · k_S ≈ q · k over the keys."""
    keep = np.asarray(sorted(keep), dtype=np.int64)
    removed = np.setdiff1d(np.arange(wq.shape[1]), keep)
    if not len(removed):
        return wq, bq
    b = regression(key_cov, keep, removed)          # k_R ≈ k_S B  →  q·k ≈ (q_S + B q_R)·k_S
    new_w = wq.astype(np.float64).copy()
    new_w[:, keep] += wq[:, removed].astype(np.float64) @ b.T
    new_b = None
    if bq is not None:
        new_b = bq.astype(np.float64).copy()
        new_b[keep] += bq[removed].astype(np.float64) @ b.T
    return new_w.astype(wq.dtype), None if new_b is None else new_b.astype(bq.dtype)


def removal_error(cov: np.ndarray, gram: np.ndarray, keep: list[int], compensate: bool = True,
                  mean: Optional[np.ndarray] = None) -> float:
    """E‖Δy‖² when the inputs outside `keep` are removed: tr(G_RR Σ_{R|S}) with the fit (whose bias
    takes the means), tr(G_RR (Σ_RR + μ_R μ_Rᵀ)) without (Σ the covariance of the inputs; G = W Wᵀ)."""
    keep = np.asarray(sorted(keep), dtype=np.int64)
    removed = np.setdiff1d(np.arange(len(cov)), keep)
    if not len(removed):
        return 0.0
    residual = cov[np.ix_(removed, removed)]
    if not compensate and mean is not None:
        residual = residual + np.outer(mean[removed], mean[removed])
    if compensate and len(keep):
        b = regression(cov, keep, removed)
        # Σ_RR − Bᵀ Σ_SR − Σ_RS B + Bᵀ Σ_SS B: the covariance of what the ridge fit leaves
        c_sr = cov[np.ix_(keep, removed)]
        residual = residual - b.T @ c_sr - c_sr.T @ b + b.T @ cov[np.ix_(keep, keep)] @ b
    return float(np.sum(gram[np.ix_(removed, removed)] * residual))


@dataclass
class Removal:
    """Greedy removal order of one layer's inputs (or one head's dims), with the error after each step."""
    order: list[int]          # inputs in the order they go
    errors: np.ndarray        # errors[i]: the error once order[:i] are gone (errors[0] = 0)

    def keep(self, count: int) -> list[int]:
        gone = set(self.order[:len(self.order) - count])
        return [j for j in range(len(self.order)) if j not in gone]

    def error(self, count: int) -> float:
        return float(self.errors[len(self.order) - count])


class _LazyLayer:
    """One layer's P = (Σ + λI)⁻¹ and G of the greedy removal, with the rank-one updates of recent
    steps kept as factors instead of applied: a step then reads one column (O(n·k)) instead of
    rewriting two n×n matrices, and `fold` applies the batch as matrix products and drops removed rows."""

    def __init__(self, p: np.ndarray, g: np.ndarray, capacity: int):
        self.p, self.g = p, g
        self.diag_p, self.diag_g = np.diag(p).copy(), np.diag(g).copy()
        n = len(p)
        # P = p − Pc Acᵀ;  G = g − Ac Gcᵀ − Gc Acᵀ + Ac diag(gjj) Acᵀ  (columns 0..k-1 hold the steps so far)
        self.pc, self.ac, self.gc = (np.empty((n, capacity)) for _ in range(3))
        self.gjj = np.empty(capacity)
        self.k = 0

    def remove(self, j: int) -> float:
        k, ac = self.k, self.ac[:, :self.k]
        pj = self.p[:, j] - self.pc[:, :k] @ ac[j]
        gj = self.g[:, j] - ac @ (self.gc[j, :k] - self.gjj[:k] * ac[j]) - self.gc[:, :k] @ ac[j]
        pjj, gjj = pj[j], gj[j]
        a = pj / pjj
        self.pc[:, k], self.ac[:, k], self.gc[:, k], self.gjj[k] = pj, a, gj, gjj
        self.diag_p -= pj * a
        self.diag_g -= a * (2 * gj - gjj * a)
        self.k += 1
        return gjj / pjj

    def fold(self, kept: np.ndarray) -> None:
        k = self.k
        pc, ac, gc = self.pc[kept, :k], self.ac[kept, :k], self.gc[kept, :k]
        sub = np.ix_(kept, kept)
        self.p = self.p[sub] - pc @ ac.T
        self.g = self.g[sub] - ac @ (gc - ac * self.gjj[:k]).T - gc @ ac.T
        self.diag_p, self.diag_g = np.diag(self.p).copy(), np.diag(self.g).copy()
        n, capacity = len(kept), self.pc.shape[1]
        self.pc, self.ac, self.gc = (np.empty((n, capacity)) for _ in range(3))
        self.k = 0


FOLD_EVERY = 64   # steps between folds: a column read grows with it, a fold's share of the work shrinks


def greedy_removal(layers: list[tuple[np.ndarray, np.ndarray]], min_keep: int = 1, chunk: int = 1) -> Removal:
    """Remove inputs one (or `chunk`) at a time, always the one whose removal, with the remaining
    inputs refitted, adds the least error: ΔE_j = G_jj / P_jj with P = (Σ + λI)⁻¹ over what is kept,
    then the compensation of j moves onto the others (rank-one updates of P and G, which also zero
    j's row and column). `layers` holds (Σ, G) pairs that share their input indices and lose the same
    ones (CAIT's consistent heads); their errors add."""
    n = len(layers[0][0])
    capacity = FOLD_EVERY + chunk
    state = [_LazyLayer(np.linalg.inv(c + ridge(c) * np.eye(n)), g.astype(np.float64), capacity)
             for c, g in layers]
    index = np.arange(n)               # the input each row of the matrices holds
    dead = np.zeros(n, dtype=bool)     # removed since the last fold
    order, errors, total, left = [], [0.0], 0.0, n
    while left > min_keep:
        cost = np.full(len(index), np.inf)
        cost[~dead] = sum(s.diag_g[~dead] / s.diag_p[~dead] for s in state)
        for j in np.argsort(cost, kind="stable")[:int(min(chunk, left - min_keep))].tolist():
            for s in state:
                total += s.remove(j)
            dead[j] = True
            left -= 1
            order.append(int(index[j]))
            errors.append(total)
        if state[0].k >= FOLD_EVERY and left > min_keep:
            kept = np.flatnonzero(~dead)
            for s in state:
                s.fold(kept)
            index, dead = index[kept], np.zeros(len(kept), dtype=bool)
    rest = index[~dead].tolist()
    return Removal(order + rest, np.array(errors + [np.inf] * len(rest)))


# --- writing fitted weights back into the graph -------------------------------------------------

def _replace_input(node, name: str, value: np.ndarray, dtype) -> None:
    """Give `node` a constant of its own in place of its input `name`: the exporter may share one
    initializer between layers whose values happen to be equal, so it is never written in place."""
    for slot, tensor in enumerate(node.inputs):
        if tensor.name == name:
            node.inputs[slot] = gs.Constant(f"{node.name}/{name}_compensated",
                                            values=np.ascontiguousarray(value.astype(dtype)))
            return
    raise Vit2TrtError(f"node '{node.name}' does not read '{name}'; cannot write the compensated weights.")


def write_linear(nodes: dict, tensors: dict, lin: Linear, weight: np.ndarray, bias: Optional[np.ndarray],
                 columns: Optional[slice] = None) -> None:
    """Write (in, out) `weight` and `bias` into `lin`, or into its output columns `columns`."""
    stored = np.asarray(const_value(tensors[lin.weight]))
    full = stored.T.copy() if lin.weight_layout == "out_in" else stored.copy()
    full[:, columns or slice(None)] = weight
    _replace_input(nodes[lin.node], lin.weight, full.T if lin.weight_layout == "out_in" else full, stored.dtype)
    if bias is not None and lin.bias is not None:
        stored_b = np.asarray(const_value(tensors[lin.bias]))
        new_b = stored_b.reshape(-1).copy()
        new_b[columns or slice(None)] = bias
        _replace_input(nodes[lin.bias_node], lin.bias, new_b.reshape(stored_b.shape), stored_b.dtype)


def query_columns(attn: Attention) -> tuple[Linear, slice]:
    """The linear layer that holds the queries and which of its output columns they are."""
    width = attn.heads * attn.head_dim_qk
    if attn.layout != "fused_qkv":
        return attn.q, slice(0, width)
    widths = {"q": width, "k": width, "v": attn.heads * attn.head_dim_v}
    start = sum(widths[r] for r in sorted(attn.qkv_chunks, key=attn.qkv_chunks.get)
                if attn.qkv_chunks[r] < attn.qkv_chunks["q"])
    return attn.qkv, slice(start, start + width)
