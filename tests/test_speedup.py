"""converter/measure/speedup.py: a speedup is a median of paired ratios with a bootstrap interval, marked
unstable when noise keeps the interval wide, flagged beyond the FLOPs ratio. Driven by a fake
machine whose clock only the models advance, so nothing here depends on this machine's load."""
from __future__ import annotations

import numpy as np
import pytest

from vit2trt.converter.measure.bench import latency_rows
from vit2trt.converter.demo import demo_markdown
from vit2trt.converter.planning.report import _markdown
from vit2trt.converter.measure.speedup import (MAX_ROUNDS, MIN_ROUNDS, STABLE, Speedup, bootstrap_interval, format_speedup,
                                       measure_speedup, speedup_of)


class FakeMachine:
    """A clock that only running models advance: each run takes its model's seconds times a factor
    the test chooses per run (a busy machine), and every run is logged."""

    def __init__(self, noise=lambda i: 1.0):
        self.now, self.noise, self.log = 0.0, noise, []

    def runner(self, name: str, seconds: float):
        def run(_x):
            self.now += seconds * self.noise(len(self.log))
            self.log.append(name)
        return run

    def clock(self) -> float:
        return self.now


def measure(machine: FakeMachine, rounds: int = 5, **options):
    return measure_speedup(machine.runner("o", 0.010), machine.runner("c", 0.005), None, rounds,
                           clock=machine.clock, **options)


def test_a_quiet_machine_gives_the_true_ratio_stable_in_the_fewest_rounds():
    timing = measure(FakeMachine(), rounds=MIN_ROUNDS)
    s = timing.speedup
    assert s.stable and s.rounds == MIN_ROUNDS
    assert s.speedup == pytest.approx(2.0) and s.low == pytest.approx(2.0) and s.high == pytest.approx(2.0)
    assert np.median(timing.baseline_s) == pytest.approx(0.010) and np.median(timing.variant_s) == pytest.approx(0.005)
    assert timing.runs_per_timing == 4   # the faster model's timing repeats to 20 ms


def test_mild_noise_is_stable_and_within_tolerance_of_the_true_ratio():
    factors = np.random.default_rng(1).uniform(0.97, 1.03, 100_000)   # ±3% per run
    s = measure(FakeMachine(lambda i: factors[i]), rounds=10).speedup
    assert s.stable and s.speedup == pytest.approx(2.0, rel=STABLE)
    assert s.low <= 2.0 <= s.high and s.high - s.low <= 2 * STABLE * s.speedup


def test_a_noisy_machine_is_marked_unstable_after_the_most_rounds():
    factors = np.random.default_rng(2).lognormal(0.0, 0.6, 100_000)   # runs slowed or hurried by up to ~3x
    s = measure(FakeMachine(lambda i: factors[i]), rounds=5, min_timing=0.0).speedup
    assert not s.stable and s.rounds == 5 * MAX_ROUNDS
    assert s.high - s.low > 2 * STABLE * s.speedup
    assert format_speedup(s).startswith("~") and "unstable" in format_speedup(s)


def test_the_time_cap_ends_the_rounds_and_leaves_the_figure_unstable():
    factors = np.random.default_rng(3).lognormal(0.0, 0.6, 100_000)
    machine = FakeMachine(lambda i: factors[i])
    seen = []
    timing = measure(machine, rounds=5, max_rounds=10_000, time_cap=1.0, min_timing=0.0,
                     progress=lambda done, most: seen.append(machine.now))
    began = seen[0] - timing.baseline_s[0] - timing.variant_s[0]   # the clock when the first round started
    longest_round = max(b + v for b, v in zip(timing.baseline_s, timing.variant_s))
    assert machine.now - began <= 1.0 + longest_round   # stops at the first round past the cap
    assert machine.now - began >= 1.0 and timing.speedup.rounds < 10_000 and not timing.speedup.stable


def test_the_order_alternates_round_by_round():
    machine = FakeMachine()
    measure(machine, rounds=MIN_ROUNDS, min_timing=0.0, warmup=1)
    timed = machine.log[4:]   # after the warm-up (o, c) and the calibration (o, c)
    assert timed == ["o", "c", "c", "o"] * (MIN_ROUNDS // 2)


def test_few_ratios_are_never_stable_however_close():
    assert not speedup_of([2.0] * (MIN_ROUNDS - 1)).stable and speedup_of([2.0] * MIN_ROUNDS).stable


def test_the_bootstrap_interval_is_seeded_and_holds_the_median():
    ratios = np.random.default_rng(4).normal(1.5, 0.2, 40)
    assert bootstrap_interval(ratios) == bootstrap_interval(list(ratios))
    low, high = bootstrap_interval(ratios)
    assert low < np.median(ratios) < high


def test_a_speedup_beyond_the_flops_ratio_is_flagged_and_credited_at_it():
    # What a busy machine once printed for the demo: 9.76x for a model with 1.20x fewer FLOPs.
    s = Speedup(9.76, 9.5, 10.1, 30, True, flops_ratio=1.2)
    assert s.exceeds_flops and s.credible == 1.2 and s.as_json()["exceeds_flops"] is True
    assert format_speedup(s) == "9.76× [9.50–10.10] (exceeds FLOPs ratio 1.20×)"
    assert not Speedup(1.15, 1.1, 1.2, 30, True, 1.2).exceeds_flops
    # A median just above the ratio, its interval reaching below it: the ratio met, not noise.
    assert not Speedup(1.22, 1.15, 1.30, 30, True, 1.2).exceeds_flops


def test_the_time_cap_never_cuts_below_the_first_rounds():
    """A slow model and a short cap still get `rounds` pairs (at most MIN_ROUNDS of them): a quiet
    machine is then stable, as it should be."""
    machine = FakeMachine(lambda i: 1.0)
    timing = measure(machine, rounds=6, max_rounds=48, time_cap=1e-9, min_timing=0.0)
    assert timing.speedup.rounds == 6 and timing.speedup.stable


@pytest.mark.parametrize("figure,text,ascii_text", [
    (Speedup(1.31, 1.27, 1.36, 30, True), "1.31× [1.27–1.36]", "1.31x [1.27-1.36]"),
    (Speedup(1.3, 0.9, 2.1, 240, False), "~1.3× (unstable: [0.9–2.1])", "~1.3x [0.9-2.1]*"),
    (Speedup.reference(), "1.00×", "1.00x"),
    (Speedup(9.76, 9.5, 10.1, 30, True, 1.2), "9.76× [9.50–10.10] (exceeds FLOPs ratio 1.20×)", "9.76x [9.50-10.10]!"),
])
def test_figures_read_as_the_table_shows_them(figure, text, ascii_text):
    assert format_speedup(figure) == text and format_speedup(figure, ascii=True) == ascii_text
    assert Speedup.from_json(figure.as_json(), figure.flops_ratio) == figure


def test_bench_rows_and_the_report_carry_the_interval_and_the_marking():
    factors = np.random.default_rng(5).lognormal(0.0, 0.6, 100_000)
    timing = measure(FakeMachine(lambda i: factors[i]), rounds=5, min_timing=0.0, flops_ratio=1.1)
    rows = latency_rows(timing, 1)
    original, compressed = rows
    assert original["speedup"] == 1.0 and original["runs"] == compressed["runs"] == timing.speedup.rounds
    assert compressed["stable"] is False and compressed["rounds"] == 5 * MAX_ROUNDS
    assert compressed["speedup_low"] < compressed["speedup"] < compressed["speedup_high"]
    latency = {"repeats": 5, "max_rounds": 40, "time_cap_s": 30.0, "threads": 2, "inputs": "seeded noise",
               "flops_ratio": 1.1, "backends": {"ort": rows}}
    text = _markdown({"latency": latency}, has_plot=False)
    assert format_speedup(timing.speedup.with_flops(1.1)) in text and "(unstable: [" in text
    assert "exceeds FLOPs ratio 1.10×" in text   # the fake candidate is 2x faster at 1.1x fewer FLOPs


def test_the_demo_table_marks_unstable_and_incredible_figures():
    def row(b1: Speedup, b8: Speedup, flops_ratio: float) -> dict:
        return {"gflops": 0.01, "flops_ratio": flops_ratio, "accuracy": 0.9, "accuracy_delta": -0.01,
                "speedup_b1": b1.as_json(), "speedup_b8": b8.as_json()}

    summary = {"model": "m", "checkpoint": "c", "test_images": 10, "threads": 2, "repeats": 30, "rows": {
        "uncompressed": {"gflops": 0.012, "accuracy": 0.91, "accuracy_delta": 0.0,
                         "speedup_b1": Speedup.reference().as_json(), "speedup_b8": Speedup.reference().as_json()},
        "tome": row(Speedup(12.68, 5.0, 20.0, 240, False, 2.26), Speedup(1.8, 1.75, 1.86, 60, True, 2.26), 2.26)}}
    text = demo_markdown(summary)
    assert "| ~12.7× (unstable: [5.0–20.0]) (exceeds FLOPs ratio 2.26×) | 1.80× [1.75–1.86] |" in text
    assert "| 1.00× | 1.00× |" in text
