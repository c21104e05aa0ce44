"""CAIT (consistent channel pruning + asymmetric merging of neighbouring tokens) in native ONNX:
the same tokens and channels as the PyTorch reference, per image, buildable everywhere."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import timm
import torch
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.deploy.engine import build_engine, tensorrt_backend
from vit2trt.converter.deploy.export import export_model
from vit2trt.converter.graph import describe_vit, read_vit
from vit2trt.converter.graph.loading import load_onnx
from vit2trt.errors import Vit2TrtError
from vit2trt.models.cait_reference import CAITViT, merge_neighbours
from vit2trt.models.reference import ReferenceRecord, build_model
from vit2trt.passes.atme import RESTORED_OUTPUT, apply_atme, plan_atme
from vit2trt.passes.cdcp import cdcp, cdcp_keep

from conftest import METHOD_MODELS, rel_error, with_constant_mask

CASES = [   # id, spec, args, stages, channel ratio (the shared method models; dinov2's grid is 7x7, odd)
    ("deit_small", *METHOD_MODELS["deit_small"], [1, 2], 0.25),
    ("distilled", *METHOD_MODELS["deit_small_distilled"], [1, 2], 0.5),
    ("registers_odd_grid", *METHOD_MODELS["dinov2_reg4"], [1, 2], 0.25),
    ("gap_no_cls", *METHOD_MODELS["gap_no_cls"], [1, 2, 3], 0.0),
]


def _run_all(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _cait(model, ratio, stages, restore=True):
    vit = describe_vit(model)
    decisions = None
    if ratio:
        result, keeps = cdcp(model, vit, ratio)
        model, vit = result.model, describe_vit(result.model)
        decisions = {"blocks": [k.to_dict() for k in keeps]}
    return apply_atme(model, vit, stages, restore_grid=restore), decisions


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("case_id,spec,args,stages,ratio", CASES + [
    ("hf_vit", *METHOD_MODELS["hf_vit"], [1, 2], 0.25)],
    ids=[c[0] for c in CASES] + ["hf_vit"])
def test_cait_matches_the_pytorch_reference(tmp_path, export_cache, case_id, spec, args, stages, ratio, exporter):
    exported = export_cache(spec, args, exporter)
    model = load_onnx(exported.onnx_path)
    if any(b.attn.mask_inputs for b in describe_vit(model).blocks):   # HF dynamo: refused (tested below)
        pytest.skip("graph adds a fixed-size attention mask")
    result, decisions = _cait(model, ratio, stages)
    path = tmp_path / "cait.onnx"
    onnx.save(result.model, str(path))
    record = ReferenceRecord.load(exported.record_path)
    c, h, w = record.preprocessing["input_size"]
    x = np.random.default_rng(5).standard_normal((8, c, h, w)).astype(np.float32)
    reference = CAITViT(build_model(record), result.report["stages"], result.report["axes"], decisions)
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    got, restored = _run_all(path, x)
    assert rel_error(got, want) <= 1e-4
    assert rel_error(restored, reference.restored.numpy()) <= 1e-4
    assert restored.shape[1] == describe_vit(model).num_tokens
    single = np.concatenate([_run_all(path, x[i:i + 1])[0] for i in range(8)])
    assert rel_error(single, got) <= 1e-5
    # The graph really runs on fewer tokens and narrower heads.
    g = read_vit(path)
    assert [b.tokens for b in g.blocks] == result.report["tokens"]
    assert result.report["tokens"][-1] < result.report["tokens"][0]
    if ratio:
        assert all(b.attn.head_dim_qk == len(decisions["blocks"][i]["qk_keep"][0]) for i, b in enumerate(g.blocks))
    # Merging changes the result: the uncompressed reference gives other outputs.
    with torch.no_grad():
        plain = build_model(record)(torch.from_numpy(x)).numpy()
    assert rel_error(plain, want) > 10 * max(rel_error(got, want), 1e-7)


def test_merge_is_weighted_by_attention_and_keeps_the_layout():
    # Two rows of four tokens after one extra token; weights favour the right token of each pair.
    x = torch.arange(9 * 1, dtype=torch.float32).reshape(1, 9, 1)
    importance = torch.tensor([[0.5, 1, 3, 1, 3, 1, 1, 0, 4]])
    sizes = torch.ones(9)
    merged, new_sizes, grid = merge_neighbours(x, importance, sizes, 1, (2, 4), "width")
    assert grid == (2, 2) and new_sizes.tolist() == [1, 2, 2, 2, 2]
    expected = [0, (1 * 1 + 3 * 2) / 4, (1 * 3 + 3 * 4) / 4, (1 * 5 + 1 * 6) / 2, (0 * 7 + 4 * 8) / 4]
    assert torch.allclose(merged[0, :, 0], torch.tensor(expected), atol=1e-6)
    merged, new_sizes, grid = merge_neighbours(x, torch.ones(1, 9), sizes, 1, (2, 4), "height")
    assert grid == (1, 4) and merged[0, 1:, 0].tolist() == [3.0, 4.0, 5.0, 6.0]


def test_plan_alternates_axes_and_tracks_every_patch(export_cache):
    exported = export_cache("timm:vit_small_patch14_reg4_dinov2", {"depth": 3, "img_size": 126, "num_classes": 10},
                            "torchscript")
    vit = describe_vit(load_onnx(exported.onnx_path))
    plan = plan_atme(vit, [1, 2])
    assert plan.axes == ["width", "height"] and plan.grids == [(9, 9), (9, 5), (5, 5)]
    assert plan.tokens == [86, 50, 30] and plan.sizes.sum() == vit.num_tokens
    assert (plan.owner[:5] == np.arange(5)).all()                 # class and register tokens stay put
    assert np.bincount(plan.owner).tolist() == plan.sizes.tolist()


def test_channels_are_the_same_in_every_head(export_cache):
    exported = export_cache(*METHOD_MODELS["deit_small"], "torchscript")
    model = load_onnx(exported.onnx_path)
    keeps = cdcp_keep(model, describe_vit(model), 0.25)
    assert len(keeps) == 4
    for keep in keeps:
        assert len(keep.qk_keep) == 6 and all(k == keep.qk_keep[0] for k in keep.qk_keep)
        assert all(k == keep.v_keep[0] for k in keep.v_keep) and len(keep.v_keep[0]) == 48


def test_channels_zeroed_in_training_are_stripped_first(tmp_path):
    """A checkpoint with consistent zeroed channels (CAIT's learned masks) loses them physically."""
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", depth=3, num_classes=10, img_size=96).eval()
    heads, hd = 6, 64
    dead_qk, dead_v = list(range(0, 64, 4)), list(range(1, 64, 8))
    with torch.no_grad():
        for blk in model.blocks:
            for h in range(heads):
                for j in dead_qk:
                    blk.attn.qkv.weight[h * hd + j] = 0          # the Q row suffices: q·k is then 0
                    blk.attn.qkv.bias[h * hd + j] = 0
                for j in dead_v:
                    blk.attn.proj.weight[:, h * hd + j] = 0
    weights = tmp_path / "masked.pth"
    torch.save(model.state_dict(), weights)
    exported = export_model("timm:deit_small_patch16_224", tmp_path / "masked.onnx", weights=str(weights),
                            model_args={"depth": 3, "num_classes": 10, "img_size": 96})
    result = CliRunner().invoke(app, ["convert", str(exported.onnx_path), "--method", "cait", "--channel-ratio", "0",
                                      "--stages", "1,2", "--out", str(tmp_path / "out"), "--no-build"])
    assert result.exit_code == 0, result.output
    decisions = json.loads((tmp_path / "out" / "decisions.json").read_text())
    for block in decisions["blocks"]:
        assert all(set(k).isdisjoint(dead_qk) and len(k) == 48 for k in block["qk_keep"])
        assert all(set(k).isdisjoint(dead_v) and len(k) == 56 for k in block["v_keep"])
    x = np.random.default_rng(1).standard_normal((4, 3, 96, 96)).astype(np.float32)
    reference = CAITViT(model, [1, 2], ["width", "height"])
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    assert rel_error(_run_all(tmp_path / "out" / "model.onnx", x)[0], want) <= 1e-4


@pytest.mark.skipif(tensorrt_backend()[1] is None, reason="no tensorrt or tensorrt_rtx module")
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_cait_graphs_build_with_tensorrt(tmp_path, export_cache, exporter):
    exported = export_cache(*METHOD_MODELS["deit_small"], exporter)
    result, _ = _cait(load_onnx(exported.onnx_path), 0.25, [1, 2], restore=True)
    path = tmp_path / "cait.onnx"
    onnx.save(result.model, str(path))
    report = build_engine(path)
    assert report.status == "built", report.message


def test_convert_with_cait_is_reproducible_and_restores_the_grid(tmp_path, export_cache):
    exported = export_cache(*METHOD_MODELS["deit_small"], "torchscript")
    outs = []
    for name in ("a", "b"):
        result = CliRunner().invoke(app, ["convert", str(exported.onnx_path), "--method", "cait", "--stages", "1,2",
                                          "--restore-grid", "--out", str(tmp_path / name), "--no-build"])
        assert result.exit_code == 0, result.output
        outs.append((tmp_path / name / "model.onnx").read_bytes())
    assert outs[0] == outs[1]
    graph = onnx.load(str(tmp_path / "a" / "model.onnx"))
    assert [o.name for o in graph.graph.output][1] == RESTORED_OUTPUT
    decisions = json.loads((tmp_path / "a" / "decisions.json").read_text())
    assert decisions["atme"]["tokens"] == [37, 19, 10, 10] and decisions["settings"]["channel_ratio"] == 0.25


def test_fixed_size_attention_masks_are_refused(export_cache, tmp_path):
    exported = export_cache("timm:deit_tiny_patch16_224", {"depth": 2, "num_classes": 10}, "torchscript")
    model = load_onnx(with_constant_mask(exported.onnx_path, tmp_path / "masked.onnx"))
    with pytest.raises(Vit2TrtError, match="attention mask"):
        apply_atme(model, describe_vit(model), [1])


@pytest.mark.parametrize("argv,needle", [
    (["--method", "cait", "--stages", "0,2"], "increasing block indices"),
    (["--method", "cait", "--stages", "2,1"], "increasing block indices"),
    (["--method", "cait", "--stages", "1,9"], "increasing block indices"),
    (["--method", "cait", "--channel-ratio", "1"], "in [0, 1)"),
    (["--method", "tome", "--channel-ratio", "0.5"], "belongs to --method cait"),
    (["--method", "toast", "--stages", "1"], "belongs to --method asvit or cait"),
])
def test_bad_cait_requests_write_nothing(tmp_path, export_cache, argv, needle):
    exported = export_cache(*METHOD_MODELS["deit_small"], "torchscript")
    result = CliRunner().invoke(app, ["convert", str(exported.onnx_path), "--out", str(tmp_path / "out"),
                                      "--no-build", *argv])
    assert result.exit_code == 2 and needle in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()


def test_too_many_stages_for_the_grid_are_refused(export_cache):
    exported = export_cache("timm:vit_small_patch16_224", {"depth": 4, "class_token": False, "global_pool": "avg",
                                                           "img_size": 32}, "torchscript")
    model = load_onnx(exported.onnx_path)
    with pytest.raises(Vit2TrtError, match="grid width of 1"):
        apply_atme(model, describe_vit(model), [1, 2, 3])
