"""`plan --heal DIR`: heal the candidates near the goal before the choice, as `vit2trt heal` would.

Healing changes only weights, so a healed candidate keeps its unhealed twin's FLOPs and measured speed
and is judged again for accuracy alone, on the same judging images (never on the images it was healed
on). Which candidates get healed, in order (each with at most --heal-time, all within --time-limit):

- `--max-drop`: the candidates faster than the current choice that miss the budget by at most
  HEAL_REACH, searched by bisection on their drop: the middle one first. A success raises the speed
  the next one must beat (so the search moves to the more aggressive ones); a failure rules out every
  candidate that lost as much or more (so it moves to the milder ones). Two or three heals of 15
  minutes are all that fit an hour: closest-to-the-budget first spent them on 1.3x models while a
  2x one heals from -7 to -0.2 pt (docs/results.md). Then the choice itself, if it is unhealed.
- `--target-speedup`: the fast-enough candidates on the front, the most accurate first.

The learning rate, unless --heal-lr is given, follows how far the candidate is from the original
(its KL on the judging images): 1e-4 healed CAIT 0.5 (KL 0.5) best, but undid ToMe r = 8 (KL 0.09),
which 2e-5 healed.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

from ...errors import Vit2TrtError

HEAL_REACH = 0.10   # a candidate up to 10 pt past --max-drop may come back with healing
FAR_KL = 0.3        # a candidate this far from the original (KL) heals at FAR_LR, a nearer one at NEAR_LR
FAR_LR, NEAR_LR = 1e-4, 2e-5


def heal_lr(candidate, options) -> float:
    """--heal-lr when given, else by the candidate's distance from the original (see the module's docstring)."""
    if options.heal_lr is not None:
        return options.heal_lr
    return FAR_LR if candidate.kl >= FAR_KL else NEAR_LR


class CandidateHealer:
    """The teacher and the heal images, prepared once for every candidate healed."""

    def __init__(self, source, options, progress: Callable[[str], None]):
        from ..healing.data import read_heal_images
        from ..healing.heal import HealOptions, torch_device
        from ..measure.references import original_reference
        from ...models.reference import build_model

        self.options = HealOptions(Path(options.heal), options.heal_labels and Path(options.heal_labels),
                                   options.heal_class_map and Path(options.heal_class_map),
                                   time_limit=options.heal_time, epochs=options.heal_epochs,
                                   device=options.heal_device, batch=options.heal_batch,
                                   lr=options.heal_lr or NEAR_LR,   # each heal sets its own (heal_lr)
                                   seed=options.seed,
                                   limit=options.heal_limit)
        from ..healing.parallel import launched_world

        if launched_world() > 1:
            raise Vit2TrtError("plan --heal runs in one process; launch plain `vit2trt plan`, not under torchrun "
                               "(torchrun suits `vit2trt heal` of the chosen model).")
        try:
            self.options.check()
            self.device = torch_device(self.options.device)
        except Vit2TrtError as exc:   # heal's flags, as plan calls them
            raise Vit2TrtError(str(exc).replace("--time-limit", "--heal-time").replace("--epochs", "--heal-epochs")
                               .replace("--batch", "--heal-batch").replace("--device", "--heal-device")) from None
        reference = original_reference(source.path, source.record)
        self.record = reference.record
        progress("healing: building the original in PyTorch and reading the --heal images")
        self.teacher = build_model(self.record).eval()
        classes = int(source.vit.head.num_classes) or None
        self.data = read_heal_images(self.options.images, tuple(int(v) for v in reference.input_size),
                                     reference.preprocessing, self.options.labels, self.options.class_map, classes,
                                     self.options.holdout, self.options.seed, self.options.limit, progress,
                                     flag="--heal", labels_flag="--heal-labels", class_map_flag="--heal-class-map")

    @property
    def files(self) -> list[Path]:
        return self.data.files

    def heal(self, artifact, seconds: float, lr: float, progress: Callable[[str], None]):
        """(healed artifact, heal section) for `artifact`, training for at most `seconds` at `lr`."""
        from dataclasses import replace

        from ..healing.heal import heal_artifact

        healed, section = heal_artifact(artifact, self.teacher, self.record, self.data, replace(self.options, lr=lr),
                                        self.device, time.monotonic() + seconds, progress)
        return healed, section


def next_to_heal(candidates: list, options, healed: set[str], choose, meets_speed) -> Optional[object]:
    """The next unhealed candidate worth healing (see the module's docstring), or None."""
    from .planner import credible_speedup

    open_ = [c for c in candidates if not c.error and c.healed_from is None and c.label not in healed]
    pick = choose(candidates, options)
    if options.max_drop is not None:
        bar = credible_speedup(pick) if pick else 1.0
        # A healed candidate that still misses the budget: nothing that lost as much before healing is tried.
        failed = [c.drop_before_heal for c in candidates
                  if c.healed_from is not None and not c.meets and c.drop_before_heal is not None]
        ceiling = min(failed, default=math.inf)
        reachable = sorted((c for c in open_ if not c.meets and credible_speedup(c) > bar
                            and c.drop <= options.max_drop + HEAL_REACH and c.drop < ceiling),
                           key=lambda c: (c.drop, -credible_speedup(c)))
        if reachable:
            return reachable[len(reachable) // 2]
        return pick if pick is not None and pick.healed_from is None and pick.label not in healed else None
    fast = [c for c in open_ if meets_speed(c) and c.pareto]
    return min(fast, key=lambda c: c.drop) if fast else None


def shared_files(a: list[Path], b: list[Path]) -> int:
    """How many files of `a` have the same bytes as a file of `b` (sizes first, then SHA-256)."""
    import hashlib

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    sizes: dict[int, list[Path]] = {}
    for p in b:
        sizes.setdefault(p.stat().st_size, []).append(p)
    hashes: dict[int, set[str]] = {}
    count = 0
    for p in a:
        size = p.stat().st_size
        if size not in sizes:
            continue
        if size not in hashes:
            hashes[size] = {digest(q) for q in sizes[size]}
        count += digest(p) in hashes[size]
    return count
