"""OUT/report.json: one machine-readable record of a conversion, updated by validate and bench."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def read_report(out_dir: Path) -> dict:
    try:
        return json.loads((Path(out_dir) / "report.json").read_text())
    except (OSError, ValueError):
        return {}


def update_report(out_dir: Path, key: str, value) -> dict:
    """Set report.json's `key`, replacing the file atomically."""
    report = read_report(out_dir)
    report[key] = value
    with tempfile.NamedTemporaryFile("w", dir=out_dir, delete=False, suffix=".tmp") as fh:
        fh.write(json.dumps(report, indent=1, sort_keys=True) + "\n")
    os.replace(fh.name, Path(out_dir) / "report.json")
    return report
