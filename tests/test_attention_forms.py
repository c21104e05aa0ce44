"""Every attention form exporters write is read into the same description, and every method works on
it: the compressed graph equals the PyTorch model compressed the same way, and the fused ONNX
Attention op stays wherever a pass does not need to look inside attention.

Forms: timm and Hugging Face exported by the dynamo exporter at opset 23 (one ONNX `Attention` node
per block), and Hugging Face's SDPA exported by the dynamo exporter at its default opset (an
IsNaN -> Where guard between the Softmax and the A·V MatMul). The TorchScript export of the same
model is the eager form they are compared with."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.deploy.engine import BuildOptions, build_engine, tensorrt_backend
from vit2trt.converter.graph import read_vit

from conftest import compressed_reference_outputs, rel_error, run_onnx, run_onnx_each

# FFNs of 384 channels (mlp_ratio 2): the budget's cost grows with their width cubed, and the forms are in attention.
TIMM = ("timm:vit_tiny_patch16_224", {"depth": 4, "img_size": 64, "num_classes": 10, "mlp_ratio": 2})
HF_SDPA = ("hf:ViTForImageClassification", {"num_hidden_layers": 4, "hidden_size": 192, "num_attention_heads": 3,
                                            "intermediate_size": 384, "num_labels": 10, "image_size": 64,
                                            "attn_implementation": "sdpa"})
# (id, model, exporter, the form every block of the export has)
FORMS = [
    ("timm_onnx_attention", TIMM, "dynamo@23", "onnx_attention"),
    ("hf_sdpa_nan_guard", HF_SDPA, "dynamo", "sdpa_nan_guard"),
    ("hf_onnx_attention", HF_SDPA, "dynamo@23", "onnx_attention"),
]
METHODS = [
    ("toast_scwp", dict(method="toast", head_sparsity=0.5)),
    ("toast_budget", dict(method="toast", target_flops=0.6, multiple=8)),
    ("tome", dict(method="tome", r=4)),
    ("asvit", dict(method="asvit", stages=[2, 3], thresholds=[1 / 17, 1 / 17])),
    ("cait", dict(method="cait", stages=[2], channel_ratio=0.5)),
]


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.fixture(scope="module")
def calib_npy(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npy"
    np.save(path, np.random.default_rng(5).standard_normal((56, 3, 64, 64)).astype(np.float32))
    return path


# TorchScript decomposes HF's SDPA into plain MatMul -> Softmax -> MatMul: read, like every other form.
READ_FORMS = FORMS + [("hf_sdpa_torchscript", HF_SDPA, "torchscript", "explicit")]


@pytest.mark.parametrize("form_id,model,exporter,form", READ_FORMS, ids=[f[0] for f in READ_FORMS])
def test_every_form_reads_as_the_eager_export_does(export_cache, form_id, model, exporter, form):
    exported = export_cache(*model, exporter)
    ops = _ops(exported.onnx_path)
    if form == "onnx_attention":
        assert ops["Attention"] == 4 and ops["Softmax"] == 0
    elif form == "sdpa_nan_guard":
        assert ops["IsNaN"] == 4 and ops["Softmax"] == 4
    g = read_vit(exported.onnx_path)
    eager_model = (model[0], {k: v for k, v in model[1].items() if k != "attn_implementation"})
    eager = read_vit(export_cache(*eager_model, "torchscript").onnx_path)   # eager attention, TorchScript
    assert [b.attn.form for b in g.blocks] == [form] * 4
    assert [b.attn.form for b in eager.blocks] == ["explicit"] * 4
    for b, e in zip(g.blocks, eager.blocks):
        assert (b.attn.layout, b.attn.heads, b.attn.head_dim_qk, b.attn.head_dim_v, b.tokens, b.ffn.hidden) == \
               (e.attn.layout, e.attn.heads, e.attn.head_dim_qk, e.attn.head_dim_v, e.tokens, e.ffn.hidden)
        assert b.attn.scale == pytest.approx(e.attn.scale if e.attn.scale is not None else 64 ** -0.5, rel=1e-6)
        assert b.attn.mask_inputs == []   # HF's all-zero (or all-true) mask masks nothing: ignored
        assert b.flops == e.flops
    assert (g.num_tokens, g.num_extra_tokens, g.pooling, g.head.num_classes) == \
           (eager.num_tokens, eager.num_extra_tokens, eager.pooling, eager.head.num_classes)
    assert g.flops.total == eager.flops.total


@pytest.mark.parametrize("method_id,settings", METHODS, ids=[m[0] for m in METHODS])
@pytest.mark.parametrize("form_id,model,exporter,form", FORMS, ids=[f[0] for f in FORMS])
def test_every_method_works_on_every_form(tmp_path, export_cache, calib_npy, form_id, model, exporter, form,
                                          method_id, settings):
    exported = export_cache(*model, exporter)
    out = convert(exported.onnx_path, tmp_path / "out", ConvertOptions(build=False, calib=str(calib_npy), **settings))
    decisions = json.loads((tmp_path / "out" / "decisions.json").read_text())
    x = np.random.default_rng(3).standard_normal((6, 3, 64, 64)).astype(np.float32)
    got = run_onnx(out.onnx_path, x)
    assert rel_error(got, compressed_reference_outputs(exported, tmp_path / "out", x)) <= 1e-4
    singles = run_onnx_each(out.onnx_path, x)
    assert rel_error(singles, got) <= 1e-4
    assert out.flops_after < out.flops_before

    g = read_vit(out.onnx_path)
    forms = [b.attn.form for b in g.blocks]
    if form != "onnx_attention":
        assert "onnx_attention" not in forms
        return
    # The fused op stays wherever the pass did not need the probabilities, a token re-layout or
    # unequal Q·K and V head dims (TensorRT's fused attention wants K and V of one shape).
    if method_id == "tome":
        assert forms == ["onnx_attention"] * 4 and _ops(out.onnx_path)["Softmax"] == 0
    elif method_id == "toast_budget":   # the budget ties each block's Q·K and V dims: every block stays fused
        assert forms == ["onnx_attention"] * 4 and decisions["budget"]["tied_qk_v"]
        assert any(b.attn.head_dim_qk < 64 for b in g.blocks)
    elif method_id.startswith("toast"):
        for b in g.blocks:
            want_form = "onnx_attention" if b.attn.head_dim_qk == b.attn.head_dim_v else "explicit"
            assert b.attn.form == want_form, (b.index, b.attn.head_dim_qk, b.attn.head_dim_v)
    elif method_id == "cait":   # ATME reads the probabilities of block 1 (it merges after it) only
        assert forms[1] == "explicit" and forms.count("onnx_attention") == 3
    elif method_id == "asvit":   # block 0 is untouched; the scored and the pruned blocks are spelt out
        assert forms[0] == "onnx_attention"


@pytest.mark.skipif(tensorrt_backend()[1] is None, reason="no TensorRT module (tensorrt or tensorrt-rtx) installed")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_fused_attention_graphs_build_with_tensorrt(tmp_path, export_cache, calib_npy, precision):
    """TensorRT-RTX has no dedicated fp32 attention kernel: the build lets the layer decompose."""
    exported = export_cache(*TIMM, "dynamo@23")
    merged = convert(exported.onnx_path, tmp_path / "tome", ConvertOptions(method="tome", r=4, build=False))
    assert _ops(merged.onnx_path)["Attention"] == 4
    for path in (exported.onnx_path, merged.onnx_path):
        report = build_engine(path, options=BuildOptions(engine="auto", batch=(1, 1, 4), precision=precision))
        if report.status != "built" and precision == "fp16" and "fp16" in report.message:
            pytest.skip(f"this TensorRT cannot build fp16 here: {report.message}")
        assert report.status == "built", report.message
        assert any("attention" in note for note in report.how["notes"])


def test_the_budget_can_allocate_q_k_and_v_apart_on_a_fused_export(tmp_path, export_cache, calib_npy):
    """--no-tie-qk-v: dims allocated apart, so the blocks whose dims differ are spelt out; still exact."""
    exported = export_cache(*TIMM, "dynamo@23")
    out = convert(exported.onnx_path, tmp_path / "out", ConvertOptions(
        method="toast", target_flops=0.6, multiple=8, tie_qk_v=False, build=False, calib=str(calib_npy)))
    decisions = json.loads((tmp_path / "out" / "decisions.json").read_text())
    assert decisions["budget"]["tied_qk_v"] is False
    g = read_vit(out.onnx_path)
    untied = [b for b in g.blocks if b.attn.head_dim_qk != b.attn.head_dim_v]
    assert untied and all(b.attn.form == "explicit" for b in untied)
    x = np.random.default_rng(3).standard_normal((4, 3, 64, 64)).astype(np.float32)
    assert rel_error(run_onnx(out.onnx_path, x), compressed_reference_outputs(exported, tmp_path / "out", x)) <= 1e-4
