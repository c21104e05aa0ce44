"""ToMe in native ONNX: same merges as the PyTorch reference, per image, buildable everywhere."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from vit2trt.converter.deploy.engine import build_engine, tensorrt_backend
from vit2trt.converter.graph import describe_vit, read_vit
from vit2trt.converter.graph.loading import load_onnx
from vit2trt.errors import Vit2TrtError
from vit2trt.models.reference import ReferenceRecord, build_model
from vit2trt.models.tome_reference import ToMeViT
from vit2trt.passes.tome import apply_tome

from conftest import HF_TINY, METHOD_MODELS, rel_error, run_onnx, run_onnx_each, with_constant_mask

# r per block for the shared method models' 37 tokens (36 on gap_no_cls), four blocks each.
CASES = [(name, *METHOD_MODELS[name], r) for name, r in
         [("deit_small", 5), ("deit3_layerscale", 7), ("gap_no_cls", 5), ("no_qkv_bias", 9)]]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("case_id,spec,args,r", CASES + [
    ("hf_vit", *METHOD_MODELS["hf_vit"], 5)],
    ids=[c[0] for c in CASES] + ["hf_vit"])
def test_tome_matches_the_pytorch_reference(tmp_path, export_cache, case_id, spec, args, r, exporter):
    exported = export_cache(spec, args, exporter)
    model = load_onnx(exported.onnx_path)
    vit = describe_vit(model)
    if any(b.attn.mask_inputs for b in vit.blocks):  # HF dynamo: a fixed-size mask, refused (tested below)
        pytest.skip("graph adds a fixed-size attention mask")
    result = apply_tome(model, vit, r)
    path = tmp_path / "tome.onnx"
    onnx.save(result.model, str(path))
    record = ReferenceRecord.load(exported.record_path)
    c, h, w = record.preprocessing["input_size"]
    x = np.random.default_rng(4).standard_normal((8, c, h, w)).astype(np.float32)
    reference = ToMeViT(build_model(record), result.report["r"])
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    got = run_onnx(path, x)
    assert rel_error(got, want) <= 1e-4
    single = run_onnx_each(path, x[:8])
    assert rel_error(single, got) <= 1e-5
    # The graph really runs on fewer tokens, block by block.
    g = read_vit(path)
    tokens = result.report["tokens"]
    assert [b.flops.attn_matmul for b in g.blocks] == [
        b.attn.heads * n * n * (b.attn.head_dim_qk + b.attn.head_dim_v) for b, n in zip(g.blocks, tokens)]
    assert g.flops.total < read_vit(exported.onnx_path).flops.total
    # Merging changes the result: without it the reference gives other outputs.
    with torch.no_grad():
        plain = ToMeViT(build_model(record), [0] * len(tokens[:-1]))(torch.from_numpy(x)).numpy()
    assert rel_error(plain, want) > 10 * max(rel_error(got, want), 1e-7)


def test_r_is_clipped_to_half_the_tokens(export_cache):
    exported = export_cache("timm:vit_small_patch16_224", {"depth": 2, "qkv_bias": False}, "torchscript")
    model = load_onnx(exported.onnx_path)
    result = apply_tome(model, describe_vit(model), 500)
    assert result.report["r"] == [98, 49] and result.report["tokens"] == [197, 99, 50]


@pytest.mark.parametrize("spec,args,exporter,needle", [
    ("timm:deit_small_distilled_patch16_224", {"depth": 2}, "torchscript", "distillation"),
    ("timm:vit_small_patch14_reg4_dinov2", {"depth": 2, "img_size": 126, "num_classes": 10}, "torchscript", "register"),
])
def test_unsupported_token_layouts_are_refused(export_cache, spec, args, exporter, needle):
    exported = export_cache(spec, args, exporter)
    model = load_onnx(exported.onnx_path)
    with pytest.raises(Vit2TrtError, match=needle):
        apply_tome(model, describe_vit(model), 8)


def test_a_fixed_size_attention_mask_is_refused_and_an_empty_one_ignored(export_cache, tmp_path):
    """A constant mask that masks something cannot follow a shrinking sequence; the all-zero one
    Hugging Face's dynamo export adds masks nothing, so ToMe merges under it."""
    exported = export_cache("timm:deit_tiny_patch16_224", {"depth": 2, "num_classes": 10}, "torchscript")
    model = load_onnx(with_constant_mask(exported.onnx_path, tmp_path / "masked.onnx"))
    with pytest.raises(Vit2TrtError, match="attention mask"):
        apply_tome(model, describe_vit(model), 8)
    hf = load_onnx(export_cache("hf:ViTForImageClassification", HF_TINY, "dynamo").onnx_path)
    assert apply_tome(hf, describe_vit(hf), 8).report["tokens"] == [197, 189, 181]


@pytest.mark.skipif(tensorrt_backend()[1] is None, reason="no tensorrt or tensorrt_rtx module")
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_tome_graphs_build_with_tensorrt(tmp_path, export_cache, exporter):
    exported = export_cache(*METHOD_MODELS["deit_small"], exporter)
    model = load_onnx(exported.onnx_path)
    path = tmp_path / "tome.onnx"
    onnx.save(apply_tome(model, describe_vit(model), 5).model, str(path))
    report = build_engine(path)
    assert report.status == "built", report.message


def test_convert_with_tome_writes_a_reproducible_result(tmp_path, export_cache):
    from typer.testing import CliRunner

    from vit2trt.cli import app

    exported = export_cache(*METHOD_MODELS["deit_small"], "torchscript")
    outs = []
    for name in ("a", "b"):
        result = CliRunner().invoke(app, ["convert", str(exported.onnx_path), "--method", "tome", "--r", "5",
                                          "--out", str(tmp_path / name), "--no-build"])
        assert result.exit_code == 0, result.output
        outs.append((tmp_path / name / "model.onnx").read_bytes())
    assert outs[0] == outs[1]
    import json

    decisions = json.loads((tmp_path / "a" / "decisions.json").read_text())
    assert decisions["tome"]["tokens"] == [37, 32, 27, 22, 17]
    x = np.random.default_rng(2).standard_normal((2, 3, 96, 96)).astype(np.float32)
    reference = ToMeViT(build_model(ReferenceRecord.load(exported.record_path)), decisions["tome"]["r"])
    with torch.no_grad():
        assert rel_error(run_onnx(tmp_path / "a" / "model.onnx", x), reference(torch.from_numpy(x)).numpy()) <= 1e-4


@pytest.mark.parametrize("argv,needle", [
    (["--method", "tome", "--r", "-1"], "non-negative"),
    (["--method", "tome", "--head-sparsity", "0.5"], "belongs to --method toast"),
])
def test_bad_tome_requests_write_nothing(tmp_path, export_cache, argv, needle):
    from typer.testing import CliRunner

    from vit2trt.cli import app

    exported = export_cache(*METHOD_MODELS["deit_small"], "torchscript")
    result = CliRunner().invoke(app, ["convert", str(exported.onnx_path), "--out", str(tmp_path / "out"),
                                      "--no-build", *argv])
    assert result.exit_code == 2 and needle in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
