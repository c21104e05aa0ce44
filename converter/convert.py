"""`vit2trt convert`: compress (run the parts of a method or composition, in memory), check the result
against the original, save OUT atomically (converter/artifact.py)."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx

from .artifact import COMPENSATION_FILE, MODEL_FILE, Artifact
from .deploy.engine import BuildOptions, check_build
from .graph import describe_vit
from .graph.loading import load_onnx
from .planning.report import block_table, flops_breakdown
from .runtime import ort_runner, run_batched
from .graph.vit_graph import BuildReport
from ..errors import Vit2TrtError
from ..models.reference import read_record, sha256_of
from ..passes.methods import REGISTRY, Method, Run, composition_name, parse_composition

# Names the options had before each method declared its own (kept for scripts that use them).
_ALIASES = {"tome_r": "r", "asvit_thresholds": "thresholds", "asvit_form": "form"}


class ConvertOptions:
    """What `convert` does: the method (or a composition such as "toast+tome"), the settings that
    every method shares, and each part's own options (see passes/methods: one dataclass per method).

    Method options may be given flat (`ConvertOptions(method="tome", r=8)`): each goes to the part
    that declares it; "part.option" (`**{"cait.stages": [6, 10]}`) addresses one part of a
    composition; `settings={"tome": ToMeOptions(r=8)}` gives a part's options whole.
    """

    def __init__(self, method: str = "toast", *, calib: Optional[str] = None, calib_limit: int = 64,
                 fit_limit: int = 512, model_name: Optional[str] = None, build: bool = True, engine: str = "auto",
                 batch: tuple[int, int, int] = (1, 1, 8), precision: str = "fp32", check_batch: int = 8,
                 seed: int = 0, overwrite: bool = False, cache: Optional[dict] = None,
                 settings: Optional[dict] = None, **method_options):
        self.method = method
        self.calib = calib                    # images or .npy: agreement check, compensation, calibration
        self.calib_limit = calib_limit        # images the agreement check and AS-ViT calibration read
        self.fit_limit = fit_limit            # images the compensation and the sensitivity budget fit on
        self.model_name = model_name          # timm name, to pick a published schedule
        self.build, self.engine, self.batch, self.precision = build, engine, batch, precision
        self.check_batch, self.seed, self.overwrite = check_batch, seed, overwrite
        self.cache = cache                    # shared between conversions of one model (the planner)
        self.settings = dict(settings or {})
        self.method_options = {_ALIASES.get(k, k): v for k, v in method_options.items()}

    @property
    def calib_given(self) -> bool:
        """Calibration images were given: a folder or file name (not empty), or an array."""
        return self.calib is not None and not (isinstance(self.calib, str) and not self.calib)

    def resolve(self) -> list[tuple[Method, object]]:
        """[(method, its options)] in the order they run; misplaced options are refused by name."""
        parts = parse_composition(self.method)
        chosen = {m.name: copy.deepcopy(self.settings[m.name]) if m.name in self.settings else m.Options()
                  for m in parts}   # copies: parts fill in their defaults
        for key, value in self.method_options.items():
            part_name, _, name = key.rpartition(".")
            if part_name and part_name not in chosen:
                raise Vit2TrtError(f"option '{key}' is for method {part_name}, which --method {self.method} "
                                   "does not include.")
            owners = [m for m in parts if (not part_name or m.name == part_name) and _field(m, name) is not None]
            if not owners:
                declaring = [m.name for m in REGISTRY.values() if _field(m, name) is not None]
                if not declaring:
                    raise Vit2TrtError(f"unknown convert option '{key}'.")
                flag = _field(REGISTRY[declaring[0]], name).metadata.get("flag", name)
                raise Vit2TrtError(f"{flag} belongs to --method {' or '.join(sorted(declaring))}"
                                   f" (this run: {self.method}).")
            spec = _field(owners[0], name)
            if len(owners) > 1 and not spec.metadata.get("shared"):
                flag = spec.metadata.get("flag", name)
                raise Vit2TrtError(f"{flag} is an option of both {' and '.join(m.name for m in owners)}; in a "
                                   f"composition give it to one part, e.g. --set {owners[0].name}.{name}=VALUE.")
            parse = spec.metadata.get("parse")
            for m in owners:
                setattr(chosen[m.name], name, parse(value) if parse and isinstance(value, str) else value)
        return [(m, chosen[m.name]) for m in parts]


def _field(method: Method, name: str):
    return next((f for f in fields(method.Options) if f.name == name), None)


@dataclass
class ConvertResult:
    out_dir: Path
    onnx_path: Path
    decisions: dict
    flops_before: int
    flops_after: int
    agreement: dict
    build: Optional[BuildReport]
    notes: list[str] = field(default_factory=list)
    artifact: Optional[Artifact] = None


@dataclass
class Original:
    """The model a user gave, read once: the planner compresses it many times."""
    path: Path
    model: onnx.ModelProto
    vit: object                      # its ViTGraph description
    record: Optional[dict]           # the reference record `vit2trt export` wrote beside it

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Original":
        model = load_onnx(path)
        return cls(Path(path), model, describe_vit(model, str(path)), read_record(path))


def compress(source: str | os.PathLike | Original, options: ConvertOptions,
             progress: Callable[[str], None] = lambda msg: None) -> Artifact:
    """Run the method's parts on the graph and return the result in memory: nothing is written.
    `options.calib` may be a folder, an .npy file or an array of preprocessed images."""
    parts = options.resolve()
    if options.fit_limit < 1:
        raise Vit2TrtError(f"--fit-images must be at least 1, got {options.fit_limit}.")
    has_calib = options.calib_given
    if any(getattr(o, "compensate", None) for _, o in parts) and not has_calib:
        raise Vit2TrtError("compensation fits on calibration images: give --calib DIR (or drop --compensate).")
    if not isinstance(source, Original):
        progress("reading the graph")
        source = Original.read(source)
    working = onnx.ModelProto()
    working.CopyFrom(source.model)   # the parts must not touch a graph the caller keeps
    vit = source.vit
    run = Run(working, vit, vit, str(source.path), options.calib if has_calib else None, options.fit_limit,
              options.calib_limit, options.seed, progress, model_name=options.model_name, cache=options.cache,
              reference_record=source.record)
    reducers = [m.name for m, _ in parts if m.reduces_tokens]
    run.token_part = reducers[0] if reducers else ("cait" if any(m.name == "cait" for m, _ in parts) else None)
    for method, method_options in parts:   # every refusal before any work
        method.check(method_options, run)
    sections = [{"method": method.name, **method.apply(method_options, run)} for method, method_options in parts]
    current, notes = run.vit, run.notes
    if any(not m.reduces_tokens for m, _ in parts):   # a structured part: say which heads cannot fuse
        notes.extend(_fusion_notes(current))
    name = composition_name([m for m, _ in parts])
    structure = {"passes": run.passes, "blocks": [k.to_dict() for k in run.keeps]}
    if run.compensation:   # the fitted weights, which the PyTorch reference sets after pruning the same way
        structure["compensation"] = {"file": COMPENSATION_FILE, "tensors": sorted(run.compensation)}
    if len(sections) == 1:
        decision_parts = {k: v for k, v in sections[0].items() if k != "method"}
    else:
        decision_parts = {"parts": sections, "tcs": next((s.get("tcs") for s in sections if s.get("tcs")), None)}
    flops = {"before": vit.flops.total, "after": current.flops.total}
    decisions = {"method": name, "source": source.path.name, **decision_parts, **structure, "flops": flops}
    report = {"flops": flops, "notes": notes, "method": name, "source_path": str(source.path.resolve()),
              "blocks": block_table(vit, current), "flops_breakdown": flops_breakdown(vit, current)}
    return Artifact(decisions, report, run.compensation, source.record,
                    original_description(source.path, source.model, vit, source.record), _model=run.model)


def check_inputs(source: Original, options: ConvertOptions, progress: Callable[[str], None]) -> tuple[np.ndarray, str]:
    """The images the agreement check runs: calibration images, else seeded noise."""
    vit = source.vit
    if options.calib_given:
        from .measure.calibration import load_calibration

        inputs = load_calibration(options.calib, (vit.in_chans, *vit.img_size),
                                  (source.record or {}).get("preprocessing"), options.calib_limit,
                                  progress=lambda done, total: progress(f"reading calibration images {done}/{total}"))
        named = "the array" if isinstance(options.calib, np.ndarray) else Path(options.calib).name
        return inputs, f"{len(inputs)} calibration inputs from {named}"
    inputs = np.random.default_rng(options.seed).standard_normal(
        (options.check_batch, vit.in_chans, *vit.img_size)).astype(np.float32)
    return inputs, f"{options.check_batch} seeded random images"


def convert(model_path: str | os.PathLike, out_dir: str | os.PathLike, options: ConvertOptions,
            progress: Callable[[str], None] = lambda msg: None, source: Optional[Original] = None) -> ConvertResult:
    """compress, check against the original in ONNX Runtime, save OUT (and build the engine).
    `source`: the model already read (the planner reads it once)."""
    options.resolve()   # refuse misplaced options before anything else
    build_options = BuildOptions(options.engine if options.build else "none", tuple(options.batch), options.precision)
    check_build(build_options)   # a module asked for but missing, or a precision it cannot build: before any work
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not options.overwrite:
        raise Vit2TrtError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite.")
    if source is None:
        progress("reading the graph")
        source = Original.read(model_path)
    artifact = compress(source, options, progress)
    progress("checking against the original graph")
    inputs, described = check_inputs(source, options, progress)
    artifact.report["agreement"] = agreement(source.model, artifact.model, inputs, described)
    build = artifact.save(out_dir, overwrite=True, build_options=build_options, progress=progress)
    flops = artifact.decisions["flops"]
    return ConvertResult(out_dir, out_dir / MODEL_FILE, artifact.decisions, flops["before"], flops["after"],
                         artifact.report["agreement"], build, artifact.report["notes"], artifact)


def original_description(model_path, original: onnx.ModelProto, vit, record: Optional[dict]) -> dict:
    """What validate needs to know of the original when OUT holds no reference record: where it
    was, which exporter wrote it, and the ViT it holds (to suggest a matching --reference)."""
    return {
        "path": str(Path(model_path).resolve()), "sha256": sha256_of(model_path),
        "producer": f"{original.producer_name} {original.producer_version}".strip() or "unknown",
        "has_reference_record": record is not None,
        "preprocessing": (record or {}).get("preprocessing"),
        "input": {"name": vit.input_name, "size": [vit.in_chans, *vit.img_size]},
        "classes": vit.head.num_classes, "patch_size": list(vit.patch_size), "embed_dim": vit.embed_dim,
        "depth": vit.depth, "heads": vit.blocks[0].attn.heads,
        "extra_tokens": {t.kind: t.count for t in vit.extra_tokens}, "pooling": vit.pooling,
        "attention": sorted({b.attn.form for b in vit.blocks}),
    }


def _fusion_notes(vit) -> list[str]:
    """TensorRT fuses attention only for head dims 16-256 that are multiples of 8 (its developer guide)."""
    bad = [f"{b.index} ({b.attn.head_dim_qk}/{b.attn.head_dim_v})" for b in vit.blocks
           if not all(16 <= d <= 256 and d % 8 == 0 for d in (b.attn.head_dim_qk, b.attn.head_dim_v))]
    if not bad:
        return []
    return [f"attention in blocks {', '.join(bad)} (QK/V head dims) cannot use TensorRT's fused attention, which "
            "needs head dims from 16 to 256 that are multiples of 8 (--multiple 8 keeps multiples of 8; a head kept at "
            "fewer than 16 dims still cannot fuse)."]


def agreement(original: onnx.ModelProto, compressed: onnx.ModelProto, inputs: np.ndarray, described: str) -> dict:
    """ONNX Runtime outputs of both graphs on the same inputs, in batches of 8."""
    ref, got = (run_batched(ort_runner(model), inputs, 8) for model in (original, compressed))
    diff = float(np.abs(ref - got).max())
    result = {"inputs": described, "max_abs_diff": diff,
              "relative_error": diff / max(float(np.abs(ref).max()), 1e-12)}
    if ref.ndim == 2 and ref.shape[1] > 1:
        result["top1_agreement"] = float(np.mean(ref.argmax(1) == got.argmax(1)))
    return result
