"""The bundled model's data: scikit-learn's handwritten digits on a mostly empty canvas.

Each 8x8 digit (16 grey levels) is scaled 3x to 24x24 and placed at a random position on a 64x64
canvas, so that with 8x8 patches most of the 64 patches are background: the situation token
pruning exists for. The split is fixed (a seeded permutation: 1347 train, 450 test) and the test
canvases are rebuilt deterministically from the package data with their own seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

CANVAS = 64
SCALE = 3
TEST_COUNT = 450
SPLIT_SEED = 0
TEST_LAYOUT_SEED = 1
# The bundled ViT: timm's VisionTransformer at this size (export with these constructor arguments).
MODEL_NAME = "vit_tiny_patch16_224"
ARCHITECTURE = {"img_size": CANVAS, "patch_size": 8, "in_chans": 1, "num_classes": 10, "embed_dim": 64,
                "depth": 5, "num_heads": 2}
# Canvases are mostly zero: standardize them, or the patch embedding sees almost nothing but the
# position embedding and training sits at chance for many epochs.
MEAN, STD = 0.02, 0.12
PREPROCESSING = {"input_size": [1, CANVAS, CANVAS], "mean": [MEAN], "std": [STD], "crop_pct": 1.0,
                 "interpolation": "bilinear"}
# The preprocessing rides with the model (timm's pretrained_cfg), so that the export record tells every
# command reading image files (calibration, validate, heal) how this model sees a canvas.
MODEL_ARGS = {**ARCHITECTURE, "pretrained_cfg_overlay": PREPROCESSING}
CHECKPOINT = Path(__file__).with_name("digits_vit.safetensors")


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train digits [N, 8, 8] in [0, 1], train labels, test digits, test labels): the fixed split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(digits.target))
    images = (digits.images / 16.0).astype(np.float32)
    test, train = order[:TEST_COUNT], order[TEST_COUNT:]
    return images[train], digits.target[train], images[test], digits.target[test]


def compose(digits: np.ndarray, rng: np.random.Generator, spread: float = 1.0) -> np.ndarray:
    """Place each digit (scaled) at a random position of an empty canvas, standardized: [N, 1, CANVAS, CANVAS].
    `spread` < 1 keeps positions within that fraction of the free range around the centre (training
    starts there: from fully random positions a ViT this small sits at chance for many epochs)."""
    size = 8 * SCALE
    canvases = np.zeros((len(digits), 1, CANVAS, CANVAS), dtype=np.float32)
    free = CANVAS - size
    low = int(round(free / 2 * (1 - spread)))
    high = free - low
    top = rng.integers(low, high + 1, len(digits))
    left = rng.integers(low, high + 1, len(digits))
    big = np.kron(digits, np.ones((SCALE, SCALE), dtype=np.float32))
    for i, (y, x) in enumerate(zip(top, left)):
        canvases[i, 0, y:y + size, x:x + size] = big[i]
    return (canvases - MEAN) / STD


def test_set() -> tuple[np.ndarray, np.ndarray]:
    """The test canvases and labels, identical on every machine."""
    _, _, digits, labels = load_split()
    return compose(digits, np.random.default_rng(TEST_LAYOUT_SEED)), labels.astype(np.int64)


def save_canvases(folder: Path, canvases: np.ndarray) -> None:
    """Write standardized canvases [N, 1, H, W] as PNG files 000.png, 001.png, ... (what a user's images
    would be): PREPROCESSING reads them back to the same values, up to 8-bit rounding."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True)
    for i, canvas in enumerate(canvases):
        pixels = np.clip((canvas[0] * STD + MEAN) * 255 + 0.5, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
