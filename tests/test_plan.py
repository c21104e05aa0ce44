"""`vit2trt plan`: the choice honours the budget on images no method fitted on, the search walks
coarse to fine and stops on time or Ctrl-C keeping the best so far, bad requests exit 2."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.artifact import Artifact
from vit2trt.converter.planning.planner import (Candidate, Family, PlanOptions, _choose, _midpoint, _split, _walk, credible_speedup,
                                   figure, plan)
from vit2trt.converter.measure.confidence import paired_drop_bound, smallest_confirmable
from vit2trt.converter.measure.speedup import PairedTiming, format_speedup, speedup_of

from conftest import run_onnx, run_onnx_each

runner = CliRunner()
# mlp_ratio 2: the budget and the fits scale with the FFN width cubed; 384 channels prove what 768 do.
SMALL_VIT = ("timm:vit_tiny_patch16_224", {"depth": 4, "img_size": 96, "num_classes": 10, "mlp_ratio": 2})


@pytest.fixture(scope="module")
def data(tmp_path_factory, export_cache):
    """48 seeded images labelled with the original's own predictions (so its top-1 is 100%)."""
    exported = export_cache(*SMALL_VIT, "torchscript")
    folder = tmp_path_factory.mktemp("plan_data")
    x = np.random.default_rng(7).standard_normal((48, 3, 96, 96)).astype(np.float32)
    labels = run_onnx(exported.onnx_path, x).argmax(1).astype(np.int64)
    np.save(folder / "calib.npy", x)
    np.save(folder / "labels.npy", labels)
    return exported, folder / "calib.npy", folder / "labels.npy", x, labels


@pytest.fixture
def fast_candidates(monkeypatch):
    """Every candidate times twice as fast as the original (credited at most its FLOPs ratio), so
    that which candidates count as faster does not depend on this machine's load."""
    def twice_as_fast(original, candidate, x, rounds, flops_ratio=None, **_):
        return PairedTiming(speedup_of([2.0] * rounds, flops_ratio), [0.002] * rounds, [0.001] * rounds, 1)

    monkeypatch.setattr("vit2trt.converter.planning.planner.measure_speedup", twice_as_fast)


def test_choice_honours_max_drop_on_the_held_out_images(tmp_path, data, fast_candidates):
    exported, calib, labels_file, x, labels = data
    # 24 judging images confirm no drop under 10 pt (tests/test_confidence.py): a budget of 30 pt.
    options = PlanOptions(calib=str(calib), out_dir=str(tmp_path / "plan"), labels=str(labels_file), max_drop=0.3,
                          methods=["tome", "cait", "toast+tome"], build=False, rounds=3, time_limit=600)
    saved = []
    save = Artifact.save
    with pytest.MonkeyPatch.context() as patch:   # the search writes nothing per candidate: one save, the winner's
        patch.setattr(Artifact, "save", lambda self, folder, **kw: saved.append(folder) or save(self, folder, **kw))
        result = plan(exported.onnx_path, options)
    assert saved == [tmp_path / "plan"] and sorted(p.name for p in tmp_path.iterdir()) == ["plan"]
    assert result.chosen is not None and result.chosen.drop_bound <= 0.3
    # Recompute the chosen model's drop on the held-out split, independently of the planner's judge.
    _, held = _split(len(x), options.holdout, options.seed)
    got = run_onnx_each(tmp_path / "plan" / "model.onnx", x[held])
    accuracy = float(np.mean(got.argmax(1) == labels[held]))
    assert 1.0 - accuracy == pytest.approx(result.chosen.drop, abs=1e-9)
    wrong = (got.argmax(1) != labels[held]).astype(float)   # the original is right on every image here
    assert result.chosen.drop_se == pytest.approx(wrong.std() / np.sqrt(len(held)), abs=1e-12)
    bound = paired_drop_bound(np.ones(len(held), bool), got.argmax(1) == labels[held])
    assert result.chosen.drop_bound == pytest.approx(bound, abs=1e-12) and bound > result.chosen.drop
    # The fastest of those confirmed within the budget was chosen (by the bound, not the measured drop),
    # and the files say so.
    within = [c for c in result.candidates if not c.error and c.drop_bound <= 0.3]
    assert credible_speedup(result.chosen) == max(credible_speedup(c) for c in within)
    assert all(c.meets == (c in within) for c in result.candidates if not c.error)
    written = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert written["chosen"] == result.chosen.label and len(written["candidates"]) == len(result.candidates)
    fields = {"speedup", "speedup_low", "speedup_high", "stable", "rounds", "exceeds_flops", "drop_bound"}
    assert fields <= set(written["candidates"][0])
    markdown = (tmp_path / "plan" / "plan.md").read_text()
    assert format_speedup(figure(result.chosen)) in markdown
    assert f"| {result.chosen.drop_bound * 100:.2f} |" in markdown
    decisions = json.loads((tmp_path / "plan" / "decisions.json").read_text())
    assert decisions["method"] == result.chosen.family.replace(" ", "")
    for name in ("plan.md", "plan.png", "report.json"):
        assert (tmp_path / "plan" / name).is_file()


def test_val_is_judged_whole_and_never_fitted_on(tmp_path, data, fast_candidates, monkeypatch):
    exported, calib, labels_file, x, labels = data
    # 40 judging images: 32 new ones and 8 that --calib holds too (a user's mistake, warned about).
    fresh = np.random.default_rng(8).standard_normal((32, 3, 96, 96)).astype(np.float32)
    val_x = np.concatenate([fresh, x[:8]])
    val_y = run_onnx(exported.onnx_path, val_x).argmax(1).astype(np.int64)
    np.save(tmp_path / "val.npy", val_x)
    np.save(tmp_path / "val_labels.npy", val_y)
    fitted = []
    import vit2trt.converter.convert as convert_module
    compress = convert_module.compress
    monkeypatch.setattr(convert_module, "compress", lambda source, o, **kw: fitted.append(o.calib) or
                        compress(source, o, **kw))
    options = PlanOptions(calib=str(calib), out_dir=str(tmp_path / "plan"), labels=str(labels_file), max_drop=0.3,
                          methods=["tome"], build=False, rounds=3, val=str(tmp_path / "val.npy"),
                          val_labels=str(tmp_path / "val_labels.npy"))
    result = plan(exported.onnx_path, options)
    # Every conversion fitted on all of --calib and on nothing else.
    assert fitted and all(isinstance(f, np.ndarray) and np.array_equal(f, x) for f in fitted if f is not None)
    # The judge read every --val image: the chosen model's accuracy, recomputed on all 40, is the planner's.
    assert result.chosen is not None
    got = run_onnx_each(tmp_path / "plan" / "model.onnx", val_x).argmax(1)
    assert result.chosen.accuracy == pytest.approx(float(np.mean(got == val_y)), abs=1e-12)
    assert result.chosen.drop_bound == pytest.approx(paired_drop_bound(np.ones(40, bool), got == val_y), abs=1e-12)
    written = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert (written["fit_images"], written["held_out_images"]) == (48, 40) and "--val" in written["judged_on"]
    assert any("8 of the 40 --val images are also in --calib" in n for n in result.notes)


def test_when_nothing_fits_the_plan_names_the_tightest_bound_and_the_floor():
    from vit2trt.converter.planning.planner import _unconfirmed

    options = PlanOptions(calib="", out_dir="", max_drop=0.01)
    candidates = [Candidate("tome", "r=4", {}, flops_ratio=1.2, speedup=1.2, drop=0.004, drop_bound=0.013),
                  Candidate("tome", "r=8", {}, flops_ratio=1.5, speedup=1.5, drop=0.01, drop_bound=0.021),
                  # tighter, but slower than the original: not what the user can take
                  Candidate("asvit", "0.95", {}, flops_ratio=1.05, speedup=0.9, drop=0.0, drop_bound=0.008)]
    note = _unconfirmed(candidates, options, 2000, has_val=True)
    assert ("among candidates faster than the original, the smallest drop confirmed was 1.30 pt "
            "(r=4: +0.40 pt measured") in note
    assert f"no smaller drop than {smallest_confirmable(2000) * 100:.2f} pt" in note and "2000 --val images" in note


def test_time_limit_keeps_the_best_found_so_far(tmp_path, data, fast_candidates):
    exported, calib, labels_file, _, _ = data
    ticks = iter(range(0, 10**6, 500))
    options = PlanOptions(calib=str(calib), out_dir=str(tmp_path / "plan"), labels=str(labels_file), max_drop=0.5,
                          methods=["tome"], build=False, rounds=3, time_limit=900)
    result = plan(exported.onnx_path, options, clock=lambda: next(ticks))
    assert "time limit" in result.stopped and 1 <= len(result.candidates) < 4
    assert result.chosen is not None and (tmp_path / "plan" / "model.onnx").is_file()


def test_ctrl_c_keeps_the_best_found_so_far(tmp_path, data, fast_candidates):
    exported, calib, labels_file, _, _ = data

    def progress(message):
        if message.startswith("candidate 2:"):
            raise KeyboardInterrupt

    options = PlanOptions(calib=str(calib), out_dir=str(tmp_path / "plan"), labels=str(labels_file), max_drop=0.5,
                          methods=["tome"], build=False, rounds=3)
    result = plan(exported.onnx_path, options, progress=progress)
    assert "interrupted" in result.stopped and len(result.candidates) == 1
    assert result.chosen is result.candidates[0] and (tmp_path / "plan" / "model.onnx").is_file()
    assert "interrupted" in (tmp_path / "plan" / "plan.md").read_text()


def _fake(drops: dict, speeds: dict):
    seen = []

    def evaluate(family, level):
        c = Candidate(family.name, str(level["r"]), level, speedup=speeds[level["r"]], drop=drops[level["r"]],
                      flops_ratio=speeds[level["r"]] + 1)
        c.meets = c.drop <= 0.01 if options.max_drop is not None else c.speedup >= options.target_speedup
        seen.append(c)
        return c

    options = PlanOptions(calib="", out_dir="")
    return evaluate, seen, options


def test_walk_stops_at_the_budget_and_halves_the_crossing_step():
    drops = {r: r / 1000 + 0.0005 for r in range(0, 20)}   # r = 10 and above lose more than 1 pt
    speeds = {r: 1 + r / 10 for r in range(0, 20)}
    family = Family("tome", "tome", [{"r": r} for r in (4, 8, 12, 16)], _midpoint("r", True))
    evaluate, seen, options = _fake(drops, speeds)
    options.max_drop = 0.01
    _walk(family, evaluate, options, lambda: 0.0)
    assert [c.settings["r"] for c in seen] == [4, 8, 12, 10]   # 16 is never tried; 10 halves 8..12
    assert _choose(seen, options).settings["r"] == 8
    evaluate, seen, options = _fake(drops, speeds)
    options.target_speedup = 2.0
    _walk(family, evaluate, options, lambda: 0.0)
    assert [c.settings["r"] for c in seen] == [4, 8, 12, 10]   # 12 is fast enough; 10 is too, and more accurate
    assert _choose(seen, options).settings["r"] == 10


def test_a_speedup_beyond_the_flops_ratio_is_credited_at_the_flops_ratio():
    c = Candidate("tome", "x", {}, flops_ratio=1.5, speedup=6.0)
    assert credible_speedup(c) == 1.5   # a speedup beyond the FLOPs ratio is never believed


@pytest.mark.parametrize("argv,needle", [
    (["--max-drop", "0.2", "--target-speedup", "2"], "exactly one of"),
    ([], "exactly one of"),
    (["--max-drop", "1.5"], "in [0, 1)"),
    (["--max-drop", "0.01"], "cannot be confirmed on 24 held-out --calib images"),
    (["--target-speedup", "0.5"], "above 1"),
    (["--max-drop", "0.2", "--runtime", "tensorrt"], "need full TensorRT"),
    (["--max-drop", "0.2", "--runtime", "tpu"], "--runtime must be"),
    (["--max-drop", "0.2", "--methods", "tome,speedy"], "cannot search speedy"),
    (["--max-drop", "0.2", "--holdout", "0.99"], "--holdout"),
    (["--max-drop", "0.2", "--calib-limit", "4"], "too few"),
    (["--max-drop", "0.2", "--labels", "WRONG_LABELS"], "integer labels"),
    (["--max-drop", "0.2", "--val", "CALIB"], "has no labels"),
    (["--max-drop", "0.2", "--val", "CALIB", "--val-labels", "CLASS_99"], "beyond the model's 10 outputs"),
    (["--max-drop", "0.2", "--val-labels", "CLASS_99"], "give --val too"),
    (["--max-drop", "0.2", "--calib-limit", "0"], "--calib-limit"),
    (["--max-drop", "0.2", "--heal", "CALIB", "--heal-time", "0"], "--heal-time"),
    (["--max-drop", "0.2", "--heal-labels", "CLASS_99"], "give --heal too"),
    (["--max-drop", "0.2", "--heal", "CALIB"], "--heal"),
    (["--max-drop", "0.2", "--heal", "CALIB", "--heal-epochs", "0"], "--heal-epochs"),
    (["--max-drop", "0.2", "--heal", "CALIB", "--heal-lr", "0"], "--heal-lr"),
])
def test_bad_plan_requests_exit_2_and_write_nothing(tmp_path, data, argv, needle):
    exported, calib, _, _, _ = data
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros(3, dtype=np.int64))
    class_99 = tmp_path / "class_99.npy"
    np.save(class_99, np.full(48, 99, dtype=np.int64))
    argv = [{"WRONG_LABELS": str(wrong), "CALIB": str(calib), "CLASS_99": str(class_99)}.get(a, a) for a in argv]
    result = runner.invoke(app, ["plan", str(exported.onnx_path), "--calib", str(calib), "--no-build",
                                 "--out", str(tmp_path / "out"), *argv])
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
