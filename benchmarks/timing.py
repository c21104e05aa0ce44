"""Shared timing helpers for the benchmarks: paired speedups (converter/measure/speedup.py) and per-node kernel times."""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from vit2trt.converter.runtime import ort_runner, ort_session
from vit2trt.converter.measure.speedup import (
    TIME_CAP_S, PairedTiming, Speedup, format_speedup, measure_speedup, terminal_legend,
)


def session(path: Path, threads: int, profile_prefix: str | None = None):
    return ort_session(path, threads, profile_prefix=profile_prefix)


def paired_speedups(paths: dict[str, Path], batches: list[int], rounds: int, threads: int,
                    image: tuple[int, int, int] = (3, 224, 224), inputs: np.ndarray | None = None,
                    baseline: str = "uncompressed", flops: dict[str, int] | None = None,
                    time_cap: float = TIME_CAP_S) -> dict[tuple[str, int], PairedTiming]:
    """Every variant against `baseline` at every batch, in back-to-back pairs (converter/measure/speedup.py:
    median ratio, bootstrap interval, unstable or beyond the FLOPs ratio marked). Batch b runs the
    first b of `inputs` when given, else seeded noise. The baseline's own entry is the reference
    (speedup 1) with all its timings."""
    rng = np.random.default_rng(0)
    batch_inputs = {b: inputs[:b] if inputs is not None else rng.standard_normal((b, *image)).astype(np.float32)
                    for b in batches}
    runners = {name: ort_runner(path, threads) for name, path in paths.items()}
    out: dict[tuple[str, int], PairedTiming] = {}
    for b, x in batch_inputs.items():
        base_s: list[float] = []
        for name, run in runners.items():
            if name == baseline:
                continue
            ratio = flops[baseline] / flops[name] if flops and name in flops else None
            out[(name, b)] = measure_speedup(runners[baseline], run, x, rounds, time_cap=time_cap, flops_ratio=ratio)
            base_s += out[(name, b)].baseline_s
        out[(baseline, b)] = PairedTiming(Speedup.reference(), base_s, base_s, 1)
    return out


def median_ms(timing: PairedTiming) -> float:
    return statistics.median(timing.variant_s) * 1e3


def node_times(path: Path, x: np.ndarray, threads: int, runs: int) -> dict[str, float]:
    """Median kernel time (ms) of every node over `runs` profiled runs (ONNX Runtime's profiler)."""
    with tempfile.TemporaryDirectory() as tmp:
        s = session(path, threads, profile_prefix=str(Path(tmp) / "profile"))
        for _ in range(runs):
            s.run(None, {s.get_inputs()[0].name: x})
        events = json.loads(Path(s.end_profiling()).read_text())
    samples: dict[str, list[float]] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            samples.setdefault(event["name"][: -len("_kernel_time")], []).append(event["dur"] / 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def print_speed_table(title: str, flops: dict[str, int], timings: dict[tuple[str, int], PairedTiming],
                      batches: list[int], baseline: str = "uncompressed") -> None:
    """One row per variant: GFLOPs, FLOPs ratio, and per batch the median ms, the speedup as
    converter/measure/speedup.py prints it, and its quotient by the FLOPs ratio."""
    print(title)
    print("speedup: median of back-to-back ratios against the uncompressed model [95% bootstrap interval]; "
          + terminal_legend())
    header = f"{'variant':34s} {'GFLOPs':>7s} {'FLOPs x':>8s}"
    for b in batches:
        header += f" {'ms b' + str(b):>9s} {'speedup':36s} {'quot.':>6s}"
    print(header)
    for name in flops:
        ratio = flops[baseline] / flops[name]
        row = f"{name:34s} {flops[name] / 1e9:7.3f} {ratio:8.2f}"
        for b in batches:
            figure = timings[(name, b)].speedup.with_flops(ratio)
            row += f" {median_ms(timings[(name, b)]):9.1f} {format_speedup(figure, ascii=True):36s} " \
                   f"{figure.speedup / ratio:6.2f}"
        print(row)
