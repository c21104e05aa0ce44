"""vit2trt heal: the healed graph equals the healed PyTorch model, only weights change, the held-out judge
improves, the same seed gives the same bytes, time limit and Ctrl-C keep the best, bad input exits 2;
and the weight write-back is proven on every exporter form of the reader's matrix."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.artifact import Artifact
from vit2trt.converter.convert import ConvertOptions, Original, compress, convert
from vit2trt.converter.deploy.export import export_model
from vit2trt.converter.graph import describe_vit
from vit2trt.converter.healing.distill import _Taps
from vit2trt.converter.healing.heal import HealOptions, heal
from vit2trt.converter.healing.weights import match_weights, write_weights
from vit2trt.models import digits

from conftest import HF_TINY, rel_error, run_onnx

runner = CliRunner()


@pytest.fixture(scope="module")
def digits_cait(tmp_path_factory):
    """The bundled trained digits ViT, compressed by CAIT to half its FLOPs (which costs it accuracy), and
    300 training canvases as images (no labels) to heal on."""
    root = tmp_path_factory.mktemp("heal")
    exported = export_model(f"timm:{digits.MODEL_NAME}", root / "digits.onnx", weights=str(digits.CHECKPOINT),
                            model_args=digits.MODEL_ARGS)
    train, _, _, _ = digits.load_split()
    digits.save_canvases(root / "images", digits.compose(train[:300], np.random.default_rng(5)))
    convert(exported.onnx_path, root / "out", ConvertOptions("cait", target_flops=0.5, calib=str(root / "images"),
                                                             calib_limit=64))
    return root


def _constant_shapes(model: onnx.ModelProto) -> list:
    """Every node's op and the shapes of its constant inputs, in order: what healing must not change."""
    constants = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [(n.op_type, tuple(constants.get(i) for i in n.input)) for n in model.graph.node]


def test_heal_improves_the_held_out_judge_and_the_graph_equals_the_healed_model(digits_cait, tmp_path):
    out = tmp_path / "healed"
    section = heal(digits_cait / "out", HealOptions(digits_cait / "images", epochs=5, batch=32, lr=3e-4, out=out,
                                                   device="cpu"))
    assert section["holdout_after"]["kl"] < 0.9 * section["holdout_before"]["kl"]
    assert section["check"]["relative_error"] < 1e-5 and section["stopped_by"] == "schedule"
    assert section["images"] + section["holdout_images"] == 300 and section["frozen_weights"] == []
    before, after = onnx.load(str(digits_cait / "out" / "model.onnx")), onnx.load(str(out / "model.onnx"))
    assert _constant_shapes(after) == _constant_shapes(before)            # same nodes, same shapes
    changed = {t.name for t in after.graph.initializer} - {t.name for t in before.graph.initializer}
    assert changed, "no weight changed"
    # An independent check: the folder reopened rebuilds the healed PyTorch model, which the graph equals.
    healed = Artifact.open(out)
    assert healed.decisions["heal"]["file"] == "healed.safetensors" and (out / "healed.safetensors").is_file()
    assert json.loads((out / "report.json").read_text())["heal"]["loss_curve"]
    x = digits.test_set()[0][:24]
    with torch.no_grad():
        want = healed.torch_model()(torch.from_numpy(x)).numpy()
    assert rel_error(run_onnx(out / "model.onnx", x), want) < 1e-5
    # ... and differs from the model before healing
    assert rel_error(run_onnx(digits_cait / "out" / "model.onnx", x), want) > 1e-3


def test_heal_with_only_the_onnx_graph(digits_cait, tmp_path):
    """No reference record: teacher and student are the PyTorch ViT assembled from the original graph."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(digits_cait / "out", bare)
    (bare / "reference.json").unlink()
    section = heal(bare, HealOptions(digits_cait / "images", epochs=1, batch=32, lr=3e-4, device="cpu"))
    assert section["check"]["relative_error"] < 1e-5 and section["trained_tensors"] > 0
    x = digits.test_set()[0][:8]
    with torch.no_grad():
        want = Artifact.open(bare).torch_model(Artifact.open(digits_cait / "out").reference_record())(
            torch.from_numpy(x)).numpy()
    assert rel_error(run_onnx(bare / "model.onnx", x), want) < 1e-5   # the timm model heals the same


def test_same_seed_gives_the_same_bytes_and_torchrun_the_same_weights(digits_cait, tmp_path):
    outs = [tmp_path / name for name in ("a", "b")]
    for out in outs:
        heal(digits_cait / "out", HealOptions(digits_cait / "images", epochs=1, batch=32, lr=3e-4, out=out,
                                              device="cpu", seed=3, limit=160))
    for name in ("model.onnx", "healed.safetensors"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    # Two gloo processes under torchrun, each training on half of every batch of 32, reach the weights
    # one process reaches (up to the order of floating-point sums), and rank 0 alone writes them.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--module", "vit2trt.cli", "heal", str(digits_cait / "out"), "--images",
                           str(digits_cait / "images"), "--limit", "160", "--epochs", "1", "--batch", "32", "--lr", "3e-4", "--seed", "3",
                           "--device", "cpu", "--out", str(tmp_path / "ddp")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("healed ") == 1   # one report, from rank 0
    section = Artifact.open(tmp_path / "ddp").decisions["heal"]
    assert section["processes"] == 2 and section["backend"] == "gloo"
    one, two = load_file(str(outs[0] / "healed.safetensors")), load_file(str(tmp_path / "ddp" / "healed.safetensors"))
    student = Artifact.open(digits_cait / "out").torch_model()
    start = dict(student.named_parameters())
    assert one.keys() == two.keys()
    single = Artifact.open(outs[0]).decisions["heal"]
    assert [j["kl"] for j in section["loss_curve"]] == pytest.approx([j["kl"] for j in single["loss_curve"]], rel=1e-4)
    assert [j["train_loss"] for j in section["loss_curve"][1:]] == pytest.approx(
        [j["train_loss"] for j in single["loss_curve"][1:]], rel=1e-4)
    # Weights as a whole: the key biases get no gradient but float noise, which Adam scales up to steps
    # of the learning rate, so single values may differ by a few lr while the model is the same.
    moved = sum(float((one[k] - start[k].detach()).square().sum()) for k in one) ** 0.5
    apart = sum(float((one[k] - two[k]).square().sum()) for k in one) ** 0.5
    assert moved > 1e-3 and apart < 0.01 * moved, (moved, apart)


def test_time_limit_and_ctrl_c_write_the_best_state(digits_cait, tmp_path):
    steps = []

    def interrupt_at_step_4(message: str) -> None:
        if message.startswith("healing ("):
            steps.append(message)
            if len(steps) == 4:
                raise KeyboardInterrupt

    section = heal(digits_cait / "out", HealOptions(digits_cait / "images", epochs=5, batch=16, lr=1e-3,
                                                   out=tmp_path / "interrupted", device="cpu"),
                   progress=interrupt_at_step_4)
    assert section["stopped_by"] == "interrupt" and section["steps"] == 4
    assert Artifact.open(tmp_path / "interrupted").healed
    # A deadline already past when training starts: one step, then the best state is written.
    timed = heal(digits_cait / "out", HealOptions(digits_cait / "images", epochs=5, batch=16, time_limit=1e-9,
                                                 out=tmp_path / "timed", device="cpu"))
    assert timed["stopped_by"] == "time limit" and timed["steps"] == 1
    assert (tmp_path / "timed" / "healed.safetensors").is_file()


def test_a_slow_start_does_not_leave_the_time_limit_unused(digits_cait, tmp_path, monkeypatch):
    """The step count fixed after three probe steps is counted again at each judgement: a probe slowed
    (here by 0.3 s a step, as warm-up or a busy machine would) must not end training early. The clock is
    the test's own (0.1 s a step, judging free), so that a busy machine cannot change what is counted."""
    import types

    from vit2trt.converter.healing import distill, heal as heal_module

    now = [0.0]
    clock = types.SimpleNamespace(monotonic=lambda: now[0])
    monkeypatch.setattr(distill, "time", clock)
    monkeypatch.setattr(heal_module, "time", clock)
    planned = []

    def slow_probe(message: str) -> None:
        if message.startswith("healing ("):
            planned.append(int(message.rsplit("/", 1)[1]))
            now[0] += 0.1 + (0.3 if len(planned) <= 2 else 0.0)

    section = heal(digits_cait / "out", HealOptions(digits_cait / "images", batch=16, time_limit=3,
                                                   out=tmp_path / "timed", device="cpu"), progress=slow_probe)
    first = planned[2]   # the count the probe fixed after its third step (before: a provisional one)
    # 0.8 s went to the probe, whose pace (0.27 s a step) leaves room for 7; at 0.1 s a step 21 more fit.
    assert first == 7 and section["stopped_by"] == "time limit"
    assert 1.3 * first < section["steps"] <= 24 and section["planned_steps"] == max(planned[2:]) >= section["steps"]


def test_with_labels_the_best_state_is_chosen_by_kl_plus_cross_entropy(digits_cait, tmp_path):
    """With labels the training pulls towards them too; a judge of the KL alone could reject every step."""
    labels = digits.load_split()[1][:300]   # the canvases are the first 300 training digits, in order
    (tmp_path / "labels.txt").write_text("".join(f"{i:03d}.png {label}\n" for i, label in enumerate(labels)))
    section = heal(digits_cait / "out", HealOptions(digits_cait / "images", tmp_path / "labels.txt", epochs=1,
                                                   batch=32, lr=3e-4, out=tmp_path / "healed", device="cpu",
                                                   label_weight=0.5))
    curve = section["loss_curve"]
    assert len(curve) > 2 and all(j["score"] == pytest.approx(j["kl"] + 0.5 * j["ce"], abs=1e-5) for j in curve)
    assert section["holdout_after"]["score"] == min(j["score"] for j in curve)
    assert section["holdout_after"]["ce"] < section["holdout_before"]["ce"]


def test_cli_heals_in_place_and_validates_on_val(digits_cait, tmp_path):
    import shutil

    work = tmp_path / "out"
    shutil.copytree(digits_cait / "out", work)
    (work / "plan.md").write_text("kept\n")
    x, y = digits.test_set()
    val = tmp_path / "val"
    digits.save_canvases(val, x[:40])
    (tmp_path / "val.txt").write_text("".join(f"{i:03d}.png {label}\n" for i, label in enumerate(y[:40])))
    result = runner.invoke(app, ["heal", str(work), "--images", str(digits_cait / "images"), "--epochs", "1",
                                 "--batch", "32", "--device", "cpu", "--val", str(val),
                                 "--val-labels", str(tmp_path / "val.txt")])
    assert result.exit_code == 0, result.output
    assert "KL to the original" in result.output and "--val top-1" in result.output
    assert (work / "plan.md").read_text() == "kept\n"
    report = json.loads((work / "report.json").read_text())
    assert report["heal"]["validation"]["images"] == 40
    assert report["validation"]["surgery_error"] < 1e-5      # validate proves the healed graph too
    assert "## Healing" in (work / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--time-limit", "0"], "--time-limit"),
    (["--recipe", "everything"], "--recipe"),
    (["--holdout", "1.5"], "--holdout"),
    (["--epochs", "0"], "--epochs"),
    (["--val-labels", "x.txt"], "--val"),
])
def test_bad_options_exit_2(digits_cait, args, message):
    result = runner.invoke(app, ["heal", str(digits_cait / "out"), "--images", str(digits_cait / "images"), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_bad_inputs_exit_2(digits_cait, tmp_path):
    missing = runner.invoke(app, ["heal", str(digits_cait / "out"), "--images", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "--images" in missing.output
    few = tmp_path / "few"
    digits.save_canvases(few, digits.compose(digits.load_split()[0][:2], np.random.default_rng(0)))
    result = runner.invoke(app, ["heal", str(digits_cait / "out"), "--images", str(few)])
    assert result.exit_code == 2 and "at least 4 images" in result.output
    import shutil

    bare = tmp_path / "bare"   # no record, and the original graph is gone
    shutil.copytree(digits_cait / "out", bare)
    (bare / "reference.json").unlink()
    original = json.loads((bare / "original.json").read_text())
    (bare / "original.json").write_text(json.dumps(dict(original, path=str(tmp_path / "gone.onnx"))))
    result = runner.invoke(app, ["heal", str(bare), "--images", str(digits_cait / "images")])
    assert result.exit_code == 2 and "no reference record" in " ".join(result.output.split())
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["heal", str(digits_cait / "out"), "--images", str(digits_cait / "images"),
                                     "--device", "cuda"])
        assert result.exit_code == 2 and "CUDA" in result.output


# The write-back on every form the reader accepts: compress, perturb every trainable weight as training
# would, write it into the graph, and run both.
FORMS = [
    ("timm:vit_tiny_patch16_224", {"depth": 2, "img_size": 64, "num_classes": 10}, "torchscript", "toast"),
    ("timm:vit_tiny_patch16_224", {"depth": 2, "img_size": 64, "num_classes": 10}, "dynamo", "tome"),
    ("timm:vit_tiny_patch16_224", {"depth": 2, "img_size": 64, "num_classes": 10}, "dynamo@23", "cait"),
    ("timm:deit3_small_patch16_224", {"depth": 2, "img_size": 64, "num_classes": 10, "mlp_ratio": 2}, "dynamo", "toast"),
    ("timm:deit_tiny_distilled_patch16_224", {"depth": 2, "img_size": 64, "num_classes": 10}, "torchscript", "cait"),
    ("timm:vit_small_patch14_reg4_dinov2", {"depth": 2, "img_size": 56, "num_classes": 10}, "dynamo", "asvit"),
    ("timm:vit_tiny_patch16_224", {"depth": 2, "img_size": 64, "num_classes": 10, "class_token": False,
                                   "global_pool": "avg"}, "torchscript", "tome"),
    ("hf:ViTForImageClassification", dict(HF_TINY, image_size=64), "torchscript", "toast"),
]


@pytest.mark.parametrize("spec, args, exporter, method", FORMS,
                         ids=[f"{s.split(':')[1][:14]}-{e}-{m}" for s, _, e, m in FORMS])
def test_trained_weights_written_into_the_graph_equal_the_model(export_cache, spec, args, exporter, method):
    exported = export_cache(spec, args, exporter)
    options = {"toast": dict(target_flops=0.7), "tome": dict(r=2), "cait": dict(target_flops=0.6),
               "asvit": dict()}[method]
    size = args.get("img_size", args.get("image_size"))
    calib = np.random.default_rng(0).standard_normal((96, 3, size, size)).astype(np.float32)
    artifact = compress(Original.read(exported.onnx_path), ConvertOptions(method, calib=calib, **options))
    student = artifact.torch_model()
    vit = describe_vit(artifact.model)
    weights = match_weights(student, vit, artifact.model)
    assert not weights.unmatched
    names = {id(p) for p in weights.trainable}
    untrained = [n for n, p in student.named_parameters() if id(p) not in names]
    # only a bias the exporter left out of the graph (all zeros) may stay untrained
    assert all(n.endswith("bias") and not p.detach().abs().max() for n, p in student.named_parameters()
               if n in untrained), untrained
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in weights.trainable:
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=generator))
    healed = write_weights(artifact.model, weights)
    x = np.random.default_rng(1).standard_normal((4, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        want = student(torch.from_numpy(x)).numpy()
    assert rel_error(run_onnx(healed, x), want) < 1e-5
    assert rel_error(run_onnx(artifact.model, x), want) > 1e-4   # the weights did change the graph
    # The feature loss's taps hold the whole batch, also where the model runs image by image (AS-ViT).
    taps = _Taps(student, blocks=False)
    with torch.no_grad():
        student(torch.from_numpy(x))
        batch = taps.feature
        taps.reset()
        student(torch.from_numpy(x[2:3]))
    assert batch.shape[0] == 4 and torch.allclose(batch[2:3], taps.feature, atol=1e-6)
    taps.remove()


def _folder_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_bad_input_leaves_out_as_it_was(digits_cait, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(digits_cait / "out", out)
    before = _folder_bytes(out)
    flat = tmp_path / "flat"
    digits.save_canvases(flat, digits.compose(digits.load_split()[0][:6], np.random.default_rng(0)))
    (tmp_path / "labels.txt").write_text("".join(f"{i:03d}.png {99 if i == 2 else 1}\n" for i in range(6)))
    broken = tmp_path / "broken"
    shutil.copytree(flat, broken)
    (broken / "003.png").write_bytes(b"not a png")
    other = tmp_path / "other.onnx"
    shutil.copyfile(out / "model.onnx", other)    # a graph, but not the one OUT was converted from
    cases = [
        (["--images", str(flat), "--labels", str(tmp_path / "labels.txt")], "99"),
        (["--images", str(broken)], "003.png"),
        (["--images", str(flat), "--reference", str(other)], "SHA-256"),
    ]
    for args, needle in cases:
        result = runner.invoke(app, ["heal", str(out), *args])
        assert result.exit_code == 2 and needle in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
    assert _folder_bytes(out) == before
    (out / "decisions.json").unlink()
    result = runner.invoke(app, ["heal", str(out), "--images", str(flat)])
    assert result.exit_code == 2 and "decisions.json" in result.output


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt_rtx") is None, reason="no tensorrt_rtx module")
def test_a_healed_composition_rebuilds_its_engine(digits_cait, tmp_path):
    exported = digits_cait / "digits.onnx"
    convert(exported, tmp_path / "out", ConvertOptions("toast+tome", target_flops=0.7, r=4,
                                                       calib=str(digits_cait / "images"), engine="tensorrt-rtx"))
    engine_before = (tmp_path / "out" / "model.engine").read_bytes()
    section = heal(tmp_path / "out", HealOptions(digits_cait / "images", epochs=1, batch=32, lr=3e-4, device="cpu"))
    assert section["check"]["relative_error"] < 1e-5
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["build"]["status"] == "built", report["build"]
    assert (tmp_path / "out" / "model.engine").read_bytes() != engine_before   # built from the healed weights


def test_convert_heal_converts_then_heals(digits_cait, tmp_path):
    images = str(digits_cait / "images")
    common = ["convert", str(digits_cait / "digits.onnx"), "--method", "cait", "--target-flops", "0.5", "--calib",
              images, "--no-build", "--heal", images, "--heal-batch", "32", "--heal-lr", "3e-4", "--heal-device", "cpu"]
    # A bad healing option is refused before anything is converted.
    result = runner.invoke(app, common + ["--out", str(tmp_path / "refused"), "--heal-epochs", "0"])
    assert result.exit_code == 2 and "--epochs must be at least 1" in result.output
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "out"
    result = runner.invoke(app, common + ["--out", str(out), "--heal-epochs", "2"])
    assert result.exit_code == 0, result.output
    assert "KL to the original" in result.output
    healed = Artifact.open(out)
    section = healed.decisions["heal"]
    assert section["holdout_after"]["kl"] < section["holdout_before"]["kl"] and section["epochs"] == 2.0
    # The folder holds the healed model: its graph equals the healed PyTorch model, not the converted one.
    x = digits.test_set()[0][:16]
    with torch.no_grad():
        want = healed.torch_model()(torch.from_numpy(x)).numpy()
    assert rel_error(run_onnx(out / "model.onnx", x), want) < 1e-5
    assert rel_error(run_onnx(digits_cait / "out" / "model.onnx", x), want) > 1e-3
