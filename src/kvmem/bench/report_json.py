"""Benchmark reports as JSON files. JSON has no Infinity or NaN, so those are written as strings
("inf", "nan"), as `bench serve` does; objects JSON does not know are written as their str()."""

from __future__ import annotations

import json
import math
from pathlib import Path


def finite(value):
    """`value` with every non-finite float, at any depth, replaced by its string."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(report), indent=1, default=str) + "\n")
    return path
