"""validate without a record from `vit2trt export`: a PyTorch model named on the command line, or the
original graph in ONNX Runtime; and, with neither, a message that says what the original was and
how to supply a reference."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.measure.validate import validate

from conftest import HF_TINY

runner = CliRunner()
TIMM_ARGS = ["--arg", "num_classes=10", "--arg", "img_size=64", "--arg", "depth=2"]


@pytest.fixture(scope="module")
def own_export(tmp_path_factory):
    """A user's own script: timm model, trained weights saved as safetensors, torch.onnx.export; no record."""
    root = tmp_path_factory.mktemp("own")
    torch.manual_seed(7)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64, depth=2).eval()
    save_file(model.state_dict(), str(root / "weights.safetensors"))
    torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(root / "model.onnx"), dynamo=False, opset_version=17,
                      input_names=["pixels"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}})
    convert(root / "model.onnx", root / "out", ConvertOptions(method="tome", r=4, build=False))
    np.save(root / "images.npy", np.random.default_rng(2).standard_normal((6, 3, 64, 64)).astype(np.float32))
    return root


def _validate(root, *args):
    return runner.invoke(app, ["validate", str(root / "out"), "--images", str(root / "images.npy"), *args])


def test_without_a_reference_the_original_graph_is_assembled_into_a_pytorch_model(own_export):
    """Only model.onnx: the PyTorch ViT assembled from the original graph is the reference, and the surgery
    check runs against it; it is the model the user trained (the same as their timm model and weights)."""
    assert (own_export / "out" / "original.json").is_file() and not (own_export / "out" / "reference.json").exists()
    result = validate(own_export / "out", own_export / "images.npy")
    assert result["reference_kind"] == "graph" and "assembled from model.onnx" in result["reference"]
    assert result["surgery_error"] is not None and result["surgery_error"] <= 1e-4
    by_timm = validate(own_export / "out", own_export / "images.npy", reference="timm:vit_tiny_patch16_224",
                       weights=own_export / "weights.safetensors",
                       model_args={"num_classes": 10, "img_size": 64, "depth": 2})
    assert by_timm["relative_error"] == pytest.approx(result["relative_error"], rel=1e-3, abs=1e-5)


def test_without_a_reference_or_the_original_the_message_says_what_to_give(own_export, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(own_export / "out", out)
    original = json.loads((out / "original.json").read_text())
    original["path"] = str(tmp_path / "moved" / "model.onnx")   # the original is no longer where it was
    (out / "original.json").write_text(json.dumps(original))
    before = (out / "report.json").read_text()
    result = runner.invoke(app, ["validate", str(out), "--images", str(own_export / "images.npy")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for needle in ("no reference record", str(tmp_path / "moved" / "model.onnx"), "2 blocks", "10 classes", "64x64",
                   "--reference timm:NAME --weights FILE", "--reference-onnx", "no longer there"):
        assert needle in text, needle
    assert (out / "report.json").read_text() == before   # nothing written


def test_a_timm_reference_with_weights_checks_the_surgery(own_export):
    result = validate(own_export / "out", own_export / "images.npy", reference="timm:vit_tiny_patch16_224",
                      weights=own_export / "weights.safetensors",
                      model_args={"num_classes": 10, "img_size": 64, "depth": 2})
    assert result["reference_kind"] == "pytorch" and "weights.safetensors" in result["reference"]
    assert result["surgery_error"] is not None and result["surgery_error"] <= 1e-4
    # The same comparison against the original graph in ONNX Runtime gives the same errors: the
    # PyTorch reference really is the model the user exported.
    by_onnx = validate(own_export / "out", own_export / "images.npy", reference_onnx=own_export / "model.onnx")
    assert by_onnx["reference_kind"] == "onnx" and by_onnx["surgery_error"] is None
    assert by_onnx["relative_error"] == pytest.approx(result["relative_error"], rel=1e-3, abs=1e-5)
    assert by_onnx["top1_agreement"] == result["top1_agreement"]
    report = json.loads((own_export / "out" / "report.json").read_text())
    assert report["validation"]["reference_kind"] == "onnx"
    assert "ONNX Runtime running model.onnx" in (own_export / "out" / "report.md").read_text()


def test_the_cli_names_the_reference_it_used(own_export):
    result = _validate(own_export, "--reference", "timm:vit_tiny_patch16_224", "--weights",
                       str(own_export / "weights.safetensors"), *TIMM_ARGS)
    assert result.exit_code == 0, result.output
    assert "reference: PyTorch timm:vit_tiny_patch16_224, weights weights.safetensors" in result.output
    result = _validate(own_export, "--reference-onnx", str(own_export / "model.onnx"))
    assert result.exit_code == 0, result.output
    assert "reference: ONNX Runtime running model.onnx" in " ".join(result.output.split())


def test_a_hugging_face_reference_by_name(tmp_path, export_cache):
    """An HF export whose record is gone: hf:ViTForImageClassification with the same config and seed
    rebuilds the same model."""
    exported = export_cache("hf:ViTForImageClassification", HF_TINY, "torchscript")
    shutil.copyfile(exported.onnx_path, tmp_path / "model.onnx")
    convert(tmp_path / "model.onnx", tmp_path / "out", ConvertOptions(method="tome", r=8, build=False))
    np.save(tmp_path / "images.npy", np.random.default_rng(2).standard_normal((4, 3, 224, 224)).astype(np.float32))
    args = [a for key, value in HF_TINY.items() for a in ("--arg", f"{key}={value}")]
    result = runner.invoke(app, ["validate", str(tmp_path / "out"), "--images", str(tmp_path / "images.npy"),
                                 "--reference", "hf:ViTForImageClassification", *args])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())["validation"]
    assert report["reference_kind"] == "pytorch" and report["surgery_error"] <= 1e-4


@pytest.mark.parametrize("args,needles", [
    (["--reference", "timm:no_such_vit"], ["--reference timm:no_such_vit", "no model"]),
    (["--reference", "timm:vit_tiny_patch16_224", "--arg", "img_size=64", "--arg", "depth=2"],
     ["returns 1000 outputs", "compressed graph 10", "num_classes=10"]),
    (["--reference", "timm:vit_tiny_patch16_224", "--arg", "num_classes=10", "--arg", "depth=2"],
     ["takes inputs of [3, 224, 224]", "[3, 64, 64]", "img_size"]),
    (["--reference", "timm:vit_tiny_patch16_224", "--reference-onnx", "x.onnx"], ["give one reference"]),
    (["--weights", "w.safetensors"], ["--weights and --arg describe a PyTorch model"]),
    (["--reference", "timm:vit_tiny_patch16_224", "--weights", "missing.safetensors", *TIMM_ARGS],
     ["does not exist"]),
    (["--reference-onnx", "missing.onnx"], ["--reference-onnx missing.onnx: no such file"]),
    (["--reference", "timm:vit_tiny_patch16_224", "--arg", "num_classes=10", "--arg", "img_size=64",
      "--weights", "{weights}"], ["weights do not fit"]),   # 12 blocks built, 2 in the checkpoint
], ids=["unknown_model", "other_width", "other_input_size", "two_references", "weights_alone", "missing_weights",
        "missing_onnx", "weights_of_another_model"])
def test_a_reference_that_does_not_fit_is_refused(own_export, args, needles):
    args = [a.replace("{weights}", str(own_export / "weights.safetensors")) for a in args]
    before = (own_export / "out" / "report.json").read_text()
    result = _validate(own_export, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert text.startswith("error:")
    for needle in needles:
        assert needle in text, text
    assert (own_export / "out" / "report.json").read_text() == before


def test_an_original_exported_at_a_fixed_batch_is_run_image_by_image(own_export, tmp_path):
    """Many users export at batch 1: the reference runs it one image at a time; another fixed batch is refused."""
    from safetensors.torch import load_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64, depth=2).eval()
    model.load_state_dict(load_file(str(own_export / "weights.safetensors")))
    for batch in (1, 2):
        torch.onnx.export(model, (torch.randn(batch, 3, 64, 64),), str(tmp_path / f"fixed{batch}.onnx"), dynamo=False,
                          opset_version=17)
    result = _validate(own_export, "--reference-onnx", str(tmp_path / "fixed1.onnx"), "--batch", "4")
    assert result.exit_code == 0, result.output
    fixed = json.loads((own_export / "out" / "report.json").read_text())["validation"]
    assert fixed["reference"].startswith("ONNX Runtime running fixed1.onnx")
    dynamic = validate(own_export / "out", own_export / "images.npy", reference_onnx=own_export / "model.onnx")
    assert fixed["relative_error"] == pytest.approx(dynamic["relative_error"], rel=1e-3, abs=1e-5)
    result = _validate(own_export, "--reference-onnx", str(tmp_path / "fixed2.onnx"))
    assert result.exit_code == 2 and "fixed batch of 2" in result.output


def test_a_rebuilt_reference_is_a_fresh_copy_equal_to_a_fresh_init(tmp_path):
    """build_model keeps initialized models for reuse: each call still returns its own model, equal to a
    fresh seeded init, and leaves the random state as a fresh init leaves it."""
    from safetensors.torch import save_file as save_torch

    from vit2trt.models import reference as reference_module
    from vit2trt.models.reference import ReferenceRecord, build_model

    record = ReferenceRecord("timm", "vit_tiny_patch16_224", {"depth": 1, "img_size": 32, "num_classes": 3},
                             {"input_size": [3, 32, 32]}, seed=11)
    reference_module._INITIALIZED.clear()
    first = build_model(record)
    after_fresh = torch.rand(4)
    second = build_model(record)
    assert torch.equal(torch.rand(4), after_fresh)   # the same random state after a reused init
    with torch.no_grad():
        first.head.weight.add_(1.0)   # a caller's change reaches no other copy
    third = build_model(record)
    torch.manual_seed(11)
    want = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=3)
    for model in (second, third):
        assert model is not first and not model.training
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))
    # With a weights file, the weights win over the reused init.
    weights = {k: v + 0.5 for k, v in want.state_dict().items()}
    save_torch(weights, str(tmp_path / "w.safetensors"))
    loaded = build_model(ReferenceRecord("timm", "vit_tiny_patch16_224", record.kwargs, record.preprocessing,
                                         weights=str(tmp_path / "w.safetensors")))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items())
