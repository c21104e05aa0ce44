"""The PyTorch ViT assembled from an ONNX graph alone equals the graph on every model of the reader's
matrix and every exporter form; a graph timm cannot be is refused with the reason."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from vit2trt.errors import ExportError
from vit2trt.models.graph_reference import model_from_graph

from conftest import EXPORTERS, MATRIX, model_args, rel_error, run_onnx

FORMS = [(name, spec, args, exporter) for name, spec, args in MATRIX for exporter in EXPORTERS] + [
    ("vit_tiny", "timm:vit_tiny_patch16_224", {}, "dynamo@23"),
    ("deit3_small_layerscale", "timm:deit3_small_patch16_224", {}, "dynamo@23")]


@pytest.mark.parametrize("name, spec, args, exporter", FORMS, ids=[f"{f[0]}-{f[3]}" for f in FORMS])
def test_the_assembled_model_equals_the_graph(export_cache, name, spec, args, exporter):
    exported = export_cache(spec, model_args(spec, args), exporter)
    model, _, kwargs = model_from_graph(exported.onnx_path)
    x = np.random.default_rng(3).standard_normal((2, kwargs["in_chans"], *kwargs["img_size"])).astype(np.float32)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    assert rel_error(got, run_onnx(exported.onnx_path, x)) < 1e-5


def test_a_graph_timm_cannot_be_is_refused(export_cache, tmp_path):
    exported = export_cache("timm:vit_tiny_patch16_224", {"depth": 2, "img_size": 64, "num_classes": 10}, "torchscript")
    model = onnx.load(str(exported.onnx_path))
    # a different attention scale in block 0: the graph no longer computes timm's attention
    for node in model.graph.node:
        if node.op_type == "Softmax":
            node.input[0], scaled = f"{node.input[0]}_x3", node.input[0]
            three = numpy_helper.from_array(np.array(3.0, dtype=np.float32), "three")
            model.graph.initializer.append(three)
            index = list(model.graph.node).index(node)
            model.graph.node.insert(index, onnx.helper.make_node("Mul", [scaled, "three"], [node.input[0]], name="x3"))
            break
    onnx.save(model, str(tmp_path / "scaled.onnx"))
    with pytest.raises(ExportError, match="differs from it"):
        model_from_graph(tmp_path / "scaled.onnx")
