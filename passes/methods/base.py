"""What a compression method is, and the state a conversion carries from one method to the next.

A method declares its name, its options (a dataclass whose fields carry their command-line flag
and help), what it does to the graph (`apply`: run its passes on `Run.model`) and how the PyTorch
reference of its part is rebuilt (`reference`). `convert` composes a list of them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import numpy as np
import onnx

from ...converter.graph import describe_vit
from ...converter.graph.vit_graph import ViTGraph
from ..base import PassResult
from ..structured_prune import BlockKeep, prune_structure


def option(default: Any, flag: str, help: str, cli_type: type = None, parse: Callable[[Any], Any] = None,
           shared: bool = False, secondary: str = None):
    """A method option. `cli_type` is what the command line reads (default: the default's type),
    `parse` turns that into the option's value; `shared` options given once apply to every part of a
    composition that declares them (they must mean the same in each); `secondary` is a --no-flag."""
    return field(default=default, metadata={"flag": flag, "help": help, "cli_type": cli_type, "parse": parse,
                                            "shared": shared, "secondary": secondary})


def option_fields(options_type: type) -> list:
    return [f for f in fields(options_type) if "flag" in f.metadata]


class Method:
    """One compression method. Subclasses set the class attributes and override the hooks."""

    name: str = ""
    title: str = ""            # the CLI help panel
    order: int = 0             # position in a composition: structure first, tokens last
    reduces_tokens: bool = False   # the whole method is a token reducer (one per graph)
    Options: type = object

    def check(self, options, run: "Run") -> None:
        """Refuse settings that cannot work, before any work (raise Vit2TrtError)."""

    def apply(self, options, run: "Run") -> dict:
        """Run the passes on run.model / run.vit; return this part's decisions section."""
        raise NotImplementedError

    def reference(self, model, part: dict):
        """The PyTorch reference of this part, wrapped around `model` (which already carries the
        structure every part pruned, see decisions['blocks'])."""
        return model

    # What `vit2trt plan` searches: settings from mild to aggressive (none: the planner skips the
    # method), the option it halves between two of them, and how a setting reads in its table.
    plan_key: Optional[str] = None
    plan_integer: bool = False

    def plan_levels(self, vit: ViTGraph, has_record: bool, healing: bool = False) -> list[dict]:
        """Settings `plan` searches, mild to aggressive; `healing`: plan heals candidates, which brings
        more aggressive settings within reach."""
        return []

    def plan_label(self, level: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in level.items())


@dataclass
class Run:
    """The graph as it goes through the parts of a conversion, and what was done to it."""

    model: onnx.ModelProto
    vit: ViTGraph                  # the current graph's description
    original_vit: ViTGraph
    model_path: str
    calib: Any                     # calibration images: a folder, an .npy file or an array; None: none given
    fit_limit: int
    calib_limit: int
    seed: int
    progress: Callable[[str], None]
    model_name: Optional[str] = None
    token_part: Optional[str] = None   # the part that reduces tokens in this composition
    token_schedule: Optional[list[int]] = None   # tokens each block will see once that part ran
    keeps: list[BlockKeep] = field(default_factory=list)   # kept structure, in original indices
    compensation: dict[str, np.ndarray] = field(default_factory=dict)
    passes: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stripped: bool = False
    cache: Optional[dict] = None   # the planner shares statistics between candidates
    reference_record: Optional[dict] = None   # the record `vit2trt export` wrote beside the model

    @property
    def has_calib(self) -> bool:
        return self.calib is not None   # compress passes None when no images were given

    def describe(self, label: str) -> None:
        self.vit = describe_vit(self.model, label)

    def apply(self, result: PassResult, label: str) -> dict:
        """Take a pass's graph and account for it: the new graph, its report, its description."""
        self.passes.append(result.report)
        self.model = result.model
        self.describe(label)
        return result.report

    def record(self) -> Optional[dict]:
        return self.reference_record

    def recorded_name(self) -> Optional[str]:
        record = self.record() or {}
        return self.model_name or (record.get("name") if record.get("family") == "timm" else None)

    def strip_zeroed(self) -> None:
        """Remove structure a masked fine-tune zeroed (once per conversion)."""
        if self.stripped:
            return
        from ..strip_zeros import strip_dead_structure

        self.stripped = True
        self.progress("stripping zeroed structure")
        result, keeps = strip_dead_structure(self.model, self.vit)
        if not keeps:
            self.passes.append(result.report)
            return
        if self.compensation:   # nothing fits before the strip today; narrow what would
            self.compensation = slice_compensation(self.compensation, keeps, self.vit)
        self.apply(result, "stripped graph")
        self.keeps = compose_keeps(self.keeps, keeps)

    def calibration_inputs(self, limit: int) -> np.ndarray:
        from ...converter.measure.calibration import load_calibration

        return load_calibration(self.calib, (self.vit.in_chans, *self.vit.img_size),
                                (self.record() or {}).get("preprocessing"), limit,
                                progress=lambda done, total: self.progress(f"reading calibration images {done}/{total}"))

    def calibration_stats(self):
        """Activation moments of the current graph for compensation and budgets (None without --calib)."""
        if not self.has_calib:
            return None
        from ..calibration_stats import collect_stats

        key = None
        if self.cache is not None:
            images = (hashlib.sha1(self.calib.tobytes()).hexdigest() if isinstance(self.calib, np.ndarray)
                      else str(self.calib))
            key = ("stats", hashlib.sha1(self.model.SerializeToString()).hexdigest(), images, self.fit_limit)
            if key in self.cache:
                return self.cache[key]
        stats = collect_stats(self.model, self.vit, self.calibration_inputs(self.fit_limit),
                              progress=lambda done, total: self.progress(f"calibration statistics {done}/{total} images"))
        if key is not None:
            self.cache[key] = stats
        return stats

    def prune(self, new_keeps: list[BlockKeep], name: str, stats, compensate: Optional[bool]) -> None:
        """Remove what `new_keeps` (indices into the current graph) drops, compensated when
        statistics are at hand and compensation is not turned off."""
        if not new_keeps:
            return
        # Kept indices in ascending order everywhere: the graph, the fits and the reference agree on it.
        new_keeps = [BlockKeep(k.index, *(None if v is None else
                                          ([sorted(d) for d in v] if attr != "ffn_keep" else sorted(v))
                                          for attr, v in (("qk_keep", k.qk_keep), ("v_keep", k.v_keep),
                                                          ("ffn_keep", k.ffn_keep))))
                     for k in new_keeps]
        fitted_tensors: dict = {}
        if stats is not None and compensate is not False:
            from ..sensitivity import compensate_keeps

            self.progress("fitting compensation")
            fitted, fitted_tensors = compensate_keeps(self.model, self.vit, stats, new_keeps)
            self.apply(fitted, "compensated graph")   # the fitted weights are new constants
        # Weights an earlier part fitted for layers this part narrows without refitting: slice them.
        self.compensation = {**slice_compensation(self.compensation, new_keeps, self.vit), **fitted_tensors}
        result = prune_structure(self.model, self.vit, new_keeps)
        result.report["pass"] = name
        self.apply(result, f"graph after {name}")
        self.keeps = compose_keeps(self.keeps, new_keeps)

    def structured_reference(self):
        """The original's PyTorch reference with the structure pruned so far (AS-ViT calibrates on it)."""
        from ...models.pruned_reference import apply_decisions
        from ...models.reference import ReferenceRecord, build_model

        if self.reference_record is None:
            return None
        model = build_model(ReferenceRecord(**self.reference_record))
        if not self.keeps and not self.compensation:
            return model
        import torch

        weights = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.compensation.items()}
        return apply_decisions(model, {"blocks": [k.to_dict() for k in self.keeps]}, weights)


def compose_keeps(first: list[BlockKeep], second: list[BlockKeep]) -> list[BlockKeep]:
    """Express `second` (indices into what `first` kept) in indices of the original model."""
    by_index = {k.index: k for k in first}
    out = {k.index: BlockKeep(k.index, k.qk_keep, k.v_keep, k.ffn_keep) for k in first}
    for k in second:
        base = by_index.get(k.index)
        merged = out.setdefault(k.index, BlockKeep(k.index))
        for attr in ("qk_keep", "v_keep"):
            new = getattr(k, attr)
            if new is None:
                continue
            old = getattr(base, attr) if base else None
            setattr(merged, attr, [[old[h][j] for j in dims] if old else list(dims) for h, dims in enumerate(new)])
        if k.ffn_keep is not None:
            old = base.ffn_keep if base else None
            merged.ffn_keep = [old[c] for c in k.ffn_keep] if old else list(k.ffn_keep)
    return [out[i] for i in sorted(out)]


def slice_compensation(tensors: dict, new_keeps: list[BlockKeep], vit: ViTGraph) -> dict:
    """Fitted (in, out) weights of the current graph, narrowed the way `new_keeps` narrows their layers."""
    out = dict(tensors)
    for keep in new_keeps:
        attn = vit.blocks[keep.index].attn
        prefix = f"blocks.{keep.index}"
        if keep.qk_keep is not None:
            cols = [h * attn.head_dim_qk + j for h, dims in enumerate(keep.qk_keep) for j in sorted(dims)]
            for kind, axis in (("weight", 1), ("bias", 0)):
                if f"{prefix}.q.{kind}" in out:
                    out[f"{prefix}.q.{kind}"] = np.take(out[f"{prefix}.q.{kind}"], cols, axis=axis)
        if keep.v_keep is not None and f"{prefix}.proj.weight" in out:
            rows = [h * attn.head_dim_v + j for h, dims in enumerate(keep.v_keep) for j in sorted(dims)]
            out[f"{prefix}.proj.weight"] = out[f"{prefix}.proj.weight"][rows]
        if keep.ffn_keep is not None and f"{prefix}.fc2.weight" in out:
            out[f"{prefix}.fc2.weight"] = out[f"{prefix}.fc2.weight"][sorted(keep.ffn_keep)]
    return out
