"""AS-ViT adaptive token pruning: each image keeps its own tokens, both graph forms equal the
per-image PyTorch reference, and bad settings are refused."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.deploy.engine import build_engine, tensorrt_backend
from vit2trt.converter.graph import describe_vit, read_vit
from vit2trt.converter.graph.loading import load_onnx
from vit2trt.errors import Vit2TrtError
from vit2trt.models.asvit_reference import ASViT
from vit2trt.models.reference import ReferenceRecord, build_model
from vit2trt.passes.asvit import apply_asvit, default_stages

from conftest import METHOD_MODELS, method_cases, rel_error, run_onnx, run_onnx_each

runner = CliRunner()

# The shared method models (conftest.METHOD_MODELS). The fp16 test keeps 224 pixels (it needs more than
# 2048 token positions in a batch).
DEIT_SMALL = METHOD_MODELS["deit_small"]
CASES = method_cases("deit_small", "deit_small_distilled", "deit3_layerscale", "dinov2_reg4", "hf_vit")
STAGES = [1, 2, 3]


def _thresholds(vit, model=None, x=None):
    """Without a model: about the mean score (class attention is ~1/N per token). With one: per
    stage, the middle of the widest gap between the inputs' scores around their median, so that
    float rounding cannot flip a token from one side to the other."""
    if model is None:
        return [1.0 / vit.num_tokens] * len(STAGES)
    thresholds = []
    for stage in range(len(STAGES)):
        reference = ASViT(model, STAGES, thresholds + [-1.0] * (len(STAGES) - stage))
        with torch.no_grad():
            reference(torch.from_numpy(x))
        pool = torch.cat([s[stage][vit.num_extra_tokens:] for s in reference.scores]).sort().values
        lo, hi = int(len(pool) * 0.3), int(len(pool) * 0.7)
        gaps = pool[lo + 1:hi + 1] - pool[lo:hi]
        at = lo + int(gaps.argmax())
        thresholds.append(float((pool[at] + pool[at + 1]) / 2))
    return thresholds


_REFERENCES: dict = {}


def _reference(exported, vit):
    """Thresholds, inputs, per-image reference outputs and kept-token counts of one model: the same for
    its three forms and both exporters (one seeded PyTorch model), so worked out once."""
    record = ReferenceRecord.load(exported.record_path)
    key = (record.family, record.name, json.dumps(record.kwargs, sort_keys=True), record.seed)
    if key not in _REFERENCES:
        c, h, w = record.preprocessing["input_size"]
        x = np.random.default_rng(6).standard_normal((8, c, h, w)).astype(np.float32)
        thresholds = _thresholds(vit, build_model(record), x)
        reference = ASViT(build_model(record), STAGES, thresholds)
        with torch.no_grad():
            want = reference(torch.from_numpy(x)).numpy()
        _REFERENCES[key] = thresholds, x, want, np.array(reference.kept)   # kept: [images, blocks]
    return _REFERENCES[key]


@pytest.mark.parametrize("form", ["dynamic", "bounded", "packed"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("case_id,spec,args", CASES, ids=[c[0] for c in CASES])
def test_asvit_matches_the_per_image_reference(tmp_path, export_cache, case_id, spec, args, exporter, form):
    exported = export_cache(spec, args, exporter)
    model = load_onnx(exported.onnx_path)
    vit = describe_vit(model)
    if form != "bounded" and any(b.attn.mask_inputs for b in vit.blocks):
        with pytest.raises(Vit2TrtError, match="bounded"):  # HF dynamo's fixed-size mask cannot shrink
            apply_asvit(model, vit, STAGES, [0.01] * 3, form)
        return
    thresholds, x, want, kept = _reference(exported, vit)
    path = tmp_path / "asvit.onnx"
    onnx.save(apply_asvit(model, vit, STAGES, thresholds, form).model, str(path))
    assert (kept[:, -1] < vit.num_tokens).all(), "tokens were dropped"
    assert len(set(kept[:, -1])) > 1, "images keep different numbers of tokens"
    got = run_onnx(path, x)
    assert rel_error(got, want) <= 1e-4
    single = run_onnx_each(path, x[:8])
    assert rel_error(single, got) <= 1e-5


def test_dynamic_and_packed_forms_really_shrink_the_sequence(export_cache, tmp_path):
    exported = export_cache(*DEIT_SMALL, "torchscript")
    model = load_onnx(exported.onnx_path)
    vit = describe_vit(model)
    path = tmp_path / "asvit.onnx"
    onnx.save(apply_asvit(model, vit, STAGES, _thresholds(vit), "dynamic").model, str(path))
    tokens = [b.tokens for b in read_vit(path).blocks]      # the reader's probe image, batch 1
    assert tokens[0] == 37 and tokens[-1] <= tokens[1] < 37
    packed = tmp_path / "packed.onnx"
    onnx.save(apply_asvit(model, vit, STAGES, _thresholds(vit), "packed").model, str(packed))
    assert [b.tokens for b in read_vit(packed).blocks] == tokens    # batch 1: packed is the image's own count
    bounded = tmp_path / "bounded.onnx"
    onnx.save(apply_asvit(model, vit, STAGES, _thresholds(vit), "bounded").model, str(bounded))
    assert [b.tokens for b in read_vit(bounded).blocks] == [37] * 4


@pytest.mark.skipif(tensorrt_backend()[1] is None, reason="no tensorrt or tensorrt_rtx module")
@pytest.mark.parametrize("form", ["bounded", "packed"])
def test_forms_build_with_tensorrt(export_cache, tmp_path, form):
    exported = export_cache(*DEIT_SMALL, "dynamo")
    model = load_onnx(exported.onnx_path)
    vit = describe_vit(model)
    path = tmp_path / "asvit.onnx"
    onnx.save(apply_asvit(model, vit, STAGES, _thresholds(vit), form).model, str(path))
    report = build_engine(path)
    assert report.status == "built", report.message


def test_calibrated_thresholds_meet_the_flops_target(export_cache, tmp_path):
    exported = export_cache(*DEIT_SMALL, "torchscript")
    result = runner.invoke(app, ["convert", str(exported.onnx_path), "--method", "asvit", "--stages", "1,2,3",
                                 "--target-flops", "0.7", "--out", str(tmp_path / "out"), "--no-build"])
    assert result.exit_code == 0, result.output
    decisions = json.loads((tmp_path / "out" / "decisions.json").read_text())
    calibration = decisions["asvit"]["calibration"]
    assert 0.6 <= calibration["flops_fraction"] <= 0.7
    assert decisions["asvit"]["thresholds"][0] > 0
    assert default_stages(12) == [4, 7, 10]


def test_thresholds_from_a_json_file(export_cache, tmp_path):
    exported = export_cache(*DEIT_SMALL, "torchscript")
    settings = tmp_path / "thresholds.json"
    settings.write_text(json.dumps({"stages": STAGES, "thresholds": [0.005, 0.005, 0.005]}))
    result = runner.invoke(app, ["convert", str(exported.onnx_path), "--method", "asvit", "--thresholds", str(settings),
                                 "--out", str(tmp_path / "out"), "--no-build"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "decisions.json").read_text())["asvit"]["stages"] == STAGES


@pytest.mark.parametrize("argv,needle", [
    (["--stages", "0,2"], "stages must be"),
    (["--stages", "1,9"], "stages must be"),
    (["--thresholds", "0.1,0.2"], "one threshold per stage"),
    (["--thresholds", "0.1,-1,0.1"], "non-negative"),
    (["--target-flops", "1.5"], "fraction"),
    (["--target-flops", "0.05"], "cannot be met"),
    (["--asvit-form", "magic"], "graph form"),
])
def test_bad_asvit_requests_write_nothing(export_cache, tmp_path, argv, needle):
    exported = export_cache(*DEIT_SMALL, "torchscript")
    result = runner.invoke(app, ["convert", str(exported.onnx_path), "--method", "asvit", "--out",
                                 str(tmp_path / "out"), "--no-build", *argv])
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_models_that_average_tokens_are_refused(export_cache):
    exported = export_cache("timm:vit_small_patch16_224", {"depth": 2, "global_pool": "avg"}, "torchscript")
    model = load_onnx(exported.onnx_path)
    with pytest.raises(Vit2TrtError, match="averages all of them"):
        apply_asvit(model, describe_vit(model), [1], [0.01])


def test_models_without_class_token_are_refused(export_cache):
    exported = export_cache("timm:vit_small_patch16_224", {"depth": 2, "class_token": False, "global_pool": "avg"},
                            "torchscript")
    model = load_onnx(exported.onnx_path)
    with pytest.raises(Vit2TrtError, match="no class token"):
        apply_asvit(model, describe_vit(model), [1], [0.01])


def test_packed_form_keeps_its_order_in_fp16_at_large_batches(export_cache, tmp_path):
    """fp16 counts exactly only to 2048: the packed form's counts and rankings are int64, so
    converting the graph for an fp16 engine leaves them alone, and a batch of 12 × 197 > 2048
    token positions still gives the fp32 graph's answers."""
    from vit2trt.converter.deploy import engine

    exported = export_cache("timm:deit_small_patch16_224", {"depth": 4}, "torchscript")
    model = load_onnx(exported.onnx_path)
    vit = describe_vit(model)
    path = tmp_path / "asvit.onnx"
    onnx.save(apply_asvit(model, vit, STAGES, _thresholds(vit), "packed").model, str(path))
    half, _ = engine._graph_in_precision(path, "fp16", tmp_path)
    rankings = [n for n in onnx.load(str(half)).graph.node if n.name.endswith(("/kept_columns", "/counts"))]
    assert rankings and all("_cast" not in i for n in rankings for i in n.input)   # not converted to fp16
    x = np.random.default_rng(3).standard_normal((12, 3, 224, 224)).astype(np.float32)
    want, got = run_onnx(path, x), run_onnx(half, x)
    assert rel_error(got, want) < 2e-2
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9
