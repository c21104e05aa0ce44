"""Speed at matched accuracy, on the bundled digits ViT (the one really trained model in this workplace).

No pretrained DeiT exists here, so "at matched accuracy" can only be measured on a model we
trained ourselves: timm vit_tiny_patch16_224 shape, dim 64, depth 5, 65 tokens, 94.0% on the fixed
450-image test split (models/digits.py).

1. Training-free: every method swept over its setting; kept is the most compressed setting whose
   test accuracy is within --tolerance of the uncompressed model.
2. Fine-tuned, as the papers do before they report accuracy (short, on CPU, from the bundled
   weights, on the training split only):
   - CAIT (CDCP 0.25 with ATME at three stage choices) and ToaSt (SCWP head sparsity 0.5, 0.25):
     the channels vit2trt's training-free criterion removes are zeroed and held at zero while the
     model trains (ATME in CAIT's forward); then vit2trt converts the exported checkpoint,
     stripping the zeroed channels physically (ToaSt's main path; CAIT with --channel-ratio 0).
   - AS-ViT at 0.65 of the FLOPs: backbone and thresholds trained together with soft keep masks
     and the budget loss (models/asvit_tuning.py's relaxation), then the hard budget met exactly on
     the calibration images, and converted with the learned thresholds.
   ToMe is training-free in its paper, so it is only swept.
3. All kept variants timed against the uncompressed model in ONNX Runtime in back-to-back pairs
   (converter/measure/speedup.py: median ratio with its 95% interval, unstable or beyond the FLOPs ratio
   marked), batches 1, 8 and 64. At batch 1 this 19-MFLOP model is overhead-bound.

    python benchmarks/matched_accuracy.py [--tolerance 0.005] [--epochs 30] [--repeats 30]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from vit2trt.converter.convert import ConvertOptions, convert
from vit2trt.passes.methods.asvit import asvit_flops_model
from vit2trt.converter.deploy.export import export_model
from vit2trt.converter.graph import read_vit
from vit2trt.models.asvit_tuning import BUDGET_WEIGHT, SoftASViT, _meet_budget
from vit2trt.models.cait_reference import CAITViT
from vit2trt.models.digits import CHECKPOINT, MODEL_ARGS, MODEL_NAME, compose, load_split, test_set
from vit2trt.models.reference import ReferenceRecord, build_model
from vit2trt.converter.measure.speedup import format_speedup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import paired_speedups  # noqa: E402

SWEEPS = {
    "tome": [{"tome_r": r} for r in (1, 2, 3, 4, 6, 8, 10, 13)],
    "asvit": [{"target_flops": f} for f in (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65)],
    "cait": [{"stages": s, "channel_ratio": c} for s in ([4], [3], [2], [1, 3]) for c in (0.0, 0.125, 0.25)],
    "toast": [{"head_sparsity": h} for h in (0.125, 0.25, 0.5)],
}
# Fine-tuned with the pruned channels held at zero, then stripped (AS-ViT is fine-tuned separately).
FINE_TUNED = [("cait", {"stages": [1, 3], "channel_ratio": 0.25}), ("cait", {"stages": [2], "channel_ratio": 0.25}),
              ("cait", {"stages": [3], "channel_ratio": 0.25}), ("toast", {"head_sparsity": 0.5}),
              ("toast", {"head_sparsity": 0.25})]


def onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: images[i:i + 64]})[0] for i in range(0, len(images), 64)])
    return float(np.mean(logits.argmax(1) == labels))


def train_loop(model: nn.Module, forward, epochs: int, lr: float, seed: int, after_step=lambda: None,
               extra_loss=None, log=print) -> None:
    """Fine-tune `model` through `forward(images) -> logits[, aux]` on the training split at random
    positions (as the bundled model was trained), AdamW with a cosine schedule."""
    digits, labels, _, _ = load_split()
    labels = torch.from_numpy(labels.astype(np.int64))
    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(digits) / 64)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
    start = time.perf_counter()
    for epoch in range(epochs):
        images = torch.from_numpy(compose(digits, rng, 1.0))
        order = torch.from_numpy(rng.permutation(len(images)))
        for i in range(0, len(order), 64):
            index = order[i:i + 64]
            out = forward(images[index])
            logits, aux = out if isinstance(out, tuple) else (out, None)
            loss = F.cross_entropy(logits, labels[index], label_smoothing=0.1)
            if extra_loss is not None:
                loss = loss + extra_loss(aux)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            after_step()
        if epoch % 10 == 9 or epoch == epochs - 1:
            log(f"  epoch {epoch + 1}/{epochs}, {time.perf_counter() - start:.0f} s")


def zero_cdcp_channels(model: nn.Module, blocks: list[dict]) -> callable:
    """Zero the channels CDCP removes (Q/K rows together; V rows with the projection's columns) and
    return a function that zeroes them again (after every optimizer step)."""
    masks = []
    for block, decision in zip(model.blocks, blocks):
        heads, width = block.attn.num_heads, block.attn.head_dim
        dim = heads * width
        qk = torch.ones(dim, dtype=torch.bool)
        v = torch.ones(dim, dtype=torch.bool)
        for h in range(heads):
            qk[h * width:(h + 1) * width] = False
            qk[[h * width + d for d in decision["qk_keep"][h]]] = True
            v[h * width:(h + 1) * width] = False
            v[[h * width + d for d in decision["v_keep"][h]]] = True
        rows = torch.cat([qk, qk, v]).float()
        masks.append((block.attn.qkv, rows, block.attn.proj, v.float()))

    def apply() -> None:
        with torch.no_grad():
            for qkv, rows, proj, v in masks:
                qkv.weight.mul_(rows[:, None])
                if qkv.bias is not None:
                    qkv.bias.mul_(rows)
                proj.weight.mul_(v[None, :])
    apply()
    return apply


def save_and_export(model: nn.Module, folder: Path, name: str):
    from safetensors.torch import save_file

    weights = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return export_model(f"timm:{MODEL_NAME}", folder / f"{name}.onnx", weights=str(weights), model_args=MODEL_ARGS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tolerance", type=float, default=0.005, help="accuracy drop allowed (0.005 = half a point)")
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = test_set()
    train_digits, _, _, _ = load_split()
    calib = compose(train_digits[:64], np.random.default_rng(2))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "calib.npy", calib)
        original = export_model(f"timm:{MODEL_NAME}", tmp / "original.onnx", weights=str(CHECKPOINT),
                                model_args=MODEL_ARGS)
        base_flops = read_vit(original.onnx_path).flops.total
        base_accuracy = onnx_accuracy(original.onnx_path, images, labels)
        print(f"uncompressed: {base_flops / 1e6:.1f} MFLOPs, test accuracy {base_accuracy * 100:.1f}% "
              f"({len(labels)} images); tolerance {args.tolerance * 100:.1f} points")

        def run(method: str, settings: dict, source=original.onnx_path, tag: str = "") -> dict:
            out = tmp / f"{method}{tag}_{len(list(tmp.iterdir()))}"
            calib_file = str(tmp / "calib.npy") if method == "asvit" else None
            result = convert(source, out, ConvertOptions(method=method, build=False, calib=calib_file, **settings))
            flops = result.flops_after
            calibration = result.decisions.get("asvit", {}).get("calibration")
            if calibration:   # AS-ViT's FLOPs depend on the image: the calibration mean
                flops = int(result.flops_before * calibration["flops_fraction"])
            return {"path": result.onnx_path, "flops_ratio": base_flops / flops,
                    "accuracy": onnx_accuracy(result.onnx_path, images, labels), "settings": settings}

        chosen = {}
        print("\n1. training-free sweeps (test accuracy, FLOPs ratio)")
        for method, sweep in SWEEPS.items():
            best = None
            for settings in sweep:
                row = run(method, dict(settings))
                ok = row["accuracy"] >= base_accuracy - args.tolerance - 1e-9
                print(f"  {method:6s} {str(settings):45s} {row['accuracy'] * 100:5.1f}%  {row['flops_ratio']:.2f}x"
                      f"{'  within' if ok else ''}")
                if ok and (best is None or row["flops_ratio"] > best["flops_ratio"]):
                    best = row
            if best is not None:
                chosen[f"{method} training-free {best['settings']}"] = best
            else:
                print(f"  {method}: no setting within tolerance")

        print(f"\n2. fine-tuned ({args.epochs} epochs each, training split only)")
        record = ReferenceRecord.load(original.record_path)
        # CAIT and ToaSt: the pruned channels zeroed and held at zero while training (ATME in CAIT's
        # forward), then vit2trt strips the zeroed channels of the exported checkpoint.
        for method, settings in FINE_TUNED:
            decisions = decisions_of(run(method, dict(settings))["path"])
            model = build_model(record)
            restore_zeros = zero_cdcp_channels(model, decisions["blocks"])
            forward = model
            strip = {}
            if method == "cait":
                atme = decisions["atme"]
                forward = CAITViT(model, atme["stages"], atme["axes"])
                strip = {"channel_ratio": 0.0, "stages": atme["stages"]}
            model.train()
            t0 = time.perf_counter()
            train_loop(model, forward, args.epochs, args.lr, args.seed, after_step=restore_zeros)
            tuned = save_and_export(model.eval(), tmp, f"{method}_finetuned_{len(chosen)}")
            row = run(method, strip, source=tuned.onnx_path, tag="_ft")
            row["settings"] = dict(settings, fine_tuned_epochs=args.epochs)
            chosen[f"{method} fine-tuned {settings}"] = row
            print(f"  {method} {settings} fine-tuned in {time.perf_counter() - t0:.0f} s: {row['accuracy'] * 100:.1f}% "
                  f"at {row['flops_ratio']:.2f}x fewer FLOPs")

        # AS-ViT: backbone and thresholds together under the budget (soft masks), then the hard budget.
        start = run("asvit", {"target_flops": 0.65})
        start_thresholds = decisions_of(start["path"])["asvit"]["thresholds"]
        stages = decisions_of(start["path"])["asvit"]["stages"]
        vit = read_vit(original.onnx_path)
        block_flops, fixed = asvit_flops_model(vit)
        model = build_model(record)
        soft = SoftASViT(model, stages, start_thresholds, block_flops, fixed)
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        teacher = build_model(record).eval()

        def asvit_forward(x):
            logits, fraction = soft(x)
            with torch.no_grad():
                target = teacher(x)
            return logits, (logits, target, fraction)

        def asvit_loss(aux):
            logits, target, fraction = aux
            distill = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True,
                               reduction="batchmean")
            return distill + BUDGET_WEIGHT * (fraction.mean() - 0.65) ** 2

        t0 = time.perf_counter()
        train_loop(soft, asvit_forward, args.epochs, args.lr, args.seed, extra_loss=asvit_loss)
        print(f"  AS-ViT fine-tuned in {time.perf_counter() - t0:.0f} s")
        model.eval()
        learned = [float(t) for t in soft.thresholds().detach()]
        calib_t = torch.from_numpy(calib)
        with torch.no_grad():
            top1 = model(calib_t).argmax(-1)
        thresholds, (fraction, _) = _meet_budget(model, calib_t, stages, learned, block_flops, fixed, top1, 0.65, 12)
        tuned = save_and_export(model, tmp, "asvit_finetuned")
        row = run("asvit", {"asvit_thresholds": thresholds, "stages": stages}, source=tuned.onnx_path, tag="_ft")
        row["flops_ratio"] = 1 / fraction   # the calibration-image mean, as for calibrated thresholds
        row["settings"] = {"target_flops": 0.65, "fine_tuned_epochs": args.epochs}
        chosen[f"asvit fine-tuned {row['settings']}"] = row
        print(f"  asvit fine-tuned: {row['accuracy'] * 100:.1f}% at {row['flops_ratio']:.2f}x fewer FLOPs "
              "(calibration-image mean)")

        print(f"\n3. speed, ONNX Runtime {ort.__version__} CPU, {args.threads} threads, median of at least "
              f"{args.repeats} paired ratios [95% interval] (test images)")
        batches = [1, 8, 64]
        paths = {"uncompressed": original.onnx_path, **{name: row["path"] for name, row in chosen.items()}}
        timings = paired_speedups(paths, batches, args.repeats, args.threads, inputs=images[:64])
        print(f"| variant | accuracy | Δ | matched | FLOPs × | {' | '.join(f'speedup b{b}' for b in batches)} |")
        print("|---|---|---|---|---|" + "---|" * len(batches))
        print(f"| uncompressed | {base_accuracy * 100:.1f}% | — | | 1.00 | " + " | ".join("1.00×" for _ in batches)
              + " |")
        for name, row in chosen.items():
            speed = [timings[(name, b)].speedup.with_flops(row["flops_ratio"]) for b in batches]
            matched = "yes" if row["accuracy"] >= base_accuracy - args.tolerance - 1e-9 else "no"
            print(f"| {name} | {row['accuracy'] * 100:.1f}% | {(row['accuracy'] - base_accuracy) * 100:+.1f} | "
                  f"{matched} | {row['flops_ratio']:.2f} | " + " | ".join(format_speedup(s) for s in speed) + " |")


def decisions_of(onnx_path) -> dict:
    return json.loads((Path(onnx_path).parent / "decisions.json").read_text())


if __name__ == "__main__":
    main()
