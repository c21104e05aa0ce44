"""`vit2trt plan` on the real pretrained ViT-Ti in ../shared/real: the planner's pick and the best
single method, side by side in one run, on photos the planner never saw.

The planner fits on the first 512 photos of real/val (sorted file order) and judges every candidate
on the next 2000 (`--val`); with `--heal` (default: real/train with its class map) it heals the
candidates near the goal. The pick and the best single-method candidate the planner found for the
same goal are then measured on the remaining photos, which the planner never saw: top-1 against the
bound the planner stated, and ONNX Runtime CPU speedups at batch 1 and 8 against the original from
back-to-back pairs in alternating order (converter/measure/speedup.py: median of the per-round
ratios with its 95% bootstrap interval, marked unstable or beyond the FLOPs ratio where it is).

    python benchmarks/plan_real.py [--out plan-real] [--goals max-drop=0.01,target-speedup=2.0]
                                   [--time-limit 3600] [--heal-time 900] [--heal-lr LR] [--no-heal] [--val-count 2000]
                                   [--arrays X.npy Y.npy]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from vit2trt.converter.runtime import ort_runner
from vit2trt.converter.measure.speedup import Speedup, format_speedup, measure_speedup
from vit2trt.converter.measure.calibration import load_calibration
from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.converter.deploy.export import export_model
from vit2trt.converter.graph import read_vit
from vit2trt.converter.planning.planner import PlanOptions, _choose, families, plan

from real_accuracy import SHARED_REAL, labelled_photos, top1

CALIB = 512
SINGLE = ("tome", "cait", "toast", "asvit")


def speeds(paths: dict[str, Path], x: np.ndarray, repeats: int, threads: int, flops_x: dict[str, float]) -> dict:
    """Every variant against the original at batch 1 and 8: Speedup.as_json per "name bB"."""
    runners = {name: ort_runner(path, threads) for name, path in paths.items()}
    out = {}
    for name in paths:
        if name == "original":
            continue
        for b in (1, 8):
            timing = measure_speedup(runners["original"], runners[name], x[:b], repeats,
                                     flops_ratio=flops_x.get(name), warmup=2)
            out[f"{name} b{b}"] = timing.speedup.as_json()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=str(SHARED_REAL))
    parser.add_argument("--out", default="plan-real")
    parser.add_argument("--goals", default="max-drop=0.01,target-speedup=2.0")
    parser.add_argument("--time-limit", type=float, default=3600)
    parser.add_argument("--val-count", type=int, default=2000, help="photos after the calibration ones that judge")
    parser.add_argument("--no-heal", action="store_true", help="plan without healing")
    parser.add_argument("--heal-time", type=float, default=900, help="seconds of healing per candidate")
    parser.add_argument("--heal-limit", type=int, default=None, help="train photos read at most")
    parser.add_argument("--heal-lr", type=float, default=None,
                        help="healing learning rate (default: plan's, by each candidate's distance from the original)")
    parser.add_argument("--methods", default=None, help="families to search, comma-separated (default: plan's)")
    parser.add_argument("--batch", type=int, default=1, help="batch the planner times at")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arrays", nargs=2, default=None,
                        help="preprocessed photos and labels (.npy, sorted file order) instead of reading real/val")
    args = parser.parse_args()
    shared, out = Path(args.shared), Path(args.out)
    if not (shared / "vit_tiny_tin200.safetensors").is_file():
        raise SystemExit(f"{shared} holds no real ViT-Ti (see shared/real/README.md).")
    out.mkdir(parents=True, exist_ok=True)
    report = {"goals": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exported = export_model("timm:vit_tiny_patch16_224", tmp / "vit_tiny.onnx",
                                weights=str(shared / "vit_tiny_tin200.safetensors"), model_args={"num_classes": 200})
        if args.arrays:
            x, labels = np.load(args.arrays[0]), np.load(args.arrays[1])
        else:
            preprocessing = json.loads(exported.record_path.read_text())["preprocessing"]
            _, labels = labelled_photos(shared)
            x = load_calibration(shared / "val", (3, 224, 224), preprocessing)
        np.save(tmp / "calib.npy", x[:CALIB])
        np.save(tmp / "calib_labels.npy", labels[:CALIB].astype(np.int64))
        judged = slice(CALIB, CALIB + args.val_count)
        np.save(tmp / "val.npy", x[judged])
        np.save(tmp / "val_labels.npy", labels[judged].astype(np.int64))
        held_x, held_y = x[CALIB + args.val_count:], labels[CALIB + args.val_count:]
        healing = {} if args.no_heal else {
            "heal": str(shared / "train"), "heal_class_map": str(shared / "train.class_map.json"),
            "heal_time": args.heal_time, "heal_limit": args.heal_limit, "heal_lr": args.heal_lr}
        original_top1 = top1(exported.onnx_path, held_x, held_y)
        print(f"original: top-1 {original_top1 * 100:.2f}% on {len(held_y)} held-out photos", flush=True)
        report["original_top1"] = original_top1
        for goal in args.goals.split(","):
            key, value = goal.split("=")
            settings = {"max_drop": float(value)} if key == "max-drop" else {"target_speedup": float(value)}
            began = time.monotonic()
            result = plan(exported.onnx_path, PlanOptions(
                calib=str(tmp / "calib.npy"), labels=str(tmp / "calib_labels.npy"), out_dir=str(out / f"plan_{key}"),
                val=str(tmp / "val.npy"), val_labels=str(tmp / "val_labels.npy"), batch=args.batch,
                time_limit=args.time_limit, build=False, overwrite=True, threads=args.threads,
                methods=args.methods and args.methods.split(","), **healing, **settings),
                progress=lambda m: None if "healing (" in m or m.startswith("reading") else print(m, flush=True))
            plan_s = time.monotonic() - began
            opts = PlanOptions(calib="", out_dir="", **settings)
            single = _choose([c for c in result.candidates if c.family in SINGLE], opts)
            entry = {"goal": goal, "plan_s": plan_s, "stopped": result.stopped, "notes": result.notes,
                     "pick": result.chosen.label if result.chosen else None,
                     "pick_stated": None if result.chosen is None else {
                         "drop_pt": result.chosen.drop * 100, "bound_pt": result.chosen.drop_bound * 100,
                         "before_heal_pt": None if result.chosen.drop_before_heal is None
                         else result.chosen.drop_before_heal * 100},
                     "single": single.label if single else None, "candidates": len(result.candidates)}
            paths = {"original": exported.onnx_path}
            if result.chosen:
                paths["pick"] = out / f"plan_{key}" / "model.onnx"
            if single and result.chosen and single is not result.chosen:
                if single.healed_from is None:
                    family = next(f for f in families(read_vit(exported.onnx_path), True, healing=bool(healing))
                                  if f.name == single.family)
                    single_out = convert(exported.onnx_path, tmp / f"single_{key}", ConvertOptions(
                        method=family.method, build=False, calib=str(tmp / "calib.npy"), fit_limit=CALIB,
                        **single.settings))
                    paths["single"] = single_out.onnx_path
                else:   # a healed single would need its heal again: the table reports the pick alone
                    single = None
                    entry["single"] = None
            elif single:
                paths["single"] = paths.get("pick")
            for name, path in paths.items():
                if name != "original":
                    entry[f"{name}_top1"] = top1(path, held_x, held_y)
                    entry[f"{name}_drop_pt"] = (original_top1 - entry[f"{name}_top1"]) * 100
            entry["flops_x"] = {c.label: c.flops_ratio for c in result.candidates if c.label in (entry["pick"],
                                                                                               entry["single"])}
            entry["speed"] = speeds({k: v for k, v in paths.items() if k == "original" or v != paths["original"]},
                                    held_x, args.repeats, args.threads,
                                    {name: entry["flops_x"].get(entry[name]) for name in ("pick", "single")})
            print(json.dumps(entry, indent=1), flush=True)
            report["goals"].append(entry)
    (out / "plan_real.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["# vit2trt plan on the real ViT-Ti", "",
             f"Planner: fits on the first {CALIB} photos of real/val, judges on the next {args.val_count} (--val)"
             f"{'' if args.no_heal else ', heals on real/train with labels'}; measured on the other "
             f"{len(held_y)}. Original top-1 {original_top1 * 100:.2f}%.", "",
             "| goal | | candidate | FLOPs × | top-1 | drop pt (unseen) | stated: drop, 95% bound | "
             "b1 speedup [95% interval] | b8 speedup [95% interval] | plan min |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in report["goals"]:
        for name in ("pick", "single"):
            if e.get(name) is None:
                continue
            b1, b8 = e["speed"].get(f"{name} b1"), e["speed"].get(f"{name} b8")
            flops_x = e["flops_x"].get(e[name])
            fmt = lambda s: format_speedup(Speedup.from_json(s, flops_x)) if s else "same as pick"  # noqa: E731
            stated = e.get("pick_stated") if name == "pick" else None
            said = f"{stated['drop_pt']:+.2f}, ≤ {stated['bound_pt']:.2f}" if stated else ""
            lines.append(f"| {e['goal']} | {name} | {e[name]} | {e['flops_x'].get(e[name], 0):.2f} | "
                         f"{e[name + '_top1'] * 100:.2f}% | {e[name + '_drop_pt']:+.2f} | {said} | {fmt(b1)} | "
                         f"{fmt(b8)} | {e['plan_s'] / 60:.0f} |")
    (out / "plan_real.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
