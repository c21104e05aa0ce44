"""Closed-form compensation and sensitivity budgets: the fits never add error, the compensated graphs
equal the PyTorch model compressed the same way, budgets are met, bad requests exit 2."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.graph import read_vit
from vit2trt.models.compressed_reference import compressed_reference
from vit2trt.models.reference import ReferenceRecord, build_model
from vit2trt.passes.compensation import compensate_inputs, compensate_queries, greedy_removal, removal_error

from conftest import HF_TINY, rel_error, run_onnx, run_onnx_each

runner = CliRunner()
# mlp_ratio 2: the budget and the fits scale with the FFN width cubed; 384 channels prove what 768 do.
SMALL_VIT = ("timm:vit_tiny_patch16_224", {"depth": 3, "img_size": 64, "num_classes": 10, "mlp_ratio": 2})


def _correlated(rng, rows: int, width: int, rank: int) -> np.ndarray:
    latent = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, width))
    return latent + 0.3 * rng.standard_normal((rows, width)) + rng.standard_normal(width)


@pytest.mark.parametrize("seed", range(5))
def test_compensation_never_increases_the_layer_reconstruction_error(seed):
    rng = np.random.default_rng(seed)
    x = _correlated(rng, 4000, 24, 10)
    w, b = rng.standard_normal((24, 7)), rng.standard_normal(7)
    mean, cov = x.mean(0), np.cov(x.T, bias=True)
    for count in (20, 12, 6, 2):
        keep = sorted(rng.choice(24, count, replace=False).tolist())
        new_w, new_b = compensate_inputs(w, b, mean, cov, keep)
        want = x @ w + b
        plain = np.square(want - (x[:, keep] @ w[keep] + b)).sum(1).mean()
        fitted = np.square(want - (x[:, keep] @ new_w[keep] + new_b)).sum(1).mean()
        assert fitted <= plain
        # the closed-form error is the measured one
        assert removal_error(cov, w @ w.T, keep) == pytest.approx(fitted, rel=1e-6)
        assert removal_error(cov, w @ w.T, keep, compensate=False, mean=mean) == pytest.approx(plain, rel=1e-6)


def test_query_refit_reconstructs_logits_up_to_what_softmax_ignores():
    rng = np.random.default_rng(0)
    images, tokens, width, dim = 40, 30, 16, 8
    x = np.stack([_correlated(rng, tokens, width, 3) for _ in range(images)])
    wq, wk = rng.standard_normal((width, dim)), rng.standard_normal((width, dim))
    bq, bk = rng.standard_normal(dim), rng.standard_normal(dim)
    q, k = x @ wq + bq, x @ wk + bk
    kc = (k - k.mean(1, keepdims=True)).reshape(-1, dim)
    keep = [0, 2, 3, 6]

    def centred_logits(qq, kk):   # per query, minus its mean over keys: what softmax sees
        s = qq @ kk.transpose(0, 2, 1)
        return s - s.mean(-1, keepdims=True)

    want = centred_logits(q, k)
    nq, nb = compensate_queries(wq, bq, kc.T @ kc / len(kc), keep)
    fitted = centred_logits((x @ nq + nb)[..., keep], k[..., keep])
    plain = centred_logits(q[..., keep], k[..., keep])
    assert np.square(want - fitted).mean() < 0.8 * np.square(want - plain).mean()


def test_greedy_removal_error_curve_rises_and_keeps_what_is_asked():
    rng = np.random.default_rng(1)
    x = _correlated(rng, 3000, 20, 8)
    w = rng.standard_normal((20, 5))
    removal = greedy_removal([(np.cov(x.T, bias=True), w @ w.T)], min_keep=3)
    errors = [removal.error(c) for c in range(20, 2, -1)]
    assert errors[0] == 0 and all(a <= b + 1e-12 for a, b in zip(errors, errors[1:]))
    assert len(removal.keep(7)) == 7 and removal.keep(7) == sorted(removal.keep(7))


def _greedy_as_written(layers, min_keep, chunk):
    """The greedy removal written out on full matrices (removed rows stay, zeroed), every rank-one
    update applied at once: the specification that the folding, compacting greedy_removal must
    reproduce (the same order; errors up to rounding, since it applies the updates in batches)."""
    from vit2trt.passes.compensation import ridge

    n = len(layers[0][0])
    state = [[np.linalg.inv(c + ridge(c) * np.eye(n)), g.astype(np.float64).copy()] for c, g in layers]
    alive, order, errors, total = np.ones(n, dtype=bool), [], [0.0], 0.0
    while alive.sum() > min_keep:
        cost = np.full(n, np.inf)
        cost[alive] = sum(np.diag(g)[alive] / np.diag(p)[alive] for p, g in state)
        for j in np.argsort(cost, kind="stable")[:int(min(chunk, alive.sum() - min_keep))].tolist():
            for p, g in state:
                pj, gj, pjj, gjj = p[:, j].copy(), g[:, j].copy(), p[j, j], g[j, j]
                total += gjj / pjj
                a = pj / pjj
                g -= np.outer(a, gj) + np.outer(gj, a) - np.outer(a, a) * gjj
                p -= np.outer(pj, a)
            alive[j] = False
            order.append(j)
            errors.append(total)
    return order + np.flatnonzero(alive).tolist(), errors


@pytest.mark.parametrize("n, chunk, heads", [(40, 1, 1), (40, 1, 3), (150, 4, 1), (97, 3, 2), (300, 5, 2)])
def test_greedy_removal_equals_the_written_out_greedy(n, chunk, heads):
    rng = np.random.default_rng(n + chunk + heads)
    layers = []
    for _ in range(heads):
        w = rng.standard_normal((n, 12))
        layers.append((np.cov(_correlated(rng, 400, n, 6).T, bias=True), w @ w.T))
    order, errors = _greedy_as_written(layers, n // 8, chunk)
    removal = greedy_removal(layers, min_keep=n // 8, chunk=chunk)
    assert removal.order == order
    np.testing.assert_allclose(removal.errors[:len(errors)], errors, rtol=1e-10, atol=0)


@pytest.fixture(scope="module")
def calib_npy(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npy"
    np.save(path, np.random.default_rng(5).standard_normal((64, 3, 64, 64)).astype(np.float32))
    return path


CASES = [
    ("toast_budget", dict(method="toast", target_flops=0.6)),
    ("toast_budget_multiple", dict(method="toast", target_flops=0.7, multiple=8)),
    ("toast_scwp", dict(method="toast", head_sparsity=0.5)),
    ("cait_budget", dict(method="cait", target_flops=0.4)),
    ("cait_cdcp", dict(method="cait", channel_ratio=0.5)),
]


@pytest.mark.parametrize("case_id,settings", CASES, ids=[c[0] for c in CASES])
def test_compensated_graph_equals_the_compensated_pytorch_model(tmp_path, export_cache, calib_npy, case_id, settings):
    exported = export_cache(*SMALL_VIT, "torchscript")
    out = convert(exported.onnx_path, tmp_path / "out", ConvertOptions(build=False, calib=str(calib_npy), **settings))
    decisions = json.loads((tmp_path / "out" / "decisions.json").read_text())
    assert decisions["compensation"]["tensors"] and (tmp_path / "out" / "compensation.safetensors").is_file()
    record = ReferenceRecord.load(exported.record_path)
    reference = compressed_reference(build_model(record), decisions, tmp_path / "out")
    x = np.random.default_rng(3).standard_normal((8, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    got = run_onnx(out.onnx_path, x)
    assert rel_error(got, want) <= 1e-5
    singles = run_onnx_each(out.onnx_path, x[:8])
    assert rel_error(singles, got) <= 1e-5
    if "target_flops" in settings:
        assert out.flops_after <= settings["target_flops"] * out.flops_before * (1 + 1e-9)
    if settings.get("multiple", 1) > 1:
        g = read_vit(out.onnx_path)
        assert all(d % 8 == 0 for b in g.blocks for d in (b.attn.head_dim_qk, b.attn.head_dim_v, b.ffn.hidden))
    # Compensation really changed the weights: the same pruning without it computes something else.
    plain = convert(exported.onnx_path, tmp_path / "plain",
                    ConvertOptions(build=False, calib=str(calib_npy), compensate=False, **settings))
    assert rel_error(run_onnx(plain.onnx_path, x), got) > 1e-3
    # Every fit the report lists lowered its layer's calibration reconstruction error.
    fits = [p for p in decisions["passes"] if p.get("pass") == "compensation"][0]["blocks"]
    for block in fits:
        for kind in ("qk", "v", "ffn"):
            if kind in block:
                assert block[kind]["with"] <= block[kind]["without"]


def test_hf_model_compensated_with_a_budget(tmp_path, export_cache):
    exported = export_cache("hf:ViTForImageClassification", HF_TINY, "torchscript")
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(2).standard_normal((8, 3, 224, 224)).astype(np.float32))
    out = convert(exported.onnx_path, tmp_path / "out",
                  ConvertOptions(build=False, calib=str(calib), target_flops=0.6))
    decisions = json.loads((tmp_path / "out" / "decisions.json").read_text())
    reference = compressed_reference(build_model(ReferenceRecord.load(exported.record_path)), decisions, tmp_path / "out")
    x = np.random.default_rng(4).standard_normal((4, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        assert rel_error(run_onnx(out.onnx_path, x), reference(torch.from_numpy(x)).numpy()) <= 1e-5
    assert out.flops_after <= 0.6 * out.flops_before


def test_same_calibration_gives_identical_bytes(tmp_path, export_cache, calib_npy):
    exported = export_cache(*SMALL_VIT, "torchscript")
    options = ConvertOptions(build=False, calib=str(calib_npy), target_flops=0.6)
    a = convert(exported.onnx_path, tmp_path / "a", options)
    b = convert(exported.onnx_path, tmp_path / "b", options)
    for name in ("model.onnx", "decisions.json", "compensation.safetensors"):
        assert (a.out_dir / name).read_bytes() == (b.out_dir / name).read_bytes()


@pytest.mark.parametrize("argv,needle", [
    (["--target-flops", "0.02"], "no allocation meets"),
    (["--target-flops", "0.6", "--multiple", "100"], "--multiple"),
    (["--target-flops", "1.5"], "--target-flops"),
    (["--target-flops", "0.6", "--head-sparsity", "0.5"], "without --head-sparsity"),
    (["--target-flops", "0.6", "--fit-images", "2"], "more calibration tokens"),
    (["--head-sparsity", "0.5", "--compensate", "--no-calib"], None),
])
def test_bad_compensation_requests_exit_2_and_write_nothing(tmp_path, export_cache, calib_npy, argv, needle):
    exported = export_cache(*SMALL_VIT, "torchscript")
    out = tmp_path / "out"
    calib = [] if "--no-calib" in argv else ["--calib", str(calib_npy)]
    argv = [a for a in argv if a != "--no-calib"]
    result = runner.invoke(app, ["convert", str(exported.onnx_path), "--out", str(out), "--no-build", *calib, *argv])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert needle is None or needle in result.output
    assert needle is not None or "--calib" in result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vit2trt")]


def test_target_flops_for_toast_needs_calibration_images(tmp_path, export_cache):
    exported = export_cache(*SMALL_VIT, "torchscript")
    result = runner.invoke(app, ["convert", str(exported.onnx_path), "--out", str(tmp_path / "out"), "--no-build",
                                 "--target-flops", "0.6"])
    assert result.exit_code == 2 and "--calib" in result.output and not (tmp_path / "out").exists()


SHARED_REAL = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "real"


@pytest.mark.skipif(not (SHARED_REAL / "vit_tiny_tin200.safetensors").is_file(),
                    reason="../shared/real (the real pretrained ViT-Ti) is not present (fresh clone)")
def test_compensation_recovers_accuracy_on_real_photos(tmp_path):
    """Real weights, real photos: SCWP 0.5 calibrated on 128 photos, measured on 112 others."""
    from vit2trt.converter.measure.calibration import image_files, load_calibration
    from vit2trt.converter.deploy.export import export_model

    exported = export_model("timm:vit_tiny_patch16_224", tmp_path / "vit.onnx",
                            weights=str(SHARED_REAL / "vit_tiny_tin200.safetensors"), model_args={"num_classes": 200})
    files = image_files(SHARED_REAL / "val")
    labels = dict(line.split() for line in (SHARED_REAL / "val.labels.txt").read_text().splitlines() if line.strip())
    folder = tmp_path / "photos"
    folder.mkdir()
    for f in files[:240]:
        (folder / f.name).symlink_to(f)
    record = ReferenceRecord.load(exported.record_path)
    x = load_calibration(folder, (3, 224, 224), record.preprocessing)
    y = np.array([int(labels[f.name]) for f in image_files(folder)])
    np.save(tmp_path / "calib.npy", x[:128])
    held_x, held_y = x[128:], y[128:]
    top1 = {}
    for compensate in (False, True):
        out = convert(exported.onnx_path, tmp_path / f"out{compensate}", ConvertOptions(
            build=False, head_sparsity=0.5, calib=str(tmp_path / "calib.npy"), compensate=compensate))
        top1[compensate] = float(np.mean(run_onnx(out.onnx_path, held_x).argmax(1) == held_y))
    original = float(np.mean(run_onnx(exported.onnx_path, held_x).argmax(1) == held_y))
    assert original > 0.55
    assert top1[True] > top1[False] + 0.05


@pytest.mark.skipif(__import__("vit2trt.converter.deploy.engine", fromlist=["tensorrt_backend"]).tensorrt_backend()[1] is None,
                    reason="no tensorrt or tensorrt_rtx module")
def test_budgeted_compensated_graph_builds_with_tensorrt(tmp_path, export_cache, calib_npy):
    exported = export_cache(*SMALL_VIT, "torchscript")
    result = runner.invoke(app, ["convert", str(exported.onnx_path), "--method", "cait", "--target-flops", "0.4",
                                 "--calib", str(calib_npy), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.engine").stat().st_size > 10_000
