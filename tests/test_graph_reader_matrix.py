"""The reader finds every part of the foundation matrix, under both exporters, and its FLOPs
agree with the analytical count from the model's own configuration."""
from __future__ import annotations

import pytest
import torch

from vit2trt.converter.graph import read_vit
from vit2trt.models.flops import analytical_flops, config_from_hf, config_from_timm
from vit2trt.models.reference import HFLogits, ReferenceRecord, build_model

from conftest import EXPORTERS, MATRIX, model_args


def _expected_timm(model) -> dict:
    block = model.blocks[0]
    tokens = {}
    if model.cls_token is not None:
        tokens["class"] = 1
    if getattr(model, "dist_token", None) is not None:
        tokens["distillation"] = model.dist_token.shape[1]
    if getattr(model, "reg_token", None) is not None:
        tokens["register"] = model.reg_token.shape[1]
    return {
        "layout": "fused_qkv", "heads": block.attn.num_heads, "head_dim": block.attn.head_dim,
        "qkv_bias": block.attn.qkv.bias is not None, "hidden": block.mlp.fc1.out_features,
        "layer_scale": not isinstance(block.ls1, torch.nn.Identity), "tokens": tokens,
        "pooling": "token" if model.global_pool == "token" else "avg",
        "final_norm": not isinstance(model.norm, torch.nn.Identity),
        "fc_norm": not isinstance(model.fc_norm, torch.nn.Identity),
        "pos_covers_extra": not model.no_embed_class or model.num_prefix_tokens == 0,
        "num_classifiers": 2 if getattr(model, "head_dist", None) is not None else 1,
        "config": config_from_timm(model),
    }


def _expected_hf(model: HFLogits) -> dict:
    cfg = model.model.config
    return {
        "layout": "split_qkv", "heads": cfg.num_attention_heads,
        "head_dim": cfg.hidden_size // cfg.num_attention_heads, "qkv_bias": bool(cfg.qkv_bias),
        "hidden": cfg.intermediate_size, "layer_scale": False, "tokens": {"class": 1}, "pooling": "token",
        "final_norm": True, "fc_norm": False, "pos_covers_extra": True, "num_classifiers": 1,
        "config": config_from_hf(cfg),
    }


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("case_id,spec,args", MATRIX, ids=[m[0] for m in MATRIX])
def test_reader_matches_model_configuration(export_cache, case_id, spec, args, exporter):
    result = export_cache(spec, model_args(spec, args), exporter)
    assert result.max_abs_diff <= 1e-4 * max(1.0, result.max_abs_ref)
    if exporter == "dynamo":
        assert any(p.name.endswith(".data") for p in result.files), "dynamo export keeps external data"
    record = ReferenceRecord.load(result.record_path)
    model = build_model(record)
    want = _expected_timm(model) if record.family == "timm" else _expected_hf(model)
    cfg = want["config"]

    g = read_vit(result.onnx_path)

    assert g.img_size == tuple(cfg.img_size)
    assert g.patch_size == tuple(cfg.patch_size)
    assert g.embed_dim == cfg.embed_dim
    assert g.num_patches == cfg.num_patches
    assert g.depth == cfg.depth
    found_tokens = {}
    for token in g.extra_tokens:
        found_tokens[token.kind] = found_tokens.get(token.kind, 0) + token.count
    assert found_tokens == want["tokens"]
    assert g.num_extra_tokens == cfg.num_prefix_tokens
    assert g.pos_embed is not None
    assert g.pos_embed_covers_extra_tokens == want["pos_covers_extra"]
    assert g.pooling == want["pooling"]
    assert (g.head.final_norm is not None) == want["final_norm"]
    assert (g.head.fc_norm is not None) == want["fc_norm"]
    assert g.head.num_classes == cfg.num_classes
    assert len(g.head.linears) == (want["num_classifiers"] if cfg.num_classes else 0)
    if g.pooling == "token":
        assert g.head.token_index == list(range(want["num_classifiers"]))

    for block in g.blocks:
        a = block.attn
        assert a.layout == want["layout"]
        assert (a.heads, a.head_dim_qk, a.head_dim_v) == (want["heads"], want["head_dim"], want["head_dim"])
        assert a.qkv_bias == want["qkv_bias"]
        assert block.ffn.hidden == want["hidden"]
        assert block.ffn.activation == "gelu"
        assert (block.layer_scale_attn is not None) == want["layer_scale"]
        assert (block.layer_scale_ffn is not None) == want["layer_scale"]
        assert block.norm1 and block.norm2
        if a.layout == "fused_qkv":
            assert a.qkv.out_features == 3 * cfg.embed_dim and a.q is None
        else:
            assert a.q.out_features == a.k.out_features == a.v.out_features == cfg.embed_dim
        assert a.proj.in_features == a.proj.out_features == cfg.embed_dim
        # The head count is carried by a reshape the passes will rewrite.
        splits = [r for r in a.head_reshapes if r.role != "merge"]
        assert splits
        for r in splits:
            assert want["heads"] in r.output_shape and want["head_dim"] == r.output_shape[-1]
            assert want["heads"] in r.shape_value or want["head_dim"] in r.shape_value
            assert r.constant_sources, "the fixed dims of the target shape are located"
        assert any(r.role == "merge" for r in a.head_reshapes)
        if a.scale is not None:
            assert a.scale == pytest.approx(want["head_dim"] ** -0.5, rel=1e-5)

    analytic = analytical_flops(cfg)
    for block in g.blocks:
        assert block.flops.attn_proj == pytest.approx(analytic.attn_proj, rel=0.01)
        assert block.flops.attn_matmul == pytest.approx(analytic.attn_matmul, rel=0.01)
        assert block.flops.ffn == pytest.approx(analytic.ffn, rel=0.01)
    assert g.flops.patch_embed == pytest.approx(analytic.patch_embed, rel=0.01)
    assert g.flops.head == pytest.approx(analytic.head, rel=0.01, abs=1)
    assert g.flops.other == 0
    assert g.flops.total == pytest.approx(analytic.total, rel=0.01)


def test_full_depth_deit_tiny(export_cache):
    """Full depth, to count all twelve blocks and the published ~1.3 GFLOPs of DeiT-Tiny."""
    result = export_cache("timm:deit_tiny_patch16_224", {}, "torchscript")
    g = read_vit(result.onnx_path)
    model = build_model(ReferenceRecord.load(result.record_path))
    analytic = analytical_flops(config_from_timm(model))
    assert g.depth == 12
    assert [b.index for b in g.blocks] == list(range(12))
    assert all(prev.output == nxt.input for prev, nxt in zip(g.blocks, g.blocks[1:]))
    assert g.flops.total == pytest.approx(analytic.total, rel=0.01)
    assert 1.2e9 < g.flops.total < 1.3e9


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_fused_qkv_chunk_order_is_read(export_cache, exporter):
    g = read_vit(export_cache("timm:vit_small_patch16_224", {"depth": 2}, exporter).onnx_path)
    assert all(b.attn.qkv_chunks == {"q": 0, "k": 1, "v": 2} for b in g.blocks)


# The dynamo exporter at opset 23 writes one ONNX Attention node per block (timm's and HF's SDPA).
OPSET23 = [m for m in MATRIX if m[0] in {"deit_small_distilled", "deit3_small_layerscale", "dinov2_reg4"}]


@pytest.mark.parametrize("case_id,spec,args", OPSET23, ids=[m[0] for m in OPSET23])
def test_reader_reads_the_onnx_attention_op(export_cache, case_id, spec, args):
    test_reader_matches_model_configuration(export_cache, case_id, spec, args, "dynamo@23")
    g = read_vit(export_cache(spec, model_args(spec, args), "dynamo@23").onnx_path)
    assert all(b.attn.form == "onnx_attention" for b in g.blocks)


def test_a_graph_read_twice_runs_once_and_reads_the_same(deit_tiny_ts, monkeypatch):
    """The reader's shape observation is kept per graph bytes: a second read runs nothing, reads the same,
    and a changed graph (other bytes) runs again."""
    import onnx

    from vit2trt.converter.graph import describe_vit, shapes

    runs = []
    real_session = shapes.ort_session
    monkeypatch.setattr(shapes, "ort_session", lambda *a, **k: runs.append(1) or real_session(*a, **k))
    model = onnx.load(str(deit_tiny_ts.onnx_path))
    monkeypatch.setattr(shapes, "_OBSERVED", type(shapes._OBSERVED)())
    first = describe_vit(model)
    second = describe_vit(onnx.load(str(deit_tiny_ts.onnx_path)))
    assert len(runs) == 1
    assert [b.tokens for b in second.blocks] == [b.tokens for b in first.blocks]
    assert second.flops.total == first.flops.total and second.num_tokens == first.num_tokens
    model.graph.initializer[0].raw_data = bytes(len(model.graph.initializer[0].raw_data))   # other bytes
    describe_vit(model)
    assert len(runs) == 2
