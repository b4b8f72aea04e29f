"""edgemoe.telemetry and edgemoe.power_log: energy integration, the real jetson-stats client fed a
recorded Orin NX service payload, the tegrastats fallback, and neither.

jetson-stats' client refuses to start without its service (a root daemon on a Jetson). Its
service is a multiprocessing SyncManager on the Unix socket jtop.service.JTOP_PIPE, exposing a
control queue, the shared stats dict and an update event; the client connects to whatever that
module attribute names. So the test points it at a temp socket and serves the same three objects
there, answering the client's configuration request and publishing the recorded samples as the
service does (JtopServer.run and jtop_stats): jtop's own client code parses every sample.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import queue
import sys
import threading
import time
from dataclasses import asdict

import numpy as np
import pytest

from edgemoe.power_log import PowerLog, Sample, board_total, integrate
from edgemoe.telemetry import Telemetry, jetson_status

# jetson-stats' client reads the platform with a deprecated distro call
pytestmark = pytest.mark.filterwarnings("ignore:distro.linux_distribution:DeprecationWarning")

DATA = os.path.join(os.path.dirname(__file__), "data", "jetson")
ORIN_NX_RAILS = {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}


# -- integration -----------------------------------------------------------------------------

def test_integrate_is_the_trapezoid_rule_held_flat_at_the_ends():
    points = [(0.0, 5.0), (1.0, 9.0), (3.0, 9.0)]
    assert integrate(points, 0.0, 3.0) == pytest.approx(0.5 * (5 + 9) + 2 * 9)
    assert integrate(points, 0.5, 2.0) == pytest.approx(0.5 * (7 + 9) / 2 + 1.0 * 9)  # 7: halfway up
    assert integrate(points, -1.0, 0.0) == pytest.approx(5.0) and integrate(points, 3.0, 4.5) == pytest.approx(13.5)
    assert integrate([], 0.0, 1.0) == 0.0 and integrate(points, 2.0, 2.0) == 0.0


def test_board_total_is_the_input_rail_else_the_sum():
    assert board_total({"VDD_IN": 5000.0, "VDD_SOC": 1200.0}) == 5000.0
    assert board_total({"POM_5V_IN": 4520.0, "POM_5V_CPU": 1078.0}) == 4520.0
    assert board_total({"VDD_GPU_SOC": 3175.0, "VDD_CPU_CV": 793.0}) == 3968.0  # AGX Orin: no input rail
    assert board_total({}) is None


def test_power_log_window_energy_per_rail_clocks_and_staleness():
    log = PowerLog()
    for t, vin, soc, cpu in [(10.0, 5000, 1000, 729.0), (11.0, 9000, 2000, 1497.0), (12.0, 9000, 2000, 1497.0)]:
        log.add(Sample(t=t, rails_mw={"VDD_IN": vin, "VDD_SOC": soc}, total_mw=vin, cpu_mhz=cpu, temp_max_c=t * 4))
    w = log.window(10.5, 12.5)
    assert w.samples == 2
    assert w.energy_j == pytest.approx(0.5 * (7 + 9) / 2 + 1.5 * 9)
    assert w.rail_energy_j == pytest.approx({"VDD_IN": w.energy_j, "VDD_SOC": 0.5 * (1.5 + 2) / 2 + 1.5 * 2})
    assert w.power_w == pytest.approx(w.energy_j / 2.0) and w.cpu_mhz == 1497.0 and w.temp_max_c == 48.0
    short = log.window(11.2, 11.3)  # between two samples: the one before stands in for the clocks
    assert short.samples == 0 and short.cpu_mhz == 1497.0 and short.power_w == pytest.approx(9.0)
    assert log.window(20.0, 21.0).power_w is None  # the last sample is 8 s old: no power, not a guess


# -- the jtop client against a recorded service payload -------------------------------------

class FakeJtopService:
    """jtop's service side on the socket jtop.service.JTOP_PIPE names, serving the recorded
    payload: 'init' answers the client's {"interval": s}; the samples are published in turn."""

    def __init__(self, recorded: dict, period: float = 0.05):
        from jtop.service import JtopManager

        class Manager(JtopManager):  # its own registry: the client's register() calls stay apart
            pass

        self._init = recorded["init"]
        self._samples = recorded["samples"]
        self.published = 0
        q, data, event = multiprocessing.Queue(), {}, multiprocessing.Event()
        Manager.register("get_queue", callable=lambda: q)
        Manager.register("sync_data", callable=lambda: data)
        Manager.register("sync_event", callable=lambda: event)
        self._server = Manager().get_server()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()
        # the service's own side talks to the shared objects through proxies, as jtop_stats does
        publisher = Manager()
        publisher.connect()
        self._q, self._data, self._event = publisher.get_queue(), publisher.sync_data(), publisher.sync_event()
        self._threads += [threading.Thread(target=self._control, daemon=True),
                          threading.Thread(target=self._publish, args=(period,), daemon=True)]
        for t in self._threads[1:]:
            t.start()

    def _serve(self) -> None:
        try:
            self._server.serve_forever()
        except SystemExit:  # how serve_forever ends, even in a thread
            pass

    def _control(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._q.get(True, 0.05)
            except queue.Empty:
                continue
            if "init" in msg:  # the client has not read its answer yet: put it back, as the service does
                self._q.put(msg)
            elif "interval" in msg:
                self._q.put({"init": self._init})

    def _publish(self, period: float) -> None:
        while not self._stop.wait(period):
            self._data.update(self._samples[self.published % len(self._samples)])
            self._event.set()
            self.published += 1

    def close(self) -> None:
        self._stop.set()
        for t in self._threads[1:]:
            t.join()
        self._server.stop_event.set()
        self._threads[0].join(timeout=3)
        multiprocessing.current_process().__dict__.pop("_manager_server", None)


@pytest.fixture
def recorded():
    with open(os.path.join(DATA, "orin_nx_service.json")) as f:
        return json.load(f)


@pytest.fixture
def no_jtop_service(tmp_path, monkeypatch):
    import jtop.service

    monkeypatch.setattr(jtop.service, "JTOP_PIPE", str(tmp_path / "jtop.sock"))


@pytest.fixture
def jtop_service(no_jtop_service, recorded):
    service = FakeJtopService(recorded)
    yield service
    service.close()


def _expected_energies(samples, t0: float, t1: float) -> dict:
    """Each rail's trapezoid integral over [t0, t1], computed with numpy from the samples the
    telemetry logged, held flat beyond the first and last."""
    out = {}
    for name in {n for s in samples for n in s.rails_mw}:
        ts = np.array([s.t for s in samples if name in s.rails_mw])
        watts = np.array([s.rails_mw[name] / 1e3 for s in samples if name in s.rails_mw])
        grid = np.concatenate(([t0], ts[(ts > t0) & (ts < t1)], [t1]))
        out[name] = float(np.trapezoid(np.interp(grid, ts, watts), grid))
    return out


def _measure(tel: Telemetry, seconds: float, freeze: bool = False):
    """A window of `seconds`. freeze: end the sampling first (the source's close joins its
    thread), so that the samples read back are exactly those the window integrated; without it a
    sample stamped before the window's end but logged after it (a loaded CI machine) differs."""
    started = tel.start()
    time.sleep(seconds)
    if freeze:
        tel._source.close()
    w = tel.stop(started)
    return w, started[0], started[0] + w.seconds, tel._log.samples()


def _check_energy(w, t0, t1, samples, low_w, high_w):
    assert set(w.rail_energy_j) == ORIN_NX_RAILS
    assert w.rail_energy_j == pytest.approx(_expected_energies(samples, t0, t1), rel=1e-9)
    assert w.energy_j == w.rail_energy_j["VDD_IN"]  # the board total is the input rail
    assert low_w * w.seconds <= w.energy_j <= high_w * w.seconds
    assert w.power_w == pytest.approx(w.energy_j / w.seconds)


def test_jtop_client_parses_a_recorded_orin_nx_payload(jtop_service, recorded):
    assert jetson_status() == (True, "jtop")
    tel = Telemetry(jetson=True)
    try:
        assert tel.has_power
        deadline = time.monotonic() + 5
        while len(tel._log.samples()) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        w, t0, t1, samples = _measure(tel, 0.6, freeze=True)
    finally:
        tel.close()
    assert w.power_source == "jtop" and w.nvpmodel == "15W" and w.power_samples >= 3
    _check_energy(w, t0, t1, samples, low_w=5.0, high_w=10.4)  # VDD_IN spans 5.0-10.4 W in the payload
    # what jtop's client handed over, converted from kHz: exactly the recorded clocks
    cpu = {s["cpu"]["cpu"][0]["freq"]["cur"] / 1e3 for s in recorded["samples"]}
    assert {s.cpu_mhz for s in samples} <= cpu and {s.gpu_mhz for s in samples} <= {306.0, 408.0, 612.0}
    assert {s.emc_mhz for s in samples} <= {2133.0, 3199.0}
    assert {s.temp_max_c for s in samples} <= {s["temperature"]["tj"]["temp"] for s in recorded["samples"]}
    inside = [s for s in samples if t0 <= s.t <= t1]
    assert w.cpu_mhz == pytest.approx(np.mean([s.cpu_mhz for s in inside]))
    assert w.gpu_mhz == pytest.approx(np.mean([s.gpu_mhz for s in inside]))
    assert w.emc_mhz == pytest.approx(np.mean([s.emc_mhz for s in inside]))
    assert w.temp_max_c == max(s.temp_max_c for s in inside)


def test_bench_row_energy_per_token_and_clocks(jtop_service):
    from edgemoe.bench.results import Row, fill_measurements

    tel = Telemetry(jetson=True)
    try:
        windows = [_measure(tel, 0.3)[0] for _ in range(2)]
    finally:
        tel.close()
    reps = [dict(rep=i, ns=int(w.seconds * 1e9), n_tokens=16, n_prompt_tokens=0, ttft_ms=None, tpot_ms=[1.0] * 16,
                 hits=0, misses=0, prefetch_hits=0, bytes_read=0, read_ms=0.0, stall_ms=0.0, peak_rss_bytes=1,
                 telemetry=json.loads(json.dumps(asdict(w))))  # as the child hands it over
            for i, w in enumerate(windows)]
    row = Row(test="tg16")
    fill_measurements(row, reps)
    assert row.power_source == "jtop" and row.nvpmodel == "15W"
    assert row.energy_per_token_j == pytest.approx(np.mean([w.energy_j / 16 for w in windows]))
    rails = dict(kv.split("=") for kv in row.rail_energy_per_token_j.split(","))
    assert set(rails) == ORIN_NX_RAILS
    assert float(rails["VDD_SOC"]) == pytest.approx(np.mean([w.rail_energy_j["VDD_SOC"] / 16 for w in windows]), rel=1e-5)
    assert 729.6 <= row.cpu_mhz <= 1497.6 and 306 <= row.gpu_mhz <= 612 and 2133 <= row.emc_mhz <= 3199


# -- the tegrastats fallback, and neither ----------------------------------------------------

TEGRASTATS = f"""#!{sys.executable}
# replays recorded lines as `tegrastats --interval MS` prints them, one a line, flushed
import sys, time
ms = int(sys.argv[sys.argv.index("--interval") + 1])
lines = [l for l in open({os.path.join(DATA, "tegrastats_orin_nx.txt")!r}) if l.strip() and not l.startswith("#")]
i = 0
while True:
    sys.stdout.write(lines[i % len(lines)])
    sys.stdout.flush()
    i += 1
    time.sleep(ms / 1000)
"""

NVPMODEL = f"""#!{sys.executable}
import sys
if sys.argv[1:] == ["-q"]:
    sys.stdout.write(open({os.path.join(DATA, "nvpmodel_q.txt")!r}).read())
"""


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("tegrastats", TEGRASTATS), ("nvpmodel", NVPMODEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_tegrastats_fallback_when_the_jtop_service_is_absent(no_jtop_service, fake_tools):
    assert jetson_status() == (True, "tegrastats")
    tel = Telemetry(jetson=True)
    source = tel._source
    try:
        w, t0, t1, samples = _measure(tel, 0.6, freeze=True)
    finally:
        tel.close()
    assert source._proc.returncode is not None  # the child is gone with the telemetry
    assert w.power_source == "tegrastats" and w.nvpmodel == "15W" and w.power_samples >= 3
    _check_energy(w, t0, t1, samples, low_w=5.0, high_w=10.4)  # VDD_IN spans 5.0-10.4 W in the lines
    assert {s.cpu_mhz for s in samples} <= {729.0, 1497.0} and {s.gpu_mhz for s in samples} <= {305, 612}
    assert {s.emc_mhz for s in samples} <= {2133, 3199} and {s.temp_max_c for s in samples} <= {45.5, 51.0, 52.5}
    assert 729 <= w.cpu_mhz <= 1497 and 305 <= w.gpu_mhz <= 612


def test_neither_source_leaves_power_empty_with_a_one_line_reason(no_jtop_service, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    ok, why = jetson_status()
    assert not ok and "\n" not in why
    assert why.startswith("the jtop service does not answer (") and why.endswith("and no tegrastats on PATH")
    tel = Telemetry(jetson=True)
    w = tel.stop(tel.start())
    tel.close()
    assert not tel.has_power and w.power_source is None and w.power_samples == 0
    assert (w.power_w, w.energy_j, w.rail_energy_j, w.nvpmodel, w.cpu_mhz, w.gpu_mhz, w.emc_mhz) == (None,) * 7
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jtop" else find_spec(name, *a))
    assert jetson_status() == (False, "jtop (jetson-stats) is not installed, and no tegrastats on PATH")
