"""What every pass returns: the new graph and a JSON-able account of what it did."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx


@dataclass
class PassResult:
    model: onnx.ModelProto
    report: dict[str, Any] = field(default_factory=dict)
