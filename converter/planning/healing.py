"""`plan --heal DIR`: heal the candidates near the goal before the choice, as `vit2trt heal` would.

Healing changes only weights, so a healed candidate keeps its unhealed twin's FLOPs and measured speed
and is judged again for accuracy alone, on the same judging images (never on the images it was healed
on). Which candidates get healed, in order (each with at most --heal-time, all within --time-limit):

- `--max-drop`: the candidates faster than the current choice that miss the budget by at most
  HEAL_REACH, the closest to the budget first (healing brings the near ones back most surely); each
  success raises the speed the next one must beat. Then the choice itself, if it is unhealed.
- `--target-speedup`: the fast-enough candidates on the front, the most accurate first.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from ...errors import Vit2TrtError

HEAL_REACH = 0.10   # a candidate up to 10 pt past --max-drop may come back with healing


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
                                   device=options.heal_device, batch=options.heal_batch, lr=options.heal_lr,
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

    def heal(self, artifact, seconds: float, progress: Callable[[str], None]):
        """(healed artifact, heal section) for `artifact`, training for at most `seconds`."""
        from ..healing.heal import heal_artifact

        healed, section = heal_artifact(artifact, self.teacher, self.record, self.data, self.options, self.device,
                                        time.monotonic() + seconds, progress)
        return healed, section


def next_to_heal(candidates: list, options, healed: set[str], choose, meets_speed) -> Optional[object]:
    """The next unhealed candidate worth healing (see the module's docstring), or None."""
    from .planner import credible_speedup

    open_ = [c for c in candidates if not c.error and c.healed_from is None and c.label not in healed]
    pick = choose(candidates, options)
    if options.max_drop is not None:
        bar = credible_speedup(pick) if pick else 1.0
        reachable = [c for c in open_ if not c.meets and credible_speedup(c) > bar
                     and c.drop <= options.max_drop + HEAL_REACH]
        if reachable:
            return min(reachable, key=lambda c: (c.drop, -credible_speedup(c)))
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
