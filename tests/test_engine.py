"""Engine: evaluation and generation with the cache off, then the cache's exactness and stats."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import N_THREADS, TINY, needs_cache, needs_llama

pytestmark = needs_llama

N_PROMPT = 24   # one ubatch (n_ubatch 512) unless a test says otherwise
N_DECODE = 32


def _engine(path, **kw):
    from edgemoe.engine import Engine

    kw.setdefault("n_ctx", 256)
    kw.setdefault("n_threads", N_THREADS)
    return Engine(path, **kw)


def _prompt(n=N_PROMPT, seed=0, n_vocab=50257):
    return np.random.default_rng(seed).integers(0, n_vocab, n).tolist()


def _greedy_run(engine, prompt, n_decode=N_DECODE):
    """Logits of a prefill and of n_decode greedy single-token steps, stacked."""
    out = [engine.eval(prompt)]
    for _ in range(n_decode):
        out.append(engine.eval([int(out[-1][-1].argmax())]))
    return np.concatenate(out)


# -- cache off ------------------------------------------------------------------------


def test_eval_shape_and_sequence(tiny_models):
    with _engine(tiny_models["qwen3moe"]) as e:
        toks = _prompt(10)
        a = e.eval(toks)
        assert a.shape == (10, e.n_vocab) and a.dtype == np.float32
        assert e.n_past == 10
        b = e.eval(toks[:3])  # the sequence advances: same tokens, new positions, new logits
        assert e.n_past == 13 and not np.array_equal(a[:3], b)
        e.reset()
        assert e.n_past == 0
        assert np.array_equal(e.eval(toks), a)
        assert e.eval([]).shape == (0, e.n_vocab)


def test_eval_splits_at_n_batch(tiny_models):
    with _engine(tiny_models["qwen3moe"], n_batch=8, n_ubatch=8) as e:
        small = e.eval(_prompt(20))
    with _engine(tiny_models["qwen3moe"], n_batch=8, n_ubatch=8) as e:
        e.eval(_prompt(20)[:8])
        e.eval(_prompt(20)[8:16])
        tail = e.eval(_prompt(20)[16:])
    assert small.shape[0] == 20
    assert np.array_equal(small[16:], tail)


def test_context_full(tiny_models):
    from edgemoe.errors import ContextFullError

    with _engine(tiny_models["qwen3moe"], n_ctx=32) as e:
        e.eval(_prompt(e.n_ctx - 2))  # llama.cpp may round n_ctx up
        with pytest.raises(ContextFullError):
            e.eval(_prompt(3))


def test_tokenize_roundtrip(tiny_models):
    with _engine(tiny_models["qwen3moe"]) as e:
        text = "Hello, world: naïve café ✓"
        assert e.detokenize(e.tokenize(text, add_special=False)) == text


def test_generate_streams_and_is_seeded(tiny_models):
    with _engine(tiny_models["qwen2moe"]) as e:
        a = list(e.generate("Once upon a time", max_tokens=24, seed=5))
        b = list(e.generate("Once upon a time", max_tokens=24, seed=5))
        c = list(e.generate("Once upon a time", max_tokens=24, seed=6))
        g1 = "".join(e.generate("Once upon a time", max_tokens=24, temperature=0))
        g2 = "".join(e.generate("Once upon a time", max_tokens=24, temperature=0))
        s = e.stats()
    assert a == b and a != c
    assert g1 == g2 and g1
    assert len(a) <= 24 and all(isinstance(p, str) for p in a)
    assert s.n_generated == 24 and s.n_prompt_tokens > 0
    assert s.ttft_ms > 0 and s.tpot_ms > 0 and s.tokens_per_s > 0
    assert s.tpot_p50_ms <= s.tpot_p90_ms
    assert s.peak_rss_bytes > 0
    assert s.hit_rate is None and s.hits == s.misses == 0 and s.expert_cache_bytes == 0


def test_text_pieces_hold_back_partial_utf8(tiny_models):
    """Pieces are whole characters even when one spans tokens (gpt-2 byte tokens)."""
    with _engine(tiny_models["olmoe"]) as e:
        # byte-level BPE has a token for every single byte; spell "a€b" byte by byte
        by_byte = {}
        for t in range(512):
            piece = e.token_to_bytes(t)
            if len(piece) == 1:
                by_byte.setdefault(piece, t)
        tokens = [by_byte[bytes([c])] for c in "a€b".encode()]
        pieces = list(e.text_pieces(tokens))
    assert pieces == ["a", "€", "b"]


def test_close_is_idempotent(tiny_models):
    from edgemoe.errors import StateError

    e = _engine(tiny_models["qwen3moe"])
    e.close()
    e.close()
    with pytest.raises(StateError):
        e.eval([1])
    with _engine(tiny_models["qwen3moe"]) as e2:
        pass
    with pytest.raises(StateError):
        e2.stats()


def test_missing_and_bad_files(tmp_path):
    from edgemoe.errors import EdgemoeIOError, ModelFormatError

    with pytest.raises(EdgemoeIOError):
        _engine(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"hello world" * 100)
    with pytest.raises(ModelFormatError):
        _engine(junk)


def test_truncated_file(tmp_path, tiny_models):
    from edgemoe.errors import EdgemoeError

    data = tiny_models["qwen3moe"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgemoeError):
        _engine(cut)


# -- the expert cache: exactness ----------------------------------------------------------

_ref_cache: dict = {}


def _reference(path, prompt, n_ubatch=512):
    key = (str(path), tuple(prompt), n_ubatch)
    if key not in _ref_cache:
        with _engine(path, n_ubatch=n_ubatch) as e:
            _ref_cache[key] = _greedy_run(e, prompt)
    return _ref_cache[key]


def _min_budget(path):
    from edgemoe.cache import inspect_model

    return inspect_model(path).min_budget_bytes


def _budget(path, which):
    return _min_budget(path) if which == "min" else which


# full policy x io matrix on qwen3moe; the other archs see each policy and each io once per budget
_POLICIES = ("default", "lru", "lfu")
_IOS = ("direct", "buffered", "mmap")
_BUDGETS = ("100%", "50%", "min")
_EXACT_CASES = [("qwen3moe", b, p, i) for b, p, i in itertools.product(_BUDGETS, _POLICIES, _IOS)]
_EXACT_CASES += [(arch, b, p, _IOS[(n + m) % 3])
                 for arch in ("qwen2moe", "olmoe")
                 for n, b in enumerate(_BUDGETS) for m, p in enumerate(_POLICIES)]
_EXACT_CASES += [("qwen3moe-q8_0", b, "default", i) for b, i in zip(_BUDGETS, _IOS)]


@needs_cache
@pytest.mark.parametrize("arch, budget, policy, io", _EXACT_CASES)
def test_logits_identical_to_cache_off(tiny_models, arch, budget, policy, io):
    path = tiny_models[arch]
    prompt = _prompt()
    ref = _reference(path, prompt)
    with _engine(path, expert_cache=_budget(path, budget), policy=policy, io=io) as e:
        got = _greedy_run(e, prompt)
        s = e.stats()
    assert np.array_equal(got, ref)
    assert s.hits + s.misses == (N_PROMPT + N_DECODE) * TINY[arch]["n_layer"] * TINY[arch]["n_expert_used"]


@needs_cache
@pytest.mark.parametrize("arch", sorted(TINY))
def test_prefill_wider_than_min_pool(tiny_models, arch):
    """A ubatch that needs more distinct experts per layer than the pool holds stays exact."""
    from edgemoe.routes import RouteRecorder

    path = tiny_models[arch]
    prompt = _prompt(64, seed=1)
    rec = RouteRecorder()
    with _engine(path, route_recorder=rec) as e:
        ref = _greedy_run(e, prompt, n_decode=4)
    rows = rec.rows()[: 64 * TINY[arch]["n_layer"]]  # the prefill's rows
    with _engine(path, expert_cache=_min_budget(path), policy="lru", io="buffered") as e:
        n_slots = e.cache.info().n_slots
        got = _greedy_run(e, prompt, n_decode=4)
    widest = max(len(np.unique(rows[rows[:, 0] == il, 2:])) for il in range(TINY[arch]["n_layer"]))
    assert widest > n_slots, "the test model must route the prefill wider than the minimum pool"
    assert np.array_equal(got, ref)


@needs_cache
@pytest.mark.parametrize("n_ubatch", [8, 512])
def test_multi_ubatch_prefill_identical(tiny_models, n_ubatch):
    path = tiny_models["qwen2moe"]
    prompt = _prompt(40, seed=2)
    ref = _reference(path, prompt, n_ubatch=n_ubatch)
    with _engine(path, expert_cache="50%", policy="default", n_ubatch=n_ubatch) as e:
        assert np.array_equal(_greedy_run(e, prompt), ref)


# -- the expert cache: statistics --------------------------------------------------------


@needs_cache
def test_hit_rate_one_after_warmup_at_full_budget(tiny_models):
    path = tiny_models["qwen3moe"]
    prompt = _prompt()
    with _engine(path, expert_cache="100%", policy="lru", io="buffered") as e:
        _greedy_run(e, prompt)
        first = e.stats()
        assert first.misses > 0 and first.bytes_read > 0
        e.reset()
        e.reset_stats()
        _greedy_run(e, prompt)  # the same routes again: everything is resident
        s = e.stats()
    assert s.misses == 0 and s.hit_rate == 1.0 and s.bytes_read == 0
    assert s.hits == (N_PROMPT + N_DECODE) * 2 * 2
    assert s.expert_cache_bytes > 0
    per_layer = [l for l in s.layers if l.hits]
    assert len(per_layer) == 2 and sum(l.hits for l in s.layers) == s.hits


def _simulate_lru(steps, capacity):
    """Misses of an LRU over one pool of `capacity` slots keyed (layer, expert).

    steps: (layer, expert ids of that layer's ubatch). All distinct experts of a step are
    used together, at one time stamp: the resident ones are touched, the rest loaded into
    empty slots (lowest index first), else into the slot with the oldest stamp among those
    the step does not need. Experts of one step share a stamp, so ties are real; they go to
    the lowest slot index (the native pool's rule: any fixed rule must be shared to compare).
    """
    keys = [None] * capacity
    stamp = [0] * capacity
    where = {}
    misses = 0
    for now, (layer, ids) in enumerate(steps, start=1):
        need = list(dict.fromkeys((layer, int(x)) for x in ids))
        assert len(need) <= capacity, "simulation defined only for steps that fit"
        for key in need:
            if key in where:
                stamp[where[key]] = now
        for key in need:
            if key in where:
                continue
            misses += 1
            empty = [s for s in range(capacity) if keys[s] is None]
            if empty:
                slot = empty[0]
            else:
                slot = min((s for s in range(capacity) if stamp[s] < now), key=lambda s: (stamp[s], s))
                del where[keys[slot]]
            keys[slot], stamp[slot] = key, now
            where[key] = slot
    return misses


def _steps_from_rows(rows):
    """Rows come per graph evaluation, layer by layer, one per token of the ubatch: a run of
    rows with the same layer is one layer-step (the models here have two or more layers)."""
    steps = []
    for r in rows:
        if steps and steps[-1][0] == r[0] and steps[-1][2] == r[1] - 1:
            steps[-1][1].extend(r[2:].tolist())
            steps[-1][2] = r[1]
        else:
            steps.append([int(r[0]), r[2:].tolist(), r[1]])
    return [(layer, ids) for layer, ids, _ in steps]


@needs_cache
@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe"])
@pytest.mark.parametrize("scale, first", [(1, 1), (3, 1), (4, 3)])
def test_lru_misses_match_simulation(tiny_models, arch, scale, first):
    """Policy lru at the minimum budget (and a multiple), from an empty cache: a first ubatch
    of `first` tokens (small enough to fit the pool), then single-token steps."""
    from edgemoe.routes import RouteRecorder

    path = tiny_models[arch]
    tokens = _prompt(48, seed=3)
    chunks = [tokens[:first]] + [[t] for t in tokens[first:]]
    rec = RouteRecorder()
    with _engine(path, route_recorder=rec) as e:
        for c in chunks:
            e.eval(c)
    rows = rec.rows()
    n_layer = TINY[arch]["n_layer"]
    assert len(rows) == len(tokens) * n_layer
    with _engine(path, expert_cache=_min_budget(path) * scale, policy="lru", io="buffered") as e:
        info = e.cache.info()
        for c in chunks:
            e.eval(c)
        s = e.stats()
    assert info.n_pools == 1  # every expert of these models has one shape and type
    steps = _steps_from_rows(rows)
    assert len(steps) == len(chunks) * n_layer
    assert s.misses == _simulate_lru(steps, info.n_slots)
    assert s.hits + s.misses == len(tokens) * n_layer * TINY[arch]["n_expert_used"]


@needs_cache
def test_dense_model_runs_without_cache(dense_model):
    notices = []
    with _engine(dense_model, expert_cache="25%", notice=notices.append) as e:
        assert e.cache is None
        assert np.isfinite(e.eval(_prompt(8))).all()
    assert len(notices) == 1 and "\n" not in notices[0]


@needs_cache
def test_budget_below_minimum(tiny_models):
    from edgemoe.errors import BudgetTooSmallError

    path = tiny_models["qwen3moe"]
    with pytest.raises(BudgetTooSmallError) as info:
        _engine(path, expert_cache=_min_budget(path) - 1)
    assert "minimum" in str(info.value).lower()


# -- external routes (router-decoupled models) -------------------------------------------


def _recorded_routes(path, prompt, n_decode):
    """Per layer, the [tokens, k] experts a cache-off greedy run used, and its tokens."""
    from edgemoe.routes import RouteRecorder

    rec = RouteRecorder()
    with _engine(path, route_recorder=rec) as e:
        tokens = [int(t) for t in prompt]
        logits = e.eval(tokens)
        for _ in range(n_decode):
            tokens.append(int(logits[-1].argmax()))
            logits = e.eval([tokens[-1]])
    rows = rec.rows()
    return {int(il): rows[rows[:, 0] == il][:, 2:] for il in np.unique(rows[:, 0])}, tokens


@needs_cache
@pytest.mark.parametrize("arch", sorted(TINY))
def test_external_routes_are_obeyed(tiny_models, arch):
    """Routes set from outside replace the top-k token by token, in every layer, also in a last
    layer that llama.cpp computes for the output rows only (generation asks for one logit)."""
    path = tiny_models[arch]
    prompt = _prompt(12, seed=5)
    n_gen = 6
    routes, tokens = _recorded_routes(path, prompt, n_gen)
    # the model's own routes, given from outside: generation is unchanged
    with _engine(path, expert_cache="50%") as e:
        for il, r in routes.items():
            e.cache.set_routes(il, r[: len(prompt) + n_gen])
        got = list(e._sample_tokens(list(prompt), n_gen, e._sampler(0.0, 0, 0, 1.0, 0.0)))
    assert got == tokens[len(prompt):]

    # other routes: the layers obey them (the recorder sees the ids actually used)
    from edgemoe.routes import RouteRecorder

    k = TINY[arch]["n_expert_used"]
    forced = np.tile(np.arange(k, dtype=np.int32)[::-1], (len(prompt), 1))
    rec = RouteRecorder()
    with _engine(path, expert_cache="100%", route_recorder=rec) as e:
        for il in routes:
            e.cache.set_routes(il, forced)
        e.eval(prompt)
        rows = rec.rows()
        # the queues are used up: the next token routes by itself again
        e.eval([int(prompt[0])])
    assert len(rows) == len(routes) * len(prompt)
    assert (rows[:, 2:] == forced[0]).all()


@needs_cache
def test_belady_uses_the_queued_future(tiny_models):
    """With every route queued, Belady misses no more than the online policies, stays exact,
    and beats LRU when the pool is smaller than a token's working set."""
    path = tiny_models["qwen3moe"]
    prompt = _prompt(12, seed=7)
    n_decode = 40
    routes, tokens = _recorded_routes(path, prompt, n_decode)
    budget = _min_budget(path) * 3 // 2  # 3 slots of 2 x 2 layers: less than one token's 4
    ref = _reference_over(path, tokens, len(prompt))
    misses = {}
    for policy in ("lru", "default", "belady"):
        with _engine(path, expert_cache=budget, policy=policy) as e:
            if policy == "belady":
                for il, r in routes.items():
                    e.cache.set_routes(il, r)
            got = _replay(e, tokens, len(prompt))
            misses[policy] = e.stats().misses
        assert np.array_equal(got, ref), policy
    assert misses["belady"] <= misses["default"]
    assert misses["belady"] < misses["lru"]


def _replay(engine, tokens, n_prompt):
    out = [engine.eval(tokens[:n_prompt])]
    for t in tokens[n_prompt:]:
        out.append(engine.eval([t]))
    return np.concatenate(out)


def _reference_over(path, tokens, n_prompt):
    with _engine(path) as e:
        return _replay(e, tokens, n_prompt)
