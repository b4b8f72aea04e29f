"""How many CPUs this process may use: the default thread count of every command."""

from __future__ import annotations

import os


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity API (macOS)
        return max(1, os.cpu_count() or 1)
