"""PyTorch reference models and analytical cost models."""
