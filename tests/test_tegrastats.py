"""The tegrastats and `nvpmodel -q` parsers on recorded lines of several boards and releases
(tests/data/jetson/tegrastats_*.txt, each saying where its format comes from)."""

from __future__ import annotations

import os

import pytest

from edgemoe.tegrastats import TegrastatsLine, parse_line, parse_nvpmodel_query

DATA = os.path.join(os.path.dirname(__file__), "data", "jetson")


def lines(board: str):
    with open(os.path.join(DATA, f"tegrastats_{board}.txt")) as f:
        return [line for line in f if line.strip() and not line.startswith("#")]


def test_orin_nx_rails_clocks_and_temperatures():
    idle, load, _ = (parse_line(line) for line in lines("orin_nx"))
    assert idle.rails_mw == {"VDD_IN": 5000, "VDD_CPU_GPU_CV": 800, "VDD_SOC": 1200}
    assert load.rails_mw == {"VDD_IN": 9800, "VDD_CPU_GPU_CV": 4300, "VDD_SOC": 2100}  # instant, not average
    assert idle.cpu_mhz == (729, 729, 729, 729, None, None, None, None)
    assert (idle.gpu_mhz, idle.emc_mhz, load.gpu_mhz, load.emc_mhz) == (305, 2133, 612, 3199)
    assert idle.temps_c["tj"] == 45.5 and idle.temps_c["soc2"] == 43.156
    assert not any(name.startswith("cv") for name in idle.temps_c)  # -256C: the sensor is off


def test_orin_nano_with_and_without_averages():
    full, short = (parse_line(line) for line in lines("orin_nano"))
    assert full.rails_mw == short.rails_mw == {"VDD_IN": 5765, "VDD_CPU_GPU_CV": 1548, "VDD_SOC": 1497}
    assert full.cpu_mhz == short.cpu_mhz == (1420, None, None, 1420, 1420, 1420)
    assert full.gpu_mhz == 624 and short.gpu_mhz is None  # `GR3D_FREQ 76%`: no clock printed
    assert full.emc_mhz == 2133 and short.emc_mhz is None
    assert full.temps_c["CPU"] == 42.5 and "CV0" not in full.temps_c and short.temps_c["PMIC"] == 50.0


def test_agx_orin_rails_and_two_gpcs():
    (p,) = (parse_line(line) for line in lines("agx_orin"))
    assert p.rails_mw == {"VDD_GPU_SOC": 3175, "VDD_CPU_CV": 793, "VIN_SYS_5V0": 4014, "VDDQ_VDD2_1V8AO": 503}
    assert len(p.cpu_mhz) == 12 and p.cpu_mhz.count(None) == 4 and p.gpu_mhz == 305


def test_jetpack4_rails_without_units():
    (xavier,) = (parse_line(line) for line in lines("agx_xavier"))
    assert xavier.rails_mw == {"VDD_IN": 14025, "VDD_CPU": 2209, "VDD_GPU": 6854, "VDD_SOC": 1371,
                               "VDD_WIFI": 19, "VDD_DDR": 2702}
    assert xavier.cpu_mhz == (2035, 2034, 2034, 2035, 2035, 2035)
    assert (xavier.gpu_mhz, xavier.emc_mhz) == (1300, 1866)
    assert xavier.temps_c["BCPU"] == -45.0 and xavier.temps_c["PMIC"] == 100.0
    (nano,) = (parse_line(line) for line in lines("nano"))
    assert nano.rails_mw == {"POM_5V_IN": 4520, "POM_5V_GPU": 0, "POM_5V_CPU": 1078}  # not RAM, SWAP or IRAM
    assert nano.cpu_mhz == (1036,) * 4 and (nano.gpu_mhz, nano.emc_mhz) == (76, 1600)


def test_old_form_shares_one_cpu_clock_and_has_no_rails():
    (p,) = (parse_line(line) for line in lines("tx1"))
    assert p.rails_mw == {} and p.cpu_mhz == (408,) * 4
    assert (p.gpu_mhz, p.emc_mhz) == (76, 408) and p.temps_c == {}


def test_an_unrelated_line_parses_to_nothing():
    assert parse_line("tegrastats: permission denied\n") == TegrastatsLine()


def test_nvpmodel_query_recorded():
    with open(os.path.join(DATA, "nvpmodel_q.txt")) as f:
        assert parse_nvpmodel_query(f.read()) == "15W"


@pytest.mark.parametrize("text, mode", [
    ("NVPM WARN: fan mode is not set!\nNV Power Mode: MAXN_SUPER\n2\n", "MAXN_SUPER"),
    ("nvpmodel: command failed\n", None),
])
def test_nvpmodel_query(text, mode):
    assert parse_nvpmodel_query(text) == mode
