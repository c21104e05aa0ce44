"""Healing the real ViT-Ti of ../shared/real/: which recipe wins back the most of what compression cost.

Stages (each can run alone, so that a GPU machine can heal while a CPU machine converts and measures):
- prepare: export the real ViT-Ti, compress it (default: CAIT at half the FLOPs with closed-form
  compensation, calibrated on the first --calib photos of val/ in sorted order), and pick the training
  photos (--per-class of every class of train/, as an ImageFolder of links, with its class map);
- heal: `vit2trt heal` once per recipe (--recipes), each into its own folder, with the same time limit;
- measure: top-1 of the original, the unhealed and every healed model on the val/ photos after the
  calibration ones, which no stage ever saw (the graphs in ONNX Runtime, through `vit2trt validate`).

    python benchmarks/heal_real.py --work /tmp/heal prepare
    python benchmarks/heal_real.py --work /tmp/heal heal --recipes features,logits,features+labels --time-limit 300
    python benchmarks/heal_real.py --work /tmp/heal measure

A recipe written `NAME+labels` heals with train/'s labels (the class map), the others without labels.
Results go to WORK/heal_real.json (merged stage by stage).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"


def _results(work: Path) -> dict:
    path = work / "heal_real.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(work: Path, results: dict) -> None:
    (work / "heal_real.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def prepare(args) -> None:
    from vit2trt.converter.convert import ConvertOptions, convert
    from vit2trt.converter.deploy.export import export_model

    work, real = Path(args.work), Path(args.real)
    val = sorted(p for p in (real / "val").iterdir() if p.suffix.lower() == ".jpeg")
    for name, files in (("calib", val[:args.calib]), ("held", val[args.calib:])):
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            if not (folder / f.name).exists():
                (folder / f.name).symlink_to(f.resolve())
    labels = dict(line.split() for line in (real / "val.labels.txt").read_text().splitlines() if line.strip())
    (work / "held.labels.txt").write_text("".join(f"{f.name} {labels[f.name]}\n" for f in val[args.calib:]))
    train = work / "train"
    for cls in sorted(p for p in (real / "train").iterdir() if p.is_dir()):
        (train / cls.name).mkdir(parents=True, exist_ok=True)
        photos = sorted(cls.iterdir(), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))[:args.per_class]
        for f in photos:
            if not (train / cls.name / f.name).exists():
                (train / cls.name / f.name).symlink_to(f.resolve())
    (work / "train.class_map.json").write_text((real / "train.class_map.json").read_text())
    onnx_path = work / "vit_tiny_tin200.onnx"
    if not onnx_path.is_file():
        export_model("timm:vit_tiny_patch16_224", onnx_path, weights=str(real / "vit_tiny_tin200.safetensors"),
                     model_args={"num_classes": 200})
    settings = json.loads(args.method)
    start = time.monotonic()
    convert(onnx_path, work / "compressed", ConvertOptions(calib=str(work / "calib"), build=False, overwrite=True,
                                                           **settings))
    results = _results(work)
    results["prepare"] = {"method": settings, "calib_photos": args.calib, "train_photos_per_class": args.per_class,
                          "convert_seconds": round(time.monotonic() - start, 1)}
    _save(work, results)


def heal_all(args) -> None:
    from vit2trt.converter.healing.heal import HealOptions, heal

    work = Path(args.work)
    results = _results(work)
    for recipe in args.recipes.split(","):
        name, _, with_labels = recipe.partition("+")
        options = HealOptions(work / "train", class_map=work / "train.class_map.json" if with_labels else None,
                              time_limit=args.time_limit, epochs=args.epochs, device=args.device, batch=args.batch, lr=args.lr,
                              recipe=name, out=work / f"healed-{recipe}", overwrite=True, seed=args.seed)
        section = heal(work / "compressed", options, progress=lambda m: print(m, flush=True) if args.verbose else None)
        results.get("measure", {}).pop(recipe, None)   # measured before this heal: stale
        results.setdefault("heal", {})[recipe] = {k: section[k] for k in (
            "holdout_before", "holdout_after", "seconds", "device", "epochs", "steps", "images_per_second",
            "images", "holdout_images", "stopped_by", "check", "lr", "batch", "labels")}
        print(recipe, json.dumps(results["heal"][recipe]), flush=True)
        _save(work, results)


def measure(args) -> None:
    from vit2trt.converter.measure.validate import validate

    work = Path(args.work)
    results = _results(work)
    folders = {"compressed": work / "compressed"} | {
        p.name.removeprefix("healed-"): p for p in sorted(work.glob("healed-*")) if (p / "model.onnx").is_file()}
    for name, folder in folders.items():
        if name in results.get("measure", {}) and not args.again:
            continue
        result = validate(folder, work / "held", work / "held.labels.txt", batch=32)
        accuracy = result["accuracy"]
        results.setdefault("measure", {})[name] = {
            "images": result["images"], "original_top1": accuracy["reference_top1"],
            "top1": accuracy["compressed_top1"], "drop_pt": round(100 * accuracy["top1_drop"], 2),
            "agreement": result["top1_agreement"], "surgery_error": result["surgery_error"]}
        print(name, json.dumps(results["measure"][name]), flush=True)
        _save(work, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("prepare", "heal", "measure"))
    parser.add_argument("--work", required=True)
    parser.add_argument("--real", default=str(REAL))
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--per-class", type=int, default=100, help="training photos per class (train/ has 100)")
    parser.add_argument("--method", default='{"method": "cait", "target_flops": 0.5}',
                        help="ConvertOptions as JSON")
    parser.add_argument("--recipes", default="features,logits")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--time-limit", type=float, default=300)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--again", action="store_true", help="measure: also the folders measured before")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    {"prepare": prepare, "heal": heal_all, "measure": measure}[args.stage](args)


if __name__ == "__main__":
    main()
