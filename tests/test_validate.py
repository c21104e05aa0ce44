"""`vit2trt validate`: numbers recomputed independently, thresholds, and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.measure.calibration import load_calibration
from vit2trt.models.reference import ReferenceRecord, build_model

from conftest import run_onnx


@pytest.fixture
def converted(tmp_path, deit_tiny_ts):
    """A CAIT-compressed 2-block DeiT-Tiny (10 classes), 12 photos-to-be and their labels."""
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(deit_tiny_ts.onnx_path), "--method", "cait", "--stages", "1",
                                      "--channel-ratio", "0.5", "--out", str(out), "--no-build"])
    assert result.exit_code == 0, result.output
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    labels = {}
    for i in range(12):
        pixels = rng.integers(0, 256, (150 + 7 * i, 200, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"img{i:02d}.png")
        labels[f"img{i:02d}.png"] = int(rng.integers(0, 10))
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    return out, images, tmp_path / "labels.json", deit_tiny_ts


def _invoke(*argv):
    return CliRunner().invoke(app, ["validate", *map(str, argv)])


def test_validation_numbers_match_an_independent_run(converted):
    out, images, labels, exported = converted
    result = _invoke(out, "--images", images, "--labels", labels, "--batch", "5")
    assert result.exit_code == 0, result.output
    v = json.loads((out / "report.json").read_text())["validation"]
    record = ReferenceRecord.load(exported.record_path)
    x = load_calibration(images, tuple(record.preprocessing["input_size"]), record.preprocessing)
    with torch.no_grad():
        want = build_model(record)(torch.from_numpy(x)).numpy()
    got = run_onnx(out / "model.onnx", x)
    truth = np.array([json.loads(labels.read_text())[f"img{i:02d}.png"] for i in range(12)])
    assert v["images"] == 12
    assert v["top1_agreement"] == pytest.approx(np.mean(want.argmax(1) == got.argmax(1)))
    assert v["max_abs_error"] == pytest.approx(np.abs(got - want).max(), rel=1e-3)
    assert v["max_abs_error"] > 1e-3     # CAIT without fine-tuning really changes the logits
    assert v["accuracy"]["reference_top1"] == pytest.approx(np.mean(want.argmax(1) == truth))
    assert v["accuracy"]["compressed_top1"] == pytest.approx(np.mean(got.argmax(1) == truth))
    assert v["batch_dependence"] <= 1e-5
    assert v["surgery_error"] <= 1e-4      # the graph computes what PyTorch computes when compressed alike
    assert -1 <= v["cosine_min"] <= v["cosine_mean"] <= 1


def test_missed_thresholds_fail_with_exit_code_1(converted):
    out, images, labels, _ = converted
    result = _invoke(out, "--images", images, "--min-agreement", "1.01")
    assert result.exit_code == 1 and "top-1 agreement" in result.output
    assert json.loads((out / "report.json").read_text())["validation"]["failures"]
    result = _invoke(out, "--images", images, "--labels", labels, "--max-accuracy-drop", "-1")
    assert result.exit_code == 1 and "accuracy drop" in result.output
    result = _invoke(out, "--images", images, "--min-cosine", "-1", "--min-agreement", "0")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["validation"]["failures"] == []


def test_bad_validation_requests_exit_2(converted, tmp_path):
    out, images, labels, _ = converted
    (tmp_path / "partial.json").write_text(json.dumps({"img00.png": 1}))
    (tmp_path / "broken.json").write_text("{not json")
    cases = [
        ((tmp_path / "nowhere", "--images", images), "no model.onnx"),
        ((out, "--images", images, "--reference", tmp_path / "missing.json"), "missing.json: no such file"),
        ((out, "--images", images, "--labels", tmp_path / "partial.json"), "no label for 11"),
        ((out, "--images", images, "--labels", tmp_path / "broken.json"), "expected JSON"),
        ((out, "--images", images, "--max-accuracy-drop", "0.1"), "needs --labels"),
        ((out, "--images", tmp_path / "empty_dir_missing"), "no such file"),
    ]
    for argv, needle in cases:
        result = _invoke(*argv)
        assert result.exit_code == 2 and needle in " ".join(result.output.split()), (argv, result.output)


@pytest.mark.parametrize("argv", [
    ["--method", "toast", "--head-sparsity", "0.5"],
    ["--method", "tome", "--r", "20"],
    ["--method", "asvit", "--stages", "1", "--thresholds", "0.0052"],
    ["--method", "cait", "--stages", "1", "--channel-ratio", "0.5"],
], ids=["toast", "tome", "asvit", "cait"])
def test_every_method_matches_its_compressed_pytorch_reference(tmp_path, deit_tiny_ts, argv):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(deit_tiny_ts.onnx_path), *argv, "--out", str(out),
                                      "--no-build"])
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(3).standard_normal((6, 3, 224, 224)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert _invoke(out, "--images", tmp_path / "x.npy").exit_code == 0
    v = json.loads((out / "report.json").read_text())["validation"]
    assert v["surgery_error"] <= 1e-4 and v["max_abs_error"] > 10 * v["surgery_error"] * np.abs(
        run_onnx(out / "model.onnx", x)).max()
