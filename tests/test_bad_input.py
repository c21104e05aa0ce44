"""Broken or foreign inputs end with exit code 2 and one message naming the problem."""
from __future__ import annotations

import shutil

import pytest
import torch
from typer.testing import CliRunner

from vit2trt.cli import app

runner = CliRunner()


def _inspect(path, *extra):
    return runner.invoke(app, ["inspect", str(path), "--no-build", *extra])


def _assert_clean_failure(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[0].startswith("error:")
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, text


def test_file_that_is_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("these are not the weights you are looking for\n" * 20)
    _assert_clean_failure(_inspect(path), "not a readable ONNX model")


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    _assert_clean_failure(_inspect(tmp_path / "empty.onnx"), "empty")
    _assert_clean_failure(_inspect(tmp_path / "absent.onnx"), "no such file")


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_truncated_file(tmp_path, deit_tiny_ts, fraction):
    data = deit_tiny_ts.onnx_path.read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    result = _inspect(path)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "truncated" in " ".join(result.output.split())


def test_missing_external_data(tmp_path, export_cache):
    result = export_cache("timm:deit_tiny_patch16_224", {"depth": 2, "num_classes": 10}, "dynamo")
    path = tmp_path / "model.onnx"
    shutil.copy(result.onnx_path, path)  # the .data file stays behind
    _assert_clean_failure(_inspect(path), "external data", "model.onnx.data", "not found")


def test_truncated_external_data(tmp_path, export_cache):
    result = export_cache("timm:deit_tiny_patch16_224", {"depth": 2, "num_classes": 10}, "dynamo")
    shutil.copy(result.onnx_path, tmp_path / "model.onnx")
    data = (result.onnx_path.parent / "model.onnx.data").read_bytes()
    (tmp_path / "model.onnx.data").write_bytes(data[: len(data) // 2])
    result = _inspect(tmp_path / "model.onnx")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "truncated" in " ".join(result.output.split()) or "external data" in result.output


def test_resnet_is_not_a_vit(tmp_path):
    import timm

    model = timm.create_model("resnet18", num_classes=10).eval()
    path = tmp_path / "resnet.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    _assert_clean_failure(_inspect(path), "not a Vision Transformer", "no attention", "20 Conv", "0 Softmax")


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("not onnx")
    result = runner.invoke(app, ["--debug", "inspect", str(path), "--no-build"])
    assert result.exit_code != 0
    assert result.exception is not None  # raised instead of a one-line message


def test_cli_exit_code_from_a_real_process(tmp_path):
    """The installed console script, not just the in-process runner, exits with 2."""
    import subprocess
    import sys

    path = tmp_path / "notes.onnx"
    path.write_text("not onnx")
    proc = subprocess.run([sys.executable, "-m", "vit2trt.cli", "inspect", str(path), "--no-build"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("seed", range(6))
def test_corrupted_bytes_never_crash(tmp_path, deit_tiny_ts, seed):
    """Flipped bytes anywhere in the graph: a description (weights hit) or one clean error."""
    import numpy as np

    data = bytearray(deit_tiny_ts.onnx_path.read_bytes())
    rng = np.random.default_rng(seed)
    # Half the flips land in the graph structure (the protobuf's tail holds nodes after weights).
    region = (len(data) - 40_000, len(data)) if seed % 2 else (0, len(data))
    for pos in rng.integers(*region, size=8):
        data[pos] ^= 0xFF
    path = tmp_path / "flipped.onnx"
    path.write_bytes(bytes(data))
    result = _inspect(path)
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert result.output.startswith("error:")


def test_graph_with_a_broken_block_names_the_block(tmp_path, deit_tiny_ts):
    """Turn block 1's FFN residual Add into a Max (valid graph, no residual): the message says so."""
    import onnx

    model = onnx.load(str(deit_tiny_ts.onnx_path))
    residual = next(n for n in model.graph.node if n.name == "/blocks/blocks.1/Add_1")
    residual.op_type = "Max"
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    _assert_clean_failure(_inspect(path), "block 1 FFN", "no residual Add", "Found")


def test_attention_ops_a_vit_does_not_have_are_refused(tmp_path):
    """Opset 23 turns SDPA into one ONNX Attention op, which is read; a causal one, or ONNX Runtime's
    contrib attention ops (what its graph optimizer writes), are refused with what to do."""
    import onnx

    from vit2trt.converter.deploy.export import export_model

    result = export_model("timm:deit_tiny_patch16_224", tmp_path / "m.onnx", exporter="dynamo", opset=23,
                          model_args={"depth": 1, "num_classes": 10})
    assert _inspect(result.onnx_path).exit_code == 0
    model = onnx.load(str(result.onnx_path))
    attention = next(n for n in model.graph.node if n.op_type == "Attention")
    attention.attribute.append(onnx.helper.make_attribute("is_causal", 1))
    for a in list(attention.attribute):
        if a.name == "is_causal" and a.i == 0:
            attention.attribute.remove(a)
    onnx.save(model, str(tmp_path / "causal.onnx"))
    _assert_clean_failure(_inspect(tmp_path / "causal.onnx"), "causal", "not a ViT's")
    attention.op_type, attention.domain = "MultiHeadAttention", "com.microsoft"
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(tmp_path / "contrib.onnx"))
    _assert_clean_failure(_inspect(tmp_path / "contrib.onnx"), "no attention", "MultiHeadAttention",
                          "without runtime graph optimizations")
