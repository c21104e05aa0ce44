"""The images healing trains and judges on: read once as uint8 at the model's input size, split into a
training part and a held-out part, and augmented on the device (random resized crop and flip) per step.

Keeping uint8 crops in memory (150 KB an image at 224 pixels) lets a CPU heal for minutes without
decoding a JPEG twice; the augmentation is tensor arithmetic, so it runs wherever the model runs and
draws its randomness from one seeded generator (the same seed gives the same batches).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..measure.calibration import DEFAULT_PREPROCESSING, image_files, read_cropped
from ...errors import Vit2TrtError

CROP_SCALE = (0.35, 1.0)        # random resized crop: area kept, as a fraction of the image
CROP_RATIO = (3 / 4, 4 / 3)     # and its aspect ratio


@dataclass
class HealImages:
    """uint8 images [N, H, W, C] in the order of `files`, with their classes (or None), and the split."""
    images: np.ndarray
    labels: Optional[np.ndarray]
    files: list[Path]
    train: np.ndarray           # indices trained on
    holdout: np.ndarray         # indices judged on, never trained on
    config: dict                # preprocessing: mean, std, crop, interpolation


def read_heal_images(folder: Path, input_size: tuple[int, int, int], preprocessing: Optional[dict],
                     labels: Optional[Path], class_map: Optional[Path], classes: Optional[int], holdout: float,
                     seed: int, limit: Optional[int] = None,
                     progress: Callable[[str], None] = lambda msg: None, flag: str = "--images",
                     labels_flag: str = "--labels", class_map_flag: str = "--class-map") -> HealImages:
    """Read `folder` (flat or an ImageFolder) at the model's input size and split off `holdout` of it
    (`flag` and the others name the options in messages)."""
    from ..measure.validate import image_labels

    folder = Path(folder)
    if not folder.is_dir():
        raise Vit2TrtError(f"{flag} {folder}: not a folder of images.")
    if not 0 < holdout < 1:
        raise Vit2TrtError(f"--holdout is the fraction of --images to judge on, between 0 and 1; got {holdout}.")
    files = image_files(folder, limit, flag)
    if len(files) < 4:
        raise Vit2TrtError(f"{flag} {folder}: healing needs at least 4 images (some to train on, some to "
                           f"judge on); found {len(files)}.")
    # Labels only when asked for: an ImageFolder's sorted folder order need not be the head's, and wrong
    # labels would teach the model wrong classes (distillation needs none).
    truth = image_labels(folder, files, len(files), labels, class_map, classes, flag, labels_flag, class_map_flag) \
        if labels is not None or class_map is not None else None
    config = dict(DEFAULT_PREPROCESSING, **(preprocessing or {}))
    done = [0]

    def read(file: Path) -> np.ndarray:
        array = read_cropped(file, input_size, config, flag)
        done[0] += 1
        if done[0] % 64 == 0 or done[0] == len(files):
            progress(f"reading images {done[0]}/{len(files)}")
        return array

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:   # Pillow frees the GIL
        images = np.stack(list(pool.map(read, files)))
    order = np.random.default_rng(seed).permutation(len(files))
    held = max(1, int(round(holdout * len(files))))
    return HealImages(images, truth, files, np.sort(order[held:]), np.sort(order[:held]), config)


class Augment:
    """Random resized crop and horizontal flip of uint8 [B, H, W, C] images, then the model's normalization,
    on `device`. The crop boxes and flips come from `generator` (on the CPU, so every device draws the same)."""

    def __init__(self, config: dict, device: torch.device, generator: torch.Generator):
        self.device, self.generator = device, generator
        self.mean = torch.tensor(config["mean"], dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        self.std = torch.tensor(config["std"], dtype=torch.float32, device=device).reshape(1, -1, 1, 1)

    def plain(self, images: np.ndarray) -> torch.Tensor:
        """The model's input for `images`, unaugmented (what judging sees)."""
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean[:, : x.shape[1]]) / self.std[:, : x.shape[1]]

    def __call__(self, images: np.ndarray, part: slice = slice(None)) -> torch.Tensor:
        """`images[part]` augmented; the draws are made for all of `images`, so that processes training on
        parts of one batch (torchrun) see what one process would."""
        from torchvision.ops import roi_align

        b, h, w = images.shape[:3]
        g = self.generator
        area = torch.empty(b).uniform_(*CROP_SCALE, generator=g) * h * w
        log_ratio = torch.empty(b).uniform_(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1]), generator=g)
        ratio = log_ratio.exp()
        cw = (area * ratio).sqrt().clamp(max=w)
        ch = (area / ratio).sqrt().clamp(max=h)
        left = torch.rand(b, generator=g) * (w - cw)
        top = torch.rand(b, generator=g) * (h - ch)
        flip = torch.rand(b, generator=g) < 0.5
        left, top, cw, ch, flip = left[part], top[part], cw[part], ch[part], flip[part]
        x = torch.from_numpy(images[part]).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        boxes = torch.stack([torch.arange(len(x), dtype=torch.float32), left, top, left + cw, top + ch], 1)
        x = roi_align(x, boxes.to(self.device), output_size=(h, w), spatial_scale=1.0, sampling_ratio=2,
                      aligned=True)
        x = torch.where(flip.to(self.device).reshape(-1, 1, 1, 1), x.flip(-1), x)
        return (x - self.mean[:, : x.shape[1]]) / self.std[:, : x.shape[1]]
