"""Fused kernels (Triton) and their TensorRT plugin registration."""
