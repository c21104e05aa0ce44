"""The bundled digits model: a fixed split, deterministic test canvases, the committed checkpoint's
accuracy, and `vit2trt demo` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.models.digits import CANVAS, CHECKPOINT, MEAN, SCALE, STD, compose, load_split, test_set

needs_checkpoint = pytest.mark.skipif(not CHECKPOINT.is_file(), reason="bundled checkpoint not trained yet")


def test_split_is_fixed_and_test_canvases_are_deterministic():
    train, train_labels, test, test_labels = load_split()
    assert len(train) == 1347 and len(test) == 450 and set(test_labels) == set(range(10))
    a, la = test_set()
    b, lb = test_set()
    assert np.array_equal(a, b) and np.array_equal(la, lb) and a.shape == (450, 1, CANVAS, CANVAS)
    # Each canvas holds exactly its digit, scaled, and background elsewhere.
    pixels = a * STD + MEAN
    for i in range(5):
        ys, xs = np.nonzero(pixels[i, 0] > 1e-6)
        assert ys.max() - ys.min() < 8 * SCALE and xs.max() - xs.min() < 8 * SCALE
        assert np.isclose(pixels[i, 0].sum(), test[i].sum() * SCALE * SCALE, rtol=1e-4)
    # Most 8x8 patches are background.
    patches = (pixels.reshape(450, 8, 8, 8, 8).transpose(0, 1, 3, 2, 4).reshape(450, 64, 64) > 1e-6).any(-1)
    assert patches.mean() < 0.3


def test_curriculum_keeps_early_digits_centred():
    digits = load_split()[0][:50]
    centred = compose(digits, np.random.default_rng(0), spread=0.0) * STD + MEAN
    ys, xs = np.nonzero(centred[:, 0].max(0) > 1e-6)
    free = CANVAS - 8 * SCALE
    assert ys.min() >= free // 2 - 1 and xs.max() <= free // 2 + 8 * SCALE


@needs_checkpoint
def test_bundled_checkpoint_reaches_its_recorded_accuracy():
    import timm
    from safetensors.torch import load_file

    from vit2trt.models.digits import MODEL_ARGS, MODEL_NAME

    model = timm.create_model(MODEL_NAME, **MODEL_ARGS).eval()
    model.load_state_dict(load_file(str(CHECKPOINT)))
    images, labels = test_set()
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(1).numpy()
    accuracy = float(np.mean(predicted == labels))
    recorded = json.loads(CHECKPOINT.with_suffix(".json").read_text())["test_accuracy"]
    assert accuracy == pytest.approx(recorded, abs=0.005)
    assert accuracy >= 0.9


@needs_checkpoint
def test_demo_prints_every_method_with_real_accuracy(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--repeats", "2", "--time-cap", "0.2", "--no-build",
                                        "--heal-epochs", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["rows"]) == {"uncompressed", "toast", "asvit", "cait", "tome", "toast_keep", "toast+tome_keep",
                                    "cait_healed"}
    recorded = json.loads(CHECKPOINT.with_suffix(".json").read_text())["test_accuracy"]
    assert summary["rows"]["uncompressed"]["accuracy"] == pytest.approx(recorded, abs=0.005)
    for name, row in summary["rows"].items():
        if name != "uncompressed":
            assert row["flops_ratio"] > 1.0 and row["surgery_error"] <= 1e-4
            assert 0.0 <= row["accuracy"] <= 1.0
            for b in (1, 8):   # every figure carries its interval and its marking
                figure = row[f"speedup_b{b}"]
                assert figure["speedup_low"] <= figure["speedup"] <= figure["speedup_high"] and figure["rounds"] >= 2
                assert figure["exceeds_flops"] == (figure["speedup_low"] > row["flops_ratio"])
    # The settings that keep accuracy do (within 1 pt on the 450 test canvases), and the table says which.
    for name in ("toast_keep", "toast+tome_keep"):
        row = summary["rows"][name]
        assert row["keeps_accuracy_setting"] and row["accuracy_delta"] >= -0.01 and row["flops_ratio"] > 1.3
    assert summary["rows"]["toast"]["accuracy_delta"] < -0.1   # what the defaults cost, for contrast
    # Healing wins back part of what cait cost, on the test canvases it never saw, with the same graph.
    healed, cait = summary["rows"]["cait_healed"], summary["rows"]["cait"]
    assert healed["accuracy"] > cait["accuracy"] + 0.03 and healed["gflops"] == cait["gflops"]
    assert healed["heal"]["epochs"] == 1 and not healed["heal"]["labels"]
    text = (out / "demo.md").read_text()
    assert "`toast_keep` = `--method toast --target-flops 0.7 --compensate`" in text
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG" and "| tome |" in text
    assert (out / "cait" / "report.html").is_file() and "`cait_healed` is the `cait` row healed" in text
