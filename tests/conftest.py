"""Shared fixtures: small exports of the foundation matrix, cached for the whole session."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# Triton kernels run on CPU tensors under Triton's interpreter; it must be chosen before import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import onnxruntime as ort
import pytest

from vit2trt.converter.deploy.export import export_model

HF_TINY = {"num_hidden_layers": 2, "hidden_size": 192, "num_attention_heads": 3,
           "intermediate_size": 768, "num_labels": 10}

# (id, spec, constructor arguments). Depth is cut to 2 where the full depth adds nothing;
# widths, patch and image sizes stay as named, since they are what the reader must find.
MATRIX = [
    ("vit_tiny", "timm:vit_tiny_patch16_224", {}),
    ("vit_small", "timm:vit_small_patch16_224", {}),
    ("vit_base", "timm:vit_base_patch16_224", {}),
    ("vit_base_p32", "timm:vit_base_patch32_224", {}),
    ("vit_small_384", "timm:vit_small_patch16_384", {}),
    ("deit_small", "timm:deit_small_patch16_224", {}),
    ("deit_small_distilled", "timm:deit_small_distilled_patch16_224", {}),
    ("deit3_small_layerscale", "timm:deit3_small_patch16_224", {}),
    ("vit_small_gap_no_cls", "timm:vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}),
    ("dinov2_reg4", "timm:vit_small_patch14_reg4_dinov2", {"img_size": 126, "num_classes": 10}),
    ("vit_medium_gap_256", "timm:vit_medium_patch16_gap_256", {}),
    ("vit_small_no_qkv_bias", "timm:vit_small_patch16_224", {"qkv_bias": False}),
    ("hf_vit", "hf:ViTForImageClassification", HF_TINY),
]
EXPORTERS = ["torchscript", "dynamo"]


def model_args(spec: str, args: dict) -> dict:
    return dict(args, depth=2) if spec.startswith("timm:") else dict(args)


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    cache: dict[tuple, object] = {}

    def get(spec: str, args: dict, exporter: str):
        """`exporter` is "torchscript", "dynamo" or "dynamo@23" (an opset; 23 writes ONNX Attention)."""
        key = (spec, json.dumps(args, sort_keys=True), exporter)
        if key not in cache:
            folder = root / f"m{len(cache)}"
            name, _, opset = exporter.partition("@")
            cache[key] = export_model(spec, folder / "model.onnx", exporter=name, model_args=args, seed=0,
                                      opset=int(opset) if opset else None)
        return cache[key]

    return get


@pytest.fixture
def deit_tiny_ts(export_cache):
    """A 2-block DeiT-Tiny, TorchScript export: the quick default for CLI tests."""
    return export_cache("timm:deit_tiny_patch16_224", {"depth": 2, "num_classes": 10}, "torchscript")


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_onnx(path, x: np.ndarray) -> np.ndarray:
    """First output of the graph at `path` (or an in-memory ModelProto) in ONNX Runtime (CPU)."""
    source = path.SerializeToString() if hasattr(path, "SerializeToString") else str(path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def compressed_reference_outputs(exported, out_dir: Path, x: np.ndarray) -> np.ndarray:
    """The exported model in PyTorch, compressed as out_dir/decisions.json says, run on x."""
    from vit2trt.models.compressed_reference import compressed_reference
    from vit2trt.models.reference import ReferenceRecord, build_model

    decisions = json.loads((Path(out_dir) / "decisions.json").read_text())
    reference = compressed_reference(build_model(ReferenceRecord.load(exported.record_path)), decisions, out_dir)
    with torch.no_grad():
        return reference(torch.from_numpy(x)).numpy()


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| relative to max |want|."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def with_constant_mask(source, target, seed: int = 0) -> Path:
    """`source` with a constant, non-zero attention mask added to every block's scores before the
    Softmax (a fixed-size mask that token reduction cannot follow)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    rng = np.random.default_rng(seed)
    nodes = list(model.graph.node)
    for i, node in enumerate([n for n in nodes if n.op_type == "Softmax"]):
        scores = node.input[0]
        probe = helper.make_tensor_value_info(scores, onnx.TensorProto.FLOAT, None)
        model.graph.output.append(probe)
        tokens = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            [scores], {session.get_inputs()[0].name: np.zeros([1, *shape[1:]], np.float32)})[0].shape[-1]
        model.graph.output.remove(probe)
        mask = numpy_helper.from_array((rng.standard_normal((1, 1, tokens, tokens)) * 0.1).astype(np.float32),
                                       f"test_mask_{i}")
        model.graph.initializer.append(mask)
        node.input[0] = f"masked_scores_{i}"
        model.graph.node.insert(list(model.graph.node).index(node),
                                helper.make_node("Add", [scores, mask.name], [node.input[0]], name=f"test_mask_add_{i}"))
    onnx.save(model, str(target))
    return Path(target)
