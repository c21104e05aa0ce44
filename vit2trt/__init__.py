"""vit2trt: compress exported Vision Transformers by ONNX graph surgery and build TensorRT engines."""
__version__ = "0.1.0"
