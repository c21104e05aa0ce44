"""Reading exported ViT graphs, exporting timm/HF models, and building engines."""
