"""Lookahead prefetch: logits stay exact, the predictor's counts, options, and the no-spin wait;
and misses read in pieces by several I/O threads at once."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import N_THREADS, REPO, assert_one_line_error, needs_cache

pytestmark = needs_cache

TRAINED = REPO / "models" / "edgemoe-tiny-q8_0.gguf"  # 8 MoE layers with trained routers
N_PROMPT = 16
N_DECODE = 48


def _engine(path, **kw):
    from edgemoe.engine import Engine

    kw.setdefault("n_ctx", 256)
    kw.setdefault("n_threads", N_THREADS)
    return Engine(path, **kw)


def _text_tokens(engine, n):
    text = (REPO / "models" / "corpus" / "heldout.txt").read_text(encoding="utf-8")[:4000]
    return engine.tokenize(text)[:n]


def _teacher_forced(engine, tokens):
    """Logits of a prefill and of single-token steps over held-out text (the decode path)."""
    out = [engine.eval(tokens[:N_PROMPT])]
    for t in tokens[N_PROMPT:]:
        out.append(engine.eval([t]))
    return np.concatenate(out)


_ref: dict = {}


def _reference(path):
    if path not in _ref:
        with _engine(path) as e:
            tokens = _text_tokens(e, N_PROMPT + N_DECODE)
            _ref[path] = (tokens, _teacher_forced(e, tokens))
    return _ref[path]


def _min_budget(path):
    from edgemoe.cache import inspect_model

    return inspect_model(path).min_budget_bytes


@pytest.mark.parametrize("budget, lookahead, top", [("min", 1, 0), ("min", 2, 8), ("25%", 1, 0),
                                                    ("25%", 3, 8), ("10%", 1, 6), ("100%", 2, 0)])
def test_logits_identical_with_lookahead(budget, lookahead, top):
    tokens, ref = _reference(TRAINED)
    cache = _min_budget(TRAINED) if budget == "min" else budget
    with _engine(TRAINED, expert_cache=cache, prefetch="lookahead", lookahead=lookahead, prefetch_top=top) as e:
        got = _teacher_forced(e, tokens)
        s = e.cache.stats()
    assert np.array_equal(got, ref)
    assert s.hits + s.misses == len(tokens) * 8 * 8


@pytest.mark.parametrize("io", ["direct", "buffered", "mmap"])
@pytest.mark.parametrize("prefetch", ["off", "lookahead"])
def test_misses_read_in_pieces_are_exact_and_whole(monkeypatch, io, prefetch):
    """With 4 KiB pieces each expert's load is dozens of reads that 4 I/O threads share: the
    logits stay exact, and without prefetch every miss reads exactly one expert's bytes."""
    from edgemoe.cache import inspect_model

    monkeypatch.setenv("EDGEMOE_READ_PIECE_KIB", "4")  # read by the cache when it is created
    tokens, ref = _reference(TRAINED)
    info = inspect_model(TRAINED)
    with _engine(TRAINED, expert_cache="25%", io=io, prefetch=prefetch, n_io_threads=4) as e:
        got = _teacher_forced(e, tokens)
        s = e.cache.stats()
    assert np.array_equal(got, ref)
    assert info.slot_bytes_max // 4096 >= 8  # the pieces are many
    if prefetch == "off":
        assert s.bytes_read == s.misses * info.expert_bytes // (8 * 64)


@pytest.mark.parametrize("arch", ["qwen2moe", "olmoe", "qwen3moe-q8_0"])
def test_logits_identical_with_lookahead_other_archs(tiny_models, arch):
    """Shared experts (qwen2moe), f32 experts without a norm ratio problem (olmoe), q8_0."""
    path = tiny_models[arch]
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, 50257, N_PROMPT).tolist()

    def run(**kw):
        with _engine(path, **kw) as e:
            out = [e.eval(prompt)]
            for _ in range(24):
                out.append(e.eval([int(out[-1][-1].argmax())]))
            return np.concatenate(out)

    ref = run()
    got = run(expert_cache=_min_budget(path), prefetch="lookahead")
    assert np.array_equal(got, ref)


def test_predictor_counts():
    tokens, _ = _reference(TRAINED)
    with _engine(TRAINED, expert_cache="25%", prefetch="lookahead") as e:
        e.eval(tokens[:N_PROMPT])
        e.reset_stats()
        for t in tokens[N_PROMPT:]:
            e.eval([t])
        per_layer = [e.cache.stats(il) for il in range(8)]
        total = e.cache.stats()
        assert e.cache.info().prefetch == "lookahead"
    # layer 0 has no earlier layer to be predicted from; every later one is predicted each step
    assert per_layer[0].pred_predicted == 0
    for s in per_layer[1:]:
        assert s.pred_predicted == N_DECODE * 8  # one token's top-8 per step
        assert s.pred_actual == N_DECODE * 8
    # trained routers agree from one layer to the next far beyond chance (8 of 64: 0.125)
    assert total.pred_precision > 0.5
    assert total.prefetch_issued > 0 and total.prefetch_hits > 0
    assert total.prefetch_hits + total.prefetch_wasted <= total.prefetch_issued
    assert total.prefetch_cancelled <= total.prefetch_wasted
    assert total.steps == N_DECODE * 8


def _decode_stats(**kw):
    tokens, _ = _reference(TRAINED)
    with _engine(TRAINED, expert_cache="25%", prefetch="lookahead", **kw) as e:
        e.eval(tokens[:N_PROMPT])
        e.reset_stats()
        for t in tokens[N_PROMPT:]:
            e.eval([t])
        return [e.cache.stats(il) for il in range(8)]


def test_prefetch_top_loads_fewer_experts():
    for s in _decode_stats(prefetch_top=3)[1:]:
        assert s.pred_predicted == N_DECODE * 8  # the prediction itself stays top-k
        assert 0 < s.prefetch_issued <= N_DECODE * 3


def test_lookahead_zero_predicts_but_loads_nothing():
    layers = _decode_stats(lookahead=0)
    assert all(s.prefetch_issued == 0 and s.prefetch_hits == 0 for s in layers)
    assert all(s.pred_predicted == N_DECODE * 8 for s in layers[1:])


def test_prefetch_off_names_nothing():
    tokens, _ = _reference(TRAINED)
    with _engine(TRAINED, expert_cache="25%") as e:
        for t in tokens[:24]:
            e.eval([t])
        s = e.cache.stats()
        assert e.cache.info().prefetch == "off"
    assert s.pred_predicted == s.prefetch_issued == s.prefetch_hits == 0


def test_auto_is_lookahead_where_it_can_be(model_dir, gpt2_vocab):
    from edgemoe.synth import SynthConfig, write_model

    with _engine(TRAINED, expert_cache="25%", prefetch="auto") as e:
        assert e.cache.info().prefetch == "lookahead"
    path = model_dir / "tiny-qwen3moe-1layer-auto.gguf"
    write_model(path, SynthConfig(arch="qwen3moe", vocab=str(gpt2_vocab), n_layer=1, n_embd=64, n_ff=128,
                                  n_ff_exp=64, n_expert=8, n_expert_used=2, n_head=4, n_head_kv=2, seed=9))
    with _engine(path, expert_cache="50%", prefetch="auto") as e:
        assert e.cache.info().prefetch == "off"


def test_default_top_loads_half_of_top_k():
    for s in _decode_stats()[1:]:
        assert 0 < s.prefetch_issued <= N_DECODE * 4


@pytest.mark.parametrize("kw, needle", [(dict(prefetch="sometimes"), "unknown prefetch"),
                                        (dict(prefetch="lookahead", lookahead=-1), "lookahead must be 0 to 8"),
                                        (dict(prefetch="lookahead", lookahead=9), "lookahead must be 0 to 8"),
                                        (dict(prefetch="lookahead", prefetch_top=-1), "prefetch_top")])
def test_bad_prefetch_options(kw, needle):
    from edgemoe.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match=needle):
        _engine(TRAINED, expert_cache="25%", **kw)


def test_lookahead_refused_with_one_moe_layer(model_dir, gpt2_vocab):
    """One MoE layer has no later layer to predict: asking for lookahead says why."""
    from edgemoe.errors import InvalidArgumentError
    from edgemoe.synth import SynthConfig, write_model

    path = model_dir / "tiny-qwen3moe-1layer.gguf"
    write_model(path, SynthConfig(arch="qwen3moe", vocab=str(gpt2_vocab), n_layer=1, n_embd=64, n_ff=128,
                                  n_ff_exp=64, n_expert=8, n_expert_used=2, n_head=4, n_head_kv=2, seed=9))
    with pytest.raises(InvalidArgumentError, match="lookahead prefetch"):
        _engine(path, expert_cache="50%", prefetch="lookahead")


def test_waiting_threads_sleep(monkeypatch):
    """While a remap waits for slow reads the other compute thread sleeps: the process's CPU time
    is the compute threads' share of the compute time plus little of the stall, where one
    thread spinning through the stall would add the whole stall (and at ggml's barrier, both)."""
    monkeypatch.setenv("EDGEMOE_READ_DELAY_MS", "5")  # read by the cache when it is created
    n_threads = 2
    with _engine(TRAINED, expert_cache=_min_budget(TRAINED), n_threads=n_threads) as e:
        list(e.generate("Once upon a time", max_tokens=12, temperature=0))
        s = e.stats()
    t = s.per_token
    assert t.stall_ms > 20  # the reads did make it wait
    assert t.cpu_s * 1e3 < n_threads * t.compute_ms + 0.5 * t.stall_ms, t


def test_run_prints_the_breakdown(tmp_path):
    out = tmp_path / "stats.json"
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "run", "-n", "12", "--temp", "0", "--expert-cache", "25%",
                           "--prefetch", "lookahead", "--stats", "--stats-json", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stderr.splitlines() if ": " in line)
    for name in ("compute_ms_per_token", "stall_ms_per_token", "cache_ms_per_token", "predict_ms_per_token",
                 "bytes_read_per_token", "cpu_s_per_token", "prefetch_hits_per_token", "pred_precision"):
        assert name in lines, proc.stderr
    stats = json.loads(out.read_text())
    assert len(stats["layers"]) == 8
    assert stats["layers"][0]["pred_precision"] is None
    assert 0 < stats["layers"][4]["pred_precision"] <= 1
    assert stats["compute_ms_per_token"] >= 0


@pytest.mark.parametrize("args, needle", [(["--prefetch", "always"], "--prefetch"),
                                          (["--lookahead", "9"], "--lookahead")])
def test_run_refuses_bad_prefetch_flags(args, needle):
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "run", "-n", "2", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert_one_line_error(proc, needle)
