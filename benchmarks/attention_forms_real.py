"""The real ViT-Ti in ../shared/real/ exported in two attention forms, compressed alike, measured alike.

Forms: TorchScript (eager attention: MatMul -> Softmax -> MatMul) and the dynamo exporter at opset 23
(one ONNX Attention node per block). Each is compressed with ToMe (r = 8, no calibration) and with
ToaSt at 0.8 of the FLOPs with closed-form compensation (fitted on the first --calib photos of
val/ in sorted order); top-1 is measured on the next --held photos, which no method saw.
The originals and ToMe must give the same accuracy in both forms (the same model, read into the
same description). ToaSt's budget on the fused form keeps each block's Q·K and V dims equal, so
that its blocks stay fused; the table shows what that costs against the untied allocation. The
report says which attention form each compressed graph kept.

    python benchmarks/attention_forms_real.py --work /tmp/forms [--calib 256] [--held 1000]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from vit2trt.converter.measure.calibration import DEFAULT_PREPROCESSING, preprocess_image
from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.deploy.export import export_model

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
SETTINGS = {"tome r=8": dict(method="tome", r=8),
            "toast 0.8 FLOPs, compensated": dict(method="toast", target_flops=0.8, multiple=8, compensate=True),
            "toast 0.8, compensated, untied": dict(method="toast", target_flops=0.8, multiple=8, compensate=True,
                                                  tie_qk_v=False)}


def photos(first: int, count: int, preprocessing: dict) -> tuple[np.ndarray, np.ndarray]:
    files = sorted((REAL / "val").iterdir())[first:first + count]
    table = dict(line.split() for line in (REAL / "val.labels.txt").read_text().splitlines() if line.strip())
    config = dict(DEFAULT_PREPROCESSING, **preprocessing)
    x = np.stack([preprocess_image(f, tuple(preprocessing["input_size"]), config) for f in files])
    return x.astype(np.float32), np.array([int(table[f.name]) for f in files])


def top1(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i:i + 32]})[0] for i in range(0, len(x), 32)])
    return float(np.mean(logits.argmax(1) == y)), logits.argmax(1)


def attention_ops(path: Path) -> dict:
    ops = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    return {"Attention": ops["Attention"], "Softmax": ops["Softmax"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--held", type=int, default=1000)
    args = parser.parse_args()
    if not REAL.is_dir():
        raise SystemExit(f"{REAL} is absent: this benchmark needs the real ViT-Ti and its photos.")
    weights = str(REAL / "vit_tiny_tin200.safetensors")
    forms = {"torchscript (explicit)": ("torchscript", None), "dynamo opset 23 (ONNX Attention)": ("dynamo", 23)}
    exported = {}
    for form, (exporter, opset) in forms.items():
        exported[form] = export_model("timm:vit_tiny_patch16_224", args.work / form.split()[0] / "model.onnx",
                                      weights=weights, exporter=exporter, opset=opset,
                                      model_args={"num_classes": 200})
    preprocessing = json.loads(exported[next(iter(forms))].record_path.read_text())["preprocessing"]
    calib, _ = photos(0, args.calib, preprocessing)
    np.save(args.work / "calib.npy", calib)
    held_x, held_y = photos(args.calib, args.held, preprocessing)
    rows = []
    for form in forms:
        base, base_pred = top1(exported[form].onnx_path, held_x, held_y)
        rows.append({"form": form, "setting": "original", "top1": base, "ops": attention_ops(exported[form].onnx_path)})
        for label, settings in SETTINGS.items():
            out = args.work / form.split()[0] / label.replace(" ", "_").replace(",", "").replace("=", "")
            result = convert(exported[form].onnx_path, out, ConvertOptions(
                build=False, overwrite=True, calib=str(args.work / "calib.npy"), **settings))
            acc, pred = top1(result.onnx_path, held_x, held_y)
            rows.append({"form": form, "setting": label, "top1": acc, "drop_pt": (base - acc) * 100,
                         "flops_ratio": result.flops_before / result.flops_after,
                         "ops": attention_ops(result.onnx_path), "predictions": pred.tolist()})
    print(f"Real ViT-Ti (200 classes), fitted on {args.calib} photos, top-1 on the next {len(held_y)}:")
    print(f"{'form':34} {'setting':30} {'top-1':>7} {'drop':>7} {'FLOPs':>6}  attention ops kept")
    for r in rows:
        drop = f"{r['drop_pt']:.2f}" if "drop_pt" in r else ""
        ratio = f"{r['flops_ratio']:.2f}x" if "flops_ratio" in r else ""
        print(f"{r['form']:34} {r['setting']:30} {r['top1'] * 100:6.2f}% {drop:>7} {ratio:>6}  {r['ops']}")
    for label in SETTINGS:
        a, b = [np.array(r["predictions"]) for r in rows if r["setting"] == label]
        print(f"{label}: the two forms predict the same class for {np.mean(a == b) * 100:.2f}% of the photos")
    (args.work / "attention_forms_real.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
