"""Engine builds: backend choice, optimization profile, precision, the build record, failures."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter import convert as convert_module
from vit2trt.converter.deploy import engine
from vit2trt.converter.graph.vit_graph import BuildReport

from conftest import rel_error, run_onnx

needs_rtx = pytest.mark.skipif(engine.tensorrt_backend("tensorrt_rtx")[1] is None, reason="no tensorrt_rtx module")


def _convert(tmp_path, model, *argv):
    return CliRunner().invoke(app, ["convert", str(model), "--method", "tome", "--r", "8",
                                    "--out", str(tmp_path / "out"), *argv])


def test_auto_prefers_full_tensorrt_only_with_a_gpu(monkeypatch):
    fake = {"tensorrt": types.SimpleNamespace(Builder=object), "tensorrt_rtx": types.SimpleNamespace(Builder=object)}
    monkeypatch.setattr(engine, "_import", lambda name: fake.get(name))
    monkeypatch.setattr(engine, "_cuda_gpu_present", lambda: True)
    assert engine.resolve_backend("auto")[0] == "tensorrt"
    monkeypatch.setattr(engine, "_cuda_gpu_present", lambda: False)
    assert engine.resolve_backend("auto")[0] == "tensorrt_rtx"
    fake.pop("tensorrt_rtx")
    name, module, notice = engine.resolve_backend("auto")
    assert name == "none" and module is None and "tensorrt-rtx" in notice
    assert engine.resolve_backend("tensorrt")[0] == "tensorrt"   # asked for by name: no GPU check here


@needs_rtx
def test_profile_precision_and_build_record(tmp_path, deit_tiny_ts):
    result = _convert(tmp_path, deit_tiny_ts.onnx_path, "--batch", "1,4,16", "--precision", "fp16")
    assert result.exit_code == 0, result.output
    how = json.loads((tmp_path / "out" / "model.engine.json").read_text())
    assert how["module"] == "tensorrt_rtx" and how["precision"] == "fp16" and how["strongly_typed"]
    shape = how["profile"][next(iter(how["profile"]))]
    assert [shape["min"][0], shape["opt"][0], shape["max"][0]] == [1, 4, 16] and shape["min"][1:] == [3, 224, 224]
    assert (tmp_path / "out" / "model.engine").stat().st_size > 1e6
    report = json.loads((tmp_path / "out" / "report.json").read_text())["build"]
    types_seen = {layer["type"] for layer in report["layers"]}
    assert "MATRIX_MULTIPLY" in types_seen and len(report["layers"]) > 50


def test_fp16_graph_stays_close_to_fp32(tmp_path, deit_tiny_ts):
    path, notes = engine._graph_in_precision(deit_tiny_ts.onnx_path, "fp16", tmp_path)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    want, got = run_onnx(deit_tiny_ts.onnx_path, x), run_onnx(path, x)
    assert got.dtype == np.float32 and 0 < rel_error(got, want) < 2e-2
    assert notes and "fp16" in notes[0]


@pytest.mark.parametrize("argv,needle", [
    (["--batch", "4,2,8"], "1 <= min <= opt <= max"),
    (["--batch", "1,8"], "min,opt,max"),
    (["--precision", "int3"], "--precision must be one of"),
    (["--engine", "cuda"], "--engine must be one of"),
])
def test_bad_build_requests_write_nothing(tmp_path, deit_tiny_ts, argv, needle):
    result = _convert(tmp_path, deit_tiny_ts.onnx_path, *argv)
    assert result.exit_code == 2 and needle in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(engine.tensorrt_backend("tensorrt")[1] is not None, reason="full tensorrt is installed")
def test_missing_module_asked_for_by_name_writes_nothing(tmp_path, deit_tiny_ts):
    result = _convert(tmp_path, deit_tiny_ts.onnx_path, "--engine", "tensorrt")
    assert result.exit_code == 2 and "tensorrt module is not installed" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


@needs_rtx
def test_bf16_on_tensorrt_rtx_is_refused_before_work(tmp_path, deit_tiny_ts, monkeypatch):
    monkeypatch.setattr(engine, "_cuda_gpu_present", lambda: False)
    result = _convert(tmp_path, deit_tiny_ts.onnx_path, "--engine", "tensorrt-rtx", "--precision", "bf16")
    assert result.exit_code == 2 and "bf16 needs full TensorRT" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_a_failed_build_keeps_the_onnx_and_says_what_failed(tmp_path, deit_tiny_ts, monkeypatch):
    failed = BuildReport("tensorrt_rtx", "failed", 0.1, "ONNX parser: unsupported (operator NoSuchOp, name n1)")
    monkeypatch.setattr(engine, "build_engine", lambda *a, **k: failed)   # where saving the output builds
    monkeypatch.setattr(convert_module, "check_build", lambda options: "tensorrt_rtx")
    result = _convert(tmp_path, deit_tiny_ts.onnx_path)
    assert result.exit_code == 1 and "NoSuchOp" in result.output
    out = tmp_path / "out"
    assert (out / "model.onnx").is_file() and not (out / "model.engine").exists()
    assert json.loads((out / "report.json").read_text())["build"]["status"] == "failed"
