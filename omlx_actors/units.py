"""Shared readings of numbers: byte sizes written by people, and percentiles of measurements.

One definition each, so a flag, a scenario file and a benchmark read `1.5G` the same way and
report the same p99 for the same data. Pure: imports neither trio nor MLX.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", re.I)


def parse_bytes(text: str) -> int:
    """Bytes from `123`, `512M`, `1.5G`, `12GiB`, `64kb` (binary units). ValueError otherwise."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 1048576, 512M or 1.5G)")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100] (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
