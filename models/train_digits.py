"""Train the bundled digits ViT (models/digits.py) on CPU, reproducibly.

    python -m vit2trt.models.train_digits [--epochs 260] [--out models/digits_vit.safetensors]

Seeded throughout. Every epoch places the training digits at new random positions (the only
augmentation): centred for the first 5% of the epochs, then within a range around the centre that
grows to the whole canvas over the next 25% (a curriculum: from fully random positions this small
ViT sits at chance). Writes the weights as safetensors and, beside them, a JSON with the settings
and the test accuracy measured at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .digits import CHECKPOINT, MODEL_ARGS, MODEL_NAME, compose, load_split, test_set


def build(seed: int = 0) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(MODEL_NAME, pretrained=False, **MODEL_ARGS)


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch: int = 256) -> float:
    model.eval()
    with torch.no_grad():
        predicted = np.concatenate([model(torch.from_numpy(images[i:i + batch])).argmax(1).numpy()
                                    for i in range(0, len(images), batch)])
    return float(np.mean(predicted == labels))


def train(epochs: int, batch: int, lr: float, seed: int, threads: int, curriculum: float = 0.25, hold: float = 0.05,
          log=print) -> tuple[nn.Module, dict]:
    torch.set_num_threads(threads)
    train_digits, train_labels, _, _ = load_split()
    test_images, test_labels = test_set()
    model = build(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(train_digits) / batch)
    total, warmup = epochs * steps_per_epoch, 5 * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(step, total) / total)))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy(train_labels.astype(np.int64))
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        # Centred for the first `hold` of the epochs, then a range growing to the whole canvas.
        spread = min(1.0, max(0.0, epoch - hold * epochs) / max(1.0, curriculum * epochs))
        images = torch.from_numpy(compose(train_digits, rng, spread))
        order = torch.from_numpy(rng.permutation(len(images)))
        running = 0.0
        for i in range(0, len(order), batch):
            index = order[i:i + batch]
            loss = loss_fn(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item() * len(index)
        if epoch % 10 == 9 or epoch == epochs - 1:
            log(f"epoch {epoch + 1}/{epochs}: loss {running / len(order):.3f}, test accuracy "
                f"{accuracy(model, test_images, test_labels) * 100:.1f}%, {time.perf_counter() - start:.0f} s")
    info = {"model": MODEL_NAME, "args": MODEL_ARGS, "epochs": epochs, "batch": batch, "lr": lr, "seed": seed,
            "curriculum": curriculum, "hold": hold,
            "test_accuracy": accuracy(model, test_images, test_labels), "test_images": len(test_labels),
            "train_seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    return model.eval(), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=260)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hold", type=float, default=0.05, help="fraction of epochs with centred digits")
    parser.add_argument("--curriculum", type=float, default=0.25, help="fraction of epochs over which positions spread")
    parser.add_argument("--out", default=str(CHECKPOINT))
    args = parser.parse_args()
    model, info = train(args.epochs, args.batch, args.lr, args.seed, args.threads, args.curriculum, args.hold)
    from safetensors.torch import save_file

    out = Path(args.out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    out.with_suffix(".json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out} (test accuracy {info['test_accuracy'] * 100:.2f}%)")


if __name__ == "__main__":
    main()
