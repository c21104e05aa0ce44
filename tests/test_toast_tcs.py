"""Token Channel Selection in the graph: same outputs as the PyTorch reference, per image,
schedules that reach the published FLOPs, and clear refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.deploy.engine import tensorrt_backend
from vit2trt.converter.graph import read_vit
from vit2trt.models.pruned_reference import apply_decisions
from vit2trt.models.reference import ReferenceRecord, build_model
from vit2trt.passes.tcs import kept_channels, token_sample
from vit2trt.passes.toast_schedules import SCHEDULES

from conftest import METHOD_MODELS, method_cases, rel_error, run_onnx, run_onnx_each

runner = CliRunner()




def _reference_outputs(exported, out_dir, x):
    record = ReferenceRecord.load(exported.record_path)
    decisions = json.loads((out_dir / "decisions.json").read_text())
    reference = apply_decisions(build_model(record), decisions)
    with torch.no_grad():
        return reference(torch.from_numpy(x)).numpy(), decisions


TCS_CASES = method_cases("deit_small", "deit_small_distilled", "deit3_layerscale", "gap_no_cls", "dinov2_reg4",
                         "hf_vit")


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("case_id,spec,args", TCS_CASES, ids=[c[0] for c in TCS_CASES])
def test_scwp_and_tcs_match_the_pytorch_reference(tmp_path, export_cache, case_id, spec, args, exporter):
    exported = export_cache(spec, args, exporter)
    options = ConvertOptions(head_sparsity=0.9, fc1_ratios=[0.0, 0.3, 0.5, 0.4], fc2_ratios=[0.0, 0.7, 0.9, 0.8],
                             build=False)
    out = convert(exported.onnx_path, tmp_path / "out", options)
    record = ReferenceRecord.load(exported.record_path)
    c, h, w = record.preprocessing["input_size"]
    x = np.random.default_rng(7).standard_normal((8, c, h, w)).astype(np.float32)
    want, decisions = _reference_outputs(exported, tmp_path / "out", x)
    got = run_onnx(out.onnx_path, x)
    assert rel_error(got, want) <= 1e-4
    # Per-image selection: a batch of 8 equals 8 runs of batch 1.
    single = run_onnx_each(out.onnx_path, x[:8])
    assert rel_error(single, got) <= 1e-5
    g = read_vit(out.onnx_path)
    hidden, dim = g.blocks[1].ffn.hidden, g.embed_dim
    assert g.blocks[1].ffn.fc1.selected_in == kept_channels(dim, 0.3)
    assert g.blocks[2].ffn.fc2.selected_in == kept_channels(hidden, 0.9)
    assert g.blocks[0].ffn.fc1.selected_in is None
    assert [b["index"] for b in decisions["tcs"]["blocks"]] == [1, 2, 3]
    # TCS is real: without it the reference gives other outputs.
    no_tcs = dict(decisions, tcs=None)
    with torch.no_grad():
        plain = apply_decisions(build_model(record), no_tcs)(torch.from_numpy(x)).numpy()
    assert rel_error(plain, want) > 10 * max(rel_error(got, want), 1e-7)


def test_batch_shared_selection_reproduces_the_official_behaviour(tmp_path, export_cache):
    exported = export_cache(*METHOD_MODELS["deit_small"], "dynamo")
    options = ConvertOptions(fc1_ratios=[0.0, 0.3, 0.5, 0.4], fc2_ratios=[0.0, 0.7, 0.9, 0.8], tcs_shared=True,
                             build=False)
    out = convert(exported.onnx_path, tmp_path / "out", options)
    x = np.random.default_rng(8).standard_normal((8, 3, 96, 96)).astype(np.float32)
    want, decisions = _reference_outputs(exported, tmp_path / "out", x)
    assert decisions["tcs"]["settings"]["shared"] is True
    got = run_onnx(out.onnx_path, x)
    assert rel_error(got, want) <= 1e-4
    single = run_onnx_each(out.onnx_path, x[:8])
    assert rel_error(single, got) > 1e-3, "a shared channel set makes an image depend on its batch"


def test_token_sample_is_a_fixed_stride_over_patches():
    sample = token_sample(num_extra=5, num_patches=196)
    assert len(sample) == 3 and all(5 <= i < 201 for i in sample)
    assert sample == token_sample(num_extra=5, num_patches=196)
    assert kept_channels(1536, 0.9) == 153 and kept_channels(384, 0.3) == 268


@pytest.mark.parametrize("target", list(SCHEDULES["deit_tiny_patch16_224"]["targets"]))
def test_published_schedules_reach_their_flops(tmp_path, export_cache, target):
    exported = export_cache("timm:deit_tiny_patch16_224", {}, "torchscript")
    out = convert(exported.onnx_path, tmp_path / "out", ConvertOptions(target_gflops=float(target), build=False))
    official = SCHEDULES["deit_tiny_patch16_224"]["targets"][target]["computed_gflops"]
    assert out.flops_after / 1e9 == pytest.approx(official, rel=0.01)
    assert read_vit(out.onnx_path).flops.total == out.flops_after
    assert out.decisions["settings"]["schedule"] == f"deit_tiny_patch16_224@{target}"


def test_budget_solver_meets_a_target_on_an_uncovered_model(tmp_path, export_cache):
    exported = export_cache("timm:vit_small_patch16_224", {"depth": 2}, "torchscript")
    full = read_vit(exported.onnx_path).flops.total / 1e9
    target = round(full * 0.75, 3)  # block 0 stays whole, so a 2-block model cannot go far below 64%
    out = convert(exported.onnx_path, tmp_path / "out", ConvertOptions(target_gflops=target, build=False))
    assert out.flops_after / 1e9 <= target
    assert any("budget solver" in n for n in out.notes)


@pytest.mark.parametrize("argv,needle", [
    (["--target-gflops", "0.3"], "publishes no 0.3 GFLOPs schedule"),
    (["--fc1", "0,0.3"], "needs 12"),
    (["--fc1", "0,0,0,0,0,0,0,0,0,0,0,1.2"], "in [0, 1)"),
    (["--fc2", "a,b"], "comma-separated numbers"),
    (["--target-gflops", "0.9", "--fc1", "0,0,0,0,0,0,0,0,0,0,0,0.3"], "either"),
])
def test_bad_tcs_requests_write_nothing(tmp_path, export_cache, argv, needle):
    exported = export_cache("timm:deit_tiny_patch16_224", {}, "torchscript")
    result = runner.invoke(app, ["convert", str(exported.onnx_path), "--out", str(tmp_path / "out"), "--no-build", *argv])
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_unreachable_budget_is_refused(tmp_path, export_cache):
    exported = export_cache("timm:vit_small_patch16_224", {"depth": 2}, "torchscript")
    result = runner.invoke(app, ["convert", str(exported.onnx_path), "--out", str(tmp_path / "out"), "--no-build",
                                 "--target-gflops", "0.01"])
    assert result.exit_code == 2 and "no ToaSt setting reaches" in " ".join(result.output.split())


@pytest.mark.skipif(tensorrt_backend()[1] is None, reason="no tensorrt or tensorrt_rtx module")
@pytest.mark.parametrize("shared", [False, True])
def test_tcs_graphs_build_with_tensorrt(tmp_path, export_cache, shared):
    exported = export_cache(*METHOD_MODELS["deit_small"], "dynamo")
    argv = ["convert", str(exported.onnx_path), "--out", str(tmp_path / "out"), "--head-sparsity", "0.9",
            "--fc1", "0,0.3,0.5,0.4", "--fc2", "0,0.7,0.9,0.8"] + (["--tcs-shared"] if shared else [])
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.engine").stat().st_size > 100_000
