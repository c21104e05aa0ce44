"""ToMe speed on CPU: uncompressed vs ToMe (r per block) DeiT-S-size graphs in ONNX Runtime.

One run, variants interleaved, medians. Also the share of the graph's kernel time spent in the
matching and merging nodes (ONNX Runtime's node profiler).

    python benchmarks/tome_speed.py [--r 13] [--repeats 15] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.export import export_model
from vit2trt.converter.graph_reader import read_vit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians, node_times, print_speed_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--r", default="13", help="comma-separated r values, one variant each")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--profile-runs", type=int, default=10)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = export_model(f"timm:{args.model}", tmp / "base.onnx", seed=0).onnx_path
        variants = {"uncompressed": base}
        for r in (int(v) for v in args.r.split(",")):
            out = convert(base, tmp / f"tome{r}", ConvertOptions(method="tome", tome_r=r, build=False))
            variants[f"ToMe r={r}"] = out.onnx_path
        flops = {name: read_vit(path).flops.total for name, path in variants.items()}
        median = interleaved_medians(variants, batches, args.repeats, args.threads)
        print_speed_table(f"{args.model}, ONNX Runtime {ort.__version__} CPU, {args.threads} threads, median of "
                          f"{args.repeats} interleaved rounds", flops, median, batches)
        for name, path in variants.items():
            if name == "uncompressed":
                continue
            for b in batches:
                x = np.random.default_rng(1).standard_normal((b, 3, 224, 224)).astype(np.float32)
                nodes = node_times(path, x, args.threads, args.profile_runs)
                merging = sum(t for n, t in nodes.items() if "/tome/" in n)
                print(f"{name}, batch {b}: matching and merging {merging:.2f} ms = "
                      f"{merging / sum(nodes.values()) * 100:.1f}% of the graph's kernel time")


if __name__ == "__main__":
    main()
