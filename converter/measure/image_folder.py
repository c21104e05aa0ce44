"""Labelled images as torchvision's ImageFolder keeps them: one subfolder per class, images anywhere below it.

A folder whose images all sit in subfolders (none at its top level) is an ImageFolder. An image's class is
its top subfolder: the position of that name in sorted order, or the index a class map (--class-map FILE)
gives it when the model's head uses another order. Folder names and class maps are untrusted input: every
mismatch between them, and every class beyond the model's head, ends in a Vit2TrtError that names it.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from .calibration import IMAGE_SUFFIXES
from ...errors import Vit2TrtError


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _visible(name: str) -> bool:
    # Hidden entries (.ipynb_checkpoints, macOS ._photo.jpg forks) are tool litter, not classes or photos.
    return not name.startswith(".")


def class_folders(root: Path) -> list[str]:
    """The names of root's visible subfolders, sorted: the candidate classes."""
    return sorted(p.name for p in Path(root).iterdir() if _visible(p.name) and p.is_dir())


def is_image_folder(root: Path) -> bool:
    """True when root holds subfolders and no image at its top level (a flat folder keeps its old meaning)."""
    root = Path(root)
    if not root.is_dir():
        return False
    entries = list(root.iterdir())
    return not any(p.is_file() and _is_image(p) for p in entries) and bool(class_folders(root))


def _images_below(folder: Path) -> list[Path]:
    """Every visible image under folder, at any depth. Symbolic links are followed (people link class folders
    in) but each real folder is walked once, so a link back up cannot loop."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        stat = os.stat(top)
        if (stat.st_dev, stat.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs[:] = [d for d in dirs if _visible(d)]
        found += [Path(top) / f for f in files if _visible(f) and _is_image(Path(f))]
    return found


def image_folder_files(root: Path, flag: str = "--images") -> list[Path]:
    """All images of an ImageFolder, sorted by their path relative to root (the order of every array made from
    them). Like torchvision, a class folder without images is an error: its class could never be measured."""
    root = Path(root)
    per_class = {name: _images_below(root / name) for name in class_folders(root)}
    if not any(per_class.values()):
        raise Vit2TrtError(f"{flag} {root}: no images in its subfolders ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                           "an ImageFolder holds one subfolder of images per class.")
    empty = [name for name, files in per_class.items() if not files]
    if empty:
        raise Vit2TrtError(f"{flag} {root}: class folder {_names(empty)} holds no images; remove it or add "
                           "its images.")
    files = [f for found in per_class.values() for f in found]
    return sorted(files, key=lambda f: f.relative_to(root).parts)


def spread_over_classes(files: list[Path], root: Path, limit: Optional[int]) -> list[Path]:
    """At most `limit` of an ImageFolder's sorted `files`, taken round-robin over the classes (each class's
    first image, then each one's second, ...), so that a limit samples every class rather than the first
    few folders. Returned in the same sorted order."""
    if limit is None or limit >= len(files):
        return files
    per_class: dict[str, list[Path]] = {}
    for f in files:
        per_class.setdefault(f.relative_to(root).parts[0], []).append(f)
    queues = [iter(found) for found in per_class.values()]
    chosen: set[Path] = set()
    while len(chosen) < limit:
        for queue in queues:
            f = next(queue, None)
            if f is not None and len(chosen) < limit:
                chosen.add(f)
    return [f for f in files if f in chosen]


def read_class_map(path: Path, folders: list[str]) -> dict[str, int]:
    """Folder name -> class index from JSON: a list of folder names (position = index) or {"folder": index}.
    Every class folder present needs an index, and each index belongs to one folder. A list is positional, so
    it is the head's whole class list and may name classes the images lack (an evaluation on some classes);
    an object maps folders one by one, so a name without a folder is a mistake."""
    try:
        data = json.loads(Path(path).read_text(), object_pairs_hook=_pairs_without_repeats)
    except (OSError, UnicodeDecodeError) as exc:
        raise Vit2TrtError(f"--class-map {path}: cannot read it ({exc}).") from None
    except _RepeatedKeys as exc:
        raise Vit2TrtError(f"--class-map {path}: {exc}.") from None
    except ValueError as exc:
        raise Vit2TrtError(f"--class-map {path}: not valid JSON ({exc}).") from None
    if isinstance(data, list):
        mapping = _mapping_from_list(path, data)
    elif isinstance(data, dict):
        mapping = _mapping_from_object(path, data)
        _check_no_absent_folders(path, mapping, folders)
    else:
        raise Vit2TrtError(f"--class-map {path}: expected a JSON list of folder names (position = class index) "
                           f"or an object {{\"folder\": index}}, not a {type(data).__name__}.")
    _check_every_folder_mapped(path, mapping, folders)
    return mapping


class _RepeatedKeys(ValueError):
    pass


def _pairs_without_repeats(pairs: list) -> dict:
    repeated = _repeated([key for key, _ in pairs])
    if repeated:   # json keeps the last silently; a map that says two things about a folder is a mistake
        raise _RepeatedKeys(f"folder {_names(repeated)} appears more than once")
    return dict(pairs)


def _repeated(names: list[str]) -> list[str]:
    return sorted(name for name, count in Counter(names).items() if count > 1)


def _mapping_from_list(path: Path, names: list) -> dict[str, int]:
    if not all(isinstance(name, str) for name in names):
        raise Vit2TrtError(f"--class-map {path}: a list class map holds folder names (strings) only.")
    repeated = _repeated(names)
    if repeated:
        raise Vit2TrtError(f"--class-map {path}: folder {_names(repeated)} appears more than once.")
    return {name: index for index, name in enumerate(names)}


def _mapping_from_object(path: Path, table: dict) -> dict[str, int]:
    bad = [name for name, index in table.items() if isinstance(index, bool) or not isinstance(index, int) or index < 0]
    if bad:
        raise Vit2TrtError(f"--class-map {path}: folder '{bad[0]}' has index {json.dumps(table[bad[0]])}; "
                           "indices are whole numbers from 0.")
    by_index: dict[int, list[str]] = {}
    for name, index in table.items():
        by_index.setdefault(index, []).append(name)
    shared = {index: names for index, names in by_index.items() if len(names) > 1}
    if shared:
        index, names = min(shared.items())
        raise Vit2TrtError(f"--class-map {path}: index {index} is given to {len(names)} folders ({_names(names)}); "
                           "each class index belongs to one folder.")
    return dict(table)


def _check_every_folder_mapped(path: Path, mapping: dict[str, int], folders: list[str]) -> None:
    unmapped = [name for name in folders if name not in mapping]
    if unmapped:
        raise Vit2TrtError(f"--class-map {path}: no index for {len(unmapped)} class folder(s): {_names(unmapped)}.")


def _check_no_absent_folders(path: Path, mapping: dict[str, int], folders: list[str]) -> None:
    absent = sorted(set(mapping) - set(folders))
    if absent:
        raise Vit2TrtError(f"--class-map {path}: names {len(absent)} folder(s) the images lack: {_names(absent)}; "
                           "an object maps exactly the class folders present (a list may hold the head's "
                           "whole class list).")


def class_indices(root: Path, class_map: Optional[Path], width: Optional[int], flag: str = "--images") -> dict[str, int]:
    """Folder name -> class index: sorted order, or the class map; every index within the head's width."""
    folders = class_folders(root)
    mapping = read_class_map(class_map, folders) if class_map else {name: i for i, name in enumerate(folders)}
    beyond = sorted((index, name) for name, index in mapping.items() if width is not None and index >= width)
    if beyond:
        index, name = beyond[-1]
        source = f"--class-map {class_map}" if class_map else f"{flag} {root}"
        hint = "" if class_map else " (folders are numbered in sorted order; give --class-map for the head's order)"
        raise Vit2TrtError(f"{source}: '{name}' is class {index}, beyond the model's {width} outputs "
                           f"(0..{width - 1}){hint}.")
    return mapping


def folder_labels(root: Path, files: list[Path], classes: dict[str, int]) -> np.ndarray:
    """The class of each file: the index of its top subfolder under root."""
    return np.array([classes[f.relative_to(root).parts[0]] for f in files], dtype=np.int64)


def _names(names: list[str], shown: int = 3) -> str:
    quoted = ", ".join(f"'{n}'" for n in names[:shown])
    return quoted + (f" and {len(names) - shown} more" if len(names) > shown else "")
