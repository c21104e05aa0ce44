"""Either end of a deployment: the ONNX export of a PyTorch ViT that vit2trt starts from, and the TensorRT engine it ends with."""
