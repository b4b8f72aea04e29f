"""Telemetry of a timed window: psutil always (RSS, storage reads, CPU time of this process);
on a Jetson whose jtop service runs, board power, energy, temperatures and the nvpmodel mode.

jetson-stats (the `jtop` package) is AGPL-3.0 and optional (`pip install edgemoe[jetson]`);
it is imported only here and only when asked for.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import psutil


@dataclass(frozen=True)
class WindowTelemetry:
    """One timed window. Power fields are None off a Jetson."""

    seconds: float
    rss_bytes: int                # at the end of the window
    disk_read_bytes: int          # bytes this process had read from storage (page faults included)
    cpu_user_s: float
    cpu_system_s: float
    power_w: Optional[float] = None    # board total, mean over the window
    energy_j: Optional[float] = None   # power_w x seconds
    temp_max_c: Optional[float] = None
    nvpmodel: Optional[str] = None


def jetson_status() -> Tuple[bool, str]:
    """Whether jtop can report power here, else the one-line reason."""
    if importlib.util.find_spec("jtop") is None:
        return False, "jtop (jetson-stats) is not installed"
    try:
        probe = _Jetson()
    except Exception as e:
        return False, f"the jtop service does not answer ({' '.join(str(e).split()) or type(e).__name__})"
    probe.close()
    return True, ""


class _Jetson:
    """A jtop client whose update thread keeps (time, power W, hottest °C) samples."""

    def __init__(self, interval: float = 0.1):
        from jtop import jtop

        self._lock = threading.Lock()
        self._samples: List[Tuple[float, Optional[float], Optional[float]]] = []
        self.nvpmodel: Optional[str] = None
        self._jetson = jtop(interval=interval)
        self._jetson.attach(self._on_update)
        self._jetson.start()  # raises when the service is not running

    def _on_update(self, jetson) -> None:
        power = None
        try:
            power = float(jetson.power["tot"]["power"]) / 1000.0  # mW
        except (KeyError, TypeError, ValueError):
            pass
        temps = []
        try:
            temps = [float(v["temp"]) for v in jetson.temperature.values()
                     if isinstance(v, dict) and v.get("online", True) and v.get("temp", -256) > -256]
        except (AttributeError, TypeError, ValueError):
            pass
        try:
            mode = jetson.nvpmodel
            self.nvpmodel = getattr(mode, "name", None) or (str(mode) if mode is not None else None)
        except Exception:
            pass
        with self._lock:
            self._samples.append((time.monotonic(), power, max(temps) if temps else None))

    def window(self, t0: float, t1: float) -> Tuple[Optional[float], Optional[float]]:
        """Mean power and hottest temperature over [t0, t1]; the latest sample before t1 when
        the window is shorter than the update interval."""
        with self._lock:
            inside = [s for s in self._samples if t0 <= s[0] <= t1]
            if not inside:
                inside = [s for s in self._samples if s[0] <= t1][-1:]
            # keep a few seconds of history only
            self._samples = [s for s in self._samples if s[0] >= t1 - 10.0]
        powers = [p for _, p, _ in inside if p is not None]
        temps = [c for _, _, c in inside if c is not None]
        return (sum(powers) / len(powers) if powers else None), (max(temps) if temps else None)

    def close(self) -> None:
        try:
            self._jetson.close()
        except Exception:
            pass


class Telemetry:
    """Measures windows of this process's work.

    Args:
        jetson: also sample jtop (power, temperatures); silently off where unavailable
            (the caller prints the notice once, from jetson_status()).
    """

    def __init__(self, jetson: bool = True):
        self._proc = psutil.Process()
        self._jetson: Optional[_Jetson] = None
        if jetson:
            try:
                self._jetson = _Jetson()
            except Exception:
                self._jetson = None

    @property
    def has_power(self) -> bool:
        return self._jetson is not None

    def _read_bytes(self) -> int:
        try:
            return int(self._proc.io_counters().read_bytes)
        except (psutil.Error, AttributeError):  # no /proc/<pid>/io (some kernels, macOS)
            return 0

    def start(self) -> tuple:
        cpu = self._proc.cpu_times()
        return time.monotonic(), self._read_bytes(), cpu.user, cpu.system

    def stop(self, started: tuple) -> WindowTelemetry:
        t1 = time.monotonic()
        t0, read0, user0, sys0 = started
        cpu = self._proc.cpu_times()
        seconds = t1 - t0
        out = dict(seconds=seconds, rss_bytes=int(self._proc.memory_info().rss),
                   disk_read_bytes=self._read_bytes() - read0, cpu_user_s=cpu.user - user0,
                   cpu_system_s=cpu.system - sys0)
        if self._jetson is not None:
            power, temp = self._jetson.window(t0, t1)
            out.update(power_w=power, energy_j=power * seconds if power is not None else None,
                       temp_max_c=temp, nvpmodel=self._jetson.nvpmodel)
        return WindowTelemetry(**out)

    def close(self) -> None:
        if self._jetson is not None:
            self._jetson.close()
            self._jetson = None
