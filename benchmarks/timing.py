"""Shared timing helpers for the benchmarks: interleaved medians and per-node kernel times."""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from vit2trt.converter.bench import interleaved_times, ort_runner, ort_session


def session(path: Path, threads: int, profile_prefix: str | None = None):
    return ort_session(path, threads, profile_prefix)


def interleaved_medians(paths: dict[str, Path], batches: list[int], repeats: int, threads: int,
                        image: tuple[int, int, int] = (3, 224, 224),
                        inputs: np.ndarray | None = None) -> dict[tuple[str, int], float]:
    """Seconds per run, median over `repeats` rounds in which every variant runs once. Batch b runs
    the first b of `inputs` when given, else seeded noise."""
    rng = np.random.default_rng(0)
    batch_inputs = {b: inputs[:b] if inputs is not None else rng.standard_normal((b, *image)).astype(np.float32)
                    for b in batches}
    runners = {name: ort_runner(path, threads) for name, path in paths.items()}
    times = interleaved_times(runners, batch_inputs, repeats, warmup=1)
    return {key: statistics.median(v) for key, v in times.items()}


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


def print_speed_table(title: str, flops: dict[str, int], median: dict[tuple[str, int], float],
                      batches: list[int], baseline: str = "uncompressed") -> None:
    print(title)
    header = f"{'variant':34s} {'GFLOPs':>7s} {'FLOPs x':>8s}"
    for b in batches:
        header += f" {'ms b' + str(b):>9s} {'speedup':>8s} {'quot.':>6s}"
    print(header)
    for name in flops:
        ratio = flops[baseline] / flops[name]
        row = f"{name:34s} {flops[name] / 1e9:7.3f} {ratio:8.2f}"
        for b in batches:
            speed = median[(baseline, b)] / median[(name, b)]
            row += f" {median[(name, b)] * 1e3:9.1f} {speed:8.2f} {speed / ratio:6.2f}"
        print(row)
