"""What `vit2trt validate` compares a compressed graph with: the original's reference, from one of

- the record `vit2trt export` wrote (OUT/reference.json, copied by convert, or --reference FILE);
- a PyTorch model named on the command line (--reference timm:NAME | hf:... --weights FILE --arg K=V),
  built as `vit2trt export` builds it, with the same safe loading rules;
- the original ONNX graph run in ONNX Runtime (--reference-onnx original.onnx), when no PyTorch
  model is at hand. It checks outputs, not the surgery against a compressed PyTorch model.

Every kind is checked before any long run: it must build, take the graph's input size and return
as many logits as the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..artifact import ORIGINAL_FILE, RECORD_FILE, read_json
from ..runtime import fixed_batch, ort_session, run_batched, session_runner
from ...errors import ExportError, Vit2TrtError



@dataclass
class Reference:
    kind: str                      # "record", "pytorch" or "onnx"
    described: str                 # what the report says was compared against
    input_size: tuple[int, ...]    # C, H, W
    preprocessing: dict
    record: Any = None             # ReferenceRecord (record, pytorch): rebuilds the model, compressed too
    onnx_path: Optional[Path] = None
    note: Optional[str] = None
    _onnx: Any = field(default=None, repr=False)   # the ONNX Runtime session, loaded once

    def run(self, x: np.ndarray, batch: int) -> np.ndarray:
        if self.kind == "onnx":
            if self._onnx is None:
                self._onnx = ort_session(self.onnx_path)
            # an original exported at batch 1 runs one image at a time
            return run_batched(session_runner(self._onnx), x, fixed_batch(self._onnx) or batch)
        from ..runtime import torch_batched
        from ...models.reference import build_model

        return torch_batched(build_model(self.record).eval(), x, batch)


def resolve_reference(out_dir: Path, reference: Optional[str] = None, weights: Optional[str] = None,
                      model_args: Optional[dict] = None, reference_onnx: Optional[str] = None) -> Reference:
    """The reference the options name, else OUT's record; none of them: an error naming what to give."""
    if reference_onnx is not None and reference is not None:
        raise Vit2TrtError("give one reference: --reference (a record or a PyTorch model) or --reference-onnx "
                           "(the original graph), not both.")
    if (weights is not None or model_args) and not _is_model_spec(reference):
        raise Vit2TrtError("--weights and --arg describe a PyTorch model: give them with --reference timm:NAME "
                           "or --reference hf:ViTForImageClassification.")
    if reference_onnx is not None:
        return _onnx_reference(out_dir, Path(reference_onnx))
    if _is_model_spec(reference):
        return _pytorch_reference(reference, weights, model_args)
    if reference and Path(reference).suffix == ".onnx":
        recorded = (_read_original(out_dir) or {}).get("sha256")
        if recorded and Path(reference).is_file() and _sha256(Path(reference)) != recorded:
            raise Vit2TrtError(f"--reference {reference} is not the graph {out_dir} was converted from (its SHA-256 "
                               f"differs from {ORIGINAL_FILE}'s); give the original model.onnx.")
        return graph_reference(Path(reference), "--reference")
    record_path = Path(reference) if reference else out_dir / RECORD_FILE
    if not record_path.is_file() and not reference:
        original = _read_original(out_dir) or {}
        where = Path(original.get("path", ""))
        if original.get("path") and where.is_file() and original.get("sha256") == _sha256(where):
            try:   # the original graph is still there: a PyTorch ViT assembled from it is the reference
                return graph_reference(where, "the original", original.get("preprocessing"))
            except Vit2TrtError as exc:
                raise Vit2TrtError(f"{missing_reference_message(out_dir)} ({exc})") from None
    if not record_path.is_file():
        if reference:
            raise Vit2TrtError(f"--reference {reference}: no such file; give a reference record "
                               "(MODEL.onnx.reference.json) or a model as timm:NAME or hf:ViTForImageClassification.")
        raise Vit2TrtError(missing_reference_message(out_dir))
    return _record_reference(record_path)


def original_reference(path: Path, record: Optional[dict]) -> Reference:
    """The original of a graph as a PyTorch model: from its export record, else assembled from the graph."""
    from ...models.reference import ReferenceRecord

    if not record:
        return graph_reference(Path(path), "the original")
    try:
        built = ReferenceRecord(**record)
        size = tuple(int(v) for v in built.preprocessing["input_size"])
    except (TypeError, KeyError, ValueError) as exc:
        raise Vit2TrtError(f"the reference record beside {path} is not one `vit2trt export` wrote ({exc}).") from None
    return Reference("record", f"PyTorch {built.family}:{built.name} (record)", size, built.preprocessing,
                     record=built)


def graph_reference(path: Path, given_as: str, preprocessing: Optional[dict] = None) -> Reference:
    """A PyTorch ViT assembled from the ONNX graph at `path` (models/graph_reference.py)."""
    from .calibration import DEFAULT_PREPROCESSING
    from ...models.graph_reference import GRAPH_FAMILY, model_from_graph
    from ...models.reference import ReferenceRecord

    if not path.is_file():
        raise Vit2TrtError(f"{given_as} {path}: no such file.")
    try:
        _, name, kwargs = model_from_graph(path)
    except ExportError as exc:
        raise Vit2TrtError(f"{given_as} {path}: {exc}") from None
    size = [kwargs["in_chans"], *kwargs["img_size"]]
    preprocessing = {**DEFAULT_PREPROCESSING, **(preprocessing or {}), "input_size": size}
    record = ReferenceRecord(GRAPH_FAMILY, name, kwargs, preprocessing, weights=str(path.resolve()),
                             weights_sha256=_sha256(path))
    return Reference("graph", f"PyTorch ViT assembled from {path.name} (its own weights)", tuple(size), preprocessing,
                     record=record)


def _sha256(path: Path) -> str:
    from ...models.reference import sha256_of

    return sha256_of(path)


def _is_model_spec(reference: Optional[str]) -> bool:
    return reference is not None and str(reference).split(":", 1)[0] in ("timm", "hf") and ":" in str(reference)


def _record_reference(path: Path) -> Reference:
    from ...models.reference import ReferenceRecord

    try:
        record = ReferenceRecord.load(path)
        size = tuple(int(v) for v in record.preprocessing["input_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Vit2TrtError(f"{path}: not a reference record ({exc}).") from None
    weights = f", weights {Path(record.weights).name}" if record.weights else f", seed {record.seed}"
    return Reference("record", f"PyTorch {record.family}:{record.name}{weights} (record {path.name})", size,
                     record.preprocessing, record=record)


def _pytorch_reference(spec: str, weights: Optional[str], model_args: Optional[dict]) -> Reference:
    from ..deploy.export import reference_model

    try:
        record, _ = reference_model(spec, weights, model_args)
    except ExportError as exc:
        raise Vit2TrtError(f"--reference {spec}: {exc}") from None
    except Exception as exc:   # a constructor refusing its arguments, a checkpoint of another shape
        raise Vit2TrtError(f"--reference {spec} does not build ({type(exc).__name__}: {str(exc)[:300]}); check "
                           "the name, --arg values and that --weights belong to that model.") from None
    size = tuple(int(v) for v in record.preprocessing["input_size"])
    given = f", weights {Path(weights).name}" if weights else ", seeded random init (no --weights)"
    return Reference("pytorch", f"PyTorch {spec}{given}", size, record.preprocessing, record=record)


def _onnx_reference(out_dir: Path, path: Path) -> Reference:
    from .calibration import DEFAULT_PREPROCESSING
    from ...models.reference import sha256_of

    if not path.is_file():
        raise Vit2TrtError(f"--reference-onnx {path}: no such file.")
    try:
        session = ort_session(path)
    except Exception as exc:   # ORT raises many types for a file it cannot load
        raise Vit2TrtError(f"--reference-onnx {path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]}).") \
            from None
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise Vit2TrtError(f"--reference-onnx {path}: input shape {shape} is not [N, C, H, W] with fixed C, H, W.")
    if isinstance(shape[0], int) and shape[0] != 1:
        raise Vit2TrtError(f"--reference-onnx {path}: the input has a fixed batch of {shape[0]}; give a graph exported "
                           "with a dynamic batch or with batch 1.")
    original = _read_original(out_dir) or {}
    note = None
    if original.get("sha256") and original["sha256"] != sha256_of(path):
        note = f"{path.name} is not the file convert read ({original.get('path')}): its bytes differ."
    preprocessing = dict(original.get("preprocessing") or DEFAULT_PREPROCESSING, input_size=list(shape[1:]))
    return Reference("onnx", f"ONNX Runtime running {path.name} (the original graph; no PyTorch model)",
                     tuple(shape[1:]), preprocessing, onnx_path=path, note=note, _onnx=session)


def check_reference_fits(reference: Reference, session) -> None:
    """Same input size and as many outputs as the compressed graph, on one image, before the long runs."""
    graph_in = session.get_inputs()[0].shape[1:]
    if all(isinstance(d, int) for d in graph_in) and tuple(graph_in) != tuple(reference.input_size):
        raise Vit2TrtError(f"the reference ({reference.described}) takes inputs of {list(reference.input_size)}, "
                           f"the compressed graph {list(graph_in)}: give the reference the graph's image size "
                           "(for timm --arg img_size=N, for hf --arg image_size=N).")
    probe = np.zeros((1, *reference.input_size), dtype=np.float32)
    try:
        width = reference.run(probe, 1).shape[-1]
    except Vit2TrtError:
        raise
    except Exception as exc:
        raise Vit2TrtError(f"the reference ({reference.described}) fails on one image: "
                           f"{type(exc).__name__}: {str(exc)[:200]}") from None
    got = session.run(None, {session.get_inputs()[0].name: probe})[0].shape[-1]
    if width != got:
        raise Vit2TrtError(f"the reference ({reference.described}) returns {width} outputs, the compressed graph "
                           f"{got}: give the reference the graph's head (for timm --arg num_classes={got}, for hf "
                           f"--arg num_labels={got}) and its weights.")


def missing_reference_message(out_dir: Path) -> str:
    """No reference given and none in OUT: say what the original was and the ways to supply one."""
    original = _read_original(out_dir)
    try:
        return _described_missing_reference(out_dir, original)
    except (KeyError, TypeError, ValueError, IndexError):   # no original.json, or one edited by hand
        return (f"{out_dir} holds no reference record ({RECORD_FILE}) and no description of the original: give "
                "--reference timm:NAME --weights FILE [--arg KEY=VALUE], --reference hf:ViTForImageClassification "
                "..., --reference FILE.reference.json, or --reference-onnx ORIGINAL.onnx.")


def _described_missing_reference(out_dir: Path, original: Optional[dict]) -> str:
    c, h, w = original["input"]["size"]
    tokens = ", ".join(f"{n} {k} token{'s' if n > 1 else ''}" for k, n in original.get("extra_tokens", {}).items()
                       ) or "no extra tokens"
    looks = (f"a ViT with {original['depth']} blocks, embed dim {original['embed_dim']}, {original['heads']} heads, "
             f"patch {original['patch_size'][0]}, {tokens}, {original['classes']} classes, {h}x{w} input")
    where = original["path"]
    exists = "still there" if Path(where).is_file() else "no longer there"
    return (f"{out_dir} has no reference record: its original ({where}, written by {original['producer']}) was not "
            f"exported by `vit2trt export`. It is {looks}. Give one of: --reference timm:NAME --weights FILE "
            f"[--arg KEY=VALUE ...] (the PyTorch model, e.g. --arg num_classes={original['classes']} --arg "
            f"img_size={h}); --reference hf:ViTForImageClassification --weights FILE --arg ...; --reference "
            f"ORIGINAL.onnx (a PyTorch ViT assembled from the original graph); or "
            f"--reference-onnx ORIGINAL.onnx to compare with the original graph in ONNX Runtime ({where} is "
            f"{exists}).")


def _read_original(out_dir: Path) -> Optional[dict]:
    return read_json(out_dir / ORIGINAL_FILE) or None
