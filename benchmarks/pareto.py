"""Sweep every method over its budgets for one model: FLOPs, latency ratio, agreement; a Pareto table and plot.

One export, one conversion per (method, budget), then every variant timed against the uncompressed
model in ONNX Runtime on CPU in back-to-back pairs (converter/measure/speedup.py: the median ratio with its
95% interval, unstable or beyond the FLOPs ratio marked; the front and the plot count a speedup at
most at its FLOPs ratio, as `vit2trt plan` does). Agreement is top-1 agreement with the
uncompressed model on the given images (or seeded noise); with seeded random weights it measures
how much each method changes the function, not accuracy. `--weights` takes a real checkpoint when you have one.

    python benchmarks/pareto.py [--model deit_small_patch16_224] [--images ../shared/assets/calib]
                                [--repeats 10] [--plot pareto.png] [--weights FILE]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vit2trt.converter.measure.calibration import load_calibration
from vit2trt.converter.planning.plot_labels import label_points
from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.deploy.export import export_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import paired_speedups  # noqa: E402

from vit2trt.converter.measure.speedup import format_speedup  # noqa: E402

SHARED_CALIB = Path(__file__).resolve().parents[2] / "shared" / "assets" / "calib"

SWEEP = [  # (label, method, options)
    ("ToaSt SCWP 0.5", "toast", {"head_sparsity": 0.5}),
    ("ToaSt 2.9 GFLOPs", "toast", {"target_gflops": 2.9}),
    ("ToaSt 2.5 GFLOPs", "toast", {"target_gflops": 2.5}),
    ("ToMe r=8", "tome", {"tome_r": 8}),
    ("ToMe r=13", "tome", {"tome_r": 13}),
    ("ToMe r=16", "tome", {"tome_r": 16}),
    ("AS-ViT 0.8", "asvit", {"target_flops": 0.8}),
    ("AS-ViT 0.65", "asvit", {"target_flops": 0.65}),
    ("CAIT ATME", "cait", {"channel_ratio": 0.0}),
    ("CAIT 0.25", "cait", {"channel_ratio": 0.25}),
    ("CAIT 0.5", "cait", {"channel_ratio": 0.5}),
]


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 8]})[0] for i in range(0, len(x), 8)])


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names not dominated: nothing else is at least as fast and at least as agreeing, and better in one."""
    front = set()
    for name, (speed, quality) in points.items():
        if not any((s >= speed and q >= quality) and (s > speed or q > quality)
                   for other, (s, q) in points.items() if other != name):
            front.add(name)
    return front


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--images", default=str(SHARED_CALIB))
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--plot", default="pareto.png")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = export_model(f"timm:{args.model}", tmp / "base.onnx", weights=args.weights, seed=0).onnx_path
        images = Path(args.images)
        if images.is_dir():
            x = load_calibration(images, (3, 224, 224), limit=args.limit)
            where = f"{len(x)} images from {images.name}/"
        else:
            x = np.random.default_rng(0).standard_normal((args.limit, 3, 224, 224)).astype(np.float32)
            where = f"{len(x)} seeded noise inputs"
        np.save(tmp / "inputs.npy", x)
        reference = _logits(base, x)
        variants, flops, agreement = {"uncompressed": base}, {}, {"uncompressed": 1.0}
        for label, method, settings in SWEEP:
            print(f"converting: {label}", flush=True)
            extra = {"calib": str(tmp / "inputs.npy")} if method == "asvit" else {}
            result = convert(base, tmp / label.replace(" ", "_"), ConvertOptions(
                method=method, build=False, model_name=args.model, **settings, **extra))
            variants[label] = result.onnx_path
            flops[label] = result.flops_after
            flops["uncompressed"] = result.flops_before
            if method == "asvit":   # image-dependent: the calibration mean, not the reader's probe image
                flops[label] = int(result.flops_before * result.decisions["asvit"]["calibration"]["flops_fraction"])
            agreement[label] = float(np.mean(_logits(result.onnx_path, x).argmax(1) == reference.argmax(1)))
        print("timing ...", flush=True)
        timings = paired_speedups(variants, batches, args.repeats, args.threads, inputs=x, flops=flops)
    figures = {name: {b: timings[(name, b)].speedup for b in batches} for name in variants}
    speed = {name: {b: figures[name][b].credible for b in batches} for name in variants}
    front = pareto_front({name: (speed[name][batches[-1]], agreement[name]) for name in variants})
    print(f"\n{args.model}, ONNX Runtime {ort.__version__} CPU, {args.threads} threads, speedup: median of at least "
          f"{args.repeats} paired ratios [95% interval]; agreement: top-1 with the uncompressed model on {where}"
          + ("" if args.weights else "; seeded random weights"))
    header = f"{'variant':20s} {'GFLOPs':>7s} {'FLOPs x':>8s}" + "".join(f" {'speed b' + str(b):36s}" for b in batches)
    print(header + f" {'agree':>6s}  Pareto (b{batches[-1]})")
    for name in variants:
        row = f"{name:20s} {flops[name] / 1e9:7.3f} {flops['uncompressed'] / flops[name]:8.2f}"
        row += "".join(f" {format_speedup(figures[name][b], ascii=True):36s}" for b in batches)
        print(row + f" {agreement[name] * 100:5.1f}%  {'*' if name in front else ''}")
    _plot(speed, agreement, batches[-1], front, Path(args.plot), args.model)
    print(f"\nplot: {args.plot}; total {time.perf_counter() - started:.0f} s")


def _plot(speed, agreement, batch, front, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    colours = {"uncompressed": "black", "ToaSt": "tab:blue", "ToMe": "tab:orange", "AS-ViT": "tab:green",
               "CAIT": "tab:red"}
    for name in speed:
        family = name.split()[0]
        ax.scatter(speed[name][batch], agreement[name], color=colours.get(family, "grey"),
                   marker="*" if name in front else "o", s=90 if name in front else 40)
    ax.set_xlabel(f"speedup over the uncompressed model, ONNX Runtime CPU, batch {batch} (at most the FLOPs ratio)")
    ax.set_ylabel("top-1 agreement with the uncompressed model")
    ax.set_title(f"{model}: every method and budget (stars: Pareto front)", fontsize=10)
    ax.margins(x=0.12, y=0.12)   # room for the labels of the outermost points inside the axes
    ax.grid(alpha=0.3)
    fig.tight_layout()
    label_points(ax, [(speed[name][batch], agreement[name]) for name in speed], list(speed), fontsize=7)
    fig.savefig(path, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
