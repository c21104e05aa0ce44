"""`vit2trt plan --heal`: candidates near the goal are healed and judged healed, on images they were
not healed on; which ones and in what order; the time limit and Ctrl-C keep the best, healing included."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import vit2trt.converter.planning.planner as planner
from vit2trt.converter.measure.calibration import load_calibration
from vit2trt.converter.planning.healing import FAR_KL, HEAL_REACH, CandidateHealer, heal_lr, next_to_heal
from vit2trt.converter.planning.planner import Candidate, Family, PlanOptions, _choose, _midpoint, _walk, plan
from vit2trt.converter.measure.speedup import PairedTiming, speedup_of

from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.runtime import run_batched, session_runner

from conftest import run_onnx

SMALL_VIT = ("timm:vit_tiny_patch16_224", {"depth": 4, "img_size": 96, "num_classes": 10, "mlp_ratio": 2})


@pytest.fixture(scope="module")
def photos(tmp_path_factory, export_cache):
    """Seeded noise photos: 40 to heal on, and a labelled --val folder of 24 new ones plus 4 of the heal
    photos (a user's mistake the plan warns about); labels are the original's own predictions."""
    exported = export_cache(*SMALL_VIT, "torchscript")
    root = tmp_path_factory.mktemp("plan_heal")
    rng = np.random.default_rng(11)
    (root / "heal").mkdir()
    (root / "val").mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(root / "heal" / f"h{i:02d}.png")
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(root / "val" / f"v{i:02d}.png")
    for i in range(4):
        shutil.copy(root / "heal" / f"h{i:02d}.png", root / "val" / f"h{i:02d}.png")
    record = json.loads(exported.record_path.read_text())
    val_x = load_calibration(str(root / "val"), (3, 96, 96), record.get("preprocessing"))
    val_y = run_onnx(exported.onnx_path, val_x).argmax(1)
    files = sorted(p.name for p in (root / "val").iterdir())
    (root / "val.txt").write_text("".join(f"{name} {label}\n" for name, label in zip(files, val_y)))
    calib = np.random.default_rng(7).standard_normal((48, 3, 96, 96)).astype(np.float32)
    np.save(root / "calib.npy", calib)
    return exported, root, val_x, val_y


@pytest.fixture
def fast_candidates(monkeypatch):
    """Every candidate times twice as fast as the original (credited at most its FLOPs ratio)."""
    def twice_as_fast(original, candidate, x, rounds, flops_ratio=None, **_):
        return PairedTiming(speedup_of([2.0] * rounds, flops_ratio), [0.002] * rounds, [0.001] * rounds, 1)

    monkeypatch.setattr(planner, "measure_speedup", twice_as_fast)


def _options(root, tmp_path, **kw) -> PlanOptions:
    defaults = dict(calib=str(root / "calib.npy"), out_dir=str(tmp_path / "plan"), target_speedup=1.05,
                    methods=["tome"], build=False, rounds=3, val=str(root / "val"), val_labels=str(root / "val.txt"),
                    heal=str(root / "heal"), heal_epochs=1, heal_batch=8, heal_time=120, time_limit=900)
    return PlanOptions(**{**defaults, **kw})


def test_healed_candidates_are_judged_healed_on_val(photos, tmp_path, fast_candidates, monkeypatch):
    """Through the command line: what it prints, what plan.json holds, and the healed graphs themselves."""
    exported, root, val_x, val_y = photos
    healed_models = []
    heal = CandidateHealer.heal

    def keep(self, artifact, seconds, lr, progress):
        out = heal(self, artifact, seconds, lr, progress)
        healed_models.append(out[0])
        return out

    monkeypatch.setattr(CandidateHealer, "heal", keep)
    result = CliRunner().invoke(app, [
        "plan", str(exported.onnx_path), "--calib", str(root / "calib.npy"), "--val", str(root / "val"),
        "--val-labels", str(root / "val.txt"), "--target-speedup", "1.05", "--methods", "tome", "--no-build",
        "--rounds", "3", "--heal", str(root / "heal"), "--heal-epochs", "1", "--heal-batch", "8", "--heal-lr", "2e-4",
        "--out", str(tmp_path / "plan")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "4 of the 28 --val images are also in --heal" in text and "<=95%" in text
    written = json.loads((tmp_path / "plan" / "plan.json").read_text())
    candidates = written["candidates"]
    healed = [c for c in candidates if c["healed_from"]]
    assert healed and len(healed) == len(healed_models)
    for model, h in zip(healed_models, healed):
        twin = next(c for c in candidates if c["label"] == h["healed_from"])
        assert twin["meets"] and h["label"] == f"{twin['label']}, healed"   # fast enough
        # Only weights changed: the twin's FLOPs and speed, and its drop recorded as "before".
        assert [h[k] for k in ("flops_ratio", "speedup", "speedup_low", "speedup_high")] == \
            [twin[k] for k in ("flops_ratio", "speedup", "speedup_low", "speedup_high")]
        assert h["drop_before_heal"] == twin["drop"] and h["heal"]["steps"] == 5   # 36 images, batches of 8
        assert h["heal"]["lr"] == 2e-4 and h["heal"]["holdout_curve"][0]["step"] == 0
        # Judged healed: the healed graph, run independently on all of --val, scores what the planner says.
        logits = run_batched(session_runner(model.session()), val_x, 8)
        assert h["accuracy"] == pytest.approx(float(np.mean(logits.argmax(1) == val_y)), abs=1e-12)
        assert f"{h['label']} (drop {h['drop_before_heal'] * 100:+.2f} -> {h['drop'] * 100:+.2f} pt)" in text
    chosen = next(c for c in candidates if c["label"] == written["chosen"])
    assert chosen["drop_bound"] == min(c["drop_bound"] for c in candidates if c["meets"])
    decisions = json.loads((tmp_path / "plan" / "decisions.json").read_text())
    assert ("heal" in decisions) == (chosen["healed_from"] is not None)
    markdown = (tmp_path / "plan" / "plan.md").read_text()
    assert f"| {healed[0]['drop_before_heal'] * 100:+.2f} |" in markdown


def test_ctrl_c_while_healing_keeps_the_best_healed_so_far(photos, tmp_path, fast_candidates):
    exported, root, _, _ = photos

    def progress(message):
        if message.startswith("healing ") and "img/s" in message:
            raise KeyboardInterrupt   # inside the training loop: heal keeps its best state and stops

    result = plan(exported.onnx_path, _options(root, tmp_path, heal_epochs=3), progress=progress)
    healed = [c for c in result.candidates if c.healed_from]
    assert "while healing" in result.stopped and len(healed) == 1 and healed[0].heal["stopped_by"] == "interrupt"
    assert result.chosen is not None and (tmp_path / "plan" / "model.onnx").is_file()


def test_time_limit_counts_healing(photos, tmp_path, fast_candidates, monkeypatch):
    exported, root, _, _ = photos
    now = [0.0]
    given = []
    heal = CandidateHealer.heal
    monkeypatch.setattr(CandidateHealer, "heal", lambda self, a, seconds, lr, p: given.append(seconds) or heal(self, a, seconds, lr, p))
    choose_next = planner.next_to_heal

    monkeypatch.setattr(planner, "MIN_HEAL_S", 1.5)   # (60 s: seconds of real training in a test)

    def late(*args):   # the search took all but 2 s of the limit: the heal gets those 2 s, not --heal-time
        now[0] = 898.0
        return choose_next(*args)

    monkeypatch.setattr(planner, "next_to_heal", late)
    result = plan(exported.onnx_path, _options(root, tmp_path / "a", heal_epochs=None), clock=lambda: now[0])
    healed = [c for c in result.candidates if c.healed_from]
    assert given == [2.0] and len(healed) == 1 and healed[0].heal["seconds"] < 4   # not --heal-time's 120

    def spent(*args):   # less than MIN_HEAL_S left once the search is done (a heal of a few steps changes
        now[0] = 899.0  # nothing): no heal, the best unhealed model is kept
        return choose_next(*args)

    given.clear()
    now[0] = 0.0
    monkeypatch.setattr(planner, "next_to_heal", spent)
    result = plan(exported.onnx_path, _options(root, tmp_path / "b"), clock=lambda: now[0])
    assert given == [] and "ended healing" in result.stopped
    assert result.chosen is not None and result.chosen.healed_from is None


def _candidate(label, speed, drop, meets, pareto=True):
    return Candidate("tome", label, {}, flops_ratio=speed, speedup=speed, drop=drop, drop_bound=drop + 0.005,
                     meets=meets, pareto=pareto)


def _healed(twin, drop, meets):
    h = _candidate(f"{twin.label}, healed", twin.speedup, drop, meets)
    h.healed_from, h.drop_before_heal = twin.label, twin.drop
    return h


def test_which_candidates_are_healed_and_in_what_order():
    options = PlanOptions(calib="", out_dir="", max_drop=0.01, heal="photos")
    mild, a, b, c, d = (_candidate("mild", 1.2, 0.0, True), _candidate("a", 1.4, 0.02, False),
                        _candidate("b", 1.6, 0.04, False), _candidate("c", 1.8, 0.06, False),
                        _candidate("d", 2.0, 0.08, False))
    cands = [mild, a, b, c, d, _candidate("beyond reach", 2.5, 0.01 + HEAL_REACH + 0.01, False),
             _candidate("slower than the choice", 1.1, 0.02, False)]
    meets = lambda x: x.meets   # noqa: E731

    def walk(outcomes: dict) -> list[str]:
        """The order healed when each candidate's heal succeeds (True) or still misses the budget (False)."""
        order, pool = [], list(cands)
        while (target := next_to_heal(pool, options, set(order), _choose, meets)) is not None:
            order.append(target.label)
            pool.append(_healed(target, 0.0 if outcomes[target.label] else target.drop, outcomes[target.label]))
        return order

    # Bisection on the drop among the misses within reach that are faster than the choice: the middle first.
    assert next_to_heal(cands, options, set(), _choose, meets).label == "c"
    # c fails: nothing that lost as much is tried; b (the middle of a, b) heals, and it beats all that is left.
    assert walk({"c": False, "b": True}) == ["c", "b"]
    # c heals: only the faster d is left worth it; d fails too, and c (healed) stays the choice.
    assert walk({"c": True, "d": False}) == ["c", "d"]
    # All fail: down to a, then the choice itself.
    assert walk({"c": False, "b": False, "a": False, "mild": False}) == ["c", "b", "a", "mild"]
    options = PlanOptions(calib="", out_dir="", target_speedup=1.4, heal="photos")
    fast = [_candidate("slow", 1.2, 0.0, False), _candidate("a", 1.5, 0.04, True),
            _candidate("b", 1.9, 0.02, True), _candidate("off the front", 2.0, 0.05, True, pareto=False)]
    order = []
    while (c := next_to_heal(fast, options, set(order), _choose, lambda c: c.meets)) is not None:
        order.append(c.label)
    assert order == ["b", "a"]   # fast enough and on the front, the most accurate first


def test_the_learning_rate_follows_the_distance_from_the_original(photos, tmp_path, fast_candidates):
    """1e-4 heals a candidate far from the original and undoes a near one: without --heal-lr each heal's rate
    follows the candidate's KL on the judging images; --heal-lr sets them all."""
    options = PlanOptions(calib="", out_dir="", max_drop=0.01, heal="photos")
    near, far = _candidate("near", 1.3, 0.015, False), _candidate("far", 2.0, 0.07, False)
    near.kl, far.kl = FAR_KL / 3, FAR_KL * 1.5
    assert (heal_lr(near, options), heal_lr(far, options)) == (2e-5, 1e-4)
    assert heal_lr(far, PlanOptions(calib="", out_dir="", heal="photos", heal_lr=3e-5)) == 3e-5
    exported, root, _, _ = photos   # and the rate chosen is the rate healed with
    result = plan(exported.onnx_path, _options(root, tmp_path))
    twins = {c.label: c for c in result.candidates}
    healed = [c for c in result.candidates if c.healed_from]
    assert healed and all(h.heal["lr"] == heal_lr(twins[h.healed_from], options) for h in healed)


def test_with_heal_the_walk_goes_on_past_the_budget_within_reach():
    drops = {4: 0.0, 8: 0.02, 12: 0.05, 16: 0.2, 20: 0.3}
    family = Family("tome", "tome", [{"r": r} for r in drops], _midpoint("r", True))
    seen = []

    def evaluate(family, level):
        c = Candidate("tome", str(level["r"]), level, drop=drops.get(level["r"], 0.01))
        c.meets = c.drop <= 0.01
        seen.append(level["r"])
        return c

    _walk(family, evaluate, PlanOptions(calib="", out_dir="", max_drop=0.01, heal="photos"), lambda: 0.0)
    assert seen == [4, 8, 6, 12, 16]   # 8 misses: halved to 6, then on while within 10 pt; 16 is beyond
    seen.clear()
    _walk(family, evaluate, PlanOptions(calib="", out_dir="", max_drop=0.01), lambda: 0.0)
    assert seen == [4, 8, 6]


def test_heal_levels_reach_further():
    from vit2trt.passes.methods import REGISTRY

    class Vit:
        depth = 12

    assert [l["target_flops"] for l in REGISTRY["cait"].plan_levels(Vit, True, healing=True)][-2:] == [0.4, 0.33]
    assert min(l["target_flops"] for l in REGISTRY["toast"].plan_levels(Vit, True, healing=True)) == 0.4
    assert min(l["target_flops"] for l in REGISTRY["toast"].plan_levels(Vit, True)) == 0.55

