"""ToaSt structure removal: stripping masked-zero structure and SCWP, proven against PyTorch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.deploy.engine import tensorrt_backend
from vit2trt.converter.deploy.export import export_model
from vit2trt.converter.graph import read_vit
from vit2trt.models.pruned_reference import apply_decisions
from vit2trt.models.reference import ReferenceRecord, build_model

from conftest import METHOD_MODELS, method_cases, rel_error, run_onnx, run_onnx_each

runner = CliRunner()




def _inputs(record: ReferenceRecord, batch: int, seed: int = 3) -> np.ndarray:
    c, h, w = record.preprocessing["input_size"]
    return np.random.default_rng(seed).standard_normal((batch, c, h, w)).astype(np.float32)


def _masked_deit(tmp_path, exporter):
    """A DeiT-S (96 pixels) with structure zeroed as a masked fine-tune leaves it, uneven across heads."""
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", depth=3, num_classes=10, img_size=96).eval()
    heads, hd, d = 6, 64, 384
    with torch.no_grad():
        for i, blk in enumerate(model.blocks[1:], start=1):
            w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
            for h in range(heads):
                dead_qk = range(0, 40 + 2 * h)          # 40..50 dead dims: counts differ per head
                for j in dead_qk:
                    row = (j % 2) * d + h * hd + j      # zero either the Q row or the K row
                    w[row] = 0
                    b[row] = 0
                for j in range(10, 30 + h):             # V rows zeroed for some dims ...
                    w[2 * d + h * hd + j] = 0
                    b[2 * d + h * hd + j] = 0
                for j in range(40, 45):                 # ... proj input columns for others
                    blk.attn.proj.weight[:, h * hd + j] = 0
            blk.mlp.fc2.weight[:, 0:700] = 0            # dead hidden units via fc2 ...
            blk.mlp.fc1.weight[900:1000] = 0            # ... and via fc1 row + bias
            blk.mlp.fc1.bias[900:1000] = 0
    weights = tmp_path / "masked.pth"
    torch.save(model.state_dict(), weights)
    result = export_model("timm:deit_small_patch16_224", tmp_path / "masked.onnx", weights=str(weights),
                          exporter=exporter, model_args={"depth": 3, "num_classes": 10, "img_size": 96})
    return model, result


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_stripping_zeroed_structure_changes_only_rounding(tmp_path, exporter):
    model, exported = _masked_deit(tmp_path, exporter)
    out = convert(exported.onnx_path, tmp_path / "out", ConvertOptions(build=False))
    x = np.random.default_rng(1).standard_normal((4, 3, 96, 96)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert rel_error(run_onnx(out.onnx_path, x), want) <= 1e-5
    assert out.agreement["relative_error"] <= 1e-5
    g = read_vit(out.onnx_path)
    assert g.blocks[0].attn.head_dim_qk == 64 and g.blocks[0].ffn.hidden == 1536
    for blk in g.blocks[1:]:
        # QK: head 5 has the fewest dead dims (64 - 50 = 14 live), every head padded to the widest (24).
        assert blk.attn.head_dim_qk == 64 - 40
        assert blk.attn.head_dim_v == 64 - (20 + 5)   # head 0: 20 dead V dims + 5 dead proj columns
        assert blk.ffn.hidden == 1536 - 700 - 100
        assert blk.attn.scale == pytest.approx(64 ** -0.5)  # the softmax scale stays the original
    assert out.flops_after < 0.8 * out.flops_before
    decisions = json.loads((tmp_path / "out" / "decisions.json").read_text())
    blk1 = decisions["blocks"][0]
    assert blk1["index"] == 1 and len(blk1["qk_keep"]) == 6 and len(blk1["ffn_keep"]) == 736
    # The decisions rebuild the same compressed model in PyTorch.
    reference = apply_decisions(model, decisions)
    with torch.no_grad():
        assert rel_error(reference(torch.from_numpy(x)).numpy(), want) <= 1e-5


SCWP_CASES = method_cases("deit_small", "deit_small_distilled", "deit3_layerscale", "gap_no_cls", "dinov2_reg4",
                          "no_qkv_bias", "hf_vit")


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("case_id,spec,args", SCWP_CASES, ids=[c[0] for c in SCWP_CASES])
def test_scwp_matches_pruned_pytorch_reference(tmp_path, export_cache, case_id, spec, args, exporter):
    exported = export_cache(spec, args, exporter)
    out = convert(exported.onnx_path, tmp_path / "out", ConvertOptions(head_sparsity=0.9, build=False))
    record = ReferenceRecord.load(exported.record_path)
    decisions = json.loads((tmp_path / "out" / "decisions.json").read_text())
    reference = apply_decisions(build_model(record), decisions)
    x = _inputs(record, 8)
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    got = run_onnx(out.onnx_path, x)
    assert rel_error(got, want) <= 1e-5
    one_by_one = run_onnx_each(out.onnx_path, x[:8])
    assert rel_error(one_by_one, got) <= 1e-6
    g = read_vit(out.onnx_path)
    head_dim = g.blocks[0].attn.head_dim_qk
    assert all(b.attn.head_dim_qk == b.attn.head_dim_v == round(head_dim * 0.1) for b in g.blocks[1:])
    assert len(decisions["blocks"]) == g.depth - 1 and decisions["blocks"][0]["index"] == 1
    # The pruned model really differs from the original (pruning without fine-tuning is lossy).
    with torch.no_grad():
        original = build_model(record)(torch.from_numpy(x)).numpy()
    assert rel_error(original, want) > 1e-3


def test_scwp_keeps_the_dims_farthest_from_the_median():
    from vit2trt.passes.scwp import _rank_dims

    rows = np.zeros((5, 4))
    rows[3] = 10.0          # far from the (zero) median
    rows[1] = -4.0
    assert _rank_dims(rows, 2) == [1, 3]


def test_same_input_and_settings_give_identical_bytes(tmp_path, export_cache):
    exported = export_cache(*METHOD_MODELS["deit_small"], "dynamo")
    options = ConvertOptions(head_sparsity=0.9, fc1_ratios=[0, 0, 0.3, 0.4], fc2_ratios=[0, 0.5, 0.9, 0.3], build=False)
    a = convert(exported.onnx_path, tmp_path / "a", options)
    b = convert(exported.onnx_path, tmp_path / "b", options)
    assert a.onnx_path.read_bytes() == b.onnx_path.read_bytes()
    assert (tmp_path / "a" / "decisions.json").read_bytes() == (tmp_path / "b" / "decisions.json").read_bytes()


@pytest.mark.skipif(tensorrt_backend()[1] is None, reason="no tensorrt or tensorrt_rtx module")
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_pruned_graphs_build_with_tensorrt(tmp_path, export_cache, exporter):
    exported = export_cache("timm:deit3_small_patch16_224", {"depth": 2}, exporter)
    result = runner.invoke(app, ["convert", str(exported.onnx_path), "--method", "toast", "--head-sparsity", "0.9",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.engine").stat().st_size > 100_000
    assert "fine-tun" in result.output and "top-1 agreement" in result.output


@pytest.mark.parametrize("argv,needle", [
    (["--head-sparsity", "1.5"], "head-sparsity"),
    (["--head-sparsity", "-0.1"], "head-sparsity"),
    (["--method", "nope"], "unknown method"),
])
def test_bad_convert_requests_write_nothing(tmp_path, deit_tiny_ts, argv, needle):
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(deit_tiny_ts.onnx_path), "--out", str(out), "--no-build", *argv])
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vit2trt")]


def test_convert_of_a_non_vit_writes_nothing(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("not a graph")
    result = runner.invoke(app, ["convert", str(path), "--out", str(tmp_path / "out"), "--no-build"])
    assert result.exit_code == 2 and not (tmp_path / "out").exists()


def _official_scwp_keep(rows_q: torch.Tensor, rows_k: torch.Tensor, keep: int) -> list[int]:
    """A straight copy of the official ToaSt rule (toast/importance.py gm_score, weight_pruning.py)."""
    w = torch.cat([rows_q, rows_k], dim=1)
    median = torch.median(w, dim=0)[0]
    importance = torch.sqrt(torch.sum((w - median) ** 2, dim=1))
    return sorted(torch.topk(importance, keep).indices.tolist())


def test_scwp_keeps_the_same_dims_as_the_official_rule():
    from vit2trt.passes.scwp import _rank_dims

    differs_from_averaged_median = 0
    for seed in range(40):
        torch.manual_seed(seed)
        q, k = torch.randn(64, 384), torch.randn(64, 384)   # one head's Q and K weight rows (even count)
        rows = torch.cat([q, k], dim=1).numpy()
        for keep in (6, 32):
            assert _rank_dims(rows, keep) == _official_scwp_keep(q, k, keep)
            averaged = np.linalg.norm(rows - np.median(rows, axis=0), axis=1)
            differs_from_averaged_median += sorted(np.argsort(-averaged)[:keep].tolist()) != _official_scwp_keep(q, k, keep)
    assert differs_from_averaged_median > 0   # the rule matters: np.median's average picks other dims


def _official_masked_deit(tmp_path, zero_biases: bool):
    """DeiT-S (96 pixels) masked as the official code masks: Q/K/V weight rows and proj columns of 58 of 64 dims
    per head zeroed in blocks 1-2, biases left live (unless `zero_biases`)."""
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", depth=3, num_classes=10, img_size=96).eval()
    d, hd = 384, 64
    with torch.no_grad():
        for blk in model.blocks[1:]:
            blk.attn.qkv.bias.normal_()
            for h in range(6):
                for j in range(58):
                    for part in range(3):
                        blk.attn.qkv.weight[part * d + h * hd + (j + 3 * h) % hd] = 0
                        if zero_biases:
                            blk.attn.qkv.bias[part * d + h * hd + (j + 3 * h) % hd] = 0
                    blk.attn.proj.weight[:, h * hd + (j + 3 * h) % hd] = 0
    weights = tmp_path / f"masked_{zero_biases}.pth"
    torch.save(model.state_dict(), weights)
    result = export_model("timm:deit_small_patch16_224", tmp_path / f"masked_{zero_biases}.onnx", weights=str(weights),
                          model_args={"depth": 3, "num_classes": 10, "img_size": 96})
    return model, result


def test_live_qk_biases_strip_to_the_same_size_as_zero_biases(tmp_path):
    x = np.random.default_rng(2).standard_normal((2, 3, 96, 96)).astype(np.float32)
    flops = []
    for zero_biases in (False, True):
        model, exported = _official_masked_deit(tmp_path, zero_biases)
        out = convert(exported.onnx_path, tmp_path / f"out_{zero_biases}", ConvertOptions(build=False))
        with torch.no_grad():
            assert rel_error(run_onnx(out.onnx_path, x), model(torch.from_numpy(x)).numpy()) <= 1e-5
        g = read_vit(out.onnx_path)
        assert [b.attn.head_dim_qk for b in g.blocks] == [64, 6, 6]
        assert [b.attn.head_dim_v for b in g.blocks] == [64, 6, 6]
        flops.append(out.flops_after)
    assert flops[0] == flops[1]
