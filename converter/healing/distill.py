"""Distillation of the original (teacher, frozen) into the compressed model (student), judged on held-out
images: the training loop of `vit2trt heal`.

Recipes (docs/methods/heal.md has the evidence for the default):
- "logits": KL divergence of the student's class distribution from the teacher's;
- "features": that, plus the mean squared error of the pooled feature the classifier reads (the
  class token or the token mean after the final norm), relative to the teacher's feature variance;
- "blocks": that, plus every block's output while the student still has the teacher's tokens (all
  blocks for structured pruning, the blocks before the first merge for token reduction).
With labels, the cross-entropy of the student's logits is added.

The judge runs on the held-out images, unaugmented, and the best state by it is kept: the KL divergence,
plus the weighted cross-entropy with labels. With labels the training pulls towards them as well as
towards the teacher, so a judge of the KL alone can reject every step of a run that does what it was
asked (seen on candidates already close to the original: the start was kept).
Under torchrun every process takes its share of each batch and of the judged images (parallel.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import Augment, HealImages
from .parallel import Parallel
from .weights import base_model, head_module

RECIPES = ("logits", "features", "blocks")
JUDGE_IMAGES = 1024        # held-out images the judge runs on (a seeded draw when the hold-out has more)
JUDGEMENTS = 10            # times the judge runs while training, at most
DEFAULT_RECIPE = "features"


@dataclass
class TrainSettings:
    recipe: str = DEFAULT_RECIPE
    epochs: Optional[int] = None     # None: as many steps as fit in the time limit
    batch: int = 64
    lr: float = 1e-4
    seed: int = 0
    deadline: float = math.inf       # time.monotonic() by which training must have stopped
    block_outputs: bool = True       # False: the student's tokens never correspond (per-image dropping)
    label_weight: float = 1.0        # the cross-entropy's weight against the distillation terms, with labels


@dataclass
class Judgement:
    step: int
    kl: float                        # held-out KL(teacher || student), nats per image
    agreement: float                 # held-out top-1 agreement with the teacher
    top1: Optional[float] = None     # held-out top-1 accuracy, with labels
    train_loss: Optional[float] = None
    ce: Optional[float] = None       # held-out cross-entropy, with labels
    score: Optional[float] = None    # what the best state is chosen by: kl, plus label_weight * ce with labels


@dataclass
class DistillResult:
    best_state: dict[str, torch.Tensor]
    before: Judgement
    best: Judgement
    curve: list[Judgement] = field(default_factory=list)
    steps: int = 0
    planned_steps: int = 0
    images_seen: int = 0
    seconds: float = 0.0
    stopped_by: str = "schedule"     # "schedule", "time limit" or "interrupt"


class _Taps:
    """The pooled feature (the classifier's input) and block outputs of one model, by forward hooks."""

    def __init__(self, model: nn.Module, blocks: bool):
        self.features: list[torch.Tensor] = []
        self.blocks: list[torch.Tensor] = []
        base = base_model(model)
        self.handles = [head_module(model).register_forward_pre_hook(self._head)]
        if blocks:
            layers = base.model.vit.layers if hasattr(base, "model") and hasattr(base.model, "vit") else base.blocks
            self.handles += [layer.register_forward_hook(self._block) for layer in layers]

    def _head(self, module, inputs) -> None:
        # A model that runs image by image (AS-ViT's per-image reference) calls its head once per image.
        self.features.append(inputs[0])

    @property
    def feature(self) -> Optional[torch.Tensor]:
        """The classifier's input for the whole batch of the last forward pass."""
        if not self.features:
            return None
        return self.features[0] if len(self.features) == 1 else torch.cat(self.features)

    def _block(self, module, inputs, output) -> None:
        self.blocks.append(output[0] if isinstance(output, tuple) else output)

    def reset(self) -> None:
        self.features, self.blocks = [], []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def kl_per_image(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                    log_target=True, reduction="none").sum(-1)


def distill(teacher: nn.Module, student: nn.Module, trainable: dict[str, nn.Parameter], data: HealImages,
            settings: TrainSettings, device: torch.device,
            progress: Callable[[str], None] = lambda msg: None, parallel: Parallel = Parallel()) -> DistillResult:
    """Train `trainable` (named parameters of `student`) to mimic `teacher` on data.train; judge on
    data.holdout. Ctrl-C and the deadline end training early; the best state is returned either way."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    teacher, student = teacher.to(device).eval(), student.to(device).eval()   # eval: no dropout anywhere
    for p in teacher.parameters():
        p.requires_grad_(False)
    chosen = {id(p) for p in trainable.values()}
    for p in student.parameters():
        p.requires_grad_(id(p) in chosen)
    augment = Augment(data.config, device, generator)
    use_blocks = settings.recipe == "blocks" and settings.block_outputs
    t_taps, s_taps = _Taps(teacher, use_blocks), _Taps(student, use_blocks)
    labels = None if data.labels is None else torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
    try:
        with parallel.interrupts_as_flag():
            return _train(teacher, student, trainable, data, settings, device, augment, generator, t_taps, s_taps,
                          labels, progress, parallel)
    finally:
        t_taps.remove()
        s_taps.remove()


def _train(teacher, student, trainable, data, settings, device, augment, generator, t_taps, s_taps, labels,
           progress, parallel: Parallel) -> DistillResult:
    start = time.monotonic()
    judged = data.holdout   # judging costs a forward pass per image: at most JUDGE_IMAGES, drawn once
    if len(judged) > JUDGE_IMAGES:
        judged = np.sort(np.random.default_rng(settings.seed).choice(judged, JUDGE_IMAGES, replace=False))
    n_judged = len(judged)
    judged = judged[parallel.share(n_judged)]   # this process's share; the judge adds up every share
    held = data.images[judged]
    held_labels = None if labels is None else labels[judged]
    with torch.no_grad():   # the teacher's held-out outputs, and the scales of its feature and block outputs
        t_held, moments = [], {}
        for i in range(0, len(held), settings.batch):
            t_taps.reset()
            t_held.append(teacher(augment.plain(held[i:i + settings.batch])))
            for key, out in [("feature", t_taps.feature)] + list(enumerate(t_taps.blocks)):
                flat = out.reshape(-1, out.shape[-1]).double()
                m = moments.setdefault(key, [0.0, 0.0, 0])
                m[0], m[1], m[2] = m[0] + flat.sum(0), m[1] + (flat * flat).sum(0), m[2] + len(flat)
        t_held = torch.cat(t_held) if t_held else torch.empty(0)
    scales = {key: _variance(parallel, *m) for key, m in sorted(moments.items(), key=lambda kv: str(kv[0]))}
    feature_scale = scales.pop("feature")
    block_scales = [scales[k] for k in sorted(scales)]

    def judge(step: int, train_loss: Optional[float]) -> Judgement:
        with torch.no_grad():
            out = []
            for i in range(0, len(held), settings.batch):
                s_taps.reset()   # the taps would otherwise keep every held-out block output
                out.append(student(augment.plain(held[i:i + settings.batch])))
        out = torch.cat(out) if out else torch.empty(0, 1)
        hits = 0.0 if held_labels is None else float((out.argmax(-1).cpu() == held_labels).sum())
        ce = 0.0 if held_labels is None or not len(out) else float(
            F.cross_entropy(out.float().cpu(), held_labels, reduction="sum"))
        zero = torch.tensor(0.0, dtype=torch.float64)
        sums = parallel.sum(torch.stack([kl_per_image(out, t_held).sum().cpu().double() if len(out) else zero,
                                         (out.argmax(-1) == t_held.argmax(-1)).sum().cpu().double() if len(out) else
                                         zero,
                                         torch.tensor(hits, dtype=torch.float64),
                                         torch.tensor(ce, dtype=torch.float64)])) / n_judged
        kl = float(sums[0])
        if held_labels is None:
            return Judgement(step, kl, float(sums[1]), None, train_loss, score=kl)
        return Judgement(step, kl, float(sums[1]), float(sums[2]), train_loss, ce=float(sums[3]),
                         score=kl + settings.label_weight * float(sums[3]))

    judge_start = time.monotonic()
    before = judge(0, None)
    judge_seconds = time.monotonic() - judge_start
    best, best_state = before, _state(trainable)
    curve = [before]
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=settings.lr, weight_decay=0.0)
    trained = parallel.wrap(student, device)   # averages the gradients of the processes' shares
    train_index = data.train
    per_epoch = max(1, math.ceil(len(train_index) / settings.batch))
    planned = per_epoch * settings.epochs if settings.epochs else None
    probe = 3          # without --epochs: steps timed before the step count is fixed by the time left
    by_time = planned is None and math.isfinite(settings.deadline)
    mark = (0, 0.0)    # (step, time) the pace is measured from: after the probe, its warm-up left out
    judgements = JUDGEMENTS
    provisional = planned or 10_000
    step, seen, stopped_by, running = 0, 0, "schedule", []
    order = torch.empty(0, dtype=torch.long)
    train_start = time.monotonic()
    try:
        while planned is None or step < planned:
            if len(order) < parallel.world:   # every process needs a share of every batch
                order = torch.from_numpy(train_index)[torch.randperm(len(train_index), generator=generator)]
            batch_idx, order = order[: settings.batch], order[settings.batch:]
            images = data.images[batch_idx.numpy()]
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * _schedule(step, planned or provisional)
            part = parallel.share(len(batch_idx))
            x = augment(images, part)
            # Each share's mean loss, weighted by its size: the averaged gradients are the whole batch's.
            weight = len(x) * parallel.world / len(batch_idx)
            loss = _loss(teacher, trained, t_taps, s_taps, x,
                         None if labels is None else labels[batch_idx[part]].to(device),
                         settings.recipe, feature_scale, block_scales, settings.label_weight)
            loss = loss * weight
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step, seen = step + 1, seen + len(batch_idx)
            running.append(float(loss.detach()) / parallel.world)   # this share's part of the batch's loss
            elapsed = max(time.monotonic() - train_start, 1e-9)
            per_step = elapsed / step
            if planned is None and step == probe:
                left = settings.deadline - time.monotonic()
                if math.isfinite(left):
                    # Judging costs a held-out pass each time: at most a sixth of what is left goes to it.
                    judgements = max(1, min(JUDGEMENTS, int(left / 6 / max(judge_seconds, 1e-9))))
                    left -= (judgements + 1) * judge_seconds
                    planned = max(probe, int(left / per_step * 0.9))
                else:
                    planned = per_epoch
                planned = int(-parallel.largest(-planned))   # the slowest process's count, on every process
                judgements = int(-parallel.largest(-judgements))
                mark = (step, time.monotonic())
                progress(f"healing: {planned} steps fit the time limit ({planned * settings.batch / max(len(train_index), 1):.1f} epochs)")
            total = planned or provisional
            every = max(1, math.ceil(total / judgements))
            if by_time and step > mark[0] and step % every == 0 and step < total:
                # Three probe steps, slowed by warm-up, misjudge the pace: at every judgement the steps
                # left are counted again from the pace since the probe, so that the time is used.
                pace = (time.monotonic() - mark[1]) / (step - mark[0])
                judged_left = math.ceil((total - step) / every) + 1
                left = settings.deadline - time.monotonic() - judged_left * judge_seconds
                longer = step + int(left / pace * 0.95)
                longer = int(-parallel.largest(-longer))
                if longer > total * 1.02:
                    planned = total = longer
            if step % every == 0 or step == total:
                judgement = judge(step, _mean_loss(parallel, running[-every:]))
                curve.append(judgement)
                if judgement.score < best.score:
                    best, best_state = judgement, _state(trainable)
            eta = (total - step) * per_step
            progress(f"healing ({seen / elapsed:.0f} img/s, held-out KL {curve[-1].kl:.4f}, "
                     f"ETA {int(eta // 60)}:{int(eta % 60):02d}) {step}/{total}")
            late = time.monotonic() + per_step + judge_seconds > settings.deadline
            # Processes stop together: 1 = a process is out of time, 2 = one was interrupted (torchrun).
            stop = parallel.largest(2.0 if parallel.interrupted else float(late)) if step < total else 0.0
            if stop > 0:
                stopped_by = "interrupt" if stop > 1 else "time limit"
                judgement = judge(step, _mean_loss(parallel, running[-every:]))
                curve.append(judgement)
                if judgement.score < best.score:
                    best, best_state = judgement, _state(trainable)
                break
    except KeyboardInterrupt:
        stopped_by = "interrupt"
    return DistillResult(best_state, before, best, curve, step, planned or step, seen, time.monotonic() - start,
                         stopped_by)


def _schedule(step: int, total: int) -> float:
    """Linear warm-up over a tenth of the steps (at most 20), then a cosine decay to zero."""
    warm = max(1, min(20, total // 10))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def _mean_loss(parallel: Parallel, losses: list[float]) -> float:
    """The mean training loss of the last steps, every process's share added up."""
    return float(parallel.sum(torch.tensor(float(np.mean(losses))))) if losses else float("nan")


def _variance(parallel: Parallel, total, squares, count: int) -> float:
    """The mean over channels of the variance over every process's samples."""
    sums = parallel.sum(torch.cat([torch.as_tensor(total, dtype=torch.float64).reshape(-1),
                                   torch.as_tensor(squares, dtype=torch.float64).reshape(-1),
                                   torch.tensor([float(count)], dtype=torch.float64)]))
    n = float(sums[-1])
    dims = (len(sums) - 1) // 2
    mean = sums[:dims] / n
    return float((sums[dims:2 * dims] / n - mean * mean).clamp_min(0).mean().clamp_min(1e-12))


def _loss(teacher, student, t_taps, s_taps, x, labels, recipe: str, feature_scale: float,
          block_scales: list[float], label_weight: float = 1.0) -> torch.Tensor:
    t_taps.reset()
    s_taps.reset()
    with torch.no_grad():
        t_logits = teacher(x)
    s_logits = student(x)
    loss = kl_per_image(s_logits, t_logits).mean()
    if recipe in ("features", "blocks"):
        loss = loss + F.mse_loss(s_taps.feature.float(), t_taps.feature.float()) / feature_scale
    if recipe == "blocks":
        for s_out, t_out, scale in zip(s_taps.blocks, t_taps.blocks, block_scales):
            if s_out.shape != t_out.shape:   # tokens merged: no longer the teacher's tokens
                break
            loss = loss + F.mse_loss(s_out.float(), t_out.float()) / scale / max(1, len(t_taps.blocks))
    if labels is not None:
        loss = loss + label_weight * F.cross_entropy(s_logits.float(), labels)
    return loss


def _state(trainable: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True) for name, p in trainable.items()}
