"""Every table the CLI prints fits an 80-column terminal, and prints whole in a log, a pipe or CI: no cell is
ever broken across lines. The tables are built from small fake results by the functions the commands use."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from rich.text import Text

from vit2trt.cli import (bench_tables, demo_table, description_tables, plan_tables, print_table, thresholds_table,
                         validate_table)
from vit2trt.converter.demo import DEMO_METHODS
from vit2trt.converter.planning.planner import Candidate, PlanResult
from vit2trt.converter.measure.speedup import Speedup

# Candidate labels as the planner writes them ("family description"); the last is a method's generic label,
# longer than any terminal line.
PLAN_LABELS = ["tome r=4", "cait 0.8 FLOPs, ATME [4, 8]", "toast 0.7 FLOPs",
               "toast+tome r=4, structure to 0.95 of ToMe's FLOPs", "cait+tome r=16, channels to 0.8 of ToMe's FLOPs",
               "asvit 0.65 FLOPs (mean)",
               "toast target_flops=0.7, multiple=8, tie_qk_v=False, compensate=True, head_sparsity=0.5, fc1=None"]
# Every form a speedup takes: stable, unstable, beyond the FLOPs ratio, and two-digit.
SPEEDUPS = [Speedup(1.31, 1.27, 1.36, 30, True, 1.5), Speedup(2.3, 0.9, 3.1, 240, False, 2.5),
            Speedup(3.61, 3.55, 3.66, 30, True, 3.5), Speedup(12.31, 11.27, 13.36, 30, True, 14.0)]


def terminal() -> Console:
    return Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)


def log() -> Console:
    """Output to a file: rich guesses 80 columns there too, unless told otherwise."""
    return Console(file=io.StringIO(), width=80, force_terminal=False)


def printed(console: Console, tables) -> list[str]:
    for table in tables:
        print_table(console, table)
    return console.file.getvalue().splitlines()


def cells(table) -> list[str]:
    """The text of every header and cell of a table."""
    texts = []
    for column in table.columns:
        for cell in [column.header, *column.cells]:
            text = Text.from_markup(cell).plain if isinstance(cell, str) else str(cell)
            if text.strip():
                texts.append(text.strip())
    return texts


def assert_whole(texts, lines: list[str]) -> None:
    broken = [t for t in texts if not any(t in line for line in lines)]
    assert not broken, "broken across lines: " + repr(broken) + "\n" + "\n".join(lines)


def fake_plan() -> PlanResult:
    candidates = []
    for i, label in enumerate(PLAN_LABELS):
        s = SPEEDUPS[i % len(SPEEDUPS)]
        candidates.append(Candidate(label.split()[0], label, {}, flops_ratio=s.flops_ratio, speedup=s.speedup,
                                    speedup_low=s.low, speedup_high=s.high, rounds=s.rounds, stable=s.stable,
                                    exceeds_flops=s.exceeds_flops, agreement=0.987 - i / 100, kl=0.0123 * i,
                                    accuracy=0.9123 - i / 50, drop=0.0123 * i, pareto=i % 2 == 0))
    refused = Candidate("cait", "cait 0.5 FLOPs, ATME [4, 8]", {}, error="--target-flops 0.5 cannot be met")
    return PlanResult(Path("plan"), candidates[3], candidates + [refused], 0.93)


def fake_demo() -> dict:
    rows = {"uncompressed": {"gflops": 0.05, "accuracy": 0.9412, "accuracy_delta": 0.0,
                             "speedup_b1": Speedup.reference().as_json(), "speedup_b8": Speedup.reference().as_json()}}
    for i, name in enumerate(DEMO_METHODS):
        rows[name] = {"gflops": 0.03, "flops_ratio": SPEEDUPS[i % 4].flops_ratio, "accuracy": 0.9412 - i / 40,
                      "accuracy_delta": -i / 40, "engine": "built",
                      "speedup_b1": SPEEDUPS[i % 4].as_json(), "speedup_b8": SPEEDUPS[(i + 1) % 4].as_json()}
    return {"test_images": 360, "rows": rows}


def test_plan_fits_80_columns_under_short_names_with_the_settings_in_a_legend():
    tables = plan_tables(fake_plan(), "ort", 1)
    lines = printed(terminal(), tables)
    assert max(map(len, lines)) <= 80, "\n".join(lines)
    candidates = tables[0]
    assert_whole(cells(candidates), lines)
    assert "cait 0.5 FLOPs" not in "\n".join(lines)   # a refused candidate is in plan.md, not here
    # The legend gives every label in full: whole where it fits a line, else wrapped between words only.
    words = {w for label in PLAN_LABELS for w in label.split()}
    assert_whole([label for label in PLAN_LABELS if len(label) < 70] + sorted(words), lines)


def test_plan_prints_whole_in_a_log():
    tables = plan_tables(fake_plan(), "ort", 1)
    lines = printed(log(), tables)
    assert_whole(cells(tables[0]) + PLAN_LABELS, lines)


@pytest.mark.parametrize("console", [terminal, log], ids=["terminal", "log"])
def test_demo_table_keeps_every_cell_whole(console):
    table = demo_table(fake_demo(), 2)
    lines = printed(console(), [table])
    assert_whole(cells(table), lines)
    if console is terminal:
        assert max(map(len, lines)) <= 80, "\n".join(lines)


def fake_bench() -> dict:
    rows = []
    for b, s in ((1, SPEEDUPS[0]), (8, SPEEDUPS[1])):
        rows += [{"variant": "original", "batch": b, "median_ms": 12.34 * b, "p90_ms": 13.5 * b},
                 {"variant": "compressed", "batch": b, "median_ms": 9.87 * b, "p90_ms": 10.2 * b, **s.as_json()}]
    return {"backends": {"ort": rows, "torch-cpu": rows}, "flops_ratio": 2.5}


def fake_validation() -> dict:
    return {"images": 64, "top1_agreement": 0.984, "cosine_mean": 0.99912, "cosine_min": 0.98123,
            "max_abs_error": 0.0123, "relative_error": 0.0021, "batch_dependence": 1.2e-6, "surgery_error": 3.4e-7,
            "surgery_near_ties": 2, "accuracy": {"reference_top1": 0.81, "compressed_top1": 0.79,
                                                 "reference_top5": 0.95, "compressed_top5": 0.94}}


def fake_thresholds() -> dict:
    return {"inputs": "48 calibration inputs", "stages": [2, 4, 6, 8, 10, 11],
            "start": {"thresholds": [0.0123, 0.0234, 0.0345, 0.0456, 0.0567, 0.0678], "flops_fraction": 0.651,
                      "top1_agreement": 0.9583},
            "thresholds": [0.0111, 0.0222, 0.0333, 0.0444, 0.0555, 0.0666], "flops_fraction": 0.649,
            "top1_agreement": 0.9792}


@pytest.mark.parametrize("console", [terminal, log], ids=["terminal", "log"])
@pytest.mark.parametrize("build", [
    lambda: bench_tables(fake_bench(), 2),
    lambda: [validate_table(fake_validation(), Path("vit2trt-out/a-long-folder-name/of-a-run"))],
    lambda: [thresholds_table(fake_thresholds(), 0.65)],
], ids=["bench", "validate", "tune-thresholds"])
def test_the_other_tables_keep_every_cell_whole(console, build):
    tables = build()
    lines = printed(console(), tables)
    assert_whole([text for table in tables for text in cells(table)], lines)
    if console is terminal:
        assert max(map(len, lines)) <= 80, "\n".join(lines)


@pytest.mark.parametrize("console", [terminal, log], ids=["terminal", "log"])
def test_inspect_tables_keep_every_cell_whole(console, deit_tiny_ts):
    from vit2trt.converter.graph import read_vit

    tables = description_tables(read_vit(deit_tiny_ts.onnx_path))
    lines = printed(console(), tables)
    blocks = tables[-1]   # the per-block table; the summary's long values may wrap between words on a terminal
    assert_whole(cells(blocks), lines)
    if console is terminal:
        assert max(map(len, lines)) <= 80, "\n".join(lines)
    else:
        assert_whole(cells(tables[0]), lines)


def test_plan_and_demo_commands_print_their_tables_whole_to_a_pipe(monkeypatch, tmp_path):
    """The commands themselves, their long runs replaced by the fake results: CliRunner's output is no terminal."""
    from typer.testing import CliRunner

    from vit2trt.cli import app
    from vit2trt.converter import demo
    from vit2trt.converter.planning import planner as plan

    result = fake_plan()
    monkeypatch.setattr(plan, "plan", lambda model, options, progress: result)
    printed_plan = CliRunner().invoke(app, ["plan", "model.onnx", "--calib", "images", "--max-drop", "0.05",
                                            "--out", str(tmp_path / "plan")])
    assert printed_plan.exit_code == 0, printed_plan.output
    lines = printed_plan.output.splitlines()
    assert_whole(cells(plan_tables(result, "ort", 1)[0]) + PLAN_LABELS, lines)
    assert f"chose c4, {PLAN_LABELS[3]}: 12.31x faster" in " ".join(printed_plan.output.split())

    summary = fake_demo()
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: summary)
    printed_demo = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert printed_demo.exit_code == 0, printed_demo.output
    assert_whole(cells(demo_table(summary, 2)), printed_demo.output.splitlines())
