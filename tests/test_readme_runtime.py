"""A model with an embedded readme router: the Engine runs the router ahead of the backbone,
the backbone obeys it exactly, and the cache loads the known routes ahead (docs/cache.md)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_one_line_error
from test_engine import N_THREADS, needs_cache

pytest.importorskip("torch")

from router_reference import torch_router_routes  # noqa: E402

PROMPT_LEN, N_GEN = 24, 20


@pytest.fixture(scope="session")
def readme_model(model_dir, gpt2_vocab):
    """A synthetic qwen3moe (4 layers, 16 experts, top-2) with a random readme router embedded:
    returns (path, router)."""
    from edgemoe.convert import convert
    from edgemoe.gguf_header import read_header
    from edgemoe.model_router import backbone_of_header
    from edgemoe.router_format import random_router, write_gguf_router
    from edgemoe.synth import SynthConfig, write_model

    base = model_dir / "readme-base.gguf"
    write_model(base, SynthConfig(vocab=str(gpt2_vocab), arch="qwen3moe", n_layer=4, n_embd=64, n_ff=128,
                                  n_ff_exp=64, n_expert=16, n_expert_used=2, n_head=4, n_head_kv=2,
                                  alignment=4096, seed=11))
    router = random_router("readme", backbone_of_header(read_header(base, string_arrays=False)), top_k=1, seed=4)
    write_gguf_router(router, model_dir / "readme-router.gguf")
    out = model_dir / "readme.gguf"
    convert(str(base), str(out), router=str(model_dir / "readme-router.gguf"))
    return out, router


def _engine(path, **kw):
    from edgemoe.engine import Engine

    kw.setdefault("n_ctx", 256)
    kw.setdefault("n_threads", N_THREADS)
    kw.setdefault("notice", lambda msg: None)
    return Engine(path, **kw)


def _prompt(seed=3):
    return np.random.default_rng(seed).integers(0, 50257, PROMPT_LEN).tolist()


def _generate(engine, prompt):
    return list(engine._sample_tokens(list(prompt), N_GEN, engine._sampler(0.0, 0, 0, 1.0, 0.0)))


@needs_cache
@pytest.mark.parametrize("budget,prefetch", [("25%", "auto"), ("25%", "off"), ("100%", "auto")])
def test_backbone_obeys_the_router_on_every_token_and_layer(readme_model, budget, prefetch):
    """The experts each layer computed (the recorder reads the ids the matmuls used) equal an
    independent torch forward of the router, for the prompt and for every generated token."""
    from edgemoe.routes import RouteRecorder

    path, router = readme_model
    prompt = _prompt()
    rec = RouteRecorder()
    with _engine(path, expert_cache=budget, prefetch=prefetch, route_recorder=rec) as e:
        # every token's logits, so that every layer runs on every token; then one at a time
        e.eval(prompt[:PROMPT_LEN // 2])
        for t in prompt[PROMPT_LEN // 2:]:
            e.eval([t])
        rows = rec.rows()
    expected = torch_router_routes(router, prompt)
    for j, layer in enumerate(router.layers):
        got = rows[rows[:, 0] == layer][:, 2:]
        assert np.array_equal(got, expected[:, j]), f"layer {layer}"


@needs_cache
def test_generation_routes_equal_the_reference_and_prefetch_changes_no_bit(readme_model):
    from edgemoe.routes import RouteRecorder

    path, router = readme_model
    prompt = _prompt(5)
    runs = {}
    for name, kw in {"ahead": dict(expert_cache="25%", prefetch="auto"),
                     "demand": dict(expert_cache="25%", prefetch="off"),
                     "all": dict(expert_cache="100%")}.items():
        rec = RouteRecorder()
        with _engine(path, route_recorder=rec, **kw) as e:
            out = _generate(e, prompt)
            stats = e.stats()
            info = e.cache.info()
        runs[name] = (out, rec.rows(), stats, info)
    assert runs["ahead"][0] == runs["demand"][0] == runs["all"][0]
    tokens = prompt + runs["ahead"][0]
    expected = torch_router_routes(router, tokens[:-1])  # the last sampled token is never decoded
    rows = runs["ahead"][1]
    first = router.layers[0]
    got = rows[rows[:, 0] == first][:, 2:]
    assert np.array_equal(got, expected[:, 0])
    ahead, demand = runs["ahead"][2:], runs["demand"][2:]
    assert ahead[1].prefetch == "routes" and ahead[1].policy == "belady"
    assert demand[1].prefetch == "off" and demand[1].policy == "default"
    assert ahead[0].prefetch_issued > 0 and ahead[0].prefetch_hits > 0
    assert demand[0].prefetch_issued == 0
    # the known future: Belady with loads ahead misses no more than on-demand loading
    assert ahead[0].misses <= demand[0].misses
    assert ahead[0].router_ms > 0 and ahead[0].per_token.router_ms > 0


@needs_cache
def test_logits_are_bit_identical_with_routes_ahead_and_on_demand(readme_model):
    path, _ = readme_model
    prompt = _prompt(7)
    from edgemoe.cache import inspect_model

    # the minimum budget splits the prompt into waves, some past the last expert: their
    # pairs point at a slot that the prefetches of the same steps must not take
    least = inspect_model(path).min_budget_bytes
    out = {}
    for name, kw in {"ahead": dict(expert_cache="25%"), "demand": dict(expert_cache="25%", prefetch="off"),
                     "least": dict(expert_cache=least), "all": dict(expert_cache="100%", prefetch="off")}.items():
        with _engine(path, kv_type="f32", **kw) as e:
            logits = [e.eval(prompt)]
            for t in np.random.default_rng(1).integers(0, 50257, 12):
                logits.append(e.eval([int(t)]))
            e.reset()  # a new sequence: the router starts at position 0 again
            logits.append(e.eval(prompt[:6]))
        out[name] = np.concatenate(logits)
    assert np.array_equal(out["ahead"], out["demand"])
    assert np.array_equal(out["ahead"], out["all"])
    assert np.array_equal(out["least"], out["all"])


@needs_cache
def test_cache_off_keeps_the_cache_for_the_routes(readme_model):
    path, _ = readme_model
    notices = []
    with _engine(path, expert_cache=None, notice=notices.append) as e:
        assert e.cache is not None and e.router is not None
        assert e.cache.info().budget_bytes > 0
    assert any("100 %" in n for n in notices)


@needs_cache
def test_lookahead_and_routes_prefetch_are_refused_where_they_do_not_apply(readme_model, tiny_models):
    from edgemoe.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="lookahead"):
        _engine(readme_model[0], expert_cache="50%", prefetch="lookahead")
    with pytest.raises(InvalidArgumentError, match="readme router"):
        _engine(tiny_models["qwen3moe"], expert_cache="50%", prefetch="routes")


@needs_cache
def test_run_stats_show_the_router(readme_model, edgemoe_env):
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "run", "-m", str(readme_model[0]), "-n", "8",
                           "--temp", "0", "--expert-cache", "25%", "--stats", "-t", str(N_THREADS)],
                          capture_output=True, text=True, env=edgemoe_env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for field in ("router_ms_per_token", "prefetch_hits_per_token", "stall_ms_per_token"):
        assert f"{field}: " in proc.stderr


# -- refusals: the model's router is read from the header before llama.cpp loads anything ------


def _write_moe_gguf(path, *, router=None, decoupled=False, router_patch=None):
    """A minimal qwen3moe-looking GGUF header with one expert tensor (enough for the router
    checks, which run before llama.cpp sees the file)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_token_list([f"t{i}" for i in range(300)])
    w.add_uint32("qwen3moe.expert_count", 16)
    w.add_uint32("qwen3moe.expert_used_count", 2)
    if decoupled:
        w.add_bool("edgemoe.router_decoupled", True)
    for il in range(2):
        w.add_tensor(f"blk.{il}.ffn_up_exps.weight", np.zeros((16, 8, 8), dtype=np.float32))
    if router is not None:
        for key, value, vtype in router.kv_items():
            w.add_key_value(key, value, vtype)
        for name, arr in router.tensor_items():
            if router_patch is not None:
                arr = router_patch(name, arr)
            w.add_tensor(name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _router(n_vocab=300, layers=(0, 1)):
    from edgemoe.router_format import Backbone, random_router

    return random_router("readme", Backbone(n_vocab=n_vocab, n_expert=16, n_expert_used=2, moe_layers=layers),
                         n_embd=32, n_layer=1, n_head=2, n_ff=32, top_k=1)


@pytest.mark.parametrize("case,needle", [
    ("no_router", "without its readme router"),
    ("wrong_vocab", "does not fit the model"),
    ("wrong_layers", "does not fit the model"),
    ("short_tensor", "has shape"),
])
def test_readme_models_that_cannot_run_are_refused(tmp_path, case, needle):
    from edgemoe.errors import RouterFormatError
    from edgemoe.model_router import read_model_router

    path = tmp_path / f"{case}.gguf"
    if case == "no_router":
        _write_moe_gguf(path, decoupled=True)
    elif case == "wrong_vocab":
        _write_moe_gguf(path, router=_router(n_vocab=299), decoupled=True)
    elif case == "wrong_layers":
        _write_moe_gguf(path, router=_router(layers=(0, 1, 2)))
    else:
        _write_moe_gguf(path, router=_router(), decoupled=True,
                        router_patch=lambda name, a: a[:-1] if name.endswith("head.weight") else a)
    with pytest.raises(RouterFormatError, match=needle):
        read_model_router(path)


def test_a_truncated_router_tensor_is_a_one_line_error(tmp_path, edgemoe_env):
    path = tmp_path / "cut.gguf"
    _write_moe_gguf(path, router=_router(), decoupled=True)
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # the last tensor (a router tensor) loses its tail
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "run", "-m", str(path), "-n", "2"],
                          capture_output=True, text=True, env=edgemoe_env, timeout=120)
    assert_one_line_error(proc, "truncated")


def test_run_refuses_a_readme_model_without_its_router(tmp_path, edgemoe_env):
    path = tmp_path / "bare.gguf"
    _write_moe_gguf(path, decoupled=True)
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "run", "-m", str(path), "-n", "2"],
                          capture_output=True, text=True, env=edgemoe_env, timeout=120)
    assert_one_line_error(proc, "never trained to route")


@needs_cache
def test_trace_records_the_routers_choices(readme_model):
    """`edgemoe trace` of a readme model records what each layer computed: the router's choices,
    on every token and layer, over windows that restart the router at position 0."""
    from edgemoe.trace import record_trace

    path, router = readme_model
    tokens = np.random.default_rng(9).integers(0, 50257, 40).tolist()
    trace = record_trace(str(path), tokens, ctx=16, n_threads=N_THREADS)
    expected = np.concatenate([torch_router_routes(router, tokens[s:s + 16]) for s in range(0, 40, 16)])
    assert list(trace.layers) == list(router.layers)
    assert np.array_equal(trace.experts, expected)


@needs_cache
@pytest.mark.parametrize("n_batch, n_ubatch", [(8, 8), (16, 4)])
def test_a_prompt_in_chunks_keeps_every_layer_on_its_own_routes(readme_model, n_batch, n_ubatch):
    """A prompt longer than n_batch decodes in chunks with no output rows but the last (and a
    batch in ubatches of which only the last has one): the last layer computes none of those
    rows, so it takes none of their routes. Left queued, they were the next token's routes in
    that layer (stale routes, silently); every layer must use the router's routes for it."""
    path, _router = readme_model
    prompt = _prompt()
    with _engine(path, expert_cache="50%", n_batch=n_batch, n_ubatch=n_ubatch) as e:
        e.eval(prompt, last_only=True)
        nxt = 123
        want = e.routes_ahead(0, nxt)
        e.eval([nxt])
        used = e.last_routes(1)[0]
    assert np.array_equal(np.sort(used, axis=-1), np.sort(want, axis=-1)), (used, want)
