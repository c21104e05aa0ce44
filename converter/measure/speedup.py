"""Speedups that noise cannot fake: paired ratios, a bootstrap interval of their median, a stop rule.

One speedup is the median of per-round ratios original / variant, each round timing the two back
to back (the order alternates, so that neither always runs second): a drift in the machine's load
moves both timings of a round alike and cancels in their ratio, which separate medians of many runs
do not. Each timing repeats the run until it lasts MIN_TIMING_S, because one short run is mostly
timer and scheduler noise. Rounds are added, `rounds` at a time, until the 95% bootstrap interval of
the median is within ±STABLE of it, or until `max_rounds` or `time_cap`; a figure whose interval is
still wider is reported as unstable. A speedup above the FLOPs ratio is flagged: removing work
cannot make a model faster than the work removed, so such a figure is noise or a measurement fault.

bench, demo, plan and benchmarks/ all measure and print speedups through this module.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import numpy as np

STABLE = 0.05         # a figure is stable when its interval lies within ±5% of it
MAX_ROUNDS = 8        # rounds at most, as multiples of the rounds asked for
TIME_CAP_S = 30.0     # seconds of timing at most per figure, whatever the rounds
MIN_TIMING_S = 0.02   # each timing repeats the run until it lasts this long
MIN_ROUNDS = 6        # fewer ratios than this are never called stable, however close they lie
CONFIDENCE = 0.95
RESAMPLES = 2000

Runner = Callable[[Any], object]
Clock = Callable[[], float]


@dataclass(frozen=True)
class Speedup:
    """A measured speedup: the median ratio, its bootstrap interval, and what to make of it."""
    speedup: float
    low: float
    high: float
    rounds: int                          # paired rounds behind it (0: the reference itself, not measured)
    stable: bool                         # the interval lies within ±STABLE of the median
    flops_ratio: Optional[float] = None  # the most the removed work allows, where known

    @classmethod
    def reference(cls) -> "Speedup":
        """The original against itself: exactly 1, not measured."""
        return cls(1.0, 1.0, 1.0, 0, True, 1.0)

    @property
    def exceeds_flops(self) -> bool:
        """Even the low end of the interval lies beyond the FLOPs ratio: faster than removing that work
        can make a model, so noise (a median just above it, within its interval, is the ratio met)."""
        return self.flops_ratio is not None and self.low > self.flops_ratio

    @property
    def credible(self) -> float:
        """The figure to decide on: the measured speedup, never more than the FLOPs ratio allows."""
        return self.speedup if self.flops_ratio is None else min(self.speedup, self.flops_ratio)

    def with_flops(self, flops_ratio: Optional[float]) -> "Speedup":
        return replace(self, flops_ratio=flops_ratio)

    def as_json(self) -> dict:
        return {"speedup": self.speedup, "speedup_low": self.low, "speedup_high": self.high,
                "stable": self.stable, "rounds": self.rounds, "exceeds_flops": self.exceeds_flops}

    @classmethod
    def from_json(cls, data: dict, flops_ratio: Optional[float] = None) -> "Speedup":
        """Reads as_json's fields; an older record with a bare speedup reads as unmeasured (rounds 0)."""
        value = float(data["speedup"])
        return cls(value, float(data.get("speedup_low", value)), float(data.get("speedup_high", value)),
                   int(data.get("rounds", 0)), bool(data.get("stable", True)), flops_ratio)


@dataclass
class PairedTiming:
    """A speedup and the timings it came from, in seconds per run, one per round."""
    speedup: Speedup
    baseline_s: list[float]
    variant_s: list[float]
    runs_per_timing: int


def bootstrap_interval(values, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the median; seeded, so the same values give the same interval."""
    values = np.asarray(values, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))
    medians = np.median(values[picks], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return float(low), float(high)


def speedup_of(ratios, flops_ratio: Optional[float] = None, tolerance: float = STABLE) -> Speedup:
    """The figure a list of per-round ratios supports."""
    median = float(np.median(ratios))
    low, high = bootstrap_interval(ratios)
    return Speedup(median, low, high, len(ratios), _within(low, high, median, len(ratios), tolerance), flops_ratio)


def _within(low: float, high: float, median: float, count: int, tolerance: float) -> bool:
    return count >= MIN_ROUNDS and low >= median * (1 - tolerance) and high <= median * (1 + tolerance)


def measure_speedup(baseline: Runner, variant: Runner, x, rounds: int = 15, *, max_rounds: Optional[int] = None,
                    time_cap: float = TIME_CAP_S, flops_ratio: Optional[float] = None,
                    clock: Clock = time.perf_counter, min_timing: float = MIN_TIMING_S, warmup: int = 1,
                    progress: Callable[[int, int], None] = lambda done, most: None) -> PairedTiming:
    """Time `baseline` and `variant` on `x` in alternating back-to-back pairs until the speedup's
    interval is within ±STABLE, `max_rounds` (default MAX_ROUNDS × `rounds`) or `time_cap` seconds
    of `clock`; the interval is checked every `rounds` rounds, the cap after every round."""
    rounds = max(1, rounds)
    most = max(max_rounds or rounds * MAX_ROUNDS, 1)
    repeat = runs_per_timing(baseline, variant, x, clock, min_timing, warmup)
    began = clock()
    base_s: list[float] = []
    var_s: list[float] = []
    check_at = rounds
    while True:
        b, v = timed_pair(baseline, variant, x, repeat, clock, variant_first=len(base_s) % 2 == 1)
        base_s.append(b)
        var_s.append(v)
        progress(len(base_s), most)
        # The cap never cuts a figure below its first `rounds` (or MIN_ROUNDS) pairs: --repeats is a minimum.
        if len(base_s) >= most or (clock() - began >= time_cap and len(base_s) >= min(rounds, MIN_ROUNDS, most)):
            break
        if len(base_s) >= check_at:
            if speedup_of(_ratios(base_s, var_s)).stable:
                break
            check_at += rounds
    return PairedTiming(speedup_of(_ratios(base_s, var_s), flops_ratio), base_s, var_s, repeat)


def _ratios(base_s: list[float], var_s: list[float]) -> np.ndarray:
    return np.asarray(base_s) / np.maximum(np.asarray(var_s), 1e-12)


def runs_per_timing(baseline: Runner, variant: Runner, x, clock: Clock, min_timing: float, warmup: int) -> int:
    """How often each timing repeats the run so that the faster model's timing lasts `min_timing`
    (measured after `warmup` untimed runs of each)."""
    for _ in range(warmup):
        baseline(x)
        variant(x)
    fastest = min(_timed(baseline, x, 1, clock), _timed(variant, x, 1, clock))
    return max(1, int(np.ceil(min_timing / max(fastest, 1e-6))))


def timed_pair(baseline: Runner, variant: Runner, x, repeat: int, clock: Clock,
               variant_first: bool) -> tuple[float, float]:
    """Seconds per run of each, timed back to back in the order given."""
    if variant_first:
        v = _timed(variant, x, repeat, clock)
        return _timed(baseline, x, repeat, clock), v
    b = _timed(baseline, x, repeat, clock)
    return b, _timed(variant, x, repeat, clock)


def _timed(run: Runner, x, repeat: int, clock: Clock) -> float:
    began = clock()
    for _ in range(repeat):
        run(x)
    return (clock() - began) / repeat


# Terminal tables mark figures with one character each and print this legend under the table.
TERMINAL_LEGEND = ("~ and * : unstable, the 95% interval stayed wider than ±{stable:g}% within the rounds and "
                   "time allowed; ! : beyond the FLOPs ratio, which removing work cannot give (noise)")


def format_speedup(s: Speedup, ascii: bool = False) -> str:
    """"1.31× [1.27–1.36]" when stable; "~1.3× (unstable: [0.9–2.1])" when not; either flagged
    "(exceeds FLOPs ratio 1.20×)" where it does. `ascii` is the terminal's compact form, x and -
    with one-character marks explained by TERMINAL_LEGEND: "~1.3x [0.9-2.1]*", "2.9x [2.8-3.0]!"."""
    times, dash = ("x", "-") if ascii else ("×", "–")
    if s.rounds == 0:   # the reference itself: exactly 1, no interval
        return f"{s.speedup:.2f}{times}"
    if s.stable:
        text = f"{s.speedup:.2f}{times} [{s.low:.2f}{dash}{s.high:.2f}]"
    elif ascii:   # one decimal: the second one would claim a precision the interval denies
        text = f"~{s.speedup:.1f}{times} [{s.low:.1f}{dash}{s.high:.1f}]*"
    else:
        text = f"~{s.speedup:.1f}{times} (unstable: [{s.low:.1f}{dash}{s.high:.1f}])"
    if s.exceeds_flops:
        text += "!" if ascii else f" (exceeds FLOPs ratio {s.flops_ratio:.2f}{times})"
    return text


def terminal_legend() -> str:
    return TERMINAL_LEGEND.format(stable=STABLE * 100)


def describe_method(rounds: int, time_cap: float = TIME_CAP_S) -> str:
    """One sentence for tables' captions: how each figure was measured."""
    return (f"speedup = median of back-to-back ratios against the original ({rounds} to {rounds * MAX_ROUNDS} "
            f"pairs, at most {time_cap:g} s, each timing ≥ {MIN_TIMING_S * 1e3:g} ms) "
            f"[{CONFIDENCE * 100:g}% bootstrap interval]; unstable: the interval stayed wider than "
            f"±{STABLE * 100:g}%")
