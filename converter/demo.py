"""`vit2trt demo`: every method on the bundled, really trained digits ViT, with real accuracy.

Exports the bundled model (models/digits.py, weights in models/digits_vit.safetensors), converts
it with toast, asvit, cait and tome at their defaults and with the settings that keep accuracy
(toast --target-flops 0.7 --compensate, alone and with ToMe r = 4), validates each against the
PyTorch reference on the fixed test split (accuracy with labels), times each against the
uncompressed model in ONNX Runtime
(paired rounds, converter/measure/speedup.py: a median ratio with its bootstrap interval, marked unstable
or beyond the FLOPs ratio where it is), and writes one table (demo.md, demo.json) and a plot (demo.png).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .artifact import MODEL_FILE, RECORD_FILE
from .measure.speedup import MAX_ROUNDS, Speedup, describe_method, format_speedup, measure_speedup
from ..errors import Vit2TrtError

BATCHES = (1, 8)
DEMO_TIME_CAP_S = 3.0   # per figure: twelve figures, so an unsteady machine costs the demo 36 s at most

# Row -> (method, settings). First each method as it runs by default (ToaSt, which compresses
# nothing by default - it strips what fine-tuning zeroed - with SCWP at half the head dims). Then
# the settings that keep accuracy on this model: a FLOPs budget allocated by measured sensitivity
# with closed-form compensation, fitted on the 64 training canvases, alone and with ToMe.
DEMO_METHODS = {
    "toast": ("toast", {"head_sparsity": 0.5}),
    "asvit": ("asvit", {}),
    "cait": ("cait", {}),
    "tome": ("tome", {}),
    "toast_keep": ("toast", {"target_flops": 0.7, "compensate": True}),
    "toast+tome_keep": ("toast+tome", {"target_flops": 0.7, "r": 4, "compensate": True}),
}
KEEPS_ACCURACY = ("toast_keep", "toast+tome_keep")
# The row healing wins back: `cait` distilled from the original on the training canvases (as PNG files,
# no labels), for a few passes of seconds each.
HEALED, HEALED_FROM = "cait_healed", "cait"
HEAL_SETTINGS = {"lr": 1e-3, "batch": 64}
VALIDATE_BATCH = 64   # the 450 test canvases in few runs; batch 1 is checked apart (batch_dependence)


def run_demo(out_dir: str | os.PathLike, repeats: int = 30, threads: int = 2, build: bool = True,
             overwrite: bool = False, progress: Callable[[str], None] = lambda msg: None,
             time_cap: float = DEMO_TIME_CAP_S, heal_epochs: int = 3) -> dict:
    """`repeats`: paired timing rounds at least per figure; `time_cap`: seconds of timing at most per figure;
    `heal_epochs`: passes over the training canvases for the healed row."""
    from .convert import ConvertOptions, convert
    from .deploy.export import export_model
    from .healing.heal import HealOptions, heal
    from .measure.validate import validate
    from ..models.digits import (ARCHITECTURE, CHECKPOINT, MODEL_ARGS, MODEL_NAME, compose, load_split,
                                 save_canvases, test_set)

    out_dir = Path(out_dir)
    if not CHECKPOINT.is_file():
        raise Vit2TrtError(f"the bundled checkpoint {CHECKPOINT} is missing; train it with "
                           "`python -m vit2trt.models.train_digits`.")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise Vit2TrtError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".vit2trt-demo-") as staging:
        work = Path(staging) / "out"
        work.mkdir()
        progress("exporting the bundled digits ViT")
        exported = export_model(f"timm:{MODEL_NAME}", work / "digits_vit.onnx", weights=str(CHECKPOINT),
                                model_args=MODEL_ARGS)
        images, labels = test_set()
        np.save(work / "test_images.npy", images)
        np.save(work / "test_labels.npy", labels)
        train_digits, _, _, _ = load_split()   # calibration from the training split, never the test one
        np.save(work / "calib.npy", compose(train_digits[:64], np.random.default_rng(2)))
        rows, variants = {}, {"uncompressed": exported.onnx_path}
        baseline = validate(_as_out(work, exported), work / "test_images.npy", work / "test_labels.npy",
                            batch=VALIDATE_BATCH)
        rows["uncompressed"] = {"gflops": None, "accuracy": baseline["accuracy"]["reference_top1"]}
        for row_name, (method, settings) in DEMO_METHODS.items():
            progress(f"converting: {row_name}")
            target = work / row_name
            fitted = method == "asvit" or settings.get("compensate") or "target_flops" in settings
            result = convert(exported.onnx_path, target, ConvertOptions(
                method=method, build=build, calib=str(work / "calib.npy") if fitted else None, **settings),
                progress=progress)
            progress(f"validating {row_name} on the test split")
            checked = validate(target, work / "test_images.npy", work / "test_labels.npy", batch=VALIDATE_BATCH,
                               progress=progress)
            flops = result.flops_after
            if method == "asvit":   # image-dependent: the calibration mean
                flops = int(result.flops_before * result.decisions["asvit"]["calibration"]["flops_fraction"])
            rows[row_name] = {"method": method, "gflops": flops / 1e9, "flops_ratio": result.flops_before / flops,
                              "accuracy": checked["accuracy"]["compressed_top1"],
                              "top1_agreement": checked["top1_agreement"], "surgery_error": checked["surgery_error"],
                              "engine": None if result.build is None else result.build.status,
                              "settings": settings or "defaults", "keeps_accuracy_setting": row_name in KEEPS_ACCURACY}
            rows["uncompressed"]["gflops"] = result.flops_before / 1e9
            variants[row_name] = result.onnx_path
        progress(f"healing: {HEALED}")
        save_canvases(work / "heal_images", compose(train_digits, np.random.default_rng(3)))
        section = heal(work / HEALED_FROM, HealOptions(work / "heal_images", epochs=heal_epochs, device="cpu",
                                                       out=work / HEALED, **HEAL_SETTINGS), progress=progress)
        shutil.rmtree(work / "heal_images")
        checked = validate(work / HEALED, work / "test_images.npy", work / "test_labels.npy", batch=VALIDATE_BATCH,
                           progress=progress)
        rows[HEALED] = dict(rows[HEALED_FROM], accuracy=checked["accuracy"]["compressed_top1"],
                            top1_agreement=checked["top1_agreement"], surgery_error=checked["surgery_error"],
                            keeps_accuracy_setting=False, heal={
                                "epochs": section["epochs"], "images": section["images"], "seconds": section["seconds"],
                                "labels": False, **HEAL_SETTINGS})
        variants[HEALED] = work / HEALED / MODEL_FILE
        progress("timing every variant against the uncompressed model")
        _time_variants(rows, variants, images, repeats, threads, time_cap, progress)
        for name in variants:
            rows[name]["accuracy_delta"] = rows[name]["accuracy"] - rows["uncompressed"]["accuracy"]
        summary = {"model": f"timm {MODEL_NAME} {ARCHITECTURE}", "checkpoint": CHECKPOINT.name,
                   "test_images": len(labels), "repeats": repeats, "max_rounds": repeats * MAX_ROUNDS,
                   "time_cap_s": time_cap, "threads": threads, "rows": rows}
        (work / "demo.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        (work / "demo.md").write_text(demo_markdown(summary))
        _plot(rows, work / "demo.png")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
    return summary


def _time_variants(rows: dict, variants: dict, images: np.ndarray, repeats: int, threads: int, time_cap: float,
                   progress: Callable[[str], None]) -> None:
    """rows[name]["speedup_b1"/"speedup_b8"]: each variant against the uncompressed model, paired."""
    from .runtime import ort_runner

    runners = {name: ort_runner(path, threads) for name, path in variants.items()}
    for b in BATCHES:
        rows["uncompressed"][f"speedup_b{b}"] = Speedup.reference().as_json()
        for name, run in runners.items():
            if name == "uncompressed":
                continue
            timing = measure_speedup(runners["uncompressed"], run, images[:b], repeats, time_cap=time_cap,
                                     flops_ratio=rows[name]["flops_ratio"], warmup=2,
                                     progress=lambda d, t: progress(f"timing {name}, batch {b}: round {d}/{t}"))
            rows[name][f"speedup_b{b}"] = timing.speedup.as_json()


def figure(row: dict, batch: int) -> Speedup:
    """A demo row's speedup at `batch`, as measured (with the row's FLOPs ratio for the flag)."""
    return Speedup.from_json(row[f"speedup_b{batch}"], row.get("flops_ratio", 1.0))


def _as_out(work: Path, exported) -> Path:
    """A folder that validate reads as an OUT: the uncompressed graph and its reference record."""
    folder = work / "uncompressed"
    folder.mkdir()
    shutil.copyfile(exported.onnx_path, folder / MODEL_FILE)
    shutil.copyfile(exported.record_path, folder / RECORD_FILE)
    return folder


def demo_markdown(summary: dict) -> str:
    lines = ["# vit2trt demo: every method on the bundled digits ViT", "",
             f"Model: {summary['model']}, weights `{summary['checkpoint']}` (trained here). "
             f"Accuracy on the {summary['test_images']} test canvases; speed in ONNX Runtime on CPU, "
             f"{summary['threads']} threads, "
             f"{describe_method(summary['repeats'], summary.get('time_cap_s', DEMO_TIME_CAP_S))}.", "",
             "| method | GFLOPs | FLOPs × | speedup b1 | speedup b8 | accuracy | Δ accuracy | engine |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in summary["rows"].items():
        ratio = f"{row['flops_ratio']:.2f}" if "flops_ratio" in row else "1.00"
        lines.append(f"| {name} | {row['gflops']:.4f} | {ratio} | {format_speedup(figure(row, 1))} | "
                     f"{format_speedup(figure(row, 8))} | {row['accuracy'] * 100:.1f}% | "
                     f"{row['accuracy_delta'] * 100:+.1f} | {row.get('engine') or '-'} |")
    healed = summary["rows"].get(HEALED, {}).get("heal")
    lines += ["", "Apart from the healed row, no model was trained after compression (the papers fine-tune); those "
              "accuracy deltas are training-free. The first four rows are each method at its defaults (ToaSt: SCWP at half the head "
              "dims). The `_keep` rows are the settings that keep accuracy: " + "; ".join(
                  f"`{name}` = {_settings_text(*DEMO_METHODS[name])}" for name in KEEPS_ACCURACY) +
              ". Their dims and channels are allocated by measured sensitivity and their weights refitted in closed "
              "form on 64 training canvases (`--target-flops 0.7 --compensate`), never on the test split. A "
              "speedup beyond the FLOPs ratio is flagged: removing work cannot make a model faster than the work "
              "removed, so such a figure is noise."]
    if healed:
        lines[-1] += (f" `{HEALED}` is the `{HEALED_FROM}` row healed: `vit2trt heal {HEALED_FROM} --images CANVASES "
                      f"--epochs {healed['epochs']:g} --lr {healed['lr']:g} --batch {healed['batch']}`, the original "
                      f"distilled into it on {healed['images']} training canvases without labels, in "
                      f"{healed['seconds']:.0f} s on the CPU (the same graph, new weights).")
    lines += ["",
              "![accuracy against speedup](demo.png)", ""]
    return "\n".join(lines)


def _settings_text(method: str, settings: dict) -> str:
    """The command line a row ran: `vit2trt convert --method toast --target-flops 0.7 --compensate`."""
    words = ["--method", method]
    for key, value in settings.items():
        words += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return "`" + " ".join(words) + "`"


def _plot(rows: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = demo_figure(rows)
    fig.savefig(path, format="png")
    plt.close(fig)


def demo_figure(rows: dict):
    """Accuracy against the batch-8 speedup, one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .planning.plot_labels import label_points

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    points, labels, bars = [], [], []
    for name, row in rows.items():
        s = figure(row, 8)
        # The bar is the interval; an unstable figure is drawn hollow and says so.
        ax.errorbar([s.speedup], [row["accuracy"] * 100], xerr=[[s.speedup - s.low], [s.high - s.speedup]],
                    fmt="o", markersize=7, capsize=3, mfc="none" if not s.stable else None)
        points.append((s.speedup, row["accuracy"] * 100))
        bars.append((s.low, row["accuracy"] * 100, s.high, row["accuracy"] * 100))
        labels.append(name + ("" if s.stable else " (unstable)") + (" (> FLOPs ratio)" if s.exceeds_flops else ""))
    ax.set_xlabel("speedup over the uncompressed model, ONNX Runtime CPU, batch 8 (95% interval)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("bundled digits ViT: accuracy against speed (healed row: trained after compression)", fontsize=10)
    ax.margins(x=0.15, y=0.15)   # room for the labels of the outermost points inside the axes
    ax.grid(alpha=0.3)
    fig.tight_layout()
    label_points(ax, points, labels, avoid=bars)   # after the layout: labels are placed in display pixels
    return fig
