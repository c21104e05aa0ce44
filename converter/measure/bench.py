"""`vit2trt bench OUT`: latency of the original and the compressed model side by side, in one run.

The two models run in back-to-back pairs whose order alternates (converter/measure/speedup.py): latency is
the median and 90th percentile per variant and batch, and the speedup is the median of the pairs'
ratios with its 95% bootstrap interval, rounds added until that interval is within ±5% or a cap is
reached (then the figure is marked unstable), and flagged where it exceeds the FLOPs ratio. Backends:
- `ort`: the ONNX graphs in ONNX Runtime on CPU (always available);
- `tensorrt`: the engines on the GPU (OUT/model.engine, and one built alike from the original);
- `torch-cuda`: the PyTorch references of both models on a CUDA GPU, replayed as CUDA graphs, so
  GPU ratios exist where TensorRT does not; `torch-cpu` runs the same path on CPU.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..artifact import DECISIONS_FILE, ENGINE_FILE, ENGINE_INFO_FILE, RECORD_FILE, Artifact, read_json
from ..planning.report import render_report
from ..runtime import ort_runner, torch_runner
from .speedup import MAX_ROUNDS, TIME_CAP_S, PairedTiming, Speedup, measure_speedup
from ...errors import Vit2TrtError

BACKENDS = ("ort", "tensorrt", "torch-cuda", "torch-cpu")


def latency_rows(timing: PairedTiming, batch: int) -> list[dict]:
    """report.json's rows for one batch: the original (the reference, speedup exactly 1) and the
    compressed model, with latency from the same paired timings the speedup came from."""
    rows = []
    for variant, seconds, figure in (("original", timing.baseline_s, Speedup.reference()),
                                     ("compressed", timing.variant_s, timing.speedup)):
        rows.append({"variant": variant, "batch": batch, "median_ms": statistics.median(seconds) * 1e3,
                     "p90_ms": float(np.percentile(seconds, 90)) * 1e3, "runs": len(seconds),
                     "runs_per_timing": timing.runs_per_timing, **figure.as_json()})
    return rows


def bench(out_dir: str | os.PathLike, original: Optional[str | os.PathLike] = None,
          batches: Optional[list[int]] = None, repeats: int = 20, threads: int = 2,
          backends: tuple[str, ...] = ("ort",), progress: Callable[[str], None] = lambda msg: None,
          time_cap: float = TIME_CAP_S) -> dict:
    """`repeats`: paired rounds at least per batch (up to MAX_ROUNDS times as many while the speedup's
    interval is wider than ±5%); `time_cap`: seconds of timing at most per backend and batch."""
    out_dir = Path(out_dir)
    artifact = Artifact.open(out_dir)
    compressed, report = artifact.model_path, artifact.report
    original = Path(original) if original else Path(report.get("source_path", ""))
    if not original.is_file():
        raise Vit2TrtError(f"the original graph {original or '(unknown)'} is not there; pass --original MODEL.onnx.")
    for backend in backends:
        if backend not in BACKENDS:
            raise Vit2TrtError(f"--backend must be one of {', '.join(BACKENDS)}, got '{backend}'.")
    if repeats < 1 or threads < 1:
        raise Vit2TrtError("--repeats and --threads must be at least 1.")
    if batches is None:
        how = read_json(artifact.path(ENGINE_INFO_FILE))
        opt = next(iter(how.get("profile", {}).values()), {}).get("opt", [8])[0]
        batches = sorted({1, max(int(opt), 1)} | ({8} if opt == 1 else set()))
    if any(b < 1 for b in batches):
        raise Vit2TrtError(f"batch sizes must be at least 1, got {batches}.")
    from ..graph.loading import load_onnx
    from ..graph import describe_vit

    vit = describe_vit(load_onnx(original), str(original))
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, vit.in_chans, *vit.img_size)).astype(np.float32) for b in batches}
    flops_ratio = _flops_ratio(artifact)
    results = {"batches": batches, "repeats": repeats, "max_rounds": repeats * MAX_ROUNDS, "time_cap_s": time_cap,
               "flops_ratio": flops_ratio, "threads": threads, "original": original.name, "inputs": "seeded noise",
               "backends": {}}
    for backend in backends:
        progress(f"timing on {backend}")
        if backend == "ort":
            runners = {"original": ort_runner(original, threads), "compressed": ort_runner(compressed, threads)}
        elif backend == "tensorrt":
            runners = _engine_runners(artifact, original, vit.input_name)
        else:
            runners = _torch_runners(artifact, backend, threads)
        rows = []
        for b, x in inputs.items():
            timing = measure_speedup(runners["original"], runners["compressed"], x, repeats, time_cap=time_cap,
                                     flops_ratio=flops_ratio, warmup=2, progress=lambda d, t, b=b: progress(
                                         f"timing on {backend}, batch {b}: round {d}/{t}"))
            rows += latency_rows(timing, b)
        results["backends"][backend] = rows
    artifact.update_report("latency", results)
    render_report(out_dir)
    return results


def _flops_ratio(artifact: Artifact) -> Optional[float]:
    """The FLOPs ratio convert recorded, which bounds a credible speedup; none for AS-ViT, whose FLOPs
    depend on the image (the recorded count is one probe image's, not the timing inputs')."""
    decisions = artifact.decisions
    parts = [decisions] + list(decisions.get("parts") or [])
    if any("asvit" in part or part.get("method") == "asvit" for part in parts):
        return None
    return artifact.flops_ratio


def _engine_runners(artifact: Artifact, original: Path, input_name: str) -> dict[str, Callable]:
    from ..deploy.engine import BuildOptions, build_engine, engine_runner

    engine = artifact.path(ENGINE_FILE)
    if not engine.is_file():
        raise Vit2TrtError(f"--backend tensorrt needs {engine} (convert builds it when a TensorRT module is present).")
    how = read_json(artifact.path(ENGINE_INFO_FILE))
    profile = next(iter(how.get("profile", {}).values()), {"min": [1], "opt": [1], "max": [8]})
    compressed = engine_runner(engine, input_name)   # refuses early where no GPU can load it
    original_engine = artifact.path(".original.engine")
    report = build_engine(original, engine_path=original_engine, options=BuildOptions(
        {"tensorrt_rtx": "tensorrt-rtx"}.get(how.get("module"), "tensorrt"),
        (profile["min"][0], profile["opt"][0], profile["max"][0]), how.get("precision", "fp32")))
    if report.status != "built":
        raise Vit2TrtError(f"the original graph did not build for timing: {report.message}")
    try:
        return {"original": engine_runner(original_engine, input_name), "compressed": compressed}
    finally:
        original_engine.unlink(missing_ok=True)
        Path(str(original_engine) + ".json").unlink(missing_ok=True)


def _torch_runners(artifact: Artifact, backend: str, threads: int) -> dict[str, Callable]:
    import torch

    from ...models.reference import build_model

    if backend == "torch-cuda" and not torch.cuda.is_available():
        raise Vit2TrtError("--backend torch-cuda needs a CUDA GPU visible to PyTorch.")
    record = artifact.reference_record()
    if record is None or not artifact.decisions:
        raise Vit2TrtError(f"--backend {backend} needs {RECORD_FILE} and {DECISIONS_FILE} in {artifact.folder} "
                           "(written by convert for models exported with `vit2trt export`).")
    device = "cuda" if backend == "torch-cuda" else "cpu"
    return {"original": torch_runner(build_model(record), device, threads),
            "compressed": torch_runner(artifact.torch_model(record), device, threads)}
