"""`vit2trt inspect`: the description as JSON and as tables, and the TensorRT build check."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.deploy.engine import build_engine, tensorrt_backend
from vit2trt.converter.graph import read_vit

runner = CliRunner()
needs_tensorrt = pytest.mark.skipif(tensorrt_backend()[1] is None, reason="no tensorrt or tensorrt_rtx module")


def test_json_output_is_the_description(deit_tiny_ts):
    result = runner.invoke(app, ["inspect", str(deit_tiny_ts.onnx_path), "--json", "--no-build"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    graph = read_vit(deit_tiny_ts.onnx_path)
    assert data["depth"] == 2 and data["num_tokens"] == 197 and data["embed_dim"] == 192
    assert data["blocks"][1]["attn"]["heads"] == 3
    assert data["blocks"][0]["attn"]["qkv"]["node"] == graph.blocks[0].attn.qkv.node
    assert data["flops"]["total"] == graph.flops.total
    assert data["blocks"][0]["flops"]["total"] == graph.blocks[0].flops.total
    assert data["build"] is None


def test_human_output_names_every_part(deit_tiny_ts):
    result = runner.invoke(app, ["inspect", str(deit_tiny_ts.onnx_path), "--no-build"])
    assert result.exit_code == 0, result.output
    for needle in ("16x16 -> 14x14 = 196 tokens", "class x1 (cls_token)", "2 blocks", "fused", "10 classes"):
        assert needle in result.output


@needs_tensorrt
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_tensorrt_builds_exported_graphs(export_cache, tmp_path, exporter):
    result = export_cache("timm:deit_small_distilled_patch16_224", {"depth": 2}, exporter)
    engine = tmp_path / "model.engine"
    report = build_engine(result.onnx_path, engine_path=engine, max_batch=4)
    assert report.status == "built", report.message
    assert engine.stat().st_size > 1_000_000  # the weights are in the engine


@needs_tensorrt
def test_inspect_reports_the_build(deit_tiny_ts):
    result = runner.invoke(app, ["inspect", str(deit_tiny_ts.onnx_path), "--json"])
    assert result.exit_code == 0, result.output
    build = json.loads(result.output)["build"]
    assert build["status"] == "built" and build["backend"] in ("tensorrt", "tensorrt_rtx")


@needs_tensorrt
def test_build_failure_is_reported_not_raised(tmp_path):
    """A graph the parser rejects is a 'failed' report with the parser's words."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    report = build_engine(path)
    assert report.status == "failed" and "NoSuchOp" in report.message
