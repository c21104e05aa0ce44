"""--calib: folders of images and .npy arrays feed the agreement check; bad ones are refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.measure.calibration import load_calibration

runner = CliRunner()
SHARED_CALIB = Path(__file__).resolve().parents[2] / "shared" / "assets" / "calib"


def _images(folder: Path, count: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        size = (rng.integers(180, 320), rng.integers(180, 320))
        pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return folder


def test_images_are_resized_cropped_and_normalised(tmp_path):
    folder = _images(tmp_path / "calib", 3)
    data = load_calibration(folder, (3, 224, 224), {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0})
    assert data.shape == (3, 3, 224, 224) and data.dtype == np.float32
    assert -1.0001 <= data.min() and data.max() <= 1.0001 and abs(float(data.mean())) < 0.1


def test_convert_checks_agreement_on_calibration_images(tmp_path, deit_tiny_ts):
    folder = _images(tmp_path / "calib", 5)
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(deit_tiny_ts.onnx_path), "--out", str(out), "--no-build",
                                 "--head-sparsity", "0.5", "--calib", str(folder)])
    assert result.exit_code == 0, result.output
    assert "5 calibration inputs" in " ".join(result.output.split())


def test_npy_calibration_and_its_shape_check(tmp_path, deit_tiny_ts):
    good = tmp_path / "good.npy"
    np.save(good, np.zeros((2, 3, 224, 224), dtype=np.float32))
    assert load_calibration(good, (3, 224, 224)).shape == (2, 3, 224, 224)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 3, 64, 64), dtype=np.float32))
    result = runner.invoke(app, ["convert", str(deit_tiny_ts.onnx_path), "--out", str(tmp_path / "out"),
                                 "--no-build", "--calib", str(bad)])
    assert result.exit_code == 2 and "expected float [N, 3, 224, 224]" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_a_broken_image_is_named(tmp_path, deit_tiny_ts):
    folder = _images(tmp_path / "calib", 2)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    result = runner.invoke(app, ["convert", str(deit_tiny_ts.onnx_path), "--out", str(tmp_path / "out"),
                                 "--no-build", "--calib", str(folder)])
    assert result.exit_code == 2 and "broken.jpg" in result.output and "Traceback" not in result.output


@pytest.mark.skipif(not SHARED_CALIB.is_dir(), reason="../shared/assets/calib is not present (fresh clone)")
def test_real_photographs_from_shared(tmp_path):
    data = load_calibration(SHARED_CALIB, (3, 224, 224), limit=8)
    assert data.shape == (8, 3, 224, 224)
    assert 0.5 < float(data.std()) < 2.0  # ImageNet-normalised natural images
