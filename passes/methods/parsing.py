"""Command-line values of method options: comma-separated lists, read with a message that names the flag."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from ...errors import Vit2TrtError


def _number_list(kind: type, flag: str, usage: str) -> Callable[[Optional[str]], Optional[list]]:
    def parse(text):
        try:
            if text is None or isinstance(text, (list, tuple)):
                return None if text is None else [kind(v) for v in text]
            return [kind(v) for v in str(text).split(",")]
        except (TypeError, ValueError):
            raise Vit2TrtError(f"{flag} takes {usage}, not '{text}'.") from None
    return parse


def fraction_list(flag: str) -> Callable[[Optional[str]], Optional[list[float]]]:
    return _number_list(float, flag, "comma-separated numbers such as 0,0,0.3")


def index_list(flag: str, example: str) -> Callable[[Optional[str]], Optional[list[int]]]:
    return _number_list(int, flag, f"comma-separated block indices such as {example}")


def thresholds_value(text):
    """--thresholds: numbers, or a JSON file {"thresholds": [...], optional "stages": [...]}.
    Returns a list, or a dict holding both when the file names the stages."""
    if text is None or isinstance(text, (list, tuple, dict)):
        return text
    path = Path(str(text))
    if path.suffix == ".json" or path.is_file():
        try:
            data = json.loads(path.read_text())
            values = [float(v) for v in data["thresholds"]]
            if "stages" in data:
                return {"thresholds": values, "stages": [int(v) for v in data["stages"]]}
            return values
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise Vit2TrtError(f"--thresholds {path}: not a JSON file with a 'thresholds' list ({exc}).") from None
    return fraction_list("--thresholds")(text)
