"""ToaSt speed on CPU: uncompressed vs compressed DeiT-S-size graphs in ONNX Runtime, one run.

Every variant is timed against the uncompressed graph in back-to-back pairs (benchmarks/timing.py,
converter/measure/speedup.py): the speedup is the median of the pairs' ratios with its 95% bootstrap
interval, marked unstable or beyond the FLOPs ratio where it is. Weights are seeded
random (speed does not depend on them). Prints FLOPs ratio, measured speedup, their quotient,
and, from ONNX Runtime's node profiler, the time of TCS's own scoring/top-k/gather nodes against
the FFN MatMul time they save.

    python benchmarks/toast_speed.py [--repeats 15] [--threads 2] [--model deit_small_patch16_224]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.deploy.export import export_model
from vit2trt.converter.graph import read_vit
from vit2trt.passes.toast_schedules import SCHEDULES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import node_times, paired_speedups, print_speed_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--profile-runs", type=int, default=10)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), args, batches)


def run(tmp: Path, args, batches: list[int]) -> None:
    base = export_model(f"timm:{args.model}", tmp / "base.onnx", seed=0).onnx_path
    variants = {"uncompressed": base}
    variants["SCWP 90%"] = convert(base, tmp / "scwp", ConvertOptions(head_sparsity=0.9, build=False)).onnx_path
    schedule = SCHEDULES.get(args.model, {}).get("targets", {})
    for target in schedule:
        out = convert(base, tmp / f"t{target}", ConvertOptions(target_gflops=float(target), build=False))
        variants[f"ToaSt {target} GFLOPs"] = out.onnx_path
    flops = {name: read_vit(path).flops.total for name, path in variants.items()}
    timings = paired_speedups(variants, batches, args.repeats, args.threads, flops=flops)
    print_speed_table(f"{args.model}, ONNX Runtime {ort.__version__} CPU, {args.threads} threads, at least "
                      f"{args.repeats} paired rounds per figure", flops, timings, batches)

    # Where TCS's time goes, node by node (ONNX Runtime's profiler, same inputs, both graphs).
    for name in [n for n in variants if n.startswith("ToaSt")]:
        for b in batches:
            x = np.random.default_rng(1).standard_normal((b, 3, 224, 224)).astype(np.float32)
            tcs_nodes = node_times(variants[name], x, args.threads, args.profile_runs)
            dense_nodes = node_times(variants["SCWP 90%"], x, args.threads, args.profile_runs)
            replaced = replaced_matmuls(variants["SCWP 90%"], tcs_nodes)
            overhead = sum(t for n, t in tcs_nodes.items() if "/tcs/" in n and not n.endswith("/MatMul"))
            small = sum(t for n, t in tcs_nodes.items() if "/tcs/" in n and n.endswith("/MatMul"))
            full = sum(dense_nodes.get(n, 0.0) for n in replaced)
            total = sum(tcs_nodes.values())
            print(f"{name}, batch {b}: scoring/top-k/gather {overhead:.2f} ms ({overhead / total * 100:.1f}% of "
                  f"the graph's kernel time); FFN MatMuls {full:.2f} -> {small:.2f} ms; net gain "
                  f"{full - small - overhead:+.2f} ms")


def replaced_matmuls(dense_path: Path, tcs_nodes: dict[str, float]) -> list[str]:
    """FFN MatMul nodes of the dense graph whose work the TCS graph's selected MatMuls took over."""
    vit = read_vit(dense_path)
    names = []
    for block in vit.blocks:
        for which in ("fc1", "fc2"):
            if f"vit2trt/blocks.{block.index}/tcs/{which}/MatMul" in tcs_nodes:
                names.append(getattr(block.ffn, which).node)
    return names

if __name__ == "__main__":
    main()
