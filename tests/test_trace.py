"""`edgemoe trace` and `edgemoe trace-stats`: the trace file format, the statistics, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import N_THREADS, TINY, assert_one_line_error, needs_cache
from edgemoe.trace import (FORMAT_VERSION, Trace, TraceFormatError, eor_per_layer, load_trace, lru_capacity,
                           lru_hit_rate, routing_stats, routes_from_rows, save_trace, usage_entropy_bits)

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be "
        "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
        "surrounding families, that he is considered the rightful property of some one or other of "
        "their daughters.\n")


def _cli(args, env):
    return subprocess.run([sys.executable, "-m", "edgemoe", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _one_line_error(proc):
    assert proc.returncode == 1, proc.stderr
    return assert_one_line_error(proc)


def _trace(experts, n_expert=8, layers=None):
    experts = np.asarray(experts, dtype=np.int32)
    n, n_layers, _ = experts.shape
    return Trace(experts=experts, layers=np.arange(n_layers, dtype=np.int32) if layers is None else layers,
                 tokens=np.arange(n, dtype=np.int32), n_expert=n_expert, model="m.gguf")


# -- statistics --------------------------------------------------------------------------


def test_eor_extremes_and_a_hand_computed_case():
    same = np.tile(np.array([[[1, 2, 3, 4]]]), (10, 1, 1))
    assert eor_per_layer(same).tolist() == [1.0]
    alternating = np.array([[[0, 1]], [[2, 3]]] * 5)
    assert eor_per_layer(alternating).tolist() == [0.0]
    # overlaps 1/2 then 2/2 (order within a token does not matter): mean 0.75
    hand = np.array([[[0, 1]], [[1, 2]], [[2, 1]]])
    assert eor_per_layer(hand).tolist() == [0.75]


def _lru_reference(seq, capacity):
    """A list-based LRU: most recent last."""
    resident, hits = [], 0
    for e in seq:
        if e in resident:
            hits += 1
            resident.remove(e)
        elif len(resident) == capacity:
            resident.pop(0)
        resident.append(e)
    return hits / len(seq)


def test_lru_hit_rate_matches_a_reference_and_bounds():
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(16, size=4, replace=False) for _ in range(300)])
    for capacity in (1, 3, 4, 8, 15):
        assert lru_hit_rate(ids, capacity) == pytest.approx(_lru_reference(ids.ravel().tolist(), capacity))
    # big enough for every expert: only the first use of each misses
    assert lru_hit_rate(ids, 16) == pytest.approx(1 - len(np.unique(ids)) / ids.size)
    # a capacity below k with the same four experts every token: LRU evicts what comes next
    cyc = np.tile(np.arange(4), (50, 1))
    assert lru_hit_rate(cyc, 3) == 0.0 and lru_hit_rate(cyc, 4) == pytest.approx(1 - 4 / 200)


def test_entropy_uniform_and_single_expert():
    uniform = np.arange(64).reshape(16, 1, 4)[:, 0]
    assert usage_entropy_bits(uniform, 64) == pytest.approx(6.0)
    assert usage_entropy_bits(np.zeros((10, 1), dtype=np.int32), 64) == 0.0


def test_routing_stats_per_layer_and_means():
    rng = np.random.default_rng(1)
    layer0 = np.tile(np.array([0, 1]), (40, 1))  # always the same pair: EOR 1, entropy 1 bit
    layer1 = np.stack([rng.choice(8, size=2, replace=False) for _ in range(40)])
    t = _trace(np.stack([layer0, layer1], axis=1), n_expert=8, layers=np.array([3, 5], dtype=np.int32))
    s = routing_stats(t)
    assert [l.layer for l in s.layers] == [3, 5]
    assert s.lru_capacity == {"10%": 1, "25%": 2, "50%": 4}
    l0 = s.layers[0]
    assert l0.eor == 1.0 and l0.entropy_bits == pytest.approx(1.0) and l0.entropy_norm == pytest.approx(1 / 3)
    assert l0.lru_hit_rate["25%"] == pytest.approx(1 - 2 / 80)
    assert l0.lru_hit_rate["10%"] == 0.0  # one slot, two alternating experts
    assert s.eor == pytest.approx((1.0 + s.layers[1].eor) / 2)
    assert s.lru_hit_rate["50%"] == pytest.approx((l0.lru_hit_rate["50%"] + s.layers[1].lru_hit_rate["50%"]) / 2)
    assert json.loads(json.dumps(s.to_json()))["layers"][1]["layer"] == 5


def test_lru_capacity_rounds_and_never_zero():
    assert [lru_capacity(f, 64) for f in (0.10, 0.25, 0.50)] == [6, 16, 32]
    assert lru_capacity(0.10, 4) == 1


def test_routes_from_rows_reorders_and_checks():
    # rows come layer by layer per evaluation: two windows of 2 tokens, layers 0 and 2
    rows = np.array([[0, 0, 1, 2], [0, 1, 3, 4], [2, 0, 5, 6], [2, 1, 7, 0],
                     [0, 2, 2, 1], [0, 3, 4, 3], [2, 2, 6, 5], [2, 3, 0, 7]], dtype=np.int32)
    experts, layers = routes_from_rows(rows, 4)
    assert layers.tolist() == [0, 2]
    assert experts[:, 0].tolist() == [[1, 2], [3, 4], [2, 1], [4, 3]]
    assert experts[:, 1].tolist() == [[5, 6], [7, 0], [6, 5], [0, 7]]
    from edgemoe.errors import EdgemoeError

    with pytest.raises(EdgemoeError):
        routes_from_rows(rows[:-1], 4)  # layer 2 misses a token


# -- the file format ---------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    t = _trace(np.random.default_rng(2).integers(0, 8, size=(5, 3, 2)), layers=np.array([1, 2, 4], dtype=np.int32))
    path = str(tmp_path / "t.npz")
    save_trace(t, path)
    with np.load(path, allow_pickle=False) as z:  # the shared format, read without edgemoe
        assert z["experts"].dtype == np.int32 and z["experts"].shape == (5, 3, 2)
        assert z["layers"].dtype == np.int32 and z["tokens"].dtype == np.int32
        assert z["n_expert"].dtype == np.int32 and z["n_expert"].shape == () and int(z["n_expert"]) == 8
        assert z["format_version"].dtype == np.int32 and int(z["format_version"]) == FORMAT_VERSION == 1
        assert str(z["model"]) == "m.gguf"
    back = load_trace(path)
    assert np.array_equal(back.experts, t.experts) and back.layers.tolist() == [1, 2, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]  # no temporary left behind


@pytest.mark.parametrize("bad", ["missing", "version", "ids", "shape"])
def test_load_rejects_bad_traces(tmp_path, bad):
    path = str(tmp_path / "bad.npz")
    arrays = dict(experts=np.zeros((4, 2, 2), np.int32), layers=np.arange(2, dtype=np.int32),
                  tokens=np.zeros(4, np.int32), n_expert=np.int32(8), model=np.str_("m"),
                  format_version=np.int32(1))
    if bad == "missing":
        del arrays["layers"]
    elif bad == "version":
        arrays["format_version"] = np.int32(2)
    elif bad == "ids":
        arrays["experts"][1, 1, 0] = 8
    else:
        arrays["tokens"] = np.zeros(3, np.int32)
    np.savez(path, **arrays)
    with pytest.raises(TraceFormatError):
        load_trace(path)


# -- the commands on a model ---------------------------------------------------------------


@needs_cache
def test_trace_records_every_token_of_every_window(tiny_models, tmp_path, edgemoe_env):
    """Three windows of 16 tokens (the last one partial): each token's routes are those of its
    window evaluated alone from an empty context, the last layer included."""
    from edgemoe.engine import Engine
    from edgemoe.routes import RouteRecorder

    path = tiny_models["qwen3moe"]
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "trace.npz"
    proc = _cli(["trace", "-m", str(path), "--text", str(text), "-o", str(out), "-c", "16", "--max-tokens", "40",
                 "-t", str(N_THREADS)], edgemoe_env)
    assert proc.returncode == 0, proc.stderr
    t = load_trace(str(out))
    n_layer, k = TINY["qwen3moe"]["n_layer"], TINY["qwen3moe"]["n_expert_used"]
    assert t.experts.shape == (40, n_layer, k) and t.layers.tolist() == list(range(n_layer))
    assert t.n_expert == TINY["qwen3moe"]["n_expert"] and t.model == path.name
    with Engine(path, n_ctx=64, n_threads=N_THREADS) as e:
        tokens = e.tokenize(TEXT, add_special=False)[:40]
    assert t.tokens.tolist() == tokens
    for start in (0, 16, 32):
        window = tokens[start:start + 16]
        rec = RouteRecorder()
        with Engine(path, n_ctx=16, n_batch=16, n_ubatch=16, n_threads=N_THREADS, route_recorder=rec) as e:
            e.eval(window)
        rows = rec.rows()
        for il in range(n_layer):
            assert np.array_equal(t.experts[start:start + len(window), il], rows[rows[:, 0] == il][:, 2:])
    # at least two distinct experts per layer, or the statistics below mean nothing
    assert all(len(np.unique(t.experts[:, il])) > 2 for il in range(n_layer))

    proc = _cli(["trace-stats", str(out), "--json"], edgemoe_env)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["n_tokens"] == 40 and s["n_moe_layers"] == n_layer and s["k"] == k
    assert s["eor"] == pytest.approx(float(eor_per_layer(t.experts).mean()))
    assert set(s["lru_hit_rate"]) == {"10%", "25%", "50%"}
    assert all(0.0 <= v <= 1.0 for v in s["lru_hit_rate"].values())
    assert 0.0 < s["entropy_norm"] <= 1.0 and s["entropy_bits"] <= math.log2(t.n_expert) + 1e-9

    table = _cli(["trace-stats", str(out)], edgemoe_env)
    assert table.returncode == 0
    rows = [line for line in table.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + n_layer + 1 and rows[-1].startswith("| mean |")


@needs_cache
def test_trace_bad_inputs(tiny_models, dense_model, tmp_path, edgemoe_env):
    model = str(tiny_models["qwen3moe"])
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out.npz"
    cases = [
        (["-m", str(tmp_path / "missing.gguf"), "--text", str(text)], "not found"),
        (["-m", model, "--text", str(tmp_path / "missing.txt")], "cannot read"),
        (["-m", model, "--text", str(latin1)], "not UTF-8"),
        (["-m", model, "--text", str(empty)], "no tokens"),
        (["-m", str(dense_model), "--text", str(text)], "dense"),
        (["-m", str(text), "--text", str(text)], "not a GGUF"),
        (["-m", model, "--text", str(text), "-c", "0"], "positive"),
    ]
    for args, needle in cases:
        err = _one_line_error(_cli(["trace", *args, "-o", str(out)], edgemoe_env))
        assert needle in err, (args, err)
        assert not out.exists()
    for target in (tmp_path / "no" / "such" / "dir.npz", tmp_path):
        err = _one_line_error(_cli(["trace", "-m", model, "--text", str(text), "-o", str(target)], edgemoe_env))
        assert "cannot write" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "latin1.txt", "text.txt"]


def test_trace_stats_bad_inputs(tmp_path, edgemoe_env):
    not_npz = tmp_path / "x.npz"
    not_npz.write_text("hello")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    for path, needle in ((tmp_path / "missing.npz", "not found"), (not_npz, "not a readable trace"),
                         (tmp_path / "other.npz", "not an edgemoe trace")):
        err = _one_line_error(_cli(["trace-stats", str(path)], edgemoe_env))
        assert needle in err, err
