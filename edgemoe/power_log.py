"""Timed power and clock samples, and what a window [t0, t1] of them adds up to.

Energy is the integral over [t0, t1] of the piecewise-linear curve through the samples (the
trapezoid rule), held flat from t0 to the first sample and from the last sample to t1: windows
do not start or end on a sample, and a sampler that lags by up to one interval would otherwise
drop up to two intervals of every window.
"""

from __future__ import annotations

import bisect
import statistics
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

# rails that measure the whole module's input, in jetson-stats' order (jtop/core/power.py):
# where none is present, the board total is the rails' sum (AGX Orin, AGX Xavier)
INPUT_RAILS = ("VIN", "POM_5V_IN", "VDD_IN")
STALE_S = 5.0      # a window whose nearest sample is older than this gets no power
KEEP_S = 30.0      # history kept for interpolation at a window's start


@dataclass(frozen=True)
class Sample:
    t: float                                # time.monotonic() when it arrived
    rails_mw: Dict[str, float] = field(default_factory=dict)  # every rail, the input included
    total_mw: Optional[float] = None        # board power
    cpu_mhz: Optional[float] = None         # mean over the online cores
    gpu_mhz: Optional[float] = None
    emc_mhz: Optional[float] = None
    temp_max_c: Optional[float] = None


@dataclass(frozen=True)
class PowerWindow:
    samples: int                            # samples inside the window
    power_w: Optional[float] = None         # energy_j / seconds
    energy_j: Optional[float] = None
    rail_energy_j: Optional[Dict[str, float]] = None
    cpu_mhz: Optional[float] = None         # clocks: means over the samples inside
    gpu_mhz: Optional[float] = None
    emc_mhz: Optional[float] = None
    temp_max_c: Optional[float] = None


def board_total(rails_mw: Dict[str, float]) -> Optional[float]:
    for name in INPUT_RAILS:
        if name in rails_mw:
            return rails_mw[name]
    return sum(rails_mw.values()) if rails_mw else None


def _at(points: Sequence[Tuple[float, float]], t: float) -> float:
    times = [p[0] for p in points]
    i = bisect.bisect_right(times, t)
    if i == 0:
        return points[0][1]
    if i == len(points):
        return points[-1][1]
    (ta, va), (tb, vb) = points[i - 1], points[i]
    return va + (vb - va) * (t - ta) / (tb - ta) if tb > ta else vb


def integrate(points: Sequence[Tuple[float, float]], t0: float, t1: float) -> float:
    """∫ from t0 to t1 of the piecewise-linear curve through (time, value) points sorted by
    time, held flat beyond the first and last."""
    if not points or t1 <= t0:
        return 0.0
    knots = [(t0, _at(points, t0))] + [p for p in points if t0 < p[0] < t1] + [(t1, _at(points, t1))]
    return sum((tb - ta) * (va + vb) / 2.0 for (ta, va), (tb, vb) in zip(knots, knots[1:]))


def mean_known(values) -> Optional[float]:
    """The mean of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return float(statistics.fmean(values)) if values else None


class PowerLog:
    """Samples from a sampler thread; windows read by the measuring thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._samples: List[Sample] = []

    def add(self, sample: Sample) -> None:
        with self._lock:
            self._samples.append(sample)
            if self._samples[0].t < sample.t - KEEP_S:
                self._samples = [s for s in self._samples if s.t >= sample.t - KEEP_S]

    def samples(self) -> List[Sample]:
        with self._lock:
            return list(self._samples)

    def window(self, t0: float, t1: float) -> PowerWindow:
        usable = [s for s in self.samples() if t0 - STALE_S <= s.t <= t1]
        inside = [s for s in usable if s.t >= t0] or usable[-1:]  # a window shorter than the interval
        if not usable:
            return PowerWindow(samples=0)
        seconds = t1 - t0
        energy = rails = power = None
        totals = [(s.t, s.total_mw / 1e3) for s in usable if s.total_mw is not None]
        if totals:
            energy = integrate(totals, t0, t1)
            power = energy / seconds if seconds > 0 else totals[-1][1]
            names = sorted({name for s in usable for name in s.rails_mw})
            rails = {name: integrate([(s.t, s.rails_mw[name] / 1e3) for s in usable if name in s.rails_mw],
                                     t0, t1) for name in names}
        temps = [s.temp_max_c for s in inside if s.temp_max_c is not None]
        return PowerWindow(samples=sum(1 for s in usable if s.t >= t0), power_w=power, energy_j=energy,
                           rail_energy_j=rails, cpu_mhz=mean_known(s.cpu_mhz for s in inside),
                           gpu_mhz=mean_known(s.gpu_mhz for s in inside), emc_mhz=mean_known(s.emc_mhz for s in inside),
                           temp_max_c=max(temps) if temps else None)
