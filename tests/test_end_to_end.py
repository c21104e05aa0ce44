"""End to end on a small model, every method: convert -> engine (TensorRT-RTX on CPU where no GPU)
-> validate against the PyTorch reference -> bench -> report."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.deploy.engine import tensorrt_backend

METHODS = {
    "toast": ["--head-sparsity", "0.5"],
    "tome": ["--r", "16"],
    "asvit": ["--stages", "1", "--thresholds", "0.0052"],
    "asvit-bounded": ["--stages", "1", "--thresholds", "0.0052", "--asvit-form", "bounded"],
    "cait": ["--stages", "1"],
}


@pytest.mark.skipif(tensorrt_backend()[1] is None, reason="no tensorrt or tensorrt_rtx module")
@pytest.mark.parametrize("method", list(METHODS))
def test_convert_build_validate_bench_report(tmp_path, deit_tiny_ts, method):
    runner = CliRunner()
    out = tmp_path / "out"
    x = np.random.default_rng(7).standard_normal((6, 3, 224, 224)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = runner.invoke(app, ["convert", str(deit_tiny_ts.onnx_path), "--method", method.split("-")[0],
                                 *METHODS[method], "--out", str(out), "--batch", "1,2,4"])
    assert result.exit_code == 0, result.output
    build = json.loads((out / "report.json").read_text())["build"]
    assert build["status"] == "built", build["message"]
    assert (out / "model.engine").stat().st_size > 1e6
    assert json.loads((out / "model.engine.json").read_text())["profile"]["input"]["max"][0] == 4
    result = runner.invoke(app, ["validate", str(out), "--images", str(tmp_path / "x.npy"), "--min-cosine", "-1"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["bench", str(out), "--repeats", "2", "--batch", "1"]).exit_code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["validation"]["surgery_error"] <= 1e-4 and report["validation"]["batch_dependence"] <= 1e-5
    if method == "asvit-bounded":   # masks tokens out, keeps every shape: same FLOPs, same outputs as dynamic
        assert report["flops"]["after"] == report["flops"]["before"]
    else:
        assert report["flops"]["after"] < report["flops"]["before"]
    assert {"report.md", "report.html", "report.png"} <= {p.name for p in out.iterdir()}
    # A threshold the compressed model cannot meet fails the run.
    result = runner.invoke(app, ["validate", str(out), "--images", str(tmp_path / "x.npy"),
                                 "--min-cosine", "1.000001"])
    assert result.exit_code == 1
