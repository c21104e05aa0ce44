"""Calibration inputs: a folder of images (flat, or an ImageFolder with one subfolder per class; preprocessed
like the model's reference) or an .npy array.

Images are untrusted: each is opened with Pillow's size guard, and any failure names the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ...errors import Vit2TrtError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
DEFAULT_PREPROCESSING = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.875,
                         "interpolation": "bicubic"}


def load_calibration(path: str | os.PathLike, input_size: tuple[int, int, int],
                     preprocessing: Optional[dict] = None, limit: Optional[int] = None,
                     progress: Callable[[int, int], None] = lambda done, total: None,
                     flag: str = "--calib") -> np.ndarray:
    """Return float32 [N, C, H, W] inputs from `path` (folder of images, .npy, or an array already in
    memory); `flag` names the option in messages."""
    if isinstance(path, np.ndarray):
        return _checked_array(path, input_size, flag, "the array")[:limit]
    path = Path(path)
    if not path.exists():
        raise Vit2TrtError(f"{flag} {path}: no such file or folder.")
    if path.is_file():
        if path.suffix != ".npy":
            raise Vit2TrtError(f"{flag} {path}: expected a folder of images or an .npy array.")
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise Vit2TrtError(f"{flag} {path}: not a readable .npy array ({exc}).") from exc
        return _checked_array(data[:limit], input_size, flag, str(path))
    files = image_files(path, limit, flag)
    config = dict(DEFAULT_PREPROCESSING, **(preprocessing or {}))
    batch = []
    for i, file in enumerate(files):
        batch.append(preprocess_image(file, input_size, config, flag))
        progress(i + 1, len(files))
    return np.stack(batch)


def _checked_array(data: np.ndarray, input_size: tuple[int, int, int], flag: str, what: str) -> np.ndarray:
    if data.ndim != 4 or tuple(data.shape[1:]) != tuple(input_size) or data.dtype.kind != "f":
        raise Vit2TrtError(f"{flag} {what}: array has shape {list(data.shape)} and dtype {data.dtype}; "
                           f"expected float [N, {', '.join(map(str, input_size))}].")
    return np.ascontiguousarray(data.astype(np.float32, copy=False))


def image_files(folder: Path, limit: Optional[int] = None, flag: str = "--calib") -> list[Path]:
    """The folder's images in sorted order (the order of every array made from them): a flat folder's own
    images, or every image of an ImageFolder (one subfolder per class) sorted by relative path."""
    from .image_folder import image_folder_files, is_image_folder, spread_over_classes

    if is_image_folder(folder):   # a limit samples every class, not the first folders
        return spread_over_classes(image_folder_files(folder, flag), Path(folder), limit)
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise Vit2TrtError(f"{flag} {folder}: the folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return files


def preprocess_image(file: Path, input_size: tuple[int, int, int], config: dict, flag: str = "--calib") -> np.ndarray:
    """One image as float32 [C, H, W], preprocessed as `config` says; `flag` names the option that gave the
    image, in messages (validate reads --images, convert and plan --calib)."""
    return normalize(read_cropped(file, input_size, config, flag), config)


def read_cropped(file: Path, input_size: tuple[int, int, int], config: dict, flag: str = "--calib") -> np.ndarray:
    """One image resized and centre-cropped as `config` says, before normalization: uint8 [H, W, C]."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = input_size
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}.get(
        str(config.get("interpolation", "bicubic")), Image.BICUBIC)
    try:
        with Image.open(file) as image:
            image = image.convert("RGB" if channels == 3 else "L")
            scale = float(config.get("crop_pct", 0.875) or 1.0)
            short = int(round(min(height, width) / scale))
            w, h = image.size
            if w <= h:
                size = (short, max(short, int(round(h * short / w))))
            else:
                size = (max(short, int(round(w * short / h))), short)
            image = image.resize(size, resample)
            left, top = (size[0] - width) // 2, (size[1] - height) // 2
            array = np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise Vit2TrtError(f"{flag}: could not read image {file}: {str(exc)[:200]}") from exc
    return array[:, :, None] if array.ndim == 2 else array


def normalize(array: np.ndarray, config: dict) -> np.ndarray:
    """uint8 [H, W, C] (or [..., H, W, C]) to the model's float32 input [C, H, W]: scaled to 0..1, minus
    the mean, over the std."""
    channels = array.shape[-1]
    mean = np.asarray(config["mean"], dtype=np.float32)[:channels]
    std = np.asarray(config["std"], dtype=np.float32)[:channels]
    return ((array.astype(np.float32) / 255.0 - mean) / std).transpose(*range(array.ndim - 3), -1, -3, -2)
