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

from ..errors import Vit2TrtError
from .reference import HFLogits


def _columns(keep: list[list[int]], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + j for h, dims in enumerate(keep) for j in dims], dtype=torch.long)


class PrunedAttention(nn.Module):
    """Multi-head self-attention whose heads keep fewer QK and V dims; the scale stays the original."""

    def __init__(self, wq, bq, wk, bk, wv, bv, proj: nn.Linear, heads: int, scale: float, hf_tuple: bool):
        super().__init__()
        self.q, self.k, self.v = (self._linear(w, b) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
        self.proj = proj
        self.heads, self.scale, self.hf_tuple = heads, scale, hf_tuple
        self.probs: Optional[torch.Tensor] = None  # kept for Token Channel Selection in the same block

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
        self.probs = attn
        out = self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))
        return (out, None) if self.hf_tuple else out


def _prune_linear_rows(layer: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    return PrunedAttention._linear(layer.weight[rows], None if layer.bias is None else layer.bias[rows])


def _prune_linear_inputs(layer: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    return PrunedAttention._linear(layer.weight[:, cols], layer.bias)


class TCSMlp(nn.Module):
    """FFN with ToaSt Token Channel Selection on FC1's and FC2's inputs, per image or batch-shared."""

    def __init__(self, fc1: nn.Linear, act: nn.Module, fc2: nn.Linear, attention: PrunedAttention,
                 fc1_keep: Optional[int], fc2_keep: Optional[int], settings: dict):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2
        self.attention = [attention]  # a list: not a submodule of this one
        self.fc1_keep, self.fc2_keep = fc1_keep, fc2_keep
        self.sample = torch.tensor(settings["sample"], dtype=torch.long)
        self.use_cls, self.shared = settings["use_class_token"], settings["shared"]
        self.lambda_cls, self.lambda_patch = settings["lambda_cls"], settings["lambda_patch"]

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        sampled = x[:, self.sample].abs()                                   # [B, |S|, C]
        if not self.use_cls:
            return sampled.mean(1)
        cls_row = self.attention[0].probs[:, :, 0, :].mean(1)               # [B, N]
        patch = (sampled * cls_row[:, self.sample].unsqueeze(-1)).mean(1)
        return x[:, 0].abs() * self.lambda_cls + patch * self.lambda_patch

    def _selected(self, x: torch.Tensor, layer: nn.Linear, keep: Optional[int]) -> torch.Tensor:
        if keep is None:
            return layer(x)
        weight = layer.weight.t()                                           # [in, out]
        scores = self._scores(x)
        if self.shared:
            index = scores.mean(0).topk(keep).indices
            out = x[..., index] @ weight[index]
        else:
            index = scores.topk(keep, dim=-1).indices                       # [B, K]
            picked = x.gather(2, index[:, None, :].expand(-1, x.shape[1], -1))
            out = picked @ weight[index]                                    # [B, N, K] @ [B, K, out]
        return out if layer.bias is None else out + layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._selected(self.act(self._selected(x, self.fc1, self.fc1_keep)), self.fc2, self.fc2_keep)


def apply_decisions(model: nn.Module, decisions: dict, weights: Optional[dict] = None) -> nn.Module:
    """A compressed copy of `model` (timm VisionTransformer or HFLogits) following decisions.json:
    'blocks' (kept attention dims and FFN channels) and 'tcs' (Token Channel Selection). `weights`
    are compensated weights of the pruned layers ((in, out) arrays by 'blocks.{i}.{q|proj|fc2}.
    {weight|bias}'), set once the layers are pruned."""
    model = copy.deepcopy(model).eval()
    hf = isinstance(model, HFLogits)
    blocks = model.model.vit.layers if hf else model.blocks
    with torch.no_grad():
        for keep in decisions.get("blocks", []):
            block = blocks[keep["index"]]
            mlp = block.mlp
            if keep.get("qk_keep") is not None or keep.get("v_keep") is not None:
                _prune_block_attention(block, hf, keep)
            if keep.get("ffn_keep") is not None:
                channels = torch.tensor(sorted(keep["ffn_keep"]), dtype=torch.long)
                mlp.fc1 = _prune_linear_rows(mlp.fc1, channels)
                mlp.fc2 = _prune_linear_inputs(mlp.fc2, channels)
        _set_compensated(blocks, hf, weights or {})
        tcs = decisions.get("tcs")
        for spec in (tcs or {}).get("blocks", []):
            block = blocks[spec["index"]]
            attn = block.attention if hf else block.attn
            if not isinstance(attn, PrunedAttention):  # an unpruned block: same math, probabilities kept
                _prune_block_attention(block, hf, {})
                attn = block.attention if hf else block.attn
            mlp = block.mlp
            act = getattr(mlp, "act", None) or getattr(mlp, "activation_fn")
            block.mlp = TCSMlp(mlp.fc1, act, mlp.fc2, attn, spec.get("fc1_keep"), spec.get("fc2_keep"),
                               tcs["settings"])
    return model


def _prune_block_attention(block: nn.Module, hf: bool, keep: dict) -> None:
    attn = block.attention if hf else block.attn
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


def _set_compensated(blocks, hf: bool, weights: dict) -> None:
    for key, value in weights.items():
        parts = key.split(".")
        if len(parts) != 4 or parts[2] not in ("q", "proj", "fc2") or not parts[1].isdigit() \
                or int(parts[1]) >= len(blocks):
            raise Vit2TrtError(f"compensation.safetensors holds '{key}', which names no pruned layer.")
        _, index, layer, kind = parts
        block = blocks[int(index)]
        attn = block.attention if hf else block.attn
        target = {"q": getattr(attn, "q", None), "proj": attn.proj if isinstance(attn, PrunedAttention) else None,
                  "fc2": block.mlp.fc2}[layer]
        param = getattr(target, kind, None) if target is not None else None
        value = torch.as_tensor(value)
        if param is None or param.shape != (value.t() if kind == "weight" else value).shape:
            raise Vit2TrtError(f"compensated weight {key} {list(value.shape)} does not fit the pruned model; "
                               "compensation.safetensors and decisions.json must come from the same convert.")
        param.copy_(value.t() if kind == "weight" else value)
