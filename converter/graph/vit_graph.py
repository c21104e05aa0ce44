"""The typed description of a ViT found inside an ONNX graph.

Every later stage (passes, engines, validation) reads the graph through this description.
Names are ONNX node and tensor names of the described graph; weight layouts say how an
initializer maps onto (in_features, out_features).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Linear:
    node: str                  # MatMul or Gemm node
    weight: str                # tensor holding the weight (initializer or Constant output)
    weight_layout: str         # "in_out" (MatMul) or "out_in" (Gemm transB=1, torch layout)
    in_features: int
    out_features: int
    bias: Optional[str] = None        # bias tensor name
    bias_node: Optional[str] = None   # Add node carrying the bias (or the Gemm itself)
    output: str = ""                  # tensor after bias
    selected_in: Optional[int] = None  # Token Channel Selection: input channels kept per image


@dataclass
class HeadReshape:
    """A Reshape whose target shape carries the head count (split or merge of heads)."""
    node: str
    role: str                  # "qkv", "q", "k", "v" (split heads) or "merge" (heads back to D)
    shape_input: str           # tensor giving the target shape
    shape_value: list[int]     # target shape observed at batch 1 (may hold -1 for heads, as in HF)
    output_shape: list[int]    # shape of the result at batch 1
    constant_sources: list[str]  # initializers/Constant outputs that hold fixed dims of that shape


@dataclass
class Attention:
    layout: str                # "fused_qkv" or "split_qkv"
    heads: int
    head_dim_qk: int
    head_dim_v: int
    qkv_bias: bool
    proj: Linear
    qkv: Optional[Linear] = None
    q: Optional[Linear] = None
    k: Optional[Linear] = None
    v: Optional[Linear] = None
    qk_matmul: str = ""
    softmax: str = ""
    av_matmul: str = ""
    scale: Optional[float] = None     # product of the constant scale factors on the score path
    scale_from_shape: bool = False    # scale computed at run time from q's shape (TorchScript SDPA)
    scale_nodes: list[str] = field(default_factory=list)
    mask_nodes: list[str] = field(default_factory=list)       # constant Adds on the scores
    mask_inputs: list[str] = field(default_factory=list)      # the masks they add
    head_reshapes: list[HeadReshape] = field(default_factory=list)
    qkv_split_nodes: list[str] = field(default_factory=list)  # Split/Slice/Gather separating q, k, v
    qkv_chunks: dict[str, int] = field(default_factory=dict)  # fused: which third is q, k, v
    # The ONNX Attention node (opset 23+) that computes the whole block's attention; empty when the
    # graph spells it out (then qk_matmul, softmax and av_matmul name the explicit nodes).
    fused_op: str = ""
    nan_guard_nodes: list[str] = field(default_factory=list)  # SDPA's IsNaN -> Where after the Softmax

    @property
    def form(self) -> str:
        """How the graph writes this attention: "onnx_attention", "sdpa_nan_guard" or "explicit"."""
        return "onnx_attention" if self.fused_op else "sdpa_nan_guard" if self.nan_guard_nodes else "explicit"


@dataclass
class FFN:
    fc1: Linear
    fc2: Linear
    hidden: int
    activation: str            # "gelu", "gelu_tanh", "relu", "silu", "quick_gelu" or op list
    activation_nodes: list[str] = field(default_factory=list)


@dataclass
class LayerScale:
    node: str                  # Mul node
    gamma: str                 # tensor holding gamma


@dataclass
class BlockFlops:
    """Multiply-accumulates at batch 1 (the GFLOPs convention of the ViT/DeiT papers)."""
    attn_proj: int
    attn_matmul: int
    ffn: int

    @property
    def total(self) -> int:
        return self.attn_proj + self.attn_matmul + self.ffn


@dataclass
class Block:
    index: int
    input: str
    output: str
    norm1: Optional[str]
    norm2: Optional[str]
    attn: Attention
    ffn: FFN
    layer_scale_attn: Optional[LayerScale]
    layer_scale_ffn: Optional[LayerScale]
    residual_attn: str         # Add node
    residual_ffn: str          # Add node
    flops: BlockFlops
    tokens: int = 0            # tokens the attention sees (fewer after token merging/pruning)


@dataclass
class ExtraToken:
    kind: str                  # "class", "distillation", "register" or "unknown"
    count: int
    tensor: str                # learned parameter tensor


@dataclass
class PatchEmbed:
    node: str                  # Conv node
    weight: str
    bias: Optional[str]
    patch_size: tuple[int, int]
    in_chans: int
    embed_dim: int
    grid: tuple[int, int]


@dataclass
class Head:
    final_norm: Optional[str]  # LayerNormalization before pooling
    pooling: str               # "token" or "avg"
    pool_nodes: list[str]
    token_index: list[int]     # pooled token positions for "token" pooling (class, distillation)
    fc_norm: Optional[str]     # LayerNormalization after pooling
    linears: list[Linear]      # the classifier(s); two for distilled models
    num_classes: int


@dataclass
class GraphFlops:
    patch_embed: int
    blocks: int
    head: int
    other: int                 # MatMul/Gemm/Conv work outside the described parts

    @property
    def total(self) -> int:
        return self.patch_embed + self.blocks + self.head + self.other


@dataclass
class BuildReport:
    backend: str               # "tensorrt", "tensorrt_rtx" or "none"
    status: str                # "built", "failed", "unavailable" or "skipped"
    seconds: float = 0.0
    message: str = ""
    how: Optional[dict] = None          # module, version, targets, profile, precision, flags
    layers: Optional[list] = None       # the parsed network's layers: name and type


@dataclass
class ViTGraph:
    path: str
    opset: int
    input_name: str
    output_names: list[str]
    in_chans: int
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    embed_dim: int
    num_patches: int
    num_extra_tokens: int
    extra_tokens: list[ExtraToken]
    pos_embed: Optional[str]
    pos_embed_covers_extra_tokens: bool
    pooling: str
    patch_embed: PatchEmbed
    blocks: list[Block]
    head: Head
    flops: GraphFlops
    build: Optional[BuildReport] = None

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_extra_tokens

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["num_tokens"] = self.num_tokens
        data["depth"] = self.depth
        data["flops"]["total"] = self.flops.total
        for block, out in zip(self.blocks, data["blocks"]):
            out["flops"]["total"] = block.flops.total
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
