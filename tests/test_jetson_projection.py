"""benchmarks/jetson_projection.py: the Q4_K_M byte count, the calibration from BENCHMARKS.md, the
step model's arithmetic and the projection's shape (nothing is loaded or run)."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import jetson_projection as jp  # noqa: E402


def test_use_more_bits_layers_of_27():
    assert [i for i in range(27) if jp.use_more_bits(i, 27)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26]


@pytest.mark.parametrize("kind, layer, ncols, want", [
    ("ffn_down", 1, 1408, "Q8_0"),     # Q6_K, but 1408 is not a multiple of 256
    ("ffn_down", 3, 1408, "Q5_0"),     # Q4_K falls back the same way
    ("ffn_down", 0, 10944, "Q8_0"),    # the dense layer's down
    ("ffn_down", 3, 2816, "Q4_K"),     # shared experts' down: 2816 = 11 x 256
    ("ffn_down", 5, 2816, "Q6_K"),
    ("other", 7, 2048, "Q4_K"),        # gate/up experts, attention
    ("attn_kv_b", 0, 512, "Q6_K"),
    ("attn_kv_b", 3, 512, "Q4_K"),
    ("output", -1, 2048, "Q6_K"),
    ("token_embd", -1, 2048, "Q4_K"),
    ("gate_inp", 4, 2048, "F32"),
])
def test_q4_k_m_types(kind, layer, ncols, want):
    assert jp.q4_k_m_type(kind, layer, ncols) == want


def test_expert_bytes_by_hand():
    gate_up = 2 * 1408 * (2048 // 256) * 144          # Q4_K rows of 2048
    q5 = gate_up + 2048 * (1408 // 32) * 22           # down, Q5_0 rows of 1408
    q8 = gate_up + 2048 * (1408 // 32) * 34           # down, Q8_0
    assert (q5, q8) == (5_226_496, 6_307_840)
    mb = jp.model_bytes()
    assert mb.expert == 64 * (12 * q8 + 14 * q5)
    assert mb.mean_expert == pytest.approx((12 * q8 + 14 * q5) / 26)
    assert mb.total == mb.expert + mb.non_expert


def test_file_matches_the_published_size():
    mb = jp.model_bytes()
    # weights only; the published 10.4 GB also holds the header and tokenizer (a few MB)
    assert abs(mb.total / 1e9 - jp.PUBLISHED_FILE_GB) < 0.05
    assert 0.9 < mb.expert / mb.total < 0.93
    # one token reads its 6 x 26 experts and every non-expert weight but the embedding table
    embd = 102400 * 2048 // 256 * 144
    assert mb.active == int(mb.non_expert - embd + 156 * mb.mean_expert)


def test_kv_cache_and_budgets():
    assert jp.kv_cache_bytes(4096) == 4096 * 27 * 576 * 2
    mb = jp.model_bytes()
    b8 = jp.expert_budget_bytes(jp.USABLE_GIB["8 GB"], mb)
    by_hand = 7.4 * 2 ** 30 - (1.5 + 0.6) * 1e9 - 300 * 2 ** 20 - mb.non_expert - jp.kv_cache_bytes(4096)
    assert b8 == pytest.approx(by_hand)
    assert 0.4 < b8 / mb.expert < 0.55
    assert jp.expert_budget_bytes(jp.USABLE_GIB["16 GB"], mb) == mb.expert      # all of them fit
    assert jp.expert_budget_bytes(2.0, mb) == 0.0
    assert jp.expert_budget_bytes(7.0, mb) < b8 < jp.expert_budget_bytes(8.0, mb)


def test_calibration_from_the_benchmark_tables():
    # stock: LRU misses x 6.57 MiB over (cold TPOT - warm 38.3 ms), against 2.22 GB/s
    e = 6.57 * 2 ** 20
    eta25 = 64 * (1 - 0.5332) * e / 0.1821 / 2.22e9
    eta50 = 64 * (1 - 0.8667) * e / 0.0492 / 2.22e9
    assert jp.ETA_FAULT == pytest.approx((eta25 + eta50) / 2, rel=1e-3)
    assert jp.ETA_FAULT == pytest.approx(0.524, abs=0.002)
    assert jp.ETA_DIRECT == pytest.approx((134 / 70.9 + 32 / 16.6) / 2 / 2.22, rel=1e-6)
    assert jp.OVERLAP == pytest.approx((1 - 135.7 / 162.1 + 1 - 62.9 / 70.9 + 1 - 14.5 / 16.6) / 3)
    assert 0.11 < jp.OVERLAP < 0.16


def test_tpot_arithmetic_by_hand():
    # 1 GB at 50 GB/s = 20 ms; 10 misses x 5 MB at 2.5 GB/s = 20 ms; a quarter of that hidden
    assert jp.tpot_ms(1e9, 10, 5e6, 50, 2.5, 0.25) == pytest.approx((35.0, 20.0, 15.0))
    assert jp.tpot_ms(1e9, 10, 5e6, 50, 2.5) == pytest.approx((40.0, 20.0, 20.0))
    # full overlap cannot hide more than the compute: the step is max(compute, reads)
    assert jp.tpot_ms(1e9, 20, 5e6, 50, 2.5, 1.0)[0] == pytest.approx(40.0)
    assert jp.tpot_ms(1e9, 5, 5e6, 50, 2.5, 1.0)[0] == pytest.approx(20.0)


def test_project_by_hand_at_a_measured_point():
    mb = jp.model_bytes()
    inp = jp.Inputs(storage_gbps=3.0, mem_gbps=51.2, eta_direct=0.8, eta_fault=0.5, overlap=0.1)
    r = jp.project(0.25, inp, mb=mb)
    compute = mb.active / 51.2e9 * 1e3
    stock_reads = 156 * (1 - 0.5332) * mb.mean_expert / 1.5e9 * 1e3
    edge_reads = 156 * (1 - 0.6516) * mb.mean_expert / 2.4e9 * 1e3
    assert r["compute_ms"] == pytest.approx(compute)
    assert r["stock_ms"] == pytest.approx(compute + stock_reads)
    assert r["edgemoe_ms"] == pytest.approx(compute + 0.9 * edge_reads)
    assert r["hit_stock"] == pytest.approx(0.5332) and r["hit_edgemoe"] == pytest.approx(0.6516)


def test_the_stock_row_uses_the_stock_miss_model(monkeypatch):
    base = jp.project(0.25)
    # prefetch overlap and the direct-read efficiency are edgemoe's: stock does not move
    for kw in ({"overlap": 0.0}, {"overlap": 0.5}, {"eta_direct": 0.3}):
        r = jp.project(0.25, replace(jp.Inputs(), **kw))
        assert r["stock_ms"] == pytest.approx(base["stock_ms"])
        assert r["edgemoe_ms"] != pytest.approx(base["edgemoe_ms"])
    # the fault efficiency is stock's: edgemoe does not move
    r = jp.project(0.25, replace(jp.Inputs(), eta_fault=0.3))
    assert r["edgemoe_ms"] == pytest.approx(base["edgemoe_ms"]) and r["stock_ms"] > base["stock_ms"]
    # stock reads the LRU column, edgemoe the default policy's
    curve = dict(jp.HIT_UNTUNED)
    curve[0.25] = (0.9, curve[0.25][1])
    monkeypatch.setattr(jp, "HIT_UNTUNED", curve)
    r = jp.project(0.25)
    assert r["hit_stock"] == pytest.approx(0.9) and r["stock_ms"] < base["stock_ms"]
    assert r["edgemoe_ms"] == pytest.approx(base["edgemoe_ms"])


def test_monotone_in_the_budget():
    grid = [0.125 + i * (1 - 0.125) / 70 for i in range(71)]
    for tuned in (False, True):
        rows = [jp.project(f, tuned=tuned) for f in grid]
        for a, b in zip(rows, rows[1:]):
            assert b["stock_ms"] <= a["stock_ms"] + 1e-9
            assert b["edgemoe_ms"] <= a["edgemoe_ms"] + 1e-9
            assert b["budget_gb"] > a["budget_gb"]
        assert all(r["edgemoe_ms"] <= r["stock_ms"] for r in rows)


def test_all_resident_is_compute_alone_for_both():
    r = jp.project(1.0)
    assert r["stock_ms"] == pytest.approx(r["compute_ms"]) == pytest.approx(r["edgemoe_ms"])
    assert r["read_mb_stock"] == 0 and r["speedup"] == pytest.approx(1.0)
    # a hit-rate shift does not apply once every expert is resident
    assert jp.project(1.0, replace(jp.Inputs(), hit_shift=-0.05))["stock_ms"] == pytest.approx(r["stock_ms"])


def test_sensitivity_directions():
    base = jp.project(0.25)
    slow, fast = (jp.project(0.25, replace(jp.Inputs(), storage_gbps=s)) for s in (1.5, 5.0))
    assert slow["stock_ms"] > base["stock_ms"] > fast["stock_ms"]
    assert slow["edgemoe_ms"] > base["edgemoe_ms"] > fast["edgemoe_ms"]
    worse = jp.project(0.25, replace(jp.Inputs(), hit_shift=-0.05))
    assert worse["hit_stock"] == pytest.approx(base["hit_stock"] - 0.05)
    assert worse["edgemoe_ms"] > base["edgemoe_ms"]
    # reading top-8 routes at 8/6 of the budget can only help (hit rates rise with the budget)
    opt = jp.project(0.25, replace(jp.Inputs(), mapping="slots-per-k"))
    assert opt["hit_edgemoe"] == pytest.approx(jp.hit_rate(jp.HIT_UNTUNED, 0.25 * 8 / 6, "default"))
    assert opt["edgemoe_ms"] < base["edgemoe_ms"]
    # the tuned router's routes miss less under both
    tuned = jp.project(0.25, tuned=True)
    assert tuned["stock_ms"] < base["stock_ms"] and tuned["edgemoe_ms"] < base["edgemoe_ms"]


def test_hit_rate_interpolates_and_refuses_outside_the_measurements():
    assert jp.hit_rate(jp.HIT_UNTUNED, 0.25, "lru") == pytest.approx(0.5332)
    mid = (0.25 + 0.296875) / 2
    assert jp.hit_rate(jp.HIT_UNTUNED, mid, "default") == pytest.approx((0.6516 + 0.7188) / 2)
    assert jp.hit_rate(jp.HIT_UNTUNED, 1.3, "default") == 1.0
    with pytest.raises(ValueError):
        jp.hit_rate(jp.HIT_UNTUNED, 0.10, "lru")
    for curve in (jp.HIT_UNTUNED, jp.HIT_TUNED):
        xs = sorted(curve)
        for col in (0, 1):
            ys = [curve[x][col] for x in xs]
            assert ys == sorted(ys) and all(0 <= y <= 1 for y in ys)
        # the default policy never does worse than LRU on the same routes
        assert all(curve[x][1] >= curve[x][0] for x in xs)


def test_stock_budget_for_inverts_the_stock_model():
    t = jp.project(0.3)["stock_ms"]
    assert jp.stock_budget_for(t) == pytest.approx(0.3, abs=1e-6)
    assert jp.stock_budget_for(1.0) != jp.stock_budget_for(1.0)          # nan: below compute
    assert jp.stock_budget_for(1e6) != jp.stock_budget_for(1e6)          # nan: above the range


def test_report_prints_the_tables():
    out = jp.report()
    assert "| 8 GB board, all free RAM" in out and "| 16 GB board, all free RAM (100%)" in out
    assert "budget for 555 ms" in out
    assert out.count("### Sensitivity") == 2
