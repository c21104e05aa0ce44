"""`vit2trt heal OUT`: win back what compression cost by distilling the original into the compressed model
on the user's images, then write the trained weights back into the same graph.

The student is the compressed model as decisions.json rebuilds it in PyTorch (compensated weights
included), the teacher the original, frozen. Only weights change: the healed graph has the nodes and
shapes it had, and is proven equal to the healed PyTorch model before anything is written.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional


from ..artifact import (DECISIONS_FILE, ENGINE_FILE, ENGINE_INFO_FILE, HEALED_FILE, MODEL_DATA_FILE, Artifact,
                        read_json)
from ...errors import Vit2TrtError
from .distill import DEFAULT_RECIPE, RECIPES, TrainSettings

if TYPE_CHECKING:
    from .data import HealImages

CHECK_IMAGES = 32          # held-out images the healed graph is checked on against the healed PyTorch model
CHECK_TOLERANCE = 1e-5     # largest difference allowed, relative to the largest logit
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class HealOptions:
    images: Path
    labels: Optional[Path] = None
    class_map: Optional[Path] = None
    time_limit: float = 900.0
    epochs: Optional[int] = None
    device: str = "auto"
    batch: int = 64
    lr: float = 1e-4
    holdout: float = 0.1
    seed: int = 0
    recipe: str = DEFAULT_RECIPE
    limit: Optional[int] = None         # read only this many of --images
    out: Optional[Path] = None          # default: OUT itself
    overwrite: bool = False
    reference: Optional[str] = None
    weights: Optional[str] = None
    model_args: Optional[dict] = None
    val: Optional[Path] = None
    val_labels: Optional[Path] = None
    val_class_map: Optional[Path] = None
    label_weight: float = 1.0           # the cross-entropy's weight, with labels (Python API; the CLI keeps 1)

    def check(self) -> "HealOptions":
        if not self.time_limit > 0:
            raise Vit2TrtError(f"--time-limit is in seconds and must be positive, got {self.time_limit}.")
        if self.epochs is not None and self.epochs < 1:
            raise Vit2TrtError(f"--epochs must be at least 1, got {self.epochs}.")
        if self.batch < 1:
            raise Vit2TrtError(f"--batch must be at least 1, got {self.batch}.")
        if not self.lr > 0:
            raise Vit2TrtError(f"--lr must be positive, got {self.lr}.")
        if not 0 < self.holdout < 1:
            raise Vit2TrtError(f"--holdout is the fraction of --images to judge on, between 0 and 1; got {self.holdout}.")
        if not self.label_weight >= 0:
            raise Vit2TrtError(f"label_weight must be zero or positive, got {self.label_weight}.")
        if self.recipe not in RECIPES:
            raise Vit2TrtError(f"--recipe must be one of {', '.join(RECIPES)}, got '{self.recipe}'.")
        if self.device not in DEVICES:
            raise Vit2TrtError(f"--device must be one of {', '.join(DEVICES)}, got '{self.device}'.")
        if self.labels is not None and self.class_map is not None:
            raise Vit2TrtError("give the classes of --images one way: --labels (a flat folder) or --class-map "
                               "(an ImageFolder), not both.")
        if (self.val_labels or self.val_class_map) and self.val is None:
            raise Vit2TrtError("--val-labels and --val-class-map describe --val DIR: give --val too.")
        return self


def torch_device(choice: str):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise Vit2TrtError("--device cuda: PyTorch sees no CUDA device here; use --device cpu (or auto).")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def heal(out_dir: str | os.PathLike, options: HealOptions,
         progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Heal OUT and write the result to options.out (default OUT). Returns the report's 'heal' section."""
    from ..measure.references import resolve_reference
    from .data import read_heal_images

    started = time.monotonic()
    options.check()
    out_dir = Path(out_dir)
    artifact = Artifact.open(out_dir)
    if not (out_dir / DECISIONS_FILE).is_file() or not artifact.decisions:
        raise Vit2TrtError(f"{out_dir} holds no {DECISIONS_FILE}: heal needs the folder `vit2trt convert` or `plan` "
                           "wrote (decisions.json rebuilds the compressed model it trains).")
    destination = Path(options.out) if options.out else out_dir
    if destination.resolve() != out_dir.resolve() and destination.exists() and any(destination.iterdir()) \
            and not options.overwrite:
        raise Vit2TrtError(f"--out {destination} exists and is not empty; choose another --out or pass --overwrite.")
    if (out_dir / MODEL_DATA_FILE).exists():
        raise Vit2TrtError(f"{out_dir} holds a graph beyond 2 GB (external weights), which heal does not write yet.")
    device = torch_device(options.device)
    reference = resolve_reference(out_dir, options.reference, options.weights, options.model_args)
    record = reference.record

    progress("building the original and the compressed model in PyTorch")
    from ...models.reference import build_model

    teacher = build_model(record).eval()

    def read_images(classes: Optional[int]):   # after the weights are matched: a graph heal cannot train fails first
        return read_heal_images(Path(options.images), tuple(int(v) for v in reference.input_size),
                                reference.preprocessing, options.labels, options.class_map, classes, options.holdout,
                                options.seed, options.limit, progress)

    healed, section = heal_artifact(artifact, teacher, record, read_images, options, device,
                                    started + options.time_limit, progress)
    if healed is None:   # a torchrun process other than rank 0: rank 0 writes the one result
        return section
    progress("saving")
    build_options = _engine_options(out_dir)
    extra_files = _extra_files(out_dir)
    healed.save(destination, overwrite=True, build_options=build_options, progress=progress,
                extra=lambda staging: [shutil.copy2(f, staging / f.name) for f in extra_files])
    if options.val is not None:
        from ..measure.validate import validate

        progress("validating on --val")
        section["validation"] = {k: v for k, v in validate(
            destination, options.val, options.val_labels, options.reference, progress=progress,
            class_map=options.val_class_map, weights=options.weights, model_args=options.model_args,
            flag="--val").items() if k in ("accuracy", "top1_agreement", "images", "surgery_error")}
        Artifact.open(destination).update_report("heal", section)
    return section


def heal_artifact(artifact: Artifact, teacher, record, data: "HealImages | Callable[[Optional[int]], HealImages]",
                  options: HealOptions, device, deadline: float, progress: Callable[[str], None] = lambda msg: None
                  ) -> tuple[Optional[Artifact], dict]:
    """Heal a compressed model in memory: (the healed artifact, its 'heal' section), or (None, this
    process's summary) on a torchrun process other than rank 0. `teacher` is the original in PyTorch,
    `record` the ReferenceRecord that built it, `data` the images (read once when plan heals several
    candidates on them), or what reads them given the head's class count; training stops by
    `deadline` (time.monotonic())."""
    import torch

    from ..graph import describe_vit
    from .distill import JUDGE_IMAGES, distill
    from .parallel import cpu_threads, launched_world, start as start_parallel
    from .weights import match_weights, write_weights

    student = artifact.torch_model(record)
    where = str(artifact.model_path) if artifact.folder is not None else "the compressed model"
    vit = describe_vit(artifact.model, where)
    weights = match_weights(student, vit, artifact.model)
    names = {id(p): name for name, p in student.named_parameters()}
    trainable = {names[id(p)]: p for p in weights.trainable if id(p) in names}
    if not trainable:
        raise Vit2TrtError("no weight of the compressed graph could be matched to the PyTorch model, so none can be "
                           "healed; check that the reference record belongs to the model convert read.")
    if callable(data):
        data = data(vit.head.num_classes or None)
    if options.device == "cpu" or device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    held = min(len(data.holdout), JUDGE_IMAGES)
    if launched_world() > held or launched_world() > options.batch:
        raise Vit2TrtError(f"torchrun started {launched_world()} processes, more than the {held} held-out images or "
                           f"the batch of {options.batch}: each process needs a share of both. Give more --images, "
                           "a larger --holdout or --batch, or fewer processes.")
    parallel, device = start_parallel(device)
    settings = TrainSettings(options.recipe, options.epochs, options.batch, options.lr, options.seed,
                             deadline=deadline, block_outputs="asvit" not in _methods(artifact.decisions),
                             label_weight=options.label_weight)
    result = distill(teacher, student, trainable, data, settings, device, progress if parallel.main else _quiet,
                     parallel)
    parallel.finish()
    if not parallel.main:
        return None, {"rank": parallel.rank, "stopped_by": result.stopped_by, "steps": result.steps}
    progress("writing the healed weights into the graph")
    student = student.to("cpu")
    with torch.no_grad():
        for name, value in result.best_state.items():
            trainable[name].copy_(value)
    healed_graph = write_weights(artifact.model, weights)
    heal_settings = {"file": HEALED_FILE, "recipe": options.recipe, "label_weight": options.label_weight,
                     "seed": options.seed, "batch": options.batch,
                     "lr": options.lr, "steps": result.steps, "images": int(len(data.train)),
                     "holdout_images": int(len(data.holdout)), "labels": data.labels is not None,
                     "processes": parallel.world, "backend": parallel.backend}
    healed = Artifact(dict(artifact.decisions), dict(artifact.report), artifact.compensation,
                      artifact.record, artifact.original,
                      healed={k: v.numpy() for k, v in result.best_state.items()}, _model=healed_graph)
    healed.decisions["heal"] = heal_settings   # torch_model() reads the file it names

    progress("checking the healed graph against the healed PyTorch model")
    from ..measure.calibration import normalize
    from ..measure.validate import surgery_check

    x = normalize(data.images[data.holdout[:CHECK_IMAGES]], data.config)
    check = surgery_check(healed, record, x, 8)
    if not check["error"] <= CHECK_TOLERANCE:
        raise Vit2TrtError(f"the healed graph differs from the healed PyTorch model by {check['error']:.3g} (relative; "
                           f"allowed {CHECK_TOLERANCE:g}); nothing was written. Please report this with the graph.")
    section = _section(result, data, settings, device, weights, check, heal_settings)
    healed.report["heal"] = section
    healed.decisions["heal"] = section   # what rebuilds the healed model, and how it was healed
    healed.report.pop("validation", None)   # measured on the model before healing
    return healed, section


def _quiet(message: str) -> None:
    pass


def _methods(decisions: dict) -> set[str]:
    return {p.get("method") for p in decisions.get("parts") or [decisions]}


def _section(result, data, settings, device, weights, check, heal_settings: dict) -> dict:
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        **heal_settings,
        "epochs": round(result.images_seen / max(len(data.train), 1), 3),
        "planned_steps": result.planned_steps, "seconds": round(result.seconds, 1),
        "images_per_second": round(result.images_seen / max(result.seconds, 1e-9), 1),
        "device": name, "stopped_by": result.stopped_by,
        "holdout_before": _judgement(result.before), "holdout_after": _judgement(result.best),
        "loss_curve": [_judgement(j) for j in result.curve],
        "trained_tensors": len(result.best_state), "frozen_weights": weights.unmatched,
        "check": {"images": min(CHECK_IMAGES, len(data.holdout)), "relative_error": check["error"],
                  "near_ties": check["near_ties"]},
    }


def _judgement(j) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(j).items() if v is not None}


def _engine_options(out_dir: Path):
    """The options OUT's engine was built with, to rebuild it for the healed weights (None: OUT has no engine)."""
    from ..deploy.engine import BuildOptions

    if not (out_dir / ENGINE_FILE).is_file():
        return None
    how = read_json(out_dir / ENGINE_INFO_FILE)
    profile = next(iter((how.get("profile") or {}).values()), None)
    batch = tuple(int(profile[k][0]) for k in ("min", "opt", "max")) if profile else (1, 1, 8)
    module = how.get("module")
    engine = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt-rtx", "tensorrt-rtx": "tensorrt-rtx"}.get(module, "auto")
    return BuildOptions(engine, batch,
                        how.get("precision", "fp32"))


def _extra_files(out_dir: Path) -> list[Path]:
    """Files OUT holds besides what an artifact writes (plan.md, plan.json, ...): kept as they are."""
    from .. import artifact as names

    written = {getattr(names, n) for n in dir(names) if n.endswith("_FILE")} | {"report.md", "report.html", "report.png"}
    return [f for f in sorted(out_dir.iterdir()) if f.is_file() and f.name not in written and not f.name.startswith(".")]
