"""vit2trt: compress exported Vision Transformers by ONNX graph surgery and build TensorRT engines.

Python API: `read_vit(path)` returns the ViTGraph description (vit2trt.converter.graph.vit_graph);
`export_model(...)` exports a timm / Hugging Face ViT with its reference record.
"""
__version__ = "0.1.0"

__all__ = ["read_vit", "export_model", "__version__"]


def __getattr__(name):  # lazy, so `vit2trt --help` does not import onnx and torch
    if name == "read_vit":
        from .converter.graph import read_vit

        return read_vit
    if name == "export_model":
        from .converter.deploy.export import export_model

        return export_model
    raise AttributeError(name)
