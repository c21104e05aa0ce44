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

- matrix: every variant of VARIANTS (or --variants), each compressed, timed against the original
  (ONNX Runtime, paired, batch 1 and 8), healed with and without train/'s labels (--time-limit each)
  and measured on the held-out val/ photos; plus the control, the original trained alike with labels,
  and --curve: extra heal times (seconds) for the 2x variant (cait-0.5), without labels.

    python benchmarks/heal_real.py --work /tmp/heal prepare --per-class 42
    python benchmarks/heal_real.py --work /tmp/heal matrix --time-limit 300 --curve 60,900
    python benchmarks/heal_real.py --work /tmp/heal plot --plot-out docs/heal_real.png

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


VARIANTS = {
    "tome-8": {"method": "tome", "r": 8},
    "tome-13": {"method": "tome", "r": 13},
    "toast-0.67": {"method": "toast", "target_flops": 0.67},
    "cait-0.67": {"method": "cait", "target_flops": 0.67, "stages": [6, 10]},
    "cait-0.5": {"method": "cait", "target_flops": 0.5},
    "cait-0.33": {"method": "cait", "target_flops": 0.33},
    "cait+tome-0.5": {"method": "cait+tome", "r": 8, "cait.target_flops": 0.5},
    "cait+tome-0.4": {"method": "cait+tome", "r": 8, "cait.target_flops": 0.4},
}


def _held_images(work: Path, config: dict):
    """The held-out val/ photos, preprocessed once for every model, and their labels."""
    import numpy as np

    from vit2trt.converter.measure.calibration import normalize, read_cropped

    cache = work / "held.npy"
    names = [line.split()[0] for line in (work / "held.labels.txt").read_text().splitlines() if line.strip()]
    labels = np.array([int(line.split()[1]) for line in (work / "held.labels.txt").read_text().splitlines()
                       if line.strip()])
    if not cache.is_file():
        np.save(cache, np.stack([read_cropped(work / "held" / n, (3, 224, 224), config) for n in names]))
    return np.load(cache, mmap_mode="r"), labels


def _top1(model_path: Path, images, labels, config: dict, batch: int = 64) -> float:
    import numpy as np

    from vit2trt.converter.measure.calibration import normalize
    from vit2trt.converter.runtime import ort_session

    session = ort_session(model_path, 2)
    name = session.get_inputs()[0].name
    hits = 0
    for i in range(0, len(images), batch):
        logits = session.run(None, {name: normalize(np.asarray(images[i:i + batch]), config)})[0]
        hits += int((logits.argmax(-1) == labels[i:i + batch]).sum())
    return hits / len(images)


def _speed(folder: Path, original: Path) -> dict:
    from vit2trt.converter.measure.bench import bench

    rows = bench(folder, original, batches=[1, 8], repeats=10, time_cap=20)["backends"]["ort"]
    return {f"b{r['batch']}": {"speedup": round(r["speedup"], 3), "low": round(r["speedup_low"], 3),
                               "high": round(r["speedup_high"], 3)}
            for r in rows if r["variant"] == "compressed"}


def matrix(args) -> None:
    import json as _json

    from vit2trt.converter.artifact import Artifact
    from vit2trt.converter.convert import ConvertOptions, convert
    from vit2trt.converter.healing.heal import HealOptions, heal
    from vit2trt.converter.measure.calibration import DEFAULT_PREPROCESSING

    work = Path(args.work)
    original = work / "vit_tiny_tin200.onnx"
    record = _json.loads((work / "vit_tiny_tin200.onnx.reference.json").read_text())
    config = dict(DEFAULT_PREPROCESSING, **(record.get("preprocessing") or {}))
    images, labels = _held_images(work, config)
    images, labels = images[:args.measure_images], labels[:args.measure_images]
    results = _results(work)
    table = results.setdefault("matrix", {})
    table["measured_images"] = len(labels)
    if "original" not in table:
        table["original"] = {"top1": _top1(original, images, labels, config)}
        _save(work, results)
    original_top1 = table["original"]["top1"]
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    runs = [(name, with_labels, args.time_limit) for name in names
            for with_labels in ((True,) if args.labels_only else (False, True))]
    runs += [("cait-0.5", False, float(t)) for t in (args.curve.split(",") if args.curve else [])]
    for name, with_labels, seconds in runs:
        folder = work / "matrix" / name
        row = table.setdefault(name, {"settings": VARIANTS[name]})
        if "compressed_top1" not in row:
            start = time.monotonic()
            convert(original, folder / "compressed", ConvertOptions(calib=str(work / "calib"), build=False,
                                                                      overwrite=True, **VARIANTS[name]))
            row["convert_seconds"] = round(time.monotonic() - start, 1)
            row["flops_ratio"] = round(Artifact.open(folder / "compressed").flops_ratio, 3)
            row["speed"] = _speed(folder / "compressed", original)
            row["compressed_top1"] = _top1(folder / "compressed" / "model.onnx", images, labels, config)
            row["compressed_drop_pt"] = round(100 * (row["compressed_top1"] - original_top1), 2)
            print(name, _json.dumps(row), flush=True)
            _save(work, results)
        budget = f"{args.epochs}ep-{args.limit or 'all'}" if args.epochs else f"{int(seconds)}s"
        key = f"{'labels' if with_labels else 'no-labels'}-{budget}{_recipe_suffix(args)}"
        if key in row.get("healed", {}):
            continue
        out = folder / key
        section = heal(folder / "compressed", HealOptions(
            work / "train", class_map=work / "train.class_map.json" if with_labels else None, time_limit=seconds,
            epochs=args.epochs, limit=args.limit, device=args.device, batch=args.batch, lr=args.lr, out=out,
            overwrite=True, seed=args.seed, recipe=args.recipe, label_weight=args.label_weight))
        top1 = _top1(out / "model.onnx", images, labels, config)
        row.setdefault("healed", {})[key] = {
            "top1": top1, "drop_pt": round(100 * (top1 - original_top1), 2), "seconds": section["seconds"],
            "steps": section["steps"], "epochs": section["epochs"], "images_per_second": section["images_per_second"],
            "holdout_before": section["holdout_before"], "holdout_after": section["holdout_after"]}
        print(name, key, _json.dumps(row["healed"][key]), flush=True)
        _save(work, results)
    if args.control and "control" not in table:
        table["control"] = _control(work, record, images, labels, config, args)
        table["control"]["drop_pt"] = round(100 * (table["control"]["top1"] - original_top1), 2)
        print("control", _json.dumps(table["control"]), flush=True)
        _save(work, results)


def _recipe_suffix(args) -> str:
    """Run keys name what differs from heal's defaults (the matrix's rows use them all)."""
    from vit2trt.converter.healing.distill import DEFAULT_RECIPE

    parts = [f"-{args.recipe}"] if args.recipe != DEFAULT_RECIPE else []
    parts += [f"-lr{args.lr:g}"] if args.lr != 1e-4 else []
    parts += [f"-ce{args.label_weight:g}"] if args.label_weight != 1.0 else []
    return "".join(parts)


def _control(work: Path, record: dict, images, labels, config: dict, args) -> dict:
    """The original trained with the heal's recipe, labels and budget: what training alone is worth."""
    import numpy as np
    import torch

    from vit2trt.converter.healing.data import read_heal_images
    from vit2trt.converter.healing.distill import TrainSettings, distill
    from vit2trt.models.reference import ReferenceRecord, build_model

    rec = ReferenceRecord.load(work / "vit_tiny_tin200.onnx.reference.json")
    teacher, student = build_model(rec).eval(), build_model(rec).eval()
    start = time.monotonic()
    data = read_heal_images(work / "train", (3, 224, 224), record.get("preprocessing"), None,
                            work / "train.class_map.json", 200, 0.1, args.seed, args.limit)
    settings = TrainSettings(epochs=args.epochs, batch=args.batch, lr=args.lr, seed=args.seed,
                             deadline=start + args.time_limit)
    result = distill(teacher, student, dict(student.named_parameters()), data, settings, torch.device("cpu"))
    # The final state, not the judge's best: the judge measures distance to the original, which the
    # original itself is at before training, so it would keep the untrained model.
    student = student.to("cpu").eval()
    with torch.no_grad():
        from vit2trt.converter.measure.calibration import normalize
        hits = 0
        for i in range(0, len(images), 64):
            x = torch.from_numpy(normalize(np.asarray(images[i:i + 64]), config))
            hits += int((student(x).argmax(-1).numpy() == labels[i:i + 64]).sum())
    return {"top1": hits / len(images), "seconds": round(time.monotonic() - start, 1), "steps": result.steps,
            "final_step": result.steps, "epochs": args.epochs, "limit": args.limit}


def table(args) -> None:
    """The matrix as a markdown table (docs/results.md)."""
    table = _results(Path(args.work)).get("matrix", {})
    original = table["original"]["top1"]
    print(f"original: {original:.2%} on {table.get('measured_images')} photos\n")
    print("| variant | FLOPs × | b1 speedup | b8 speedup | not healed | healed, no labels | healed, labels | heal steps × 32 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in table.items():
        if not isinstance(row, dict) or "compressed_top1" not in row:
            continue
        healed = row.get("healed", {})

        def cell(prefix: str) -> str:
            runs = [(k, v) for k, v in healed.items() if k.startswith(prefix + "-1ep")]
            return " / ".join(f"{v['drop_pt']:+.1f} pt" for _, v in runs) or "—"

        speed = row["speed"]
        steps = sorted({v["steps"] for v in healed.values()})
        print(f"| {name} | {row['flops_ratio']:.2f} | {speed['b1']['speedup']:.2f} [{speed['b1']['low']:.2f}–"
              f"{speed['b1']['high']:.2f}] | {speed['b8']['speedup']:.2f} [{speed['b8']['low']:.2f}–"
              f"{speed['b8']['high']:.2f}] | {row['compressed_drop_pt']:+.1f} pt | {cell('no-labels')} | "
              f"{cell('labels')} | {', '.join(map(str, steps))} |")
    if "control" in table:
        print(f"\ncontrol (the original trained alike, labels): {table['control']['drop_pt']:+.1f} pt")


def plot(args) -> None:
    """The matrix and the heal-time curve as one figure (docs/results.md shows it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = _results(Path(args.work)).get("matrix", {})
    original = table["original"]["top1"]
    rows = {name: row for name, row in table.items() if isinstance(row, dict) and "compressed_top1" in row}
    fig, (curve, matrix_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    # Left: the 2x variant healed for longer and longer (timed runs, no labels), and the labelled runs.
    timed = {k: v for k, v in rows.get("cait-0.5", {}).get("healed", {}).items() if k.endswith("s")}
    for labels, marker in (("no-labels", "o-"), ("labels", "s")):
        points = sorted((int(k.rsplit("-", 1)[1][:-1]) / 60, v["drop_pt"]) for k, v in timed.items()
                        if k.startswith(labels + "-"))
        if points:
            curve.plot(*zip(*points), marker, label=f"healed, {labels.replace('-', ' ')}")
    if "cait-0.5" in rows:
        curve.axhline(rows["cait-0.5"]["compressed_drop_pt"], color="grey", ls=":", label="not healed")
    curve.axhline(0, color="black", lw=0.8)
    curve.set(xscale="log", xlabel="heal time limit (minutes, 2 CPU cores)", ylabel="top-1 change vs original (pt)",
              title="CAIT at half the FLOPs, healed longer")
    curve.legend(fontsize=8)
    # Right: every variant before and after one short heal (the fixed image-step budget).
    rows = {name: row for name, row in rows.items() if any("-1ep" in k for k in row.get("healed", {}))}
    for key, label, marker in ((None, "not healed", "x"), ("no-labels", "healed, no labels", "o"),
                               ("labels", "healed, labels", "s")):
        points = []
        for name, row in rows.items():
            if key is None:
                points.append((row["flops_ratio"], row["compressed_drop_pt"]))
            else:
                runs = [v["drop_pt"] for k, v in row.get("healed", {}).items() if k.startswith(key + "-1ep")]
                points += [(row["flops_ratio"], runs[0])] if runs else []
        if points:
            matrix_ax.scatter(*zip(*points), marker=marker, label=label)
    for name, row in rows.items():
        matrix_ax.annotate(name, (row["flops_ratio"], row["compressed_drop_pt"]), fontsize=7,
                           textcoords="offset points", xytext=(4, -8))
    matrix_ax.axhline(0, color="black", lw=0.8)
    matrix_ax.set(xlabel="FLOPs × fewer", ylabel="top-1 change vs original (pt)",
                  title=f"Every variant, one short heal (original {original:.1%})")
    matrix_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot_out, dpi=110)
    print(f"wrote {args.plot_out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("prepare", "heal", "measure", "matrix", "table", "plot"))
    parser.add_argument("--work", required=True)
    parser.add_argument("--real", default=str(REAL))
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--per-class", type=int, default=100, help="training photos per class (train/ has 100)")
    parser.add_argument("--method", default='{"method": "cait", "target_flops": 0.5}',
                        help="ConvertOptions as JSON")
    parser.add_argument("--recipes", default="features,logits")
    parser.add_argument("--recipe", default="features", help="matrix: heal's recipe (logits, features, blocks)")
    parser.add_argument("--labels-only", action="store_true", help="matrix: heal with labels only")
    parser.add_argument("--label-weight", type=float, default=1.0, help="matrix: the cross-entropy's weight")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--time-limit", type=float, default=300)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--variants", default=None, help="matrix: names of VARIANTS, comma-separated (default all)")
    parser.add_argument("--curve", default="", help="matrix: extra heal times in seconds for cait-0.5, no labels")
    parser.add_argument("--control", action="store_true", help="matrix: also train the original alike (labels)")
    parser.add_argument("--limit", type=int, default=None, help="matrix: heal on only this many train photos")
    parser.add_argument("--measure-images", type=int, default=2000, help="matrix: held-out photos measured")
    parser.add_argument("--again", action="store_true", help="measure: also the folders measured before")
    parser.add_argument("--plot-out", default="heal_real.png", help="plot: the figure's path")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    {"prepare": prepare, "heal": heal_all, "measure": measure, "matrix": matrix, "table": table,
     "plot": plot}[args.stage](args)


if __name__ == "__main__":
    main()
