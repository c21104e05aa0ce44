"""`vit2trt plan`: the fastest compressed model within an accuracy budget, or the most accurate at a speed.

Every candidate is judged on images no method fitted on: a separate labelled set (--val), judged
whole, or else a seeded hold-out part of the calibration images. For each candidate the planner
measures latency on the target runtime against the original, in interleaved pairs, and accuracy on
the judging images: top-1 agreement and KL divergence to the original, and top-1 accuracy when labels
are given. The choice goes by the one-sided 95% upper bound of the drop (confidence.py), not by the
point estimate: a candidate fits a budget only when the judging images confirm it.

The search is coarse to fine: each family (a method or a composition) is a list of settings from
mild to aggressive; families are walked until they pass the budget, then the step where a family
crosses the budget is halved. Accuracy falls and speed rises along a family, which lets the walk
stop early.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..files import write_atomically
from ..runtime import ort_runner, run_batched, session_runner
from ..measure.confidence import paired_drop_bound, proportion_bound
from ..measure.speedup import Speedup, describe_method, format_speedup, measure_speedup
from .healing import HEAL_REACH, CandidateHealer, heal_lr, next_to_heal, shared_files
from ...errors import Vit2TrtError

RUNTIMES = ("ort", "tensorrt")


@dataclass
class PlanOptions:
    calib: str
    out_dir: str
    labels: Optional[str] = None
    class_map: Optional[str] = None    # an ImageFolder --calib: folder -> class index (default: sorted order)
    target_speedup: Optional[float] = None
    max_drop: Optional[float] = None
    runtime: str = "ort"
    batch: int = 1
    time_limit: float = 900.0          # seconds for the search (the chosen model's conversion comes after)
    calib_limit: Optional[int] = None  # calibration images read (None: all)
    holdout: float = 0.5               # part of them held out for judging (without --val)
    val: Optional[str] = None          # a separate labelled set that judges every candidate, whole
    val_labels: Optional[str] = None
    val_class_map: Optional[str] = None
    heal: Optional[str] = None         # images that heal the candidates near the goal (heal's --images)
    heal_labels: Optional[str] = None
    heal_class_map: Optional[str] = None
    heal_time: float = 300.0           # seconds of healing per candidate, within --time-limit
    heal_epochs: Optional[int] = None  # passes over the heal images instead (reproducible)
    heal_batch: int = 32
    heal_lr: Optional[float] = None    # None: by each candidate's distance from the original (healing.heal_lr)
    heal_limit: Optional[int] = None   # heal images read at most
    heal_device: str = "auto"
    threads: int = 2
    rounds: int = 15                   # timing pairs per candidate (more, up to 8x, while the interval is wide)
    methods: Optional[list[str]] = None   # families to search (default: all that apply)
    build: bool = True
    engine: str = "auto"
    seed: int = 0
    overwrite: bool = False


@dataclass
class Candidate:
    family: str
    label: str
    settings: dict
    flops_ratio: float = 0.0
    speedup: float = 0.0               # median of the paired ratios against the original
    speedup_low: float = 0.0           # its 95% bootstrap interval
    speedup_high: float = 0.0
    rounds: int = 0                    # paired rounds measured
    agreement: float = 0.0
    kl: float = 0.0
    accuracy: Optional[float] = None
    drop: float = 0.0                  # accuracy drop (labels) or disagreement, as a fraction
    drop_se: float = 0.0               # its standard error over the held-out images (paired)
    drop_bound: float = 0.0            # its one-sided 95% upper confidence bound: what the choice goes by
    convert_s: float = 0.0
    stable: bool = True                # the speedup's interval is within ±5% of it
    exceeds_flops: bool = False        # measured faster than the FLOPs ratio allows (noise)
    meets: bool = False
    pareto: bool = False
    error: Optional[str] = None
    convert_options: dict = field(default_factory=dict)   # what `convert` was given (reproduces it)
    healed_from: Optional[str] = None  # a healed candidate: the label of the one it was healed from
    drop_before_heal: Optional[float] = None
    heal: dict = field(default_factory=dict)   # steps, seconds, why it stopped, held-out KL before and after


@dataclass
class PlanResult:
    out_dir: Path
    chosen: Optional[Candidate]
    candidates: list[Candidate]
    original_accuracy: Optional[float]
    stopped: Optional[str] = None      # why the search ended early, if it did
    notes: list[str] = field(default_factory=list)


@dataclass
class Family:
    """Settings from mild to aggressive; `between` gives a setting halfway between two neighbours."""
    name: str
    method: str
    levels: list[dict]
    between: Optional[Callable[[dict, dict], Optional[dict]]] = None
    describe: Callable[[dict], str] = lambda s: json.dumps(s)


def _midpoint(key: str, integer: bool = False):
    def between(a: dict, b: dict) -> Optional[dict]:
        value = (a[key] + b[key]) / 2
        value = int(round(value)) if integer else round(value, 3)
        return None if value in (a[key], b[key]) else dict(a, **{key: value})
    return between


# Compositions the planner tries: ToMe's merging with a structured part that takes the model a
# little further than ToMe alone (a share of the FLOPs ToMe leaves).
COMPOSITIONS = {"toast+tome": "structure", "cait+tome": "channels"}
COMPOSITION_LEVELS = ((4, 0.95), (8, 0.9), (12, 0.85), (16, 0.8))
HEALING_COMPOSITION_LEVELS = ((20, 0.75),)   # further, when healing may bring it back
PLAN_ORDER = ("tome", "cait", "toast")   # cheap first, so that a short --time-limit still sees them


def families(vit, has_record: bool, healing: bool = False) -> list[Family]:
    """What the planner searches: every registered method that declares search levels, then the
    compositions of ToMe with a structured method (further settings of each when `healing`)."""
    from ...passes.methods import REGISTRY, available

    names = sorted(available(), key=lambda n: PLAN_ORDER.index(n) if n in PLAN_ORDER else len(PLAN_ORDER))
    out, singles = [], []
    for name in names:
        method = REGISTRY[name]
        levels = method.plan_levels(vit, has_record, healing)
        if levels:
            between = _midpoint(method.plan_key, method.plan_integer) if method.plan_key else None
            singles.append(Family(name, name, levels, between, method.plan_label))
    levels = COMPOSITION_LEVELS + (HEALING_COMPOSITION_LEVELS if healing else ())
    compositions = [Family(name, name, [{"r": r, "share": s} for r, s in levels], None,
                           lambda s, what=what: f"r={s['r']}, {what} to {s['share']:g} of ToMe's FLOPs")
                    for name, what in COMPOSITIONS.items()
                    if all(part in {f.name for f in singles} for part in name.split("+"))]
    # AS-ViT (slow to calibrate) after the compositions.
    out = [f for f in singles if f.name != "asvit"] + compositions + [f for f in singles if f.name == "asvit"]
    return out


def check_plan_options(o: PlanOptions) -> None:
    if (o.target_speedup is None) == (o.max_drop is None):
        raise Vit2TrtError("give exactly one of --target-speedup S (the most accurate model at least S times "
                           "faster) and --max-drop D (the fastest model losing at most D, e.g. 0.01).")
    if o.max_drop is not None and not 0.0 <= o.max_drop < 1.0:
        raise Vit2TrtError(f"--max-drop is a fraction of top-1 in [0, 1), e.g. 0.01 for one point; got {o.max_drop}.")
    if o.target_speedup is not None and not o.target_speedup > 1.0:
        raise Vit2TrtError(f"--target-speedup must be above 1, got {o.target_speedup}.")
    if o.runtime not in RUNTIMES:
        raise Vit2TrtError(f"--runtime must be {' or '.join(RUNTIMES)}, got '{o.runtime}'.")
    if o.runtime == "tensorrt":
        raise Vit2TrtError("--runtime tensorrt times TensorRT engines, which need full TensorRT and an NVIDIA GPU; "
                           "this build plans on ONNX Runtime only (--runtime ort). Build the chosen model's engine "
                           "with `vit2trt convert` on the GPU machine.")
    if o.batch < 1:
        raise Vit2TrtError(f"--batch must be at least 1, got {o.batch}.")
    if o.time_limit <= 0:
        raise Vit2TrtError(f"--time-limit must be positive, got {o.time_limit}.")
    if (o.heal_labels or o.heal_class_map) and o.heal is None:
        raise Vit2TrtError("--heal-labels and --heal-class-map describe --heal DIR: give --heal too.")
    if o.heal_labels and o.heal_class_map:
        raise Vit2TrtError("give the classes of --heal one way: --heal-labels (a flat folder) or --heal-class-map "
                           "(an ImageFolder), not both.")
    if o.heal_limit is not None and o.heal_limit < 1:
        raise Vit2TrtError(f"--heal-limit must be at least 1, got {o.heal_limit}.")
    if not o.heal_time > 0:
        raise Vit2TrtError(f"--heal-time is the seconds of healing per candidate and must be positive, got {o.heal_time}.")
    if o.heal_epochs is not None and o.heal_epochs < 1:
        raise Vit2TrtError(f"--heal-epochs must be at least 1, got {o.heal_epochs}.")
    if o.heal_batch < 1:
        raise Vit2TrtError(f"--heal-batch must be at least 1, got {o.heal_batch}.")
    if o.heal_lr is not None and not o.heal_lr > 0:
        raise Vit2TrtError(f"--heal-lr is the healing learning rate and must be positive, got {o.heal_lr}.")
    if o.calib_limit is not None and o.calib_limit < 1:
        raise Vit2TrtError(f"--calib-limit must be at least 1, got {o.calib_limit}.")
    if (o.val_labels or o.val_class_map) and o.val is None:
        raise Vit2TrtError("--val-labels and --val-class-map describe --val DIR: give --val too.")
    if not 0.05 <= o.holdout <= 0.95:
        raise Vit2TrtError(f"--holdout is the fraction of images kept for judging, in [0.05, 0.95]; got {o.holdout}.")
    if o.rounds < 3:
        raise Vit2TrtError(f"--rounds must be at least 3, got {o.rounds}.")


def plan(model_path: str | os.PathLike, options: PlanOptions, progress: Callable[[str], None] = lambda m: None,
         clock: Callable[[], float] = time.monotonic) -> PlanResult:
    """Search in memory (every candidate is compressed and judged without touching the disk), then save
    the chosen model as convert saves it, with plan.md, plan.json and plan.png beside it."""
    from ..convert import ConvertOptions, Original, agreement, check_inputs, compress
    from ..deploy.engine import BuildOptions, check_build
    from ...passes.methods import get_method

    check_plan_options(options)
    build_options = BuildOptions(options.engine if options.build else "none")
    check_build(build_options)   # before the search, not after
    out_dir = Path(options.out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not options.overwrite:
        raise Vit2TrtError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite.")
    source = Original.read(model_path)
    vit = source.vit
    images, labels = _load_images(options, vit, source.record)
    val = _load_val(options, vit, source.record)
    if val is None:
        fit_idx, held_idx = _split(len(images), options.holdout, options.seed)
    else:   # --val judges: every calibration image fits
        fit_idx, held_idx = np.arange(len(images)), np.arange(len(val[0]))
    needed = math.ceil(max(b.ffn.hidden for b in vit.blocks) / vit.num_tokens) + 1
    if len(fit_idx) < needed:
        fix = "give more images in --calib" + ("" if val is not None else " or lower --holdout") + \
            (", or raise --calib-limit" if options.calib_limit else "")
        raise Vit2TrtError(f"{len(fit_idx)} calibration images are too few to fit on (this model needs at least "
                           f"{needed}); {fix}.")
    wanted = [f.strip() for f in options.methods] if options.methods else None
    all_families = families(vit, source.record is not None, healing=options.heal is not None)
    if wanted:
        unknown = sorted(set(wanted) - {f.name for f in all_families})
        if unknown:
            raise Vit2TrtError(f"--methods: cannot search {', '.join(unknown)} on this model; choose from "
                               f"{', '.join(f.name for f in all_families)}.")
        all_families = [f for f in all_families if f.name in wanted]
    for family in all_families:
        for part in family.method.split("+"):
            get_method(part)
    if options.max_drop is not None:
        from ..measure.confidence import smallest_confirmable

        floor = smallest_confirmable(len(held_idx))
        if floor > options.max_drop:
            judged = f"{len(held_idx)} {'--val' if val is not None else 'held-out --calib'} images"
            raise Vit2TrtError(f"--max-drop {options.max_drop:g} cannot be confirmed on {judged}: even a model that "
                               f"matches the original on every one of them confirms no smaller drop than "
                               f"{floor * 100:.2f} pt (95% upper bound). Judge on more labelled images (--val: at least "
                               f"{math.ceil(2.71 / max(options.max_drop, 1e-9))} for this budget, many more for a model "
                               "that loses anything) or raise --max-drop.")

    start = clock()
    cache: dict = {}
    candidates: list[Candidate] = []
    stopped = None
    notes: list[str] = []
    fit = np.ascontiguousarray(images[fit_idx])
    if val is None:
        held = images[held_idx]
        held_labels = labels[held_idx] if labels is not None else None
    else:
        held, held_labels = val
        shared = _shared_images(held, fit)
        if shared:
            notes.append(f"{shared} of the {len(held)} --val images are also in --calib: the methods fitted on "
                         "them, so the drop measured on --val flatters; give --val images that --calib lacks.")
    judge = _Judge(source, held, held_labels, options)
    healer = None
    if options.heal is not None:
        healer = CandidateHealer(source, options, progress)
        notes += _heal_overlap(healer.files, options, held_idx)
    tome_flops: dict[int, float] = {}
    best: dict = {}   # the candidate the choice would take so far, and its compressed model
    origin: dict[str, tuple[Family, dict]] = {}   # label -> what rebuilds the candidate

    def convert_options(family: Family, level: dict) -> ConvertOptions:
        return ConvertOptions(method=family.method, build=False, calib=fit, fit_limit=len(fit_idx),
                              calib_limit=min(64, len(fit_idx)), seed=options.seed, cache=cache,
                              **settings_for(family, level))

    def settings_for(family: Family, level: dict) -> dict:
        if family.method in ("toast+tome", "cait+tome"):
            r = level["r"]
            if r not in tome_flops:
                flops = compress(source, ConvertOptions(method="tome", r=r, build=False)).decisions["flops"]
                tome_flops[r] = flops["after"] / flops["before"]
            structure = family.method.split("+")[0]
            extra = {"cait.target_flops" if structure == "cait" else "toast.target_flops":
                     round(tome_flops[r] * level["share"], 4)}
            return {"r": r, **extra}
        return dict(level)

    def evaluate(family: Family, level: dict) -> Candidate:
        label = f"{family.name} {family.describe(level)}"
        index = len(candidates) + 1
        progress(f"candidate {index}: {label}")
        candidate = Candidate(family.name, label, dict(level))
        candidate.convert_options = {"method": family.method, **settings_for(family, level)}
        origin[label] = (family, level)
        began = clock()
        try:
            artifact = compress(source, convert_options(family, level),
                                progress=lambda m: progress(f"candidate {index}: {label}: {m}"))
            candidate.convert_s = clock() - began
            candidate.flops_ratio = artifact.flops_ratio
            judge.score(candidate, artifact.session(options.threads))
        except Exception as exc:   # an unreachable budget or a failed fit is a result, not the plan's end
            candidate.error = str(exc) if isinstance(exc, Vit2TrtError) else f"{type(exc).__name__}: {exc}"
            candidates.append(candidate)
            return candidate
        candidate.meets = _meets(candidate, options)
        if candidate.meets and _choose([c for c in (best.get("candidate"), candidate) if c], options) is candidate:
            best.update(candidate=candidate, artifact=artifact, family=family)   # keep one model in memory, not all
        candidates.append(candidate)   # after `best`: a Ctrl-C between the two must not part them
        return candidate

    def heal(target: Candidate) -> None:
        """Heal `target` within what is left of the time limit, and judge the healed model as a
        candidate of its own. A failure is a note, not the plan's end (as for a candidate)."""
        family, level = origin[target.label]
        name = f"{target.label}, healed"
        progress(f"healing {target.label}")
        try:
            artifact = (best["artifact"] if best.get("candidate") is target
                        else compress(source, convert_options(family, level)))
            left = options.time_limit - (clock() - start)   # re-compressing counted
            healed, section = healer.heal(artifact, min(options.heal_time, max(left, 0.0)), heal_lr(target, options),
                                          lambda m: progress(f"healing {target.label}: {m}"))
            h = Candidate(target.family, name, dict(target.settings),
                          **{k: getattr(target, k) for k in _SPEED_FIELDS})
            h.convert_options = dict(target.convert_options,
                                     heal={k: section[k] for k in ("seconds", "steps", "epochs")})
            h.healed_from, h.drop_before_heal = target.label, target.drop
            h.heal = {k: section[k] for k in ("seconds", "steps", "epochs", "lr", "labels", "stopped_by", "images")}
            h.heal["holdout_kl"] = [section["holdout_before"]["kl"], section["holdout_after"]["kl"]]
            h.heal["holdout_curve"] = section["loss_curve"]   # what the judge saw: why a heal kept its start
            judge.score_accuracy(h, healed.session(options.threads))
        except Exception as exc:   # out of memory, a failed check, ...: the other candidates still count
            notes.append(f"healing {target.label} failed: "
                         f"{exc if isinstance(exc, Vit2TrtError) else f'{type(exc).__name__}: {exc}'}")
            return
        h.meets = _meets(h, options)
        origin[name] = (family, level)
        if h.meets and _choose([c for c in (best.get("candidate"), h) if c], options) is h:
            best.update(candidate=h, artifact=healed, family=family)
        candidates.append(h)
        if section.get("stopped_by") == "interrupt":
            raise KeyboardInterrupt

    # With --heal, the search leaves time to heal at least two candidates (or half the limit).
    search_limit = options.time_limit - (min(2 * options.heal_time, options.time_limit / 2) if healer else 0.0)
    interrupted = False
    reasons: list[str] = []
    try:
        for family in all_families:
            _walk(family, evaluate, options, lambda: clock() - start, search_limit)
    except _OutOfTime:
        share = f" ({search_limit:g} s of {options.time_limit:g} s, the rest for healing)" if healer else ""
        reasons.append(f"the time limit{share} ended the search")
    except KeyboardInterrupt:
        reasons.append("interrupted (Ctrl-C): the best model found so far is kept")
        interrupted = True
    if healer is not None and not interrupted:
        _mark_pareto(candidates)
        done: set[str] = set()
        try:
            while (target := next_to_heal(candidates, options, done, _choose, lambda c: c.meets)) is not None:
                # A heal of a few steps changes nothing and still costs a conversion and a judging pass.
                if options.time_limit - (clock() - start) < min(MIN_HEAL_S, options.heal_time):
                    reasons.append(f"the time limit ({options.time_limit:g} s) ended healing")
                    break
                done.add(target.label)
                heal(target)
        except KeyboardInterrupt:
            reasons.append("interrupted (Ctrl-C) while healing: the best model found so far is kept")
    stopped = "; ".join(reasons) or None
    chosen = _choose(candidates, options)
    _mark_pareto(candidates)
    if stopped:
        notes.append(stopped + ".")
    if chosen is None:
        notes.append("no candidate met the budget; no model was written (see the table for the closest).")
        if options.max_drop is not None:
            notes.append(_unconfirmed(candidates, options, len(held_idx), val is not None))
    result = PlanResult(out_dir, chosen, candidates, judge.original_accuracy, stopped, notes)

    def write_plan(folder: Path) -> None:
        _write_plan(folder, result, options, str(model_path), len(fit_idx), len(held_idx))

    if chosen is not None:
        assert best["candidate"] is chosen   # the choice over all equals the running choice
        progress(f"writing the chosen model: {chosen.label}")
        artifact = best["artifact"]
        check = convert_options(best["family"], chosen.settings)
        inputs, described = check_inputs(source, check, progress)
        artifact.report["agreement"] = agreement(source.model, artifact.model, inputs, described)
        artifact.save(out_dir, overwrite=True, build_options=build_options, progress=progress, extra=write_plan)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".vit2trt-plan-") as staging:
            final = Path(staging) / "out"
            final.mkdir()
            write_plan(final)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(final, out_dir)
    return result


MIN_HEAL_S = 60.0   # less time than this left: no further candidate is healed


class _OutOfTime(Exception):
    pass


# What a healed candidate shares with the one it was healed from: the nodes, so FLOPs and speed.
_SPEED_FIELDS = ("flops_ratio", "speedup", "speedup_low", "speedup_high", "rounds", "stable", "exceeds_flops",
                 "convert_s")


def _walk(family: Family, evaluate, options: PlanOptions, elapsed: Callable[[], float],
          limit: Optional[float] = None) -> None:
    """Walk a family from mild to aggressive until it passes the budget, then halve the crossing step.
    With --heal, --max-drop walks on while the drop stays within HEAL_REACH of the budget: healing may
    bring those back."""
    limit = options.time_limit if limit is None else limit

    def run(level):
        if elapsed() > limit:
            raise _OutOfTime()
        return evaluate(family, level)

    previous, previous_result = None, None
    for level in family.levels:
        result = run(level)
        if result.error:
            break   # more aggressive settings of this family cannot do better
        if options.max_drop is not None and not result.meets:
            # Too lossy: the best of this family lies between the last good setting and this one.
            if previous is not None and previous_result.meets and family.between:
                middle = family.between(previous, level)
                if middle is not None:
                    run(middle)
            if options.heal is not None and result.drop <= options.max_drop + HEAL_REACH:
                previous, previous_result = level, result
                continue
            return
        if options.target_speedup is not None and result.meets:
            # Fast enough: milder settings between the last slow one and this one may be more accurate.
            if previous is not None and family.between:
                middle = family.between(previous, level)
                if middle is not None:
                    run(middle)
            return
        previous, previous_result = level, result


def figure(c: Candidate) -> Speedup:
    """A candidate's speedup as converter/measure/speedup.py measures and prints it."""
    return Speedup(c.speedup, c.speedup_low, c.speedup_high, c.rounds, c.stable, c.flops_ratio)


def credible_speedup(c: Candidate) -> float:
    """The measured speedup, but never more than the FLOPs ratio allows (more is timing noise)."""
    return figure(c).credible


def _meets(c: Candidate, options: PlanOptions) -> bool:
    if options.max_drop is not None:   # confirmed within the drop, and faster than the original at all
        return c.drop_bound <= options.max_drop + 1e-12 and credible_speedup(c) > 1.0
    return credible_speedup(c) >= options.target_speedup


def _choose(candidates: list[Candidate], options: PlanOptions) -> Optional[Candidate]:
    good = [c for c in candidates if c.meets and not c.error]
    if not good:
        return None
    if options.max_drop is not None:   # the fastest confirmed within the drop; ties: the tighter bound
        return max(good, key=lambda c: (round(credible_speedup(c), 3), -c.drop_bound))
    # The most accurate at the speed: the smallest drop these images confirm.
    return min(good, key=lambda c: (c.drop_bound, c.drop, -credible_speedup(c)))


def _mark_pareto(candidates: list[Candidate]) -> None:
    scored = [c for c in candidates if not c.error]
    for c in scored:
        s = credible_speedup(c)
        c.pareto = not any(o is not c and credible_speedup(o) >= s and o.drop <= c.drop
                           and (credible_speedup(o) > s or o.drop < c.drop) for o in scored)


def _unconfirmed(candidates: list[Candidate], options: PlanOptions, judged: int, has_val: bool) -> str:
    """Why nothing fitted --max-drop, in numbers: the tightest bound any candidate reached, and the
    smallest drop these images could confirm at all."""
    from ..measure.confidence import smallest_confirmable

    what = f"{judged} {'--val' if has_val else 'held-out'} images"
    floor = smallest_confirmable(judged)
    text = (f"on {what}, even a candidate identical to the original could confirm no smaller drop than "
            f"{floor * 100:.2f} pt (95% upper bound)")
    scored = [c for c in candidates if not c.error and credible_speedup(c) > 1.0]
    if scored:
        tightest = min(scored, key=lambda c: c.drop_bound)
        text = (f"among candidates faster than the original, the smallest drop confirmed was "
                f"{tightest.drop_bound * 100:.2f} pt ({tightest.label}: "
                f"{tightest.drop * 100:+.2f} pt measured, 95% upper bound {tightest.drop_bound * 100:.2f} pt); "
                + text)
    if floor > options.max_drop:
        text += f", above --max-drop {options.max_drop * 100:g} pt: judge on more images (--val)"
    return text + "."


def _heal_overlap(heal_files: list[Path], options: PlanOptions, held_idx: np.ndarray) -> list[str]:
    """Warnings when judging images are among the --heal images (a healed candidate would be judged on
    what it trained on). Folders are compared file by file; an .npy judging set cannot be."""
    from ..measure.calibration import image_files

    if options.val:
        judged, flag = (image_files(Path(options.val), flag="--val") if Path(options.val).is_dir() else []), "--val"
    else:
        calib = Path(options.calib)
        files = image_files(calib, options.calib_limit) if calib.is_dir() else []
        judged, flag = [files[i] for i in held_idx] if files else [], "held-out --calib"
    shared = shared_files(judged, heal_files) if judged else 0
    if not shared:
        return []
    return [f"{shared} of the {len(judged)} {flag} images are also in --heal: healed candidates are judged on images "
            f"they trained on, which flatters them; give judging images that --heal lacks."]


def _shared_images(a: np.ndarray, b: np.ndarray) -> int:
    """How many images of `a` also occur in `b` (the same preprocessed pixels; compared by digest)."""
    import hashlib

    def digest(row: np.ndarray) -> bytes:
        return hashlib.sha256(np.ascontiguousarray(row).data).digest()

    seen = {digest(row) for row in b}
    return sum(digest(row) in seen for row in a)


def _split(count: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(count)
    held = max(1, int(round(count * holdout)))
    return np.sort(order[held:]), np.sort(order[:held])


def _load_images(options: PlanOptions, vit, record: Optional[dict]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    from ..measure.calibration import image_files, load_calibration
    from ..measure.validate import image_labels

    record = record or {}
    calib = Path(options.calib)
    if not calib.exists():
        raise Vit2TrtError(f"--calib {calib} does not exist.")

    def read() -> np.ndarray:
        return load_calibration(str(calib), (vit.in_chans, *vit.img_size), record.get("preprocessing"),
                                options.calib_limit)

    files = image_files(calib, options.calib_limit) if calib.is_dir() else None
    images = read() if files is None else None   # an array's labels are counted by it; images decode after labels
    labels = image_labels(calib, files, len(files) if files is not None else len(images),
                          Path(options.labels) if options.labels else None,
                          Path(options.class_map) if options.class_map else None, _classes(vit), "--calib")
    return (read() if images is None else images), labels


def _load_val(options: PlanOptions, vit, record: Optional[dict]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """--val: every image, and its labels (a judge without labels could only count disagreement,
    which the hold-out of --calib already does)."""
    from ..measure.calibration import image_files, load_calibration
    from ..measure.validate import image_labels

    if options.val is None:
        return None
    val = Path(options.val)
    if not val.exists():
        raise Vit2TrtError(f"--val {val} does not exist.")
    files = image_files(val, flag="--val") if val.is_dir() else None
    images = None if files is not None else load_calibration(str(val), (vit.in_chans, *vit.img_size),
                                                             (record or {}).get("preprocessing"), flag="--val")
    labels = image_labels(val, files, len(files) if files is not None else len(images),
                          Path(options.val_labels) if options.val_labels else None,
                          Path(options.val_class_map) if options.val_class_map else None, _classes(vit), "--val",
                          labels_flag="--val-labels", class_map_flag="--val-class-map")
    if labels is None:
        raise Vit2TrtError(f"--val {val} has no labels: give --val-labels FILE (a class per image), or make it an "
                           "ImageFolder (one subfolder per class, with --val-class-map FILE when the head orders "
                           "the classes otherwise).")
    if images is None:
        images = load_calibration(str(val), (vit.in_chans, *vit.img_size), (record or {}).get("preprocessing"),
                                  flag="--val")
    return images, labels


def _classes(vit) -> int:
    return int(vit.head.num_classes)


class _Judge:
    """The original's outputs on the held-out images, and how a candidate compares: accuracy and speed."""

    def __init__(self, source, held: np.ndarray, labels: Optional[np.ndarray], options: PlanOptions):
        self.options, self.held, self.labels = options, held, labels
        self.original_runner = ort_runner(source.path, options.threads)
        self.reference = self._logits(self.original_runner)
        self.reference_p = _softmax(self.reference)
        self.original_accuracy = (float(np.mean(self.reference.argmax(1) == labels)) if labels is not None else None)
        rng = np.random.default_rng(options.seed)
        pick = rng.choice(len(held), options.batch, replace=len(held) < options.batch)
        self.timing_input = np.ascontiguousarray(held[pick])

    def _logits(self, runner) -> np.ndarray:
        return run_batched(runner, self.held, 8)

    def score(self, c: Candidate, session) -> None:
        runner = self.score_accuracy(c, session)
        s = measure_speedup(self.original_runner, runner, self.timing_input, self.options.rounds,
                            flops_ratio=c.flops_ratio).speedup
        c.speedup, c.speedup_low, c.speedup_high, c.rounds = s.speedup, s.low, s.high, s.rounds
        c.stable, c.exceeds_flops = s.stable, s.exceeds_flops

    def score_accuracy(self, c: Candidate, session):
        """Accuracy alone (a healed candidate keeps its twin's speed: only weights changed); returns the runner."""
        runner = session_runner(session)
        logits = self._logits(runner)
        top = logits.argmax(1)
        c.agreement = float(np.mean(top == self.reference.argmax(1)))
        log_q = _log_softmax(logits)
        c.kl = float(np.mean(np.sum(self.reference_p * (np.log(np.maximum(self.reference_p, 1e-30)) - log_q), 1)))
        if self.labels is not None:
            c.accuracy = float(np.mean(top == self.labels))
            c.drop = self.original_accuracy - c.accuracy
            # Paired: only images one model gets right and the other wrong move the difference.
            reference_correct = self.reference.argmax(1) == self.labels
            change = reference_correct.astype(float) - (top == self.labels)
            c.drop_se = float(change.std() / np.sqrt(len(change)))
            c.drop_bound = paired_drop_bound(reference_correct, top == self.labels)
        else:
            c.drop = 1.0 - c.agreement
            c.drop_se = float(np.sqrt(c.drop * (1 - c.drop) / len(top)))
            c.drop_bound = proportion_bound(int(np.sum(top != self.reference.argmax(1))), len(top))
        return runner


def _softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(x))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def _write_plan(folder: Path, result: PlanResult, options: PlanOptions, source: str, fit: int, held: int) -> None:
    goal = (f"fastest within a top-1 drop of {options.max_drop * 100:g} pt" if options.max_drop is not None
            else f"most accurate at {options.target_speedup:g}x or faster")
    measure = ("top-1 accuracy drop" if result.original_accuracy is not None   # labels: --labels or an ImageFolder
               else "top-1 disagreement with the original (no labels)")
    data = {"source": source, "goal": goal, "runtime": options.runtime, "batch": options.batch,
            "fit_images": fit, "held_out_images": held, "drop_measure": measure,
            "judged_on": _judged_on(options), "drop_bound": "one-sided 95% upper confidence bound (the choice's)",
            "original_accuracy": result.original_accuracy, "stopped": result.stopped, "notes": result.notes,
            "chosen": result.chosen.label if result.chosen else None,
            "candidates": [asdict(c) for c in result.candidates]}
    write_atomically(folder / "plan.json", (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
    write_atomically(folder / "plan.md", plan_markdown(result, options, goal, measure, fit, held).encode())
    _plot(folder / "plan.png", result, options)


def _judged_on(options: PlanOptions) -> str:
    return f"--val {options.val}" if options.val else "a held-out part of --calib"


def plan_markdown(result: PlanResult, options: PlanOptions, goal: str, measure: str, fit: int, held: int) -> str:
    lines = [f"# vit2trt plan: {goal}", "",
             f"Runtime: {options.runtime} at batch {options.batch}, {options.threads} threads. Methods fitted on "
             f"{fit} calibration images; every candidate judged on {held} others ({_judged_on(options)}). "
             f"Drop = {measure}; the choice goes by its one-sided 95% upper confidence bound, not by the measured "
             f"drop. S{describe_method(options.rounds)[1:]}.", ""]
    if result.original_accuracy is not None:
        lines += [f"Original top-1 on the held-out images: {result.original_accuracy * 100:.2f}%.", ""]
    lines += ["| | candidate | FLOPs × | speedup [95% interval] | top-1 agreement | KL | top-1 | drop (pt) ± s.e. | "
              "drop ≤ (95%, pt) | before heal (pt) | convert s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result.candidates:
        mark = "**chosen**" if c is result.chosen else ("pareto" if c.pareto else "")
        if c.error:
            lines.append(f"| | {c.label} | | | | | | | | | refused: {c.error} |")
            continue
        top1 = f"{c.accuracy * 100:.2f}%" if c.accuracy is not None else "–"
        lines.append(f"| {mark} | {c.label} | {c.flops_ratio:.2f} | {format_speedup(figure(c))} | "
                     f"{c.agreement * 100:.1f}% | {c.kl:.4f} | {top1} | "
                     f"{c.drop * 100:+.2f} ± {c.drop_se * 100:.2f} | {c.drop_bound * 100:.2f} | "
                     f"{'' if c.drop_before_heal is None else f'{c.drop_before_heal * 100:+.2f}'} | {c.convert_s:.0f} |")
    lines += ["", "A speedup that exceeds the FLOPs ratio is timing noise: the choice counts such a candidate at "
              "its FLOPs ratio. An unstable one is still counted at its median; its interval says how far to trust "
              "it.", ""]
    lines += [f"Note: {n}" for n in result.notes]
    lines.append("")
    return "\n".join(lines)


def _plot(path: Path, result: PlanResult, options: PlanOptions) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    scored = [c for c in result.candidates if not c.error]
    for family in sorted({c.family for c in scored}):
        points = [c for c in scored if c.family == family]
        ax.scatter([credible_speedup(c) for c in points], [c.drop * 100 for c in points], label=family, s=28)
    front = sorted((c for c in scored if c.pareto), key=credible_speedup)
    if front:
        ax.plot([credible_speedup(c) for c in front], [c.drop * 100 for c in front], "k--", lw=0.8,
                label="Pareto front")
    if result.chosen:
        ax.scatter([credible_speedup(result.chosen)], [result.chosen.drop * 100], marker="*", s=220, c="gold",
                   edgecolors="k", zorder=5, label="chosen")
    if options.max_drop is not None:
        ax.axhline(options.max_drop * 100, color="r", lw=0.8)
    else:
        ax.axvline(options.target_speedup, color="r", lw=0.8)
    ax.set_xlabel(f"speedup vs original ({options.runtime}, batch {options.batch}; at most the FLOPs ratio)")
    ax.set_ylabel("top-1 drop (pt)" if result.original_accuracy is not None else "top-1 disagreement (pt)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
