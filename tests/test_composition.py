"""Methods that compose: every combination's graph equals the PyTorch model compressed the same way,
is batch-independent, builds with TensorRT, is reproducible; combinations that cannot work are refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.deploy.engine import build_engine, tensorrt_backend
from vit2trt.converter.graph import read_vit
from vit2trt.models.compressed_reference import compressed_reference
from vit2trt.models.reference import ReferenceRecord, build_model
from vit2trt.passes.methods import available, parse_composition

from conftest import compressed_reference_outputs, rel_error, run_onnx, run_onnx_each

runner = CliRunner()
# 6x6 patches and a class token: enough tokens for ToMe, ATME and AS-ViT stages in 4 blocks.
# mlp_ratio 2: the budget and the fits scale with the FFN width cubed; 384 channels prove what 768 do.
SMALL_VIT = ("timm:vit_tiny_patch16_224", {"depth": 4, "img_size": 96, "num_classes": 10, "mlp_ratio": 2})

CASES = [
    ("toast_scwp+tome", dict(method="toast+tome", head_sparsity=0.5, r=4)),
    ("toast_budget+tome", dict(method="toast+tome", target_flops=0.5, r=3, multiple=8)),
    ("toast_scwp+asvit", {"method": "toast+asvit", "head_sparsity": 0.5, "asvit.target_flops": 0.5, "stages": [1, 2]}),
    ("cait_cdcp+tome", dict(method="cait+tome", channel_ratio=0.5, r=4)),
    ("toast_scwp+cait_budget", {"method": "toast+cait", "head_sparsity": 0.5, "cait.target_flops": 0.4,
                                "cait.stages": [2]}),
]


@pytest.fixture(scope="module")
def calib_npy(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npy"
    np.save(path, np.random.default_rng(5).standard_normal((48, 3, 96, 96)).astype(np.float32))
    return path


def _part(decisions, name):
    return next(p for p in decisions["parts"] if p["method"] == name)


@pytest.mark.parametrize("case_id,settings", CASES, ids=[c[0] for c in CASES])
def test_composed_graph_equals_the_composed_pytorch_model(tmp_path, export_cache, calib_npy, case_id, settings):
    exported = export_cache(*SMALL_VIT, "torchscript")
    out = convert(exported.onnx_path, tmp_path / "out", ConvertOptions(build=False, calib=str(calib_npy), **settings))
    decisions = json.loads((tmp_path / "out" / "decisions.json").read_text())
    names = settings["method"].split("+")
    assert decisions["method"] == settings["method"] and [p["method"] for p in decisions["parts"]] == names
    x = np.random.default_rng(3).standard_normal((8, 3, 96, 96)).astype(np.float32)
    got = run_onnx(out.onnx_path, x)
    assert rel_error(got, compressed_reference_outputs(exported, tmp_path / "out", x)) <= 1e-4
    singles = run_onnx_each(out.onnx_path, x[:8])
    assert rel_error(singles, got) <= 1e-4
    # Both parts acted: structure was pruned (and compensated) and the tokens were reduced.
    assert decisions["blocks"] and decisions["compensation"]["tensors"]
    g = read_vit(out.onnx_path)
    if "tome" in names:
        tokens = _part(decisions, "tome")["tome"]["tokens"]
        assert tokens[-1] < tokens[0]
        # The token part ran on the pruned graph: ToMe alone keeps every head dim.
        assert min(b.attn.head_dim_qk for b in g.blocks[1:]) < 64
    if "cait" in names and "tome" not in names:
        assert _part(decisions, "cait")["atme"]["tokens"][-1] < 37
    if "cait" in names and "tome" in names:
        assert _part(decisions, "cait")["atme"] is None   # one token reducer per graph
    if "target_flops" in settings and "asvit" not in names:   # AS-ViT meets its budget on average
        assert out.flops_after <= settings["target_flops"] * out.flops_before * (1 + 1e-9)
    # Composed, it does fewer FLOPs than its parts alone (CAIT's part under ToMe is its channels only;
    # a part with --target-flops budgets the whole model, alone or composed).
    for alone in [n for n in names if not (n == "cait" and "tome" in names)]:
        own = {k.split(".")[-1]: v for k, v in settings.items()
               if k != "method" and (k.startswith(alone + ".") or ("." not in k and _field_of(alone, k)))}
        if "target_flops" in own:
            continue
        single = convert(exported.onnx_path, tmp_path / f"alone_{alone}",
                         ConvertOptions(method=alone, build=False, calib=str(calib_npy), **own))
        assert out.flops_after < single.flops_after, alone


def _field_of(method: str, name: str) -> bool:
    from dataclasses import fields

    from vit2trt.passes.methods import get_method

    return any(f.name == name for f in fields(get_method(method).Options))


def test_same_input_and_seed_give_identical_bytes(tmp_path, export_cache, calib_npy):
    exported = export_cache(*SMALL_VIT, "torchscript")
    options = ConvertOptions(method="toast+tome", build=False, calib=str(calib_npy), target_flops=0.6, r=2)
    for name in ("a", "b"):
        convert(exported.onnx_path, tmp_path / name, options)
    for file in ("model.onnx", "decisions.json", "compensation.safetensors"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_methods_run_in_order_whatever_the_order_given():
    assert [m.name for m in parse_composition("tome+toast")] == ["toast", "tome"]
    assert available() == ["toast", "cait", "asvit", "tome"]


@pytest.mark.skipif(tensorrt_backend()[1] is None, reason="no tensorrt or tensorrt_rtx module")
@pytest.mark.parametrize("method,argv", [("toast+tome", ["--head-sparsity", "0.5", "--r", "4"]),
                                         ("cait+tome", ["--r", "4"]),
                                         ("toast+cait", ["--head-sparsity", "0.5", "--stages", "2"]),
                                         ("toast+asvit", ["--head-sparsity", "0.5", "--thresholds", "0.01",
                                                          "--stages", "2", "--asvit-form", "bounded"])])
def test_compositions_build_with_tensorrt(tmp_path, export_cache, method, argv):
    exported = export_cache(*SMALL_VIT, "torchscript")
    result = runner.invoke(app, ["convert", str(exported.onnx_path), "--method", method, *argv, "--no-build",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = build_engine(tmp_path / "out" / "model.onnx")
    assert report.status == "built", report.message


@pytest.mark.parametrize("argv,needle", [
    (["--method", "tome+asvit"], "two token reducers"),
    (["--method", "toast+tome", "--fc1", "0,0,0.3,0.3"], "Token Channel Selection"),
    (["--method", "toast+cait", "--target-flops", "0.5"], "option of both toast and cait"),
    (["--method", "cait+tome", "--stages", "2"], "contributes only its channel pruning"),
    (["--method", "toast+toast"], "twice"),
    (["--method", "toast+fast"], "unknown method 'fast'"),
    (["--method", "toast+tome", "--set", "asvit.stages=2"], "does not include"),
    (["--method", "toast+tome", "--set", "tome.speed=2"], "no such method option"),
    (["--method", "toast", "--r", "4"], "belongs to --method tome"),
])
def test_bad_compositions_exit_2_and_write_nothing(tmp_path, export_cache, argv, needle):
    exported = export_cache(*SMALL_VIT, "torchscript")
    result = runner.invoke(app, ["convert", str(exported.onnx_path), "--no-build", *argv,
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_a_fifth_method_is_one_registered_class(tmp_path, export_cache):
    """A method written outside vit2trt's modules: registered, it converts, composes with ToMe and
    its PyTorch reference is rebuilt from decisions.json, with no change anywhere else."""
    from dataclasses import dataclass

    from vit2trt.passes.methods import REGISTRY, Method, option, register
    from vit2trt.passes.structured_prune import BlockKeep

    @dataclass
    class HalfFFNOptions:
        keep: float = option(0.5, "--ffn-keep", "fraction of FFN channels kept (first ones)")

    class HalfFFN(Method):
        name, title, order = "halfffn", "first FFN channels", 15
        Options = HalfFFNOptions

        def apply(self, o, run):
            keeps = [BlockKeep(b.index, ffn_keep=list(range(int(b.ffn.hidden * o.keep)))) for b in run.vit.blocks]
            run.prune(keeps, "halfffn", None, False)
            return {"settings": {"keep": o.keep}}

    register(HalfFFN)
    try:
        exported = export_cache(*SMALL_VIT, "torchscript")
        out = convert(exported.onnx_path, tmp_path / "out", ConvertOptions(method="halfffn+tome", keep=0.25, r=3,
                                                                           build=False))
        decisions = json.loads((tmp_path / "out" / "decisions.json").read_text())
        assert [p["method"] for p in decisions["parts"]] == ["halfffn", "tome"]
        assert all(b.ffn.hidden == 384 // 4 for b in read_vit(out.onnx_path).blocks)   # a quarter of 384 channels
        reference = compressed_reference(build_model(ReferenceRecord.load(exported.record_path)), decisions)
        x = np.random.default_rng(4).standard_normal((4, 3, 96, 96)).astype(np.float32)
        with torch.no_grad():
            assert rel_error(run_onnx(out.onnx_path, x), reference(torch.from_numpy(x)).numpy()) <= 1e-4
    finally:
        REGISTRY.pop("halfffn")
