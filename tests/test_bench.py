"""`vit2trt bench`: side-by-side latency rows in report.json, and bad requests. No speed is asserted:
speed claims come from benchmarks/, not from unit tests (tests/test_speedup.py proves the marking
of a figure on a fake machine)."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from vit2trt.cli import app


@pytest.fixture
def converted(tmp_path, deit_tiny_ts):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(deit_tiny_ts.onnx_path), "--method", "tome", "--r", "20",
                                      "--out", str(out), "--no-build"])
    assert result.exit_code == 0, result.output
    return out


def test_bench_times_both_models_on_every_backend(converted):
    result = CliRunner().invoke(app, ["bench", str(converted), "--repeats", "3", "--batch", "1,2", "--time-cap", "1",
                                      "--backend", "ort", "--backend", "torch-cpu"])
    assert result.exit_code == 0, result.output
    latency = json.loads((converted / "report.json").read_text())["latency"]
    assert latency["batches"] == [1, 2] and set(latency["backends"]) == {"ort", "torch-cpu"}
    for rows in latency["backends"].values():
        assert [(r["variant"], r["batch"]) for r in rows] == [
            ("original", 1), ("compressed", 1), ("original", 2), ("compressed", 2)]
        for row in rows:
            assert 3 <= row["runs"] <= 3 * 8 and 0 < row["median_ms"] <= row["p90_ms"]
            if row["variant"] == "original":
                assert row["speedup"] == 1.0 and row["rounds"] == 0   # the reference, not measured
            else:   # the paired figure: its interval, whether it settled, and the pairs behind it
                assert row["speedup_low"] <= row["speedup"] <= row["speedup_high"] and row["rounds"] == row["runs"]
                assert isinstance(row["stable"], bool) and isinstance(row["exceeds_flops"], bool)
    assert "agreement" in json.loads((converted / "report.json").read_text())   # convert's record kept


@pytest.mark.parametrize("argv,needle", [
    (["--original", "/nonexistent/model.onnx"], "is not there"),
    (["--backend", "tpu"], "--backend must be one of"),
    (["--batch", "1,x"], "comma-separated sizes"),
    (["--batch", "0"], "at least 1"),
])
def test_bad_bench_requests_exit_2(converted, argv, needle):
    result = CliRunner().invoke(app, ["bench", str(converted), "--repeats", "1", *argv])
    assert result.exit_code == 2 and needle in " ".join(result.output.split()), result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_torch_cuda_without_a_gpu_says_so(converted):
    result = CliRunner().invoke(app, ["bench", str(converted), "--repeats", "1", "--backend", "torch-cuda"])
    assert result.exit_code == 2 and "needs a CUDA GPU" in " ".join(result.output.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_engine_timing_without_a_gpu_says_so(tmp_path, deit_tiny_ts):
    out = tmp_path / "built"
    result = CliRunner().invoke(app, ["convert", str(deit_tiny_ts.onnx_path), "--method", "tome", "--out", str(out)])
    assert result.exit_code == 0, result.output
    if not (out / "model.engine").exists():
        pytest.skip("no TensorRT module built an engine")
    result = CliRunner().invoke(app, ["bench", str(out), "--repeats", "1", "--backend", "tensorrt"])
    assert result.exit_code == 2 and "needs a CUDA GPU" in " ".join(result.output.split())
    assert not (out / ".original.engine").exists()
