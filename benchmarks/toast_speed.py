"""ToaSt speed on CPU: uncompressed vs compressed DeiT-S-size graphs in ONNX Runtime, one run.

Variants are timed interleaved (every round runs each variant once per batch size) and the
median of the rounds is reported, so machine noise hits all variants alike. Weights are seeded
random (speed does not depend on them). Prints FLOPs ratio, measured speedup, their quotient,
and the cost of TCS's own scoring/top-k/gather, measured with a variant that selects every
channel (same selection ops, no channel dropped).

    python benchmarks/toast_speed.py [--repeats 15] [--threads 2] [--model deit_small_patch16_224]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.export import export_model
from vit2trt.converter.graph_reader import describe_vit, read_vit
from vit2trt.passes.tcs import TCSBlock, apply_tcs
from vit2trt.passes.toast_schedules import SCHEDULES


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = export_model(f"timm:{args.model}", tmp / "base.onnx", seed=0).onnx_path
        variants = {"uncompressed": base}
        variants["SCWP 90%"] = convert(base, tmp / "scwp", ConvertOptions(head_sparsity=0.9, build=False)).onnx_path
        schedule = SCHEDULES.get(args.model, {}).get("targets", {})
        for target in schedule:
            out = convert(base, tmp / f"t{target}", ConvertOptions(target_gflops=float(target), build=False))
            variants[f"ToaSt {target} GFLOPs"] = out.onnx_path
        if schedule:
            # Same selection subgraphs as the smallest schedule, but every channel kept: its cost
            # over "SCWP 90%" is the pure overhead of scoring, top-k and gathering.
            last = list(schedule)[-1]
            scwp_model = onnx.load(str(variants["SCWP 90%"]))
            vit = describe_vit(scwp_model)
            entry = schedule[last]
            blocks = [TCSBlock(b.index, b.ffn.fc1.in_features if entry["fc1"][b.index] > 0 else None,
                               b.ffn.hidden if entry["fc2"][b.index] > 0 else None)
                      for b in vit.blocks if entry["fc1"][b.index] > 0 or entry["fc2"][b.index] > 0]
            overhead_path = tmp / "tcs_keep_all.onnx"
            onnx.save(apply_tcs(scwp_model, vit, blocks).model, str(overhead_path))
            variants[f"TCS ops of {last}, nothing dropped"] = overhead_path

        flops = {name: read_vit(path).flops.total for name, path in variants.items()}
        sessions = {name: _session(path, args.threads) for name, path in variants.items()}
        rng = np.random.default_rng(0)
        times = {(name, b): [] for name in variants for b in batches}
        for b in batches:
            x = rng.standard_normal((b, 3, 224, 224)).astype(np.float32)
            for s in sessions.values():  # warm up
                s.run(None, {"input": x})
            for _ in range(args.repeats):
                for name, s in sessions.items():
                    start = time.perf_counter()
                    s.run(None, {"input": x})
                    times[(name, b)].append(time.perf_counter() - start)
        median = {key: statistics.median(v) for key, v in times.items()}

    print(f"{args.model}, ONNX Runtime {ort.__version__} CPU, {args.threads} threads, median of {args.repeats} "
          f"interleaved rounds")
    header = f"{'variant':34s} {'GFLOPs':>7s} {'FLOPs x':>8s}"
    for b in batches:
        header += f" {'ms b' + str(b):>9s} {'speedup':>8s} {'quot.':>6s}"
    print(header)
    for name in variants:
        ratio = flops["uncompressed"] / flops[name]
        row = f"{name:34s} {flops[name] / 1e9:7.3f} {ratio:8.2f}"
        for b in batches:
            speed = median[("uncompressed", b)] / median[(name, b)]
            row += f" {median[(name, b)] * 1e3:9.1f} {speed:8.2f} {speed / ratio:6.2f}"
        print(row)
    overhead = [n for n in variants if n.startswith("TCS ops")]
    if overhead:
        smallest = [n for n in variants if n.startswith("ToaSt")][-1]
        for b in batches:
            cost = median[(overhead[0], b)] - median[("SCWP 90%", b)]
            saved = median[("SCWP 90%", b)] - median[(smallest, b)]
            print(f"batch {b}: TCS selection ops cost {cost * 1e3:+.2f} ms "
                  f"({cost / median[('SCWP 90%', b)] * 100:+.1f}% of SCWP time); the {smallest} schedule "
                  f"runs {saved * 1e3:.2f} ms faster than SCWP alone")


if __name__ == "__main__":
    main()
