"""PyTorch reference of a structurally pruned ViT, built from the original model and decisions.json.

Independent of the ONNX surgery: weights come from the timm / Hugging Face modules themselves,
sliced with the kept indices, and the attention is written out in plain torch ops. Tests compare
ONNX Runtime on the emitted graph against this module.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from vit2trt.models.reference import HFLogits


def _columns(keep: list[list[int]], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + j for h, dims in enumerate(keep) for j in dims], dtype=torch.long)


class PrunedAttention(nn.Module):
    """Multi-head self-attention whose heads keep fewer QK and V dims; the scale stays the original."""

    def __init__(self, wq, bq, wk, bk, wv, bv, proj: nn.Linear, heads: int, scale: float, hf_tuple: bool):
        super().__init__()
        self.q, self.k, self.v = (self._linear(w, b) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
        self.proj = proj
        self.heads, self.scale, self.hf_tuple = heads, scale, hf_tuple

    @staticmethod
    def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        k = self.k(x).reshape(b, n, self.heads, -1).permute(0, 2, 3, 1)
        v = self.v(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        attn = ((q @ k) * self.scale).softmax(dim=-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))
        return (out, None) if self.hf_tuple else out


def _prune_linear_rows(layer: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    return PrunedAttention._linear(layer.weight[rows], None if layer.bias is None else layer.bias[rows])


def _prune_linear_inputs(layer: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    return PrunedAttention._linear(layer.weight[:, cols], layer.bias)


def apply_decisions(model: nn.Module, decisions: dict) -> nn.Module:
    """A pruned copy of `model` (timm VisionTransformer or HFLogits) following decisions['blocks']."""
    model = copy.deepcopy(model).eval()
    hf = isinstance(model, HFLogits)
    blocks = model.model.vit.layers if hf else model.blocks
    with torch.no_grad():
        for keep in decisions.get("blocks", []):
            block = blocks[keep["index"]]
            attn = block.attention if hf else block.attn
            mlp = block.mlp
            if keep.get("qk_keep") is not None or keep.get("v_keep") is not None:
                if hf:
                    heads, head_dim, scale = attn.num_attention_heads, attn.head_dim, attn.scaling
                    parts = [(attn.q_proj.weight, attn.q_proj.bias), (attn.k_proj.weight, attn.k_proj.bias),
                             (attn.v_proj.weight, attn.v_proj.bias)]
                    proj = attn.o_proj
                else:
                    heads, head_dim, scale = attn.num_heads, attn.head_dim, attn.scale
                    w, b = attn.qkv.weight, attn.qkv.bias
                    d = heads * head_dim
                    parts = [(w[i * d:(i + 1) * d], None if b is None else b[i * d:(i + 1) * d]) for i in range(3)]
                    proj = attn.proj
                full = [list(range(head_dim))] * heads
                qk = _columns(keep.get("qk_keep") or full, head_dim)
                vv = _columns(keep.get("v_keep") or full, head_dim)
                (wq, bq), (wk, bk), (wv, bv) = parts
                sel = lambda t, idx: None if t is None else t[idx]  # noqa: E731
                new = PrunedAttention(wq[qk], sel(bq, qk), wk[qk], sel(bk, qk), wv[vv], sel(bv, vv),
                                      _prune_linear_inputs(proj, vv), heads, scale, hf_tuple=hf)
                if hf:
                    block.attention = new
                else:
                    block.attn = new
            if keep.get("ffn_keep") is not None:
                channels = torch.tensor(sorted(keep["ffn_keep"]), dtype=torch.long)
                mlp.fc1 = _prune_linear_rows(mlp.fc1, channels)
                mlp.fc2 = _prune_linear_inputs(mlp.fc2, channels)
    return model
