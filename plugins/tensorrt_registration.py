"""Registration of the Triton kernels as TensorRT plugins (`tensorrt.plugin`, full TensorRT only).

TensorRT-RTX supports no plugins, and this workplace has no full TensorRT and no GPU: this module
is written against the documented `tensorrt.plugin` API (register / impl) but has NOT been
exercised here. The kernels themselves are tested on CPU under Triton's interpreter against the
ONNX Runtime path (tests/test_plugins.py).

A graph node `tome_merge` (attributes r, protect_cls, plugin_namespace "vit2trt") with inputs x
[B, N, C], size [B, N, 1] and metric [B, N, d] and outputs x [B, N-r, C], size [B, N-r, 1]
resolves to this plugin once `register_tensorrt_plugins()` has run in the building process.
"""
from __future__ import annotations

PLUGIN_ID = "vit2trt::tome_merge"
_registered = False


def register_tensorrt_plugins() -> bool:
    """Register vit2trt's plugins with full TensorRT; False where `tensorrt.plugin` is missing."""
    global _registered
    if _registered:
        return True
    try:
        import tensorrt.plugin as trtp
    except ImportError:
        return False
    from typing import Tuple

    @trtp.register(PLUGIN_ID)
    def _describe(x: trtp.TensorDesc, size: trtp.TensorDesc, metric: trtp.TensorDesc, r: int,
                  protect_cls: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        shape = x.shape_expr
        merged = trtp.from_shape_expr((shape[0], shape[1] - r, shape[2]), dtype=x.dtype)
        sizes = trtp.from_shape_expr((shape[0], shape[1] - r, 1), dtype=size.dtype)
        return merged, sizes

    @trtp.impl(PLUGIN_ID)
    def _run(x: trtp.Tensor, size: trtp.Tensor, metric: trtp.Tensor, r: int, protect_cls: int,
             outputs: Tuple[trtp.Tensor], stream: int) -> None:
        import torch

        from .tome_triton import tome_merge

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            merged, sizes = tome_merge(torch.as_tensor(x, device="cuda"), torch.as_tensor(size, device="cuda"),
                                       torch.as_tensor(metric, device="cuda"), r, bool(protect_cls))
            torch.as_tensor(outputs[0], device="cuda").copy_(merged)
            torch.as_tensor(outputs[1], device="cuda").copy_(sizes)

    _registered = True
    return True
