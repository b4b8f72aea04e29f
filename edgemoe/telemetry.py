"""Telemetry of a timed window: psutil always (RSS, storage reads, CPU time of this process);
on a Jetson, power per rail integrated to joules, temperatures, CPU/GPU/EMC clocks and the
nvpmodel mode, sampled every 0.1 s by one of two sources, tried in order:

- jtop: a client of the jetson-stats service (`jetson.power`, `.cpu`, `.gpu`, `.memory["EMC"]`,
  `.temperature`, `.nvpmodel`);
- tegrastats: the L4T tool as a child process (`tegrastats --interval 100`, one line a sample,
  edgemoe.tegrastats parses it), with the mode from `nvpmodel -q` at the start.

jetson-stats (the `jtop` package) is AGPL-3.0 and optional (`pip install edgemoe[jetson]`);
it is imported only here and only when asked for.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import psutil

from edgemoe.power_log import PowerLog, Sample, board_total
from edgemoe.tegrastats import parse_line, parse_nvpmodel_query

INTERVAL_S = 0.1
FIRST_LINE_S = 3.0  # how long tegrastats may take to print its first line


@dataclass(frozen=True)
class WindowTelemetry:
    """One timed window. The power, clock and temperature fields are None off a Jetson."""

    seconds: float
    rss_bytes: int                # at the end of the window
    disk_read_bytes: int          # bytes this process had read from storage (page faults included)
    cpu_user_s: float
    cpu_system_s: float
    power_source: Optional[str] = None  # "jtop" or "tegrastats"
    power_samples: int = 0              # samples inside the window
    power_w: Optional[float] = None     # board total: energy_j / seconds
    energy_j: Optional[float] = None    # board total, trapezoid over the samples (edgemoe.power_log)
    rail_energy_j: Optional[Dict[str, float]] = None  # the same, per rail
    temp_max_c: Optional[float] = None
    nvpmodel: Optional[str] = None
    cpu_mhz: Optional[float] = None     # means over the window's samples (CPU: of the online cores)
    gpu_mhz: Optional[float] = None
    emc_mhz: Optional[float] = None


def _khz_to_mhz(value) -> Optional[float]:
    return float(value) / 1e3 if isinstance(value, (int, float)) and value > 0 else None


def _jtop_sample(jetson, t: float) -> Sample:
    """One jtop update as a Sample; what this board or release lacks stays None."""
    power = jetson.power or {}
    rails = {name: float(v["power"]) for name, v in power.get("rail", {}).items()
             if v.get("online", True) and "power" in v}
    tot = power.get("tot") or {}
    total = float(tot["power"]) if "power" in tot else None
    if "name" in tot and total is not None:  # jtop moves the input rail (VDD_IN) into "tot"
        rails[tot["name"]] = total
    cores = [_khz_to_mhz(c.get("freq", {}).get("cur")) for c in jetson.cpu.get("cpu", []) if c.get("online")]
    cores = [c for c in cores if c is not None]
    gpus = [_khz_to_mhz(g.get("freq", {}).get("cur")) for g in jetson.gpu.values() if g.get("type") == "integrated"]
    emc = jetson.memory.get("EMC") or {}
    temps = [float(v["temp"]) for v in jetson.temperature.values()
             if isinstance(v, dict) and v.get("online", True) and v.get("temp", -256) > -256]
    return Sample(t=t, rails_mw=rails, total_mw=total, cpu_mhz=sum(cores) / len(cores) if cores else None,
                  gpu_mhz=next((g for g in gpus if g is not None), None),
                  emc_mhz=_khz_to_mhz(emc.get("cur")) if emc.get("online", True) else None,
                  temp_max_c=max(temps) if temps else None)


class _Jtop:
    """A jtop client whose update thread logs samples."""

    name = "jtop"

    def __init__(self, log: PowerLog, interval: float):
        from jtop import jtop

        self._log = log
        self.nvpmodel: Optional[str] = None
        self._jetson = jtop(interval=interval)
        self._jetson.attach(self._on_update)
        self._jetson.start()  # raises when the service is not running

    def _on_update(self, jetson) -> None:
        t = time.monotonic()
        try:
            mode = jetson.nvpmodel
            self.nvpmodel = mode.name if mode is not None else None
        except (AttributeError, KeyError):
            pass
        try:
            self._log.add(_jtop_sample(jetson, t))
        except (AttributeError, KeyError, TypeError, ValueError):
            pass  # a payload this release shapes differently: no sample rather than a dead client

    def close(self) -> None:
        try:
            self._jetson.close()
        except Exception:
            pass
        if self._jetson.is_alive():  # its loop ends at the next update: none lands after close()
            self._jetson.join(timeout=1.0)


def _tegrastats_sample(line: str, t: float) -> Sample:
    p = parse_line(line)
    online = [c for c in p.cpu_mhz if c is not None]
    rails = {name: float(mw) for name, mw in p.rails_mw.items()}
    return Sample(t=t, rails_mw=rails, total_mw=board_total(rails),
                  cpu_mhz=sum(online) / len(online) if online else None,
                  gpu_mhz=p.gpu_mhz, emc_mhz=p.emc_mhz, temp_max_c=max(p.temps_c.values(), default=None))


class _Tegrastats:
    """`tegrastats` as a child process; a reader thread logs one sample a line."""

    name = "tegrastats"

    def __init__(self, log: PowerLog, interval: float, binary: str):
        self._log = log
        self.nvpmodel = _nvpmodel_query()
        self._first = threading.Event()
        self._proc = subprocess.Popen([binary, "--interval", str(max(1, round(interval * 1000)))],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                      bufsize=1)
        self._thread = threading.Thread(target=self._read, name="tegrastats", daemon=True)
        self._thread.start()
        if not self._first.wait(max(FIRST_LINE_S, 3 * interval)):
            self.close()
            raise RuntimeError(f"tegrastats printed nothing in {max(FIRST_LINE_S, 3 * interval):g} s")

    def _read(self) -> None:
        for line in self._proc.stdout:
            if line.strip():
                self._log.add(_tegrastats_sample(line, time.monotonic()))
                self._first.set()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._thread.join(timeout=2)
        self._proc.stdout.close()


def _nvpmodel_query() -> Optional[str]:
    binary = shutil.which("nvpmodel")
    if binary is None:
        return None
    try:
        done = subprocess.run([binary, "-q"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvpmodel_query(done.stdout)


def _open_source(log: PowerLog, interval: float):
    """(source, "") from the first source that answers, else (None, the one-line reason)."""
    if importlib.util.find_spec("jtop") is None:
        why = "jtop (jetson-stats) is not installed"
    else:
        try:
            return _Jtop(log, interval), ""
        except Exception as e:
            why = f"the jtop service does not answer ({' '.join(str(e).split()) or type(e).__name__})"
    binary = shutil.which("tegrastats")
    if binary is None:
        return None, f"{why}, and no tegrastats on PATH"
    try:
        return _Tegrastats(log, interval, binary), ""
    except (OSError, RuntimeError) as e:
        return None, f"{why}, and tegrastats failed ({' '.join(str(e).split())})"


def jetson_status() -> Tuple[bool, str]:
    """(True, the source's name) where power can be sampled here, else (False, the one-line reason)."""
    source, why = _open_source(PowerLog(), INTERVAL_S)
    if source is None:
        return False, why
    source.close()
    return True, source.name


class Telemetry:
    """Measures windows of this process's work.

    Args:
        jetson: also sample power, clocks and temperatures (jtop, else tegrastats); silently
            off where neither answers (the caller prints the notice once, from jetson_status()).
    """

    def __init__(self, jetson: bool = True, interval: float = INTERVAL_S):
        self._proc = psutil.Process()
        self._log = PowerLog()
        self._source = _open_source(self._log, interval)[0] if jetson else None

    @property
    def has_power(self) -> bool:
        return self._source is not None

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
        out = dict(seconds=t1 - t0, rss_bytes=int(self._proc.memory_info().rss),
                   disk_read_bytes=self._read_bytes() - read0, cpu_user_s=cpu.user - user0,
                   cpu_system_s=cpu.system - sys0)
        if self._source is not None:
            w = self._log.window(t0, t1)
            out.update(power_source=self._source.name, power_samples=w.samples, power_w=w.power_w,
                       energy_j=w.energy_j, rail_energy_j=w.rail_energy_j, temp_max_c=w.temp_max_c,
                       nvpmodel=self._source.nvpmodel, cpu_mhz=w.cpu_mhz, gpu_mhz=w.gpu_mhz,
                       emc_mhz=w.emc_mhz)
        return WindowTelemetry(**out)

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None
