"""`vit2trt export`: local weights only, a rebuildable reference, nothing half-written."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.models.reference import ReferenceRecord, build_model

from conftest import run_onnx

runner = CliRunner()
TINY = ["--arg", "depth=2", "--arg", "num_classes=7"]




def _trained_like_weights():
    """A state_dict that differs from any seeded init (so loading it is visible in the outputs)."""
    torch.manual_seed(1234)
    model = timm.create_model("deit_tiny_patch16_224", depth=2, num_classes=7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("fmt", ["pth_model_key", "pth_plain", "safetensors"])
def test_export_with_local_weights_matches_pytorch(tmp_path, fmt):
    source = _trained_like_weights()
    state = source.state_dict()
    if fmt == "safetensors":
        weights = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    else:
        weights = tmp_path / "w.pth"
        torch.save({"model": state, "epoch": 3} if fmt == "pth_model_key" else state, weights)
    out = tmp_path / "out" / "model.onnx"
    result = runner.invoke(app, ["export", "timm:deit_tiny_patch16_224", "--out", str(out),
                                 "--weights", str(weights), *TINY])
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(5).standard_normal((3, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        want = source(torch.from_numpy(x)).numpy()
    got = run_onnx(out, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    record = json.loads((tmp_path / "out" / "model.onnx.reference.json").read_text())
    assert record["weights"] == str(weights.resolve()) and record["seed"] is None
    assert len(record["weights_sha256"]) == 64


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_reference_record_rebuilds_the_exported_model(tmp_path, exporter):
    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", "timm:deit3_small_patch16_224", "--out", str(out), "--seed", "11",
                                 "--exporter", exporter, "--img-size", "112", *TINY])
    assert result.exit_code == 0, result.output
    record = ReferenceRecord.load(ReferenceRecord.path_for(out))
    assert record.seed == 11 and record.kwargs["img_size"] == 112
    assert record.preprocessing["input_size"] == [3, 112, 112]
    assert record.preprocessing["mean"] and record.preprocessing["std"]
    model = build_model(record)
    x = np.random.default_rng(9).standard_normal((4, 3, 112, 112)).astype(np.float32)  # batch 4: dynamic axis
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_onnx(out, x), want, rtol=1e-4, atol=1e-5)
    # A different seed is a different model: the record really decides the weights.
    record.seed = 12
    with torch.no_grad():
        other = build_model(record)(torch.from_numpy(x)).numpy()
    assert np.abs(other - want).max() > 1e-3


def test_same_seed_gives_identical_torchscript_export(tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name / "model.onnx"
        assert runner.invoke(app, ["export", "timm:vit_tiny_patch16_224", "--out", str(out), *TINY]).exit_code == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def _assert_fails_cleanly(result, out_dir, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, text
    assert not out_dir.exists() or not any(out_dir.iterdir()), "nothing may be left half-written"


def test_hub_weights_are_refused_with_a_pointer_to_weights(tmp_path):
    out_dir = tmp_path / "out"
    result = runner.invoke(app, ["export", "timm:deit_small_patch16_224.fb_in1k", "--out", str(out_dir / "m.onnx")])
    _assert_fails_cleanly(result, out_dir, "never downloads", "--weights")


def test_pickled_objects_are_not_unpickled(tmp_path):
    import fractions  # any class outside the weights-only allowlist stands for arbitrary code

    weights = tmp_path / "evil.pth"
    torch.save({"model": {"x": fractions.Fraction(1, 3)}}, weights)
    out_dir = tmp_path / "out"
    result = runner.invoke(app, ["export", "timm:deit_tiny_patch16_224", "--out", str(out_dir / "m.onnx"),
                                 "--weights", str(weights), *TINY])
    _assert_fails_cleanly(result, out_dir, "weights-only")


def test_weights_that_do_not_fit(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", depth=3, num_classes=7).state_dict(), weights)
    out_dir = tmp_path / "out"
    result = runner.invoke(app, ["export", "timm:deit_tiny_patch16_224", "--out", str(out_dir / "m.onnx"),
                                 "--weights", str(weights), *TINY])
    _assert_fails_cleanly(result, out_dir, "do not fit", "blocks.2")


@pytest.mark.parametrize("argv,needle", [
    (["timm:no_such_vit_model"], "timm has no model"),
    (["timm:deit_tiny_patch16_224", "--arg", "not_an_argument=3"], "does not accept"),
    (["timm:deit_tiny_patch16_224", "--exporter", "tracing"], "unknown exporter"),
    (["resnet50"], "not understood"),
    (["timm:deit_tiny_patch16_224", "--arg", "depth"], "KEY=VALUE"),
])
def test_bad_export_requests(tmp_path, argv, needle):
    out_dir = tmp_path / "out"
    result = runner.invoke(app, ["export", *argv, "--out", str(out_dir / "m.onnx")])
    _assert_fails_cleanly(result, out_dir, needle)


def test_large_torchscript_graphs_use_one_external_data_file(tmp_path, monkeypatch):
    """Above 2 GB (threshold lowered here) the graph keeps its weights in model.onnx.data."""
    from vit2trt.converter.deploy import export as export_module
    from vit2trt.converter.graph import read_vit

    monkeypatch.setattr(export_module, "_TWO_GB", 1)
    out = tmp_path / "out" / "model.onnx"
    result = export_module.export_model("timm:vit_tiny_patch16_224", out, model_args={"depth": 2})
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["model.onnx", "model.onnx.data", "model.onnx.reference.json"]
    assert out.stat().st_size < 200_000 < (out.parent / "model.onnx.data").stat().st_size
    assert result.max_abs_diff < 1e-4
    assert read_vit(out).depth == 2
