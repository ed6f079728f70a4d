"""What the benchmark smoke tests share: reading a benchmark's JSON strictly."""

from __future__ import annotations

import json


def strict_json(text: str) -> dict:
    """json.loads that refuses NaN and Infinity: a benchmark that wrote one has a figure nobody can use."""
    def reject(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=reject)
