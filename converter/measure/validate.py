"""`vit2trt validate OUT`: the compressed graph against the reference of the original model.

The reference (references.py) is the PyTorch model rebuilt from the record `vit2trt export`
wrote (copied into OUT by convert), a PyTorch model named with --reference timm:NAME / hf:..., or
the original graph in ONNX Runtime (--reference-onnx). It is compared with the compressed ONNX
graph in ONNX Runtime on the same images:
top-1 agreement, logits cosine similarity, max abs error, top-1/top-5 accuracy when labels are
given (--labels, or the class subfolders of an ImageFolder), and whether an image's output depends on the
rest of its batch.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..artifact import ENGINE_FILE, Artifact
from ..planning.report import render_report
from ..runtime import ort_session, run_batched, session_runner
from ...errors import Vit2TrtError

SINGLE_RUNS = 16   # images re-run one at a time for the batch-dependence check


@dataclass
class Thresholds:
    min_top1_agreement: Optional[float] = None
    min_cosine: Optional[float] = None
    max_accuracy_drop: Optional[float] = None   # top-1, in fractions (0.01 = one point)


def read_labels(path: Path, files: list[Path]) -> np.ndarray:
    """Labels for `files` from JSON ({"name": index}) or text lines "name index" / "name,index"."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise Vit2TrtError(f"--labels {path}: cannot read it ({exc}).") from None
    try:
        if path.suffix == ".json":
            table = {str(k): int(v) for k, v in json.loads(text).items()}
        else:
            table = {}
            for line in text.splitlines():
                if line.strip():
                    name, value = line.replace(",", " ").split()[:2]
                    table[name] = int(value)
    except (ValueError, AttributeError, TypeError) as exc:
        raise Vit2TrtError(f"--labels {path}: expected JSON {{\"file\": class}} or lines 'file class' ({exc}).") \
            from None
    missing = [f.name for f in files if f.name not in table and f.stem not in table]
    if missing:
        raise Vit2TrtError(f"--labels {path}: no label for {len(missing)} image(s), e.g. {missing[0]}.")
    return np.array([table.get(f.name, table.get(f.stem)) for f in files], dtype=np.int64)


def _label_array(path: Path, count: int) -> np.ndarray:
    if path.suffix != ".npy":
        raise Vit2TrtError(f"--labels {path}: with an .npy of images, give the labels as an .npy of class indices "
                           "in the same order.")
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise Vit2TrtError(f"--labels {path}: not a readable .npy array ({exc}).") from None
    if labels.shape != (count,) or labels.dtype.kind not in "iu":
        raise Vit2TrtError(f"--labels {path}: expected {count} integer labels, got shape {list(labels.shape)} "
                           f"of {labels.dtype}.")
    return labels.astype(np.int64)


def image_labels(images: Path, files: Optional[list[Path]], count: int, labels: Optional[Path],
                 class_map: Optional[Path], width: Optional[int], flag: str, labels_flag: str = "--labels",
                 class_map_flag: str = "--class-map") -> Optional[np.ndarray]:
    """The class of each image, in the order of `files` (None: an .npy of `count` images), or None when no
    labels are given. An ImageFolder labels itself; a flat folder or an array takes --labels (`labels_flag`
    and `class_map_flag` name the options in messages)."""
    try:
        return _image_labels(images, files, count, labels, class_map, width, flag, labels_flag, class_map_flag)
    except Vit2TrtError as exc:   # the readers below name --labels and --class-map: name the options given
        message = str(exc)
        if (labels_flag, class_map_flag) == ("--labels", "--class-map"):
            raise
        renamed = message.replace("--labels ", f"{labels_flag} ").replace("--class-map ", f"{class_map_flag} ")
        raise Vit2TrtError(renamed) from None


def _image_labels(images, files, count, labels, class_map, width, flag, labels_flag, class_map_flag):
    from .image_folder import class_indices, folder_labels, is_image_folder

    if files is not None and is_image_folder(images):
        if labels is not None:
            raise Vit2TrtError(f"{labels_flag} {labels} conflicts with {flag} {images}: that is an ImageFolder (one "
                               f"subfolder per class), whose folder names are the labels. Drop {labels_flag}; give "
                               f"{class_map_flag} FILE if the model's head orders the classes otherwise.")
        return folder_labels(images, files, class_indices(images, class_map, width, flag))
    if class_map is not None:
        kind = "an .npy array" if files is None else "a flat folder (its images are not in class subfolders)"
        raise Vit2TrtError(f"{class_map_flag} {class_map} needs an ImageFolder (one subfolder per class) as {flag}; "
                           f"{images} is {kind}: give its classes with {labels_flag}.")
    if labels is None:
        return None
    truth = _label_array(Path(labels), count) if files is None else read_labels(Path(labels), files)
    check_label_range(truth, width, f"{labels_flag} {labels}")
    return truth


def check_label_range(labels: np.ndarray, width: Optional[int], source: str) -> None:
    """Every label names one of the head's logits: 0 <= label < width (width None: unknown, only >= 0)."""
    if labels.size and labels.min() < 0:
        raise Vit2TrtError(f"{source}: class {int(labels.min())} is negative; classes number the model's "
                           "outputs from 0.")
    if width is not None and labels.size and labels.max() >= width:
        raise Vit2TrtError(f"{source}: class {int(labels.max())} is beyond the model's {width} outputs "
                           f"(0..{width - 1}).")


def _head_width(session) -> Optional[int]:
    """The number of logits, where the graph's output shape states it (a dynamic one is a name)."""
    shape = session.get_outputs()[0].shape
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def _top_k_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-logits, axis=1)[:, :k]
    return float(np.mean([label in row for row, label in zip(top, labels)]))


def validate(out_dir: str | os.PathLike, images: str | os.PathLike, labels: Optional[str | os.PathLike] = None,
             reference: Optional[str | os.PathLike] = None, batch: int = 8, limit: Optional[int] = None,
             thresholds: Thresholds = Thresholds(),
             progress: Callable[[str], None] = lambda msg: None, class_map: Optional[str | os.PathLike] = None,
             use_folder_labels: bool = True, weights: Optional[str | os.PathLike] = None,
             model_args: Optional[dict] = None, reference_onnx: Optional[str | os.PathLike] = None,
             flag: str = "--images") -> dict:
    """`reference`: a reference record file or a model (timm:NAME, hf:...; with `weights`, `model_args`);
    `reference_onnx`: the original graph instead (references.py). use_folder_labels=False reads only
    the images of an ImageFolder (convert's check on its --calib, whose folders need not be in the head's
    order). `flag` names the option that gave `images`, in messages (convert's check passes --calib)."""
    from .calibration import image_files, load_calibration, preprocess_image, DEFAULT_PREPROCESSING
    from .references import check_reference_fits, resolve_reference

    out_dir = Path(out_dir)
    artifact = Artifact.open(out_dir)
    if batch < 1:
        raise Vit2TrtError(f"--batch must be at least 1, got {batch}.")
    reference_of = resolve_reference(out_dir, str(reference) if reference else None,
                                     str(weights) if weights else None, model_args,
                                     str(reference_onnx) if reference_onnx else None)
    input_size = tuple(reference_of.input_size)
    images = Path(images)
    if not images.exists():
        raise Vit2TrtError(f"{flag} {images}: no such file or folder.")
    session = artifact.session()
    progress("checking that the reference fits the graph")
    check_reference_fits(reference_of, session)
    files = image_files(images, limit, flag) if images.is_dir() else None
    x = None if files is not None else load_calibration(images, input_size, reference_of.preprocessing, limit,
                                                        flag=flag)
    truth = None
    if use_folder_labels or labels is not None:   # labels are checked before the images are decoded
        truth = image_labels(images, files, len(files) if files is not None else len(x),
                             Path(labels) if labels else None, Path(class_map) if class_map else None,
                             _head_width(session), flag)
    if thresholds.max_accuracy_drop is not None and truth is None:   # before the long runs, not after
        raise Vit2TrtError("--max-accuracy-drop needs --labels, or an ImageFolder (one subfolder per class) "
                           f"as {flag}.")
    if files is not None:
        config = dict(DEFAULT_PREPROCESSING, **reference_of.preprocessing)
        x = np.stack([preprocess_image(f, input_size, config, flag) for f in files]).astype(np.float32)

    progress(f"running the reference on {len(x)} images")
    want = reference_of.run(x, batch)
    if truth is not None and _head_width(session) is None:   # a graph that left its width dynamic
        check_label_range(truth, want.shape[-1], "--labels" if labels else f"{flag} {images}")
    progress("running the compressed graph in ONNX Runtime")
    name = session.get_inputs()[0].name
    got = run_batched(session_runner(session), x, batch)
    singles = run_batched(session_runner(session), x[:SINGLE_RUNS], 1)
    if got.shape != want.shape:
        raise Vit2TrtError(f"the compressed graph returns {list(got.shape)}, the reference {list(want.shape)}.")
    surgery = {"error": None, "near_ties": None}
    if artifact.decisions and reference_of.record is not None:
        progress("running the PyTorch reference of the compressed model")
        surgery = surgery_check(artifact, reference_of.record, x, batch)

    flat_want, flat_got = want.reshape(len(x), -1).astype(np.float64), got.reshape(len(x), -1).astype(np.float64)
    cosine = (flat_want * flat_got).sum(1) / np.maximum(
        np.linalg.norm(flat_want, axis=1) * np.linalg.norm(flat_got, axis=1), 1e-30)
    result = {
        "images": len(x), "source": images.name, "reference": reference_of.described,
        "reference_kind": reference_of.kind, "reference_note": reference_of.note, "batch": batch,
        "top1_agreement": float(np.mean(want.argmax(-1) == got.argmax(-1))),
        "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
        "max_abs_error": float(np.abs(got - want).max()),
        "relative_error": float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)),
        "batch_dependence": float(np.abs(singles - got[:len(singles)]).max()),
        "surgery_error": surgery["error"],   # vs the PyTorch model compressed the same way (relative)
        "surgery_near_ties": surgery["near_ties"],   # ToMe merges where the reference followed a near-tie
        "engine": _engine_check(out_dir, name, x, batch, want),
    }
    if truth is not None:
        result["accuracy"] = {
            "reference_top1": _top_k_hits(want, truth, 1), "reference_top5": _top_k_hits(want, truth, 5),
            "compressed_top1": _top_k_hits(got, truth, 1), "compressed_top5": _top_k_hits(got, truth, 5)}
        result["accuracy"]["top1_drop"] = result["accuracy"]["reference_top1"] - result["accuracy"]["compressed_top1"]
    if isinstance(result["engine"], dict):
        result["engine_top1_agreement"] = result["engine"]["top1_agreement"]
    failures = []
    t = thresholds
    if t.min_top1_agreement is not None and result["top1_agreement"] < t.min_top1_agreement:
        failures.append(f"top-1 agreement {result['top1_agreement']:.3f} < {t.min_top1_agreement}")
    if t.min_cosine is not None and result["cosine_min"] < t.min_cosine:
        failures.append(f"lowest logits cosine {result['cosine_min']:.4f} < {t.min_cosine}")
    if t.max_accuracy_drop is not None:
        if result["accuracy"]["top1_drop"] > t.max_accuracy_drop:
            failures.append(f"top-1 accuracy drop {result['accuracy']['top1_drop']:.3f} > {t.max_accuracy_drop}")
    result["failures"] = failures
    artifact.update_report("validation", result)
    render_report(out_dir)
    return result


def surgery_check(artifact: Artifact, record, x: np.ndarray, batch: int) -> dict:
    """The graph in ONNX Runtime against PyTorch running the same compression (decisions.json) on x:
    the largest difference relative to the largest logit. Where a ToMe graph's merge differs from the
    reference's only by a choice within NEAR_TIE (rounding decides it), the reference takes the graph's
    choice, so that what is checked is the surgery; `near_ties` counts the (image, block) merges that did."""
    import torch

    from ...models.tome_reference import ToMeViT

    compressed = artifact.torch_model(record)
    follower = next((m for m in compressed.modules() if isinstance(m, ToMeViT)), None)
    with _graph_with_decisions(artifact) if follower is not None else nullcontext() as exposed:
        blocks = exposed[1] if exposed and exposed[1] == sum(1 for r in follower.r if r) else 0
        session = ort_session(exposed[0]) if blocks else artifact.session()
        outputs = len(session.get_outputs()) - 2 * blocks
        name = session.get_inputs()[0].name
        got, same = [], []
        for i in range(0, len(x), batch):
            run = session.run(None, {name: x[i:i + batch]})
            if blocks:
                follower.follow = list(zip(run[outputs::2], run[outputs + 1::2]))
            with torch.no_grad():
                same.append(compressed(torch.from_numpy(x[i:i + batch])).numpy())
            got.append(run[0])
    got, same = np.concatenate(got), np.concatenate(same)
    return {"error": float(np.abs(got - same).max() / max(np.abs(same).max(), 1e-30)),
            "near_ties": follower.near_ties if blocks else None}


@contextmanager
def _graph_with_decisions(artifact: Artifact):
    """(graph, merging blocks): a copy of a ToMe graph that also outputs its decisions; for a saved artifact,
    written beside the original (so that external weights resolve, and are not loaded) and removed afterwards."""
    import onnx

    from ...passes.tome import with_decision_outputs

    if artifact.folder is None:   # in memory (a heal checks before it writes anything)
        yield with_decision_outputs(artifact.model)
        return
    path = artifact.model_path
    exposed, blocks = with_decision_outputs(onnx.load(str(path), load_external_data=False))
    fd, copy = tempfile.mkstemp(prefix=".vit2trt-decisions-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(exposed, copy)
        yield Path(copy), blocks
    finally:
        os.unlink(copy)


def _engine_check(out_dir: Path, input_name: str, x: np.ndarray, batch: int, want: np.ndarray):
    """The engine's outputs against the reference where it can run (a GPU), else why not."""
    engine = out_dir / ENGINE_FILE
    if not engine.is_file():
        return f"not run: no {ENGINE_FILE} in OUT"
    from ..deploy.engine import engine_runner

    try:
        run = engine_runner(engine, input_name)
    except Vit2TrtError as exc:
        return f"not run: {exc}"
    got = np.concatenate([np.asarray(next(iter(run(x[i:i + batch]).values()))) for i in range(0, len(x), batch)])
    return {"top1_agreement": float(np.mean(got.argmax(-1) == want.argmax(-1))),
            "max_abs_error": float(np.abs(got - want).max())}
