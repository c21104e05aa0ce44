"""ImageNet top-1 of the original and of each method, for users who have real weights.

    python benchmarks/imagenet_eval.py --weights deit_small.pth [--model deit_small_patch16_224]
        [--images ../shared/assets/imagenet-sample] [--limit 200] [--methods toast,asvit,cait,tome]

Images are named `<synset>_<anything>.JPEG`; the class index of an image is the position of its
synset in the sorted list of the folder's synsets, which is the standard ImageNet-1k index when the
folder holds all 1000 classes (as ../shared/assets/imagenet-sample does). --limit evaluates the
first N images (labels still come from the whole folder). With no --weights the model is seeded
random and accuracy is near chance: that only exercises the code path.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vit2trt.converter.measure.calibration import image_files, load_calibration
from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.deploy.export import export_model
from vit2trt.errors import Vit2TrtError

SHARED_IMAGENET = Path(__file__).resolve().parents[2] / "shared" / "assets" / "imagenet-sample"
METHOD_SETTINGS = {"toast": {"target_gflops": None, "head_sparsity": 0.5}, "asvit": {}, "cait": {}, "tome": {}}


def synset_labels(folder: Path) -> tuple[list[Path], np.ndarray, int]:
    files = image_files(folder, flag="--images")
    synsets = [f.name.split("_", 1)[0] for f in files]
    index = {s: i for i, s in enumerate(sorted(set(synsets)))}
    return files, np.array([index[s] for s in synsets], dtype=np.int64), len(index)


def _predict(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 16]})[0].argmax(-1) for i in range(0, len(x), 16)])


def evaluate(model: str, weights: str | None, images: Path, limit: int | None, methods: list[str],
             model_args: dict | None = None, workdir: Path | None = None) -> dict[str, float]:
    files, labels, classes = synset_labels(images)
    if model_args is None and classes != 1000:
        raise Vit2TrtError(f"{images} holds {classes} synsets; ImageNet-1k indices need all 1000.")
    unknown = sorted(set(methods) - set(METHOD_SETTINGS))
    if unknown:
        raise Vit2TrtError(f"unknown methods {unknown}; choose from {', '.join(METHOD_SETTINGS)}.")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        exported = export_model(f"timm:{model}", tmp / "model.onnx", weights=weights, model_args=model_args)
        record = json.loads(exported.record_path.read_text())
        subset = files[:limit] if limit else files
        folder = tmp / "images"
        folder.mkdir()
        for f in subset:   # a folder of just the evaluated images, in the same sorted order
            (folder / f.name).symlink_to(f.resolve())
        x = load_calibration(folder, tuple(record["preprocessing"]["input_size"]), record["preprocessing"])
        y = labels[:len(x)]
        np.save(tmp / "calib.npy", x[:32])
        top1 = {"original": float(np.mean(_predict(exported.onnx_path, x) == y))}
        for method in methods:
            settings = {k: v for k, v in METHOD_SETTINGS[method].items() if v is not None}
            extra = {"calib": str(tmp / "calib.npy")} if method == "asvit" else {}
            result = convert(exported.onnx_path, tmp / method, ConvertOptions(
                method=method, build=False, model_name=model, **settings, **extra))
            top1[method] = float(np.mean(_predict(result.onnx_path, x) == y))
    return top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--weights", default=None, help=".pth/.pt (read with weights_only=True) or .safetensors")
    parser.add_argument("--images", default=str(SHARED_IMAGENET))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--methods", default="toast,asvit,cait,tome")
    args = parser.parse_args()
    top1 = evaluate(args.model, args.weights, Path(args.images), args.limit, args.methods.split(","))
    print(f"{args.model}, weights {args.weights or 'seeded random (accuracy near chance expected)'}")
    for name, value in top1.items():
        delta = "" if name == "original" else f"  ({(value - top1['original']) * 100:+.1f})"
        print(f"{name:10s} top-1 {value * 100:5.1f}%{delta}")


if __name__ == "__main__":
    main()
