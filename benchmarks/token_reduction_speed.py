"""Token reduction speed on CPU: uncompressed vs ToMe, AS-ViT and CAIT (DeiT-S size) in ONNX Runtime.

Each variant is timed against the uncompressed graph in back-to-back pairs (converter/measure/speedup.py:
median ratio with its 95% interval, unstable or beyond the FLOPs ratio marked). Inputs are real
photographs when ../shared/assets/calib is there (AS-ViT keeps as many tokens as each image needs,
so its speed depends on the images), else seeded noise. AS-ViT thresholds are calibrated on the same folder for --target-flops, and
its default (packed) graph is timed beside the dynamic form with the same thresholds. Also
prints the share of each graph's kernel time spent in token scoring/matching/top-k/gather/merge
nodes (ONNX Runtime's node profiler). CAIT runs at its defaults (stages 4,8, channel ratio 0.25)
and with merging alone (channel ratio 0). Weights are seeded random: speed does not depend on them.

    python benchmarks/token_reduction_speed.py [--r 13] [--target-flops 0.65] [--repeats 15]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vit2trt.converter.measure.calibration import load_calibration
from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.deploy.export import export_model
from vit2trt.converter.graph import read_vit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import node_times, paired_speedups, print_speed_table  # noqa: E402

SHARED_CALIB = Path(__file__).resolve().parents[2] / "shared" / "assets" / "calib"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--r", type=int, default=13)
    parser.add_argument("--target-flops", type=float, default=0.65)
    parser.add_argument("--images", default=str(SHARED_CALIB), help="folder of photographs (optional)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile-runs", type=int, default=10)
    args = parser.parse_args()
    batches = [1, 8]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exported = export_model(f"timm:{args.model}", tmp / "base.onnx", seed=0)
        base = exported.onnx_path
        images_dir = Path(args.images) if Path(args.images).is_dir() else None
        if images_dir:
            inputs = load_calibration(images_dir, (3, 224, 224), limit=32)
            where = f"{len(inputs)} photographs from {images_dir.name}/"
        else:
            inputs = np.random.default_rng(0).standard_normal((32, 3, 224, 224)).astype(np.float32)
            where = "32 seeded noise images (no photograph folder found)"
        np.save(tmp / "inputs.npy", inputs)
        variants = {"uncompressed": base}
        variants[f"ToMe r={args.r}"] = convert(base, tmp / "tome", ConvertOptions(
            method="tome", tome_r=args.r, build=False)).onnx_path
        asvit = convert(base, tmp / "asvit", ConvertOptions(
            method="asvit", target_flops=args.target_flops, calib=str(tmp / "inputs.npy"), build=False))
        variants[f"AS-ViT {args.target_flops:g} FLOPs"] = asvit.onnx_path
        chosen = asvit.decisions["asvit"]
        variants["  same, dynamic form"] = convert(base, tmp / "asvit_dynamic", ConvertOptions(
            method="asvit", asvit_thresholds=chosen["thresholds"], stages=chosen["stages"], asvit_form="dynamic",
            build=False)).onnx_path
        variants["CAIT ATME only"] = convert(base, tmp / "cait_atme", ConvertOptions(
            method="cait", channel_ratio=0.0, build=False)).onnx_path
        variants["CAIT ATME + CDCP 0.25"] = convert(base, tmp / "cait", ConvertOptions(
            method="cait", build=False)).onnx_path
        calibrated = asvit.decisions["asvit"]["calibration"]["flops_fraction"]
        flops = {name: read_vit(path).flops.total for name, path in variants.items()}
        # AS-ViT's FLOPs depend on the image: use the calibration mean, not the reader's probe image.
        flops[f"AS-ViT {args.target_flops:g} FLOPs"] = int(flops["uncompressed"] * calibrated)
        flops["  same, dynamic form"] = flops[f"AS-ViT {args.target_flops:g} FLOPs"]
        timings = paired_speedups(variants, batches, args.repeats, args.threads, inputs=inputs, flops=flops)
        print_speed_table(f"{args.model}, ONNX Runtime {ort.__version__} CPU, {args.threads} threads, at least "
                          f"{args.repeats} paired rounds per figure, inputs: {where}", flops, timings, batches)
        _asvit_per_image(base, asvit, exported.record_path, inputs, args)
        print("\nShare of each graph's kernel time (ONNX Runtime profiler, median node times). 'selection' is"
              " scoring, matching, top-k and gathers; 'merging' is ToMe's weighted sums, size tracking and"
              " proportional-attention bias (its nodes are under tome/merge/). AS-ViT and ATME nodes all count as"
              " selection.")
        for name, path in variants.items():
            if name == "uncompressed":
                continue
            for b in batches:
                nodes = node_times(path, inputs[:b], args.threads, args.profile_runs)
                total = sum(nodes.values())
                ours = {n: t for n, t in nodes.items() if any(f"/{m}/" in n for m in ("tome", "asvit", "atme"))}
                merging = sum(t for n, t in ours.items() if "/tome/merge/" in n)
                selection = sum(ours.values()) - merging
                print(f"{name}, batch {b}: selection {selection:.2f} ms = {selection / total * 100:.1f}%, "
                      f"merging {merging:.2f} ms = {merging / total * 100:.1f}%, "
                      f"together {(selection + merging) / total * 100:.1f}%")


def _asvit_per_image(base: Path, asvit, record_path: Path, inputs: np.ndarray, args) -> None:
    """AS-ViT's cost depends on the image, and the table's batch 1 times only the first one. Here:
    every photo alone, one after another, against the original doing the same in back-to-back pairs
    (the speedup of the summed time, with its interval), against the FLOPs those photos really
    need; and the FLOPs a batch of 8 really executes (each stage keeps the batch's largest count)."""
    import torch

    from vit2trt.converter.runtime import ort_runner
    from vit2trt.converter.measure.speedup import format_speedup, measure_speedup
    from vit2trt.passes.methods.asvit import asvit_flops_model
    from vit2trt.models.asvit_reference import ASViT
    from vit2trt.models.reference import ReferenceRecord, build_model

    settings = asvit.decisions["asvit"]
    pruned = ASViT(build_model(ReferenceRecord.load(record_path)), settings["stages"], settings["thresholds"])
    with torch.no_grad():
        pruned(torch.from_numpy(inputs))
    block_flops, fixed = asvit_flops_model(read_vit(base))
    full = fixed + sum(sum(f) for f in block_flops)

    def flops(counts):
        tokens = pruned.kept[0][0]
        return fixed + sum(p * n / tokens + m * (n / tokens) ** 2 + f * n / tokens
                           for n, (p, m, f) in zip(counts, block_flops))

    per_image = [flops(c) for c in pruned.kept]

    def one_by_one(path: Path):
        run = ort_runner(path, args.threads)
        return lambda images: [run(x[None]) for x in images]

    ratio = full * len(per_image) / sum(per_image)
    speed = measure_speedup(one_by_one(base), one_by_one(asvit.onnx_path), inputs, args.repeats,
                            flops_ratio=ratio).speedup
    print(f"\nAS-ViT, each of the {len(inputs)} inputs alone (batch 1), all of them per timing: "
          f"{format_speedup(speed, ascii=True)} at {ratio:.2f}x fewer FLOPs (quotient {speed.speedup / ratio:.2f}); "
          f"per-image FLOPs fraction {min(per_image) / full:.2f}..{max(per_image) / full:.2f}, the first input's "
          f"{per_image[0] / full:.2f}.")
    b, blocks, tokens = 8, len(pruned.kept[0]), pruned.kept[0][0]
    dynamic, packed = [], []
    for start in range(0, len(inputs) - b + 1, b):
        batch = pruned.kept[start:start + b]
        longest = [max(c[i] for c in batch) for i in range(blocks)]
        dynamic.append(b * flops(longest))
        # packed: linear layers at each image's own count, attention at the batch's largest
        packed.append(sum(fixed + sum(p * c[i] / tokens + f * c[i] / tokens + m * (longest[i] / tokens) ** 2
                                      for i, (p, m, f) in enumerate(block_flops)) for c in batch))
    executed = {name: full * b * len(v) / sum(v) for name, v in (("dynamic", dynamic), ("packed", packed))}
    print(f"AS-ViT at batch {b}, FLOPs a batch executes, fewer than the original by: packed form (the default: "
          f"linear layers at each image's own count, attention at the batch's largest) {executed['packed']:.2f}x, "
          f"dynamic form (every layer at the batch's largest count) {executed['dynamic']:.2f}x; the images alone "
          f"{ratio:.2f}x.")

if __name__ == "__main__":
    main()
