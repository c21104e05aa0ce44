"""Read the Vision Transformer inside an exported ONNX graph into its typed description
(vit_graph.ViTGraph): `read_vit` from a file, `describe_vit` from a loaded model."""
from .reader import describe_vit, read_vit

__all__ = ["describe_vit", "read_vit"]
