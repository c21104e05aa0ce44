"""Real accuracy of structured pruning, with and without closed-form compensation, on the real
pretrained ViT-Ti in ../shared/real (200 Tiny-ImageNet classes).

Calibrates on the first 512 photos of real/val (sorted file order) and measures top-1 on the other
4488, which no method sees. For every variant: FLOPs, top-1, the time `convert` took, and ONNX
Runtime CPU speedups at batch 1 and 8 against the original, from back-to-back pairs in alternating
order (converter/measure/speedup.py: median of the per-round ratios with its 95% bootstrap interval, marked
unstable or beyond the FLOPs ratio where it is).

    python benchmarks/real_accuracy.py [--out real-accuracy] [--limit 4488] [--repeats 20] [--variants a,b]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vit2trt.converter.runtime import ort_runner
from vit2trt.converter.measure.speedup import Speedup, format_speedup, measure_speedup
from vit2trt.converter.measure.calibration import image_files, load_calibration
from vit2trt.converter.planning.plot_labels import label_points
from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.deploy.export import export_model
from vit2trt.converter.graph import read_vit

SHARED_REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
CALIB = 512
NO = {"compensate": False}
VARIANTS = {   # name: convert options (calibration images are added)
    "ToaSt SCWP 0.5": dict(method="toast", head_sparsity=0.5, **NO),
    "ToaSt SCWP 0.5 + compensation": dict(method="toast", head_sparsity=0.5),
    "CAIT defaults": dict(method="cait", **NO),
    "CAIT defaults + compensation": dict(method="cait"),
    "toast 0.85 FLOPs, sensitivity, no compensation": dict(method="toast", target_flops=0.85, **NO),
    "toast 0.85 FLOPs + compensation": dict(method="toast", target_flops=0.85),
    "toast 0.67 FLOPs, sensitivity, no compensation": dict(method="toast", target_flops=0.67, **NO),
    "toast 0.67 FLOPs + compensation": dict(method="toast", target_flops=0.67),
    "toast 0.67 FLOPs + compensation, --multiple 8": dict(method="toast", target_flops=0.67, multiple=8),
    "toast 0.5 FLOPs + compensation": dict(method="toast", target_flops=0.5),
    "CAIT ATME only (stages 4,8)": dict(method="cait", channel_ratio=0.0, **NO),
    "cait 0.67 FLOPs, stages 6,10, no compensation": dict(method="cait", target_flops=0.67, stages=[6, 10], **NO),
    "cait 0.67 FLOPs, stages 6,10 + compensation": dict(method="cait", target_flops=0.67, stages=[6, 10]),
    "cait 0.5 FLOPs, no compensation": dict(method="cait", target_flops=0.5, **NO),
    "cait 0.5 FLOPs + compensation": dict(method="cait", target_flops=0.5),
}


def labelled_photos(shared: Path) -> tuple[list[Path], np.ndarray]:
    files = image_files(shared / "val", flag="--images")
    labels = dict(line.split() for line in (shared / "val.labels.txt").read_text().splitlines() if line.strip())
    return files, np.array([int(labels[f.name]) for f in files], dtype=np.int64)


def top1(path: Path, x: np.ndarray, y: np.ndarray, batch: int = 50) -> float:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    pred = np.concatenate([session.run(None, {name: x[i:i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])
    return float(np.mean(pred == y))


def speed(original: Path, variant: Path, x: np.ndarray, repeats: int, threads: int, flops_x: float) -> dict:
    """The variant's speedup at batch 1 and 8 (Speedup.as_json) and its median ms."""
    baseline, compressed = ort_runner(original, threads), ort_runner(variant, threads)
    out = {}
    for b in (1, 8):
        timing = measure_speedup(baseline, compressed, x[:b], repeats, flops_ratio=flops_x, warmup=2)
        out[f"b{b}"] = {**timing.speedup.as_json(), "ms": statistics.median(timing.variant_s) * 1e3}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=str(SHARED_REAL))
    parser.add_argument("--out", default="real-accuracy", help="folder for real_accuracy.{md,json,png}")
    parser.add_argument("--limit", type=int, default=None, help="measure on the first N held-out photos only")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=None, help="comma-separated subset of the variant names' numbers (1-based)")
    args = parser.parse_args()
    shared, out = Path(args.shared), Path(args.out)
    if not (shared / "vit_tiny_tin200.safetensors").is_file():
        raise SystemExit(f"{shared} holds no real ViT-Ti (see shared/real/README.md).")
    out.mkdir(parents=True, exist_ok=True)
    names = list(VARIANTS)
    if args.variants:
        names = [names[int(i) - 1] for i in args.variants.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exported = export_model("timm:vit_tiny_patch16_224", tmp / "vit_tiny.onnx",
                                weights=str(shared / "vit_tiny_tin200.safetensors"), model_args={"num_classes": 200})
        preprocessing = json.loads(exported.record_path.read_text())["preprocessing"]
        files, labels = labelled_photos(shared)
        x = load_calibration(shared / "val", (3, 224, 224), preprocessing)
        np.save(tmp / "calib.npy", x[:CALIB])
        held_x, held_y = x[CALIB:], labels[CALIB:]
        if args.limit:
            held_x, held_y = held_x[:args.limit], held_y[:args.limit]
        base_flops = read_vit(exported.onnx_path).flops.total
        rows = [{"variant": "original", "gflops": base_flops / 1e9, "flops_x": 1.0,
                 "top1": top1(exported.onnx_path, held_x, held_y)}]
        print(f"original: top-1 {rows[0]['top1'] * 100:.2f}% on {len(held_y)} held-out photos", flush=True)
        for name in names:
            options = ConvertOptions(build=False, calib=str(tmp / "calib.npy"), **VARIANTS[name])
            start = time.perf_counter()
            result = convert(exported.onnx_path, tmp / "out", replace(options, overwrite=True))
            seconds = time.perf_counter() - start
            row = {"variant": name, "gflops": result.flops_after / 1e9, "flops_x": base_flops / result.flops_after,
                   "top1": top1(result.onnx_path, held_x, held_y), "convert_s": seconds,
                   "speed": speed(exported.onnx_path, result.onnx_path, held_x, args.repeats, args.threads,
                                  base_flops / result.flops_after)}
            rows.append(row)
            print(f"{name}: {row['flops_x']:.2f}x fewer FLOPs, top-1 {row['top1'] * 100:.2f}% "
                  f"({(row['top1'] - rows[0]['top1']) * 100:+.1f} pt), convert {seconds:.0f} s, speedup b1 "
                  f"{cell(row, 'b1')} b8 {cell(row, 'b8')}", flush=True)
    (out / "real_accuracy.json").write_text(json.dumps({"held_out": len(held_y), "calibration": CALIB,
                                                        "rows": rows}, indent=1) + "\n")
    (out / "real_accuracy.md").write_text(table(rows, len(held_y)))
    plot(rows, out / "real_accuracy.png")
    print(table(rows, len(held_y)))


def table(rows: list[dict], held: int) -> str:
    base = rows[0]["top1"]
    lines = [f"ViT-Ti (real weights), top-1 on {held} held-out photos of shared/real/val, calibrated on the "
             f"first {CALIB}; ONNX Runtime CPU speedup = median of paired ratios [95% bootstrap interval], "
             "~ and 'unstable' where the interval stayed wider than ±5%", "",
             "| variant | GFLOPs | FLOPs × | top-1 | change | speedup b1 | speedup b8 | convert s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['gflops']:.3f} | {r['flops_x']:.2f} | {r['top1'] * 100:.2f}% | "
                     f"{(r['top1'] - base) * 100:+.1f} pt | {cell(r, 'b1')} | {cell(r, 'b8')} | "
                     f"{r.get('convert_s', 0):.0f} |")
    return "\n".join(lines) + "\n"


def cell(row: dict, batch: str) -> str:
    """A row's speedup as converter/measure/speedup.py prints it; the original's is 1."""
    if "speed" not in row:
        return format_speedup(Speedup.reference())
    return format_speedup(Speedup.from_json(row["speed"][batch], row["flops_x"]))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        comp = "+ compensation" in r["variant"]
        ax.scatter(r["flops_x"], r["top1"] * 100, marker="o" if comp else "x", color="C0" if comp else "C3")
    ax.set_xlabel("FLOPs reduction (×)")
    ax.set_ylabel("top-1 on held-out photos (%)")
    ax.set_title("Real ViT-Ti: structured pruning without training (o: compensated, x: not)")
    ax.margins(x=0.12, y=0.12)   # room for the labels of the outermost points inside the axes
    fig.tight_layout()
    label_points(ax, [(r["flops_x"], r["top1"] * 100) for r in rows], [r["variant"] for r in rows], fontsize=6)
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    main()
