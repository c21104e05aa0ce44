"""Triton kernels against the reference merge and against the ONNX Runtime graph (on CPU under
Triton's interpreter where there is no GPU; see conftest)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.models.reference import ReferenceRecord, build_model
from vit2trt.models.tome_reference import ToMeViT, _merge
from vit2trt.plugins.tensorrt_registration import register_tensorrt_plugins
from vit2trt.plugins.tome_triton import tome_merge

from conftest import rel_error, run_onnx


@pytest.mark.parametrize("n,r,protect", [(17, 5, True), (16, 8, False), (9, 1, True), (40, 20, False)])
def test_kernels_merge_like_the_reference(n, r, protect):
    generator = torch.Generator().manual_seed(n + r)
    x = torch.randn(3, n, 24, generator=generator)
    size = torch.randint(1, 4, (3, n, 1), generator=generator).float()
    metric = torch.randn(3, n, 16, generator=generator)
    got_x, got_size = tome_merge(x, size, metric, r, protect)
    want_x, want_size = _merge(x, size, metric, r, protect)
    assert got_x.shape == (3, n - r, 24) and torch.equal(got_size, want_size)
    assert torch.allclose(got_x, want_x, rtol=1e-5, atol=1e-6)
    if protect:   # the class token is never merged and stays first
        assert torch.allclose(got_x[:, 0], x[:, 0]) and (got_size[:, 0] == size[:, 0]).all()


def test_a_vit_merging_with_the_kernels_equals_the_onnx_graph(tmp_path, export_cache):
    # 96 pixels (37 tokens): the kernels run under Triton's interpreter on CPU, slowly.
    exported = export_cache("timm:deit_tiny_patch16_224", {"depth": 2, "num_classes": 10, "img_size": 96},
                            "torchscript")
    result = convert(exported.onnx_path, tmp_path / "tome", ConvertOptions(method="tome", tome_r=8, build=False))
    x = np.random.default_rng(0).standard_normal((2, 3, 96, 96)).astype(np.float32)
    model = build_model(ReferenceRecord.load(exported.record_path))
    with torch.no_grad():
        fused = ToMeViT(model, result.decisions["tome"]["r"], merge=tome_merge)(torch.from_numpy(x)).numpy()
        plain = model(torch.from_numpy(x)).numpy()
    got = run_onnx(result.onnx_path, x)
    assert rel_error(fused, got) <= 1e-4
    assert rel_error(plain, got) > 1e-3   # the merges change the result: the comparison is not vacuous


def test_tensorrt_registration_needs_full_tensorrt():
    try:
        import tensorrt.plugin  # noqa: F401
        available = True
    except ImportError:
        available = False
    assert register_tensorrt_plugins() is available
