"""benchmarks/imagenet_eval.py's code path with random weights (accuracy is near chance then and
is not asserted beyond being a fraction): labels from synset order, every method evaluated."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vit2trt.errors import Vit2TrtError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from imagenet_eval import evaluate, synset_labels  # noqa: E402


def _folder(tmp_path, synsets):
    folder = tmp_path / "imagenet"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for synset in synsets:
        Image.fromarray(rng.integers(0, 256, (240, 260, 3), dtype=np.uint8)).save(folder / f"{synset}_thing.JPEG")
    return folder


def test_labels_follow_sorted_synsets(tmp_path):
    folder = _folder(tmp_path, ["n03", "n01", "n02"])
    files, labels, classes = synset_labels(folder)
    assert [f.name[:3] for f in files] == ["n01", "n02", "n03"] and labels.tolist() == [0, 1, 2] and classes == 3


def test_every_method_is_evaluated_with_random_weights(tmp_path):
    folder = _folder(tmp_path, [f"n{i:02d}" for i in range(10)])
    top1 = evaluate("deit_tiny_patch16_224", None, folder, 6, ["toast", "asvit", "cait", "tome"],
                    model_args={"depth": 2, "num_classes": 10}, workdir=tmp_path)
    assert set(top1) == {"original", "toast", "asvit", "cait", "tome"}
    assert all(0.0 <= v <= 1.0 for v in top1.values())


def test_a_partial_folder_is_refused_for_imagenet_weights(tmp_path):
    with pytest.raises(Vit2TrtError, match="need all 1000"):
        evaluate("deit_tiny_patch16_224", None, _folder(tmp_path, ["n01", "n02"]), None, ["tome"])
