"""TensorRT engine builds through one code path for full TensorRT and TensorRT-RTX.

Full `tensorrt` is preferred where installed (GPU machines); `tensorrt_rtx` builds on a
CPU-only machine, which is how CI proves that every emitted graph parses and builds.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Optional

from vit2trt.converter.vit_graph import BuildReport


def tensorrt_backend(prefer: Optional[str] = None):
    """Return (name, module) of the TensorRT flavour to use, or (\"none\", None)."""
    names = [prefer] if prefer else ["tensorrt", "tensorrt_rtx"]
    for name in names:
        try:
            module = __import__(name)
            module.Builder  # noqa: B018 - the stub packages on PyPI import but have no Builder
            return name, module
        except (ImportError, AttributeError, OSError):
            continue
    return "none", None


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: Optional[str | os.PathLike] = None,
    max_batch: int = 8,
    opt_batch: int = 1,
    prefer: Optional[str] = None,
) -> BuildReport:
    """Parse and build `onnx_path`; write the serialized engine atomically if `engine_path` is set."""
    backend, trt = tensorrt_backend(prefer)
    if trt is None:
        return BuildReport(backend="none", status="unavailable",
                           message="no TensorRT module (install tensorrt-rtx, or tensorrt on a GPU machine)")
    start = time.perf_counter()
    logger = _collecting_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if explicit is not None:  # needed before TensorRT 10, ignored since
        flags |= 1 << int(explicit)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(_describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
        return BuildReport(backend, "failed", time.perf_counter() - start, f"ONNX parser: {errors[:600]}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            return BuildReport(backend, "failed", time.perf_counter() - start,
                               f"input '{tensor.name}' has dynamic dims besides batch: {shape}")
        lo, opt, hi = ([1] + shape[1:], [opt_batch] + shape[1:], [max_batch] + shape[1:])
        profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    try:
        serialized = builder.build_serialized_network(network, config)
    except Exception as exc:  # the bindings raise on some unsupported layers
        return BuildReport(backend, "failed", time.perf_counter() - start, f"builder: {exc}")
    if serialized is None:
        detail = " | ".join(logger.messages[-3:]) or "no message"
        return BuildReport(backend, "failed", time.perf_counter() - start, f"builder returned no engine: {detail}")
    if engine_path is not None:
        engine_path = Path(engine_path)
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=engine_path.parent, delete=False, suffix=".tmp") as fh:
            fh.write(serialized)
        os.replace(fh.name, engine_path)
    return BuildReport(backend, "built", time.perf_counter() - start,
                       f"{serialized.nbytes / 2**20:.1f} MiB engine, batch 1..{max_batch}")


def _describe_parser_error(error) -> str:
    parts = []
    for attr in ("node_operator", "node_name"):  # present since TensorRT 10
        getter = getattr(error, attr, None)
        value = getter() if callable(getter) else None
        if value:
            parts.append(f"{attr.split('_')[1]} {value}")
    where = f" ({', '.join(parts)})" if parts else ""
    return f"{error.desc()}{where}"


def _collecting_logger(trt):
    """Keep TensorRT's messages for the report instead of printing them over our own output."""

    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.ERROR:
                self.messages.append(str(msg))

    return CollectingLogger()
