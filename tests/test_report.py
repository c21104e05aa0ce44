"""report.md / report.html / report.png: written by convert, completed by validate and bench, and
carrying the numbers of report.json."""
from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.planning.report import speedup_cell


def test_report_follows_convert_validate_and_bench(tmp_path, deit_tiny_ts):
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(deit_tiny_ts.onnx_path), "--method", "cait", "--stages", "1",
                                 "--out", str(out), "--no-build"])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").is_file() and (out / "report.html").is_file() and not (out / "report.png").exists()
    report = json.loads((out / "report.json").read_text())
    assert [row["tokens"] for row in report["blocks"]] == [[197, 197], [197, 99]]
    assert report["flops_breakdown"]["compressed"]["total"] == report["flops"]["after"]
    markdown = (out / "report.md").read_text()
    assert "| 1 | 3 | 64 → 48 | 64 → 48 | 768 | 197 → 99 |" in markdown

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32))
    assert runner.invoke(app, ["validate", str(out), "--images", str(tmp_path / "x.npy")]).exit_code == 0
    assert runner.invoke(app, ["bench", str(out), "--repeats", "2", "--batch", "1", "--time-cap", "1"]).exit_code == 0
    report = json.loads((out / "report.json").read_text())
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    markdown, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    agreement = f"{report['validation']['top1_agreement'] * 100:.1f}%"
    compressed = next(r for r in report["latency"]["backends"]["ort"] if r["variant"] == "compressed")
    for text in (markdown, page):
        assert agreement in text and speedup_cell(compressed, report["latency"]["flops_ratio"]) in text
    assert "<table>" in page and "data:image/png;base64," in page and "report.png" not in page
