"""`vit2trt tune-thresholds`: AS-ViT thresholds learned alone under a FLOPs budget, on the bundled
digits ViT (really trained, so agreement and accuracy mean something)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.graph import read_vit
from vit2trt.passes.methods.asvit import asvit_flops_model
from vit2trt.converter.deploy.export import export_model
from vit2trt.models.asvit_reference import ASViT
from vit2trt.models.asvit_tuning import SoftASViT, hard_evaluation, tune_thresholds
from vit2trt.models.digits import CHECKPOINT, MODEL_ARGS, MODEL_NAME, compose, load_split
from vit2trt.models.reference import ReferenceRecord, build_model

runner = CliRunner()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    exported = export_model(f"timm:{MODEL_NAME}", folder / "digits_vit.onnx", weights=str(CHECKPOINT),
                            model_args=MODEL_ARGS)
    train, _, _, _ = load_split()
    calib = compose(train[:48], np.random.default_rng(2))
    np.save(folder / "calib.npy", calib)
    model = build_model(ReferenceRecord.load(exported.record_path)).eval()
    return exported, folder, torch.from_numpy(calib), model


def test_sharp_relaxation_is_the_real_asvit(digits):
    """With a near-zero temperature the soft, batched model is the per-image AS-ViT: same logits,
    same FLOPs (the relaxation relaxes nothing else)."""
    exported, _, images, model = digits
    vit = read_vit(exported.onnx_path)
    block_flops, fixed = asvit_flops_model(vit)
    stages, thresholds = [2, 3, 4], [0.001, 0.0015, 0.0012]
    soft = SoftASViT(model, stages, thresholds, block_flops, fixed, tau_fraction=1e-7)
    with torch.no_grad():
        logits, fractions = soft(images[:16])
        hard = ASViT(model, stages, thresholds)(images[:16])
    assert torch.allclose(logits, hard, rtol=1e-4, atol=1e-4 * float(hard.abs().max()))
    teacher = model(images[:16]).argmax(-1)
    hard_flops, _ = hard_evaluation(model, images[:16], stages, thresholds, block_flops, fixed, teacher)
    assert abs(float(fractions.mean()) - hard_flops) < 1e-4
    assert hard_flops < 0.95   # tokens really were dropped, so the comparison means something


def test_tuning_meets_the_budget_and_never_returns_worse(digits):
    exported, _, images, model = digits
    vit = read_vit(exported.onnx_path)
    block_flops, fixed = asvit_flops_model(vit)
    start = [0.0009, 0.0012, 0.0001]
    result = tune_thresholds(model, images, [2, 3, 4], start, block_flops, fixed, 0.6, epochs=3)
    assert result.flops_fraction <= 0.6 + 1e-9
    assert result.flops_fraction > 0.5                    # the budget is used, not overshot
    assert result.agreement >= result.start_agreement
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    assert all(t > 0 for t in result.thresholds)


def test_cli_writes_thresholds_that_convert_reads(digits, tmp_path):
    exported, folder, _, _ = digits
    out = tmp_path / "th.json"
    args = ["tune-thresholds", str(exported.onnx_path), "--calib", str(folder / "calib.npy"), "--epochs", "1",
            "--limit", "24", "--target-flops", "0.7", "--out", str(out)]   # the plumbing: 24 of the 48 inputs
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["stages"] == [2, 3, 4] and written["flops_fraction"] <= 0.7
    again = tmp_path / "again.json"
    assert runner.invoke(app, args[:-1] + [str(again)]).exit_code == 0
    assert json.loads(again.read_text())["thresholds"] == written["thresholds"]   # deterministic
    converted = runner.invoke(app, ["convert", str(exported.onnx_path), "--method", "asvit", "--thresholds", str(out),
                                    "--out", str(tmp_path / "asvit"), "--engine", "none"])
    assert converted.exit_code == 0, converted.output
    decisions = json.loads((tmp_path / "asvit" / "decisions.json").read_text())
    assert decisions["asvit"]["thresholds"] == written["thresholds"]


@pytest.mark.parametrize("extra, message", [
    (["--target-flops", "1.5"], "--target-flops"),
    (["--stages", "2,9"], "stage"),
    (["--target-flops", "0.05"], "cannot be met"),
    (["--epochs", "0"], "--epochs"),
])
def test_bad_settings_exit_2_and_write_nothing(digits, tmp_path, extra, message):
    exported, folder, _, _ = digits
    out = tmp_path / "th.json"
    result = runner.invoke(app, ["tune-thresholds", str(exported.onnx_path), "--calib", str(folder / "calib.npy"),
                                 "--out", str(out), "--epochs", "1", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_a_model_without_its_reference_record_is_refused_with_this_commands_remedy(digits, tmp_path):
    """tune-thresholds has no --thresholds (convert's way around a missing record): its message says to export."""
    exported, folder, _, _ = digits
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(exported.onnx_path.read_bytes())   # the graph without the record beside it
    out = tmp_path / "th.json"
    result = runner.invoke(app, ["tune-thresholds", str(bare), "--calib", str(folder / "calib.npy"),
                                 "--out", str(out), "--epochs", "1"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and text.startswith("error:"), result.output
    assert "`vit2trt export`" in text and "--thresholds" not in text and not out.exists(), text
