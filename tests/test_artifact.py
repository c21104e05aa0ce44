"""The output folder as a type: compress works in memory, save/open round-trip every file exactly, the
PyTorch model of an artifact computes what its graph computes, and a failed save leaves the old folder."""
from __future__ import annotations

import os

import numpy as np
import pytest

from vit2trt.converter import artifact as artifact_module
from vit2trt.converter.artifact import COMPENSATION_FILE, DECISIONS_FILE, MODEL_FILE, RECORD_FILE, Artifact
from vit2trt.converter.convert import ConvertOptions, Original, compress
from vit2trt.converter.runtime import run_batched, session_runner, torch_batched

from conftest import rel_error


def _files(root) -> set:
    return {os.path.join(d, f) for d, _, names in os.walk(root) for f in names}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, export_cache):
    """A compensated ToaSt compression of a 2-block DeiT-Tiny, made in memory from an array of images."""
    exported = export_cache("timm:deit_tiny_patch16_224", {"depth": 2, "num_classes": 10}, "torchscript")
    x = np.random.default_rng(3).standard_normal((12, 3, 224, 224)).astype(np.float32)
    before = _files(exported.onnx_path.parent)
    cwd, previous = tmp_path_factory.mktemp("cwd"), os.getcwd()
    os.chdir(cwd)
    try:
        source = Original.read(exported.onnx_path)
        result = compress(source, ConvertOptions(method="toast", head_sparsity=0.5, compensate=True, calib=x,
                                                 fit_limit=12, build=False))
    finally:
        os.chdir(previous)
    assert _files(exported.onnx_path.parent) == before and not _files(cwd)   # nothing written anywhere
    return source, result, x


def test_compress_returns_the_whole_result_in_memory(compressed):
    source, result, _ = compressed
    assert result.folder is None and result.compensation and result.record == source.record
    assert result.decisions["compensation"]["tensors"] == sorted(result.compensation)
    assert result.decisions["flops"]["after"] < result.decisions["flops"]["before"]
    assert source.model.graph.node and len(result.model.graph.node) > 0
    assert result.model.SerializeToString() != source.model.SerializeToString()   # the caller's graph is untouched


def test_save_and_open_round_trip_and_the_torch_model_equals_the_graph(compressed, tmp_path):
    _, result, x = compressed
    result.save(tmp_path / "out")
    for name in (MODEL_FILE, DECISIONS_FILE, COMPENSATION_FILE, RECORD_FILE, "report.json", "report.md"):
        assert (tmp_path / "out" / name).is_file(), name
    opened = Artifact.open(tmp_path / "out")
    assert opened.decisions == result.decisions and opened.record == result.record
    assert sorted(opened.compensation) == sorted(result.compensation)
    assert all(np.array_equal(opened.compensation[k], v) for k, v in result.compensation.items())
    assert opened.model.SerializeToString() == result.model.SerializeToString()
    graph = run_batched(session_runner(opened.session()), x, 4)
    assert rel_error(graph, run_batched(session_runner(result.session()), x, 4)) == 0.0
    # The compensated PyTorch model, from memory and from disk, computes what the graph computes.
    for model in (result.torch_model(), opened.torch_model()):
        assert rel_error(graph, torch_batched(model.eval(), x, 4)) <= 1e-4


def test_a_failed_save_leaves_the_old_folder(compressed, tmp_path, monkeypatch):
    _, result, _ = compressed
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(Exception, match="not empty"):
        result.save(tmp_path / "out")

    def broken(folder):
        raise OSError("disk full")

    monkeypatch.setattr("vit2trt.converter.planning.report.render_report", broken)
    with pytest.raises(OSError, match="disk full"):
        result.save(tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]   # no staging left behind
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_open_names_what_is_missing(compressed, tmp_path):
    _, result, _ = compressed
    with pytest.raises(Exception, match="holds no model.onnx"):
        Artifact.open(tmp_path)
    result.save(tmp_path / "out")
    (tmp_path / "out" / COMPENSATION_FILE).unlink()
    with pytest.raises(Exception, match="compensation.safetensors, which is missing"):
        Artifact.open(tmp_path / "out")
    assert artifact_module.read_json(tmp_path / "nothing.json") == {}


def test_graphs_beyond_the_protobuf_limit_travel_as_external_data(compressed, tmp_path, monkeypatch):
    """With the 2 GB limit lowered, every in-memory path (session, observed shapes, save) takes the
    external-data route and computes what the one-message route computes."""
    from vit2trt.converter import runtime
    from vit2trt.converter.graph import shapes
    from vit2trt.converter.artifact import MODEL_DATA_FILE

    _, result, x = compressed
    model = result.model
    assert runtime.serialized(model) == model.SerializeToString()
    want = run_batched(session_runner(runtime.ort_session(model)), x[:2], 2)
    names = [n.output[0] for n in model.graph.node if n.op_type == "MatMul"][:3]
    want_shapes = shapes.observe_shapes(model, names, (1, 3, 224, 224))[0]
    monkeypatch.setattr(runtime, "_PROTOBUF_LIMIT", 4096)
    shapes._OBSERVED.clear()
    assert runtime.serialized(model) is None
    before = [(t.name, t.raw_data) for t in model.graph.initializer]
    assert rel_error(run_batched(session_runner(runtime.ort_session(model)), x[:2], 2), want) == 0.0
    assert [(t.name, t.raw_data) for t in model.graph.initializer] == before   # the caller's weights stay in place
    assert shapes.observe_shapes(model, names, (1, 3, 224, 224))[0] == want_shapes
    result.save(tmp_path / "big")
    assert (tmp_path / "big" / MODEL_DATA_FILE).stat().st_size > 4096
    opened = Artifact.open(tmp_path / "big")
    assert rel_error(run_batched(session_runner(opened.session()), x[:2], 2), want) == 0.0
