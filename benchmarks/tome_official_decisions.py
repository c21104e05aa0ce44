"""Does vit2trt's ToMe merge the tokens the official ToMe merges? On real photos, real weights.

The official rule (ToMe's bipartite_soft_matching, written here from its code: cosine of unit
keys, class row at −inf, max then argsort) runs block by block on the real ViT-Ti of ../shared/real
in float32, as the official code runs, and in float64, where rounding decides nothing. At every
block, vit2trt's reference (models/tome_reference.match, whose decisions the graph takes) decides on
the same keys; the merges are compared as sets of (source, destination) pairs. The model then goes
on along the official float32 path, so every block sees the official tokens. Every difference is
printed with the score gap that decided it.

    python benchmarks/tome_official_decisions.py [--photos 1000] [--r 8,13]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from vit2trt.converter.measure.calibration import image_files, preprocess_image
from vit2trt.models.tome_reference import match, merge_matched
from vit2trt.models.vit_parts import attention_parts, vit_parts

SHARED_REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
PREPROCESSING = {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.9, "interpolation": "bicubic"}


def official_match(metric: torch.Tensor, r: int, dtype=torch.float32):
    """(src, dst, unm, gap): the official rule, and per image the smallest score gap its choice had."""
    metric = metric.to(dtype)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    scores[:, 0, :] = -float("inf")
    top2 = scores.topk(2, dim=-1).values
    node_max, node_idx = scores.max(dim=-1)
    edges = node_max.argsort(dim=-1, descending=True)
    src = edges[:, :r]
    ranked = node_max.gather(1, edges)
    gap = torch.minimum((ranked[:, r - 1] - ranked[:, r]),
                        (top2[..., 0] - top2[..., 1]).gather(1, src).min(1).values)
    return src, node_idx.gather(1, src), edges[:, r:].sort(-1).values, gap


def merges(src, dst) -> list:
    return [sorted(zip(s.tolist(), d.tolist())) for s, d in zip(src, dst)]


def compare(model: torch.nn.Module, x: np.ndarray, r: int, batch: int = 50) -> dict:
    """Counts over every (photo, block): merges that differ from official float32 / float64, and those
    official float32 and float64 disagree on; `gaps` lists the official float64 gap at each difference."""
    parts = vit_parts(model)
    counts = {"merges": 0, "vs_float32": 0, "vs_float64": 0, "float32_vs_float64": 0, "gaps": []}
    with torch.no_grad():
        for start in range(0, len(x), batch):
            tokens, size = parts.embed(torch.from_numpy(x[start:start + batch])), None
            for block in parts.blocks:
                out, metric, _, _ = attention_parts(block, block.norm1(tokens), size)
                tokens = tokens + block.ls1(out)
                size = torch.ones_like(tokens[..., :1]) if size is None else size
                src32, dst32, unm32, _ = official_match(metric, r)
                src64, dst64, _, gap64 = official_match(metric, r, torch.float64)
                ours, float32, float64 = (merges(*match(metric, r, True)[:2]), merges(src32, dst32),
                                          merges(src64, dst64))
                counts["merges"] += len(ours)
                for i, (mine, f32, f64) in enumerate(zip(ours, float32, float64)):
                    counts["vs_float32"] += mine != f32
                    counts["vs_float64"] += mine != f64
                    counts["float32_vs_float64"] += f32 != f64
                    if mine != f32 or mine != f64:
                        counts["gaps"].append(float(gap64[i]))
                tokens, size = merge_matched(tokens, size, src32, dst32, unm32)
                tokens = tokens + block.ls2(block.mlp(block.norm2(tokens)))
    return counts


def real_model() -> torch.nn.Module:
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("vit_tiny_patch16_224", num_classes=200).eval()
    model.load_state_dict(load_file(str(SHARED_REAL / "vit_tiny_tin200.safetensors")))
    return model


def real_photos(count: int) -> np.ndarray:
    """The first `count` photos of real/val in sorted order, preprocessed as the model was trained."""
    files = image_files(SHARED_REAL / "val", flag="--images")[:count]
    return np.stack([preprocess_image(f, (3, 224, 224), PREPROCESSING) for f in files]).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--r", default="8,13")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, x = real_model(), real_photos(args.photos)
    print(f"{len(x)} photos of real/val, real ViT-Ti, 12 blocks")
    print("| r | merges | differ from official float32 | from official float64 | official float32 vs float64 |")
    print("| --- | --- | --- | --- | --- |")
    for r in [int(v) for v in args.r.split(",")]:
        c = compare(model, x, r)
        print(f"| {r} | {c['merges']} | {c['vs_float32']} | {c['vs_float64']} | {c['float32_vs_float64']} |")
        if c["gaps"]:
            print(f"  official float64 score gaps where they differ: {', '.join(f'{g:.1e}' for g in c['gaps'])}")


if __name__ == "__main__":
    main()
