"""vit2trt.converter: from an exported ViT to a compressed graph that is proven, measured and built.

- `convert.py`: `compress` (the methods' passes, in memory) and `convert` (compress, check, save);
  `artifact.py`: the output folder as a type; `tune.py`, `demo.py`: the commands of those names.
- `graph/`: loading an ONNX graph and reading the ViT in it (`read_vit`, `describe_vit`), observed
  shapes, onnx-graphsurgeon helpers, the description's dataclasses.
- `deploy/`: the ONNX export of a PyTorch ViT, and TensorRT engines.
- `measure/`: validate, bench, paired speedups, references, calibration images and image folders.
- `planning/`: the planner (`vit2trt plan`) and the reports every command writes.
- `runtime.py`: the one loader of ONNX Runtime sessions and the runners every part uses.
"""
