"""Parses expert-cache budgets: `800MiB`, `1.5GiB`, `1G`, `512M`, `4096`, `25%`, `auto`, `off`.

K/M/G/T and KiB/MiB/GiB/TiB are binary (1024-based), as in llama.cpp and free(1);
KB/MB/GB/TB are decimal (1000-based). A percentage is of all routed expert bytes. `auto` is
sized when the engine starts, from the memory the process may use (edgemoe.auto_budget).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

from edgemoe.errors import BudgetParseError

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")
_OFF = {"off", "none", "no", "disabled"}


@dataclass(frozen=True)
class Budget:
    """Exactly one of `bytes` and `fraction` is set, or neither in AUTO."""

    bytes: Optional[int] = None
    fraction: Optional[float] = None  # of all expert bytes, (0, 1]
    auto: bool = False                # sized by edgemoe.auto_budget when the engine starts

    def __str__(self) -> str:
        if self.auto:
            return "auto"
        if self.bytes is not None:
            return f"{self.bytes} bytes"
        return f"{self.fraction * 100:g}%"


AUTO = Budget(auto=True)


def parse_budget(value: Union[None, str, int, float, Budget]) -> Optional[Budget]:
    """Parses a budget; returns None for "off" (and None).

    Args:
        value: a size string, a percentage string, a byte count, a Budget, "auto", "off" or None.

    Raises:
        BudgetParseError: junk, zero, negative or a percentage outside (0, 100].
    """
    if value is None or isinstance(value, Budget):
        return value
    if isinstance(value, bool):
        raise BudgetParseError(f"invalid expert-cache budget {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise BudgetParseError(f"expert-cache budget must be positive, got {value}")
        return Budget(bytes=value)
    if isinstance(value, float):
        raise BudgetParseError(
            f"invalid expert-cache budget {value!r}: give bytes as an int or a string like '25%'"
        )
    if not isinstance(value, str):
        raise BudgetParseError(f"invalid expert-cache budget {value!r}")

    text = value.strip()
    if text.lower() in _OFF:
        return None
    if text.lower() == "auto":
        return AUTO
    m = _PERCENT_RE.match(text)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise BudgetParseError(f"expert-cache budget {value!r} must be in (0%, 100%]")
        return Budget(fraction=pct / 100.0)
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise BudgetParseError(
            f"invalid expert-cache budget {value!r} (examples: 800MiB, 1.5GiB, 25%, auto, off)"
        )
    number, unit = m.group(1), m.group(2).lower()
    if unit in ("", "b") and "." in number:
        raise BudgetParseError(f"invalid expert-cache budget {value!r}: bytes must be whole")
    n = int(float(number) * _UNITS[unit]) if "." in number else int(number) * _UNITS[unit]
    if n <= 0:
        raise BudgetParseError(f"expert-cache budget must be positive, got {value!r}")
    return Budget(bytes=n)


def format_bytes(n: int) -> str:
    """`1536 MiB` style, for messages."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
