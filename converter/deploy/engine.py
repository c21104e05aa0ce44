"""TensorRT engine builds through one code path for full TensorRT and TensorRT-RTX.

`--engine auto` takes full `tensorrt` where the module and a CUDA GPU are present, else
`tensorrt_rtx`, which builds on a CPU-only machine (how CI proves that every emitted graph parses
and builds), else no engine. The two modules differ in a few places, all in `_Flavour`:
TensorRT-RTX networks are strongly typed (lower precision means converting the ONNX graph, not a
builder flag) and it builds for a list of GPU compute capabilities rather than the GPU at hand.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..files import write_atomically
from ..graph.vit_graph import BuildReport
from ...errors import Vit2TrtError

ENGINES = ("auto", "tensorrt", "tensorrt-rtx", "none")
PRECISIONS = ("fp32", "fp16", "bf16")
_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}


@dataclass
class BuildOptions:
    engine: str = "auto"
    batch: tuple[int, int, int] = (1, 1, 8)    # optimization profile: min, opt, max
    precision: str = "fp32"

    def check(self) -> "BuildOptions":
        if self.engine not in ENGINES:
            raise Vit2TrtError(f"--engine must be one of {', '.join(ENGINES)}, got '{self.engine}'.")
        if self.precision not in PRECISIONS:
            raise Vit2TrtError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'.")
        lo, opt, hi = self.batch
        if not 1 <= lo <= opt <= hi:
            raise Vit2TrtError(f"--batch takes min,opt,max with 1 <= min <= opt <= max, got {lo},{opt},{hi}.")
        return self


def _import(module_name: str):
    try:
        module = __import__(module_name)
        module.Builder  # noqa: B018 - the stub packages on PyPI import but have no Builder
        return module
    except (ImportError, AttributeError, OSError):
        return None


def _cuda_gpu_present() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no usable CUDA stack means no GPU for TensorRT
        return False


def tensorrt_backend(prefer: Optional[str] = None):
    """Return (name, module) of the first installed TensorRT flavour, or ("none", None)."""
    for name in [prefer] if prefer else ["tensorrt", "tensorrt_rtx"]:
        module = _import(name)
        if module is not None:
            return name, module
    return "none", None


def resolve_backend(engine: str = "auto"):
    """(name, module, notice) for --engine; notice says why no engine is built (module None)."""
    if engine == "none":
        return "none", None, "no engine requested (--engine none)"
    if engine in _MODULES:
        module = _import(_MODULES[engine])
        if module is None:
            hint = ("pip install 'vit2trt[tensorrt]' on a machine with an NVIDIA GPU" if engine == "tensorrt"
                    else "pip install tensorrt-rtx")
            raise Vit2TrtError(f"--engine {engine}: the {_MODULES[engine]} module is not installed ({hint}), "
                               "or use --engine auto.")
        return _MODULES[engine], module, ""
    full = _import("tensorrt")
    if full is not None and _cuda_gpu_present():
        return "tensorrt", full, ""
    rtx = _import("tensorrt_rtx")
    if rtx is not None:
        return "tensorrt_rtx", rtx, ""
    return "none", None, ("no engine: neither tensorrt (with a GPU) nor tensorrt_rtx is installed "
                          "(pip install tensorrt-rtx builds engines on a CPU-only machine)")


def check_precision(backend: str, precision: str) -> None:
    if backend == "tensorrt_rtx" and precision == "bf16":
        raise Vit2TrtError("bf16 needs full TensorRT (a builder flag); TensorRT-RTX is strongly typed and vit2trt "
                           "converts graphs to fp16 only. Use --precision fp16 or --engine tensorrt.")


def check_build(options: BuildOptions) -> str:
    """Validate the build request before any work; returns the backend that will build."""
    backend, _, _ = resolve_backend(options.check().engine)
    check_precision(backend, options.precision)
    return backend


class _Flavour:
    """What differs between full TensorRT and TensorRT-RTX, in one place."""

    def __init__(self, name: str, trt):
        self.name, self.trt = name, trt
        self.strongly_typed = name == "tensorrt_rtx"

    def network_flags(self) -> int:
        flags = 0
        explicit = getattr(self.trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
        if explicit is not None:  # needed before TensorRT 10, ignored since
            flags |= 1 << int(explicit)
        return flags

    def set_precision(self, config, precision: str) -> list[str]:
        """Builder flags for a weakly typed network; strongly typed ones carry it in the graph."""
        if precision == "fp32" or self.strongly_typed:
            return []
        flag = {"fp16": "FP16", "bf16": "BF16"}[precision]
        config.set_flag(getattr(self.trt.BuilderFlag, flag))
        return [flag]

    def targets(self, config) -> list[str]:
        if not self.strongly_typed:
            return ["the GPU of this machine"]
        count = config.num_compute_capabilities
        chosen = [str(config.get_compute_capability(i)).split(".")[-1] for i in range(count)]
        return chosen or ["TensorRT-RTX default (the GPU present, else its supported list)"]


def _graph_in_precision(onnx_path: Path, precision: str, workdir: Path) -> tuple[Path, list[str]]:
    """For strongly typed builds: the ONNX graph itself in fp16 (inputs and outputs stay fp32)."""
    if precision == "fp32":
        return onnx_path, []
    check_precision("tensorrt_rtx", precision)
    import warnings

    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():   # it warns for every weight below fp16's range; those become ±1e-7
        warnings.simplefilter("ignore")
        model = float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    _casts_follow_fp16(model, set(float16.DEFAULT_OP_BLOCK_LIST))
    path = workdir / "model.fp16.onnx"
    onnx.save(model, str(path))
    return path, ["graph converted to fp16 (onnxconverter-common, fp32 inputs and outputs)"]


def _casts_follow_fp16(model, fp32_ops: set) -> None:
    """The converter leaves Cast(to=float) as it is (our one-hot masks, AS-ViT's keep masks), which
    would feed fp32 into fp16 MatMuls: retarget those whose consumers all run in fp16."""
    import onnx

    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    changed = set()
    for node in graph.node:
        if node.op_type != "Cast" or node.output[0] in outputs:
            continue
        to = next(a for a in node.attribute if a.name == "to")
        users = consumers.get(node.output[0], [])
        if to.i == onnx.TensorProto.FLOAT and users and all(u.op_type not in fp32_ops for u in users):
            to.i = onnx.TensorProto.FLOAT16
            changed.add(node.output[0])
    keep = [v for v in graph.value_info if v.name not in changed]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def _let_attention_decompose(trt, network) -> list[str]:
    """ONNX Attention nodes parse into TensorRT's fused attention, which fails the build where no
    dedicated kernel fits (TensorRT-RTX has none for fp32): let each fall back to its parts there.
    Where a kernel fits it is still used."""
    kind = getattr(getattr(trt, "LayerType", None), "ATTENTION_INPUT", None)
    if kind is None:
        return []
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != kind:
            continue
        layer.__class__ = trt.IAttentionInputLayer   # the bindings' way to reach a layer's own API
        layer.attention.decomposable = True
        count += 1
    return [f"{count} fused attention layer(s) may decompose where no dedicated kernel fits"] if count else []


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: Optional[str | os.PathLike] = None,
    max_batch: int = 8,
    opt_batch: int = 1,
    prefer: Optional[str] = None,
    options: Optional[BuildOptions] = None,
) -> BuildReport:
    """Parse and build `onnx_path`. With `engine_path`, write the engine and `<engine>.json` (how it
    was built) atomically. `options` (engine, profile, precision) override the older arguments."""
    if options is None:
        options = BuildOptions(engine={"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt-rtx"}.get(prefer, "auto"),
                               batch=(1, opt_batch, max_batch))
    options.check()
    backend, trt, notice = resolve_backend(options.engine)
    if trt is None:
        return BuildReport(backend="none", status="unavailable" if options.engine == "auto" else "skipped",
                           message=notice)
    flavour = _Flavour(backend, trt)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vit2trt-build-") as work:
        source, notes = ((_graph_in_precision(Path(onnx_path), options.precision, Path(work)))
                         if flavour.strongly_typed else (Path(onnx_path), []))
        logger = _collecting_logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(flavour.network_flags())
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(source)):
            errors = "; ".join(_describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
            return BuildReport(backend, "failed", time.perf_counter() - start, f"ONNX parser: {errors[:600]}")
        notes += _let_attention_decompose(trt, network)
        config = builder.create_builder_config()
        flags = flavour.set_precision(config, options.precision)
        profile = builder.create_optimization_profile()
        lo_b, opt_b, hi_b = options.batch
        shapes = {}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = list(tensor.shape)
            if any(d < 0 for d in shape[1:]):
                return BuildReport(backend, "failed", time.perf_counter() - start,
                                   f"input '{tensor.name}' has dynamic dims besides batch: {shape}")
            lo, opt, hi = [lo_b] + shape[1:], [opt_b] + shape[1:], [hi_b] + shape[1:]
            profile.set_shape(tensor.name, lo, opt, hi)
            shapes[tensor.name] = {"min": lo, "opt": opt, "max": hi}
        config.add_optimization_profile(profile)
        layers = [{"name": layer.name, "type": str(layer.type).split(".")[-1]}
                  for layer in (network.get_layer(i) for i in range(network.num_layers))]
        try:
            serialized = builder.build_serialized_network(network, config)
        except Exception as exc:  # the bindings raise on some unsupported layers
            return BuildReport(backend, "failed", time.perf_counter() - start, f"builder: {exc}", layers=layers)
        if serialized is None:
            detail = " | ".join(logger.messages[-3:]) or "no message"
            return BuildReport(backend, "failed", time.perf_counter() - start, f"builder returned no engine: {detail}",
                               layers=layers)
    seconds = time.perf_counter() - start
    how = {"module": backend, "version": getattr(trt, "__version__", "unknown"), "targets": flavour.targets(config),
           "profile": shapes, "precision": options.precision, "flags": flags, "notes": notes,
           "strongly_typed": flavour.strongly_typed, "onnx": Path(onnx_path).name,
           "size_mib": round(serialized.nbytes / 2**20, 2), "seconds": round(seconds, 2)}
    if engine_path is not None:
        engine_path = Path(engine_path)
        write_atomically(engine_path, bytes(serialized))
        write_atomically(engine_path.with_name(engine_path.name + ".json"),
                          (json.dumps(how, indent=1, sort_keys=True) + "\n").encode())
    return BuildReport(backend, "built", seconds,
                       f"{serialized.nbytes / 2**20:.1f} MiB engine, batch {lo_b}..{hi_b}, {options.precision}",
                       how=how, layers=layers)


def engine_runner(engine_path: Path, input_name: str):
    """A callable running a serialized engine on the GPU (Polygraphy's TrtRunner), or a Vit2TrtError
    saying why it cannot run here. Loading an engine needs a GPU, for TensorRT-RTX engines too."""
    how = json.loads(Path(str(engine_path) + ".json").read_text()) if Path(str(engine_path) + ".json").is_file() else {}
    module = how.get("module", "tensorrt")
    missing = [what for what, ok in (("a CUDA GPU", _cuda_gpu_present()), (f"the {module} module",
                                                                          _import(module) is not None)) if not ok]
    if missing:
        raise Vit2TrtError(f"running {Path(engine_path).name} needs {' and '.join(missing)}, missing here.")
    if module == "tensorrt_rtx":
        os.environ.setdefault("POLYGRAPHY_USE_TENSORRT_RTX", "1")   # Polygraphy drives TensorRT-RTX then
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    runner = TrtRunner(EngineFromBytes(Path(engine_path).read_bytes()))
    runner.activate()
    return lambda x: runner.infer({input_name: x})


def report_dict(report: Optional[BuildReport]) -> Optional[dict]:
    return None if report is None else asdict(report)


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
