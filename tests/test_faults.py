"""Faults under the expert cache: failed, short, early-ending and slow reads (the read-fault hook
of a test build, EDGEMOE_FAULT_INJECTION) on every I/O path, and a model file truncated,
replaced or rewritten under a running engine or `edgemoe run`.

What each promises: a fault that heals (a transient EIO within the retries, a short or slow
read) leaves the logits bit for bit those of a clean run; one that does not fails that decode
with EdgemoeIOError (one line from the CLI), never an abort; the engine's sequences are as
before the failed decode, so the same tokens decode again to the same logits once the fault is
gone."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import N_THREADS, REPO, REQUIRE_NATIVE, assert_one_line_error, needs_cache

pytestmark = needs_cache

TRAINED = REPO / "models" / "edgemoe-tiny-q8_0.gguf"  # 8 MoE layers with trained routers
N_PROMPT = 12
N_STEP = 6
IOS = ["direct", "buffered", "mmap"]


def _available() -> bool:
    from edgemoe import bindings as B

    return bool(B.edgemoe_fault_injection_available())


@pytest.fixture
def faults():
    """set(plan): a read-fault plan for this process; cleared afterwards. A build without the
    hook skips, except under EDGEMOE_REQUIRE_NATIVE (CI), where it must be there."""
    from edgemoe import bindings as B

    if not _available():
        if REQUIRE_NATIVE:
            pytest.fail("this libedgemoe has no fault injection: install with EDGEMOE_FAULT_INJECTION=1")
        pytest.skip("libedgemoe built without EDGEMOE_FAULT_INJECTION")

    def set_plan(plan):
        B.check(B.edgemoe_fault_plan(plan.encode() if plan else None))

    yield set_plan
    set_plan(None)


def _engine(path, **kw):
    from edgemoe.engine import Engine

    kw.setdefault("n_ctx", 128)
    kw.setdefault("n_threads", N_THREADS)
    kw.setdefault("expert_cache", "25%")
    return Engine(path, **kw)


_tokens_cache: dict = {}


def _tokens(engine, n):
    if n not in _tokens_cache:
        text = (REPO / "models" / "corpus" / "heldout.txt").read_text(encoding="utf-8")[:2000]
        _tokens_cache[n] = engine.tokenize(text)[:n]
    return _tokens_cache[n]


def _steps(engine, tokens):
    """A prefill, then single-token decodes: the logits of every position."""
    out = [engine.eval(tokens[:N_PROMPT])]
    for t in tokens[N_PROMPT:]:
        out.append(engine.eval([t]))
    return np.concatenate(out)


_ref: dict = {}


def _reference(io, prefetch):
    key = (io, prefetch)
    if key not in _ref:
        with _engine(TRAINED, io=io, prefetch=prefetch) as e:
            tokens = _tokens(e, N_PROMPT + N_STEP)
            _ref[key] = (tokens, _steps(e, tokens))
    return _ref[key]


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("plan", ["eio@1+2", "eio@0+3,eio@20+1", "short@0+inf", "delay=3@0+15"])
@pytest.mark.parametrize("prefetch", ["off", "lookahead"])
def test_faults_that_heal_change_no_logit(faults, io, plan, prefetch):
    tokens, want = _reference(io, prefetch)
    faults(plan)
    with _engine(TRAINED, io=io, prefetch=prefetch) as e:
        got = _steps(e, tokens)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("plan, needle", [("eio@0+inf", "Input/output error"), ("eof@0+inf", "unexpected end")])
@pytest.mark.parametrize("piece_kib", [None, 4])
def test_a_lasting_fault_fails_the_decode_and_the_engine_recovers(faults, monkeypatch, io, plan, needle, piece_kib):
    """piece_kib 4: every load is many pieces on several threads, and a fault ends some of them"""
    from edgemoe.errors import EdgemoeIOError

    if piece_kib:
        monkeypatch.setenv("EDGEMOE_READ_PIECE_KIB", str(piece_kib))  # read when the cache is created

    if io == "mmap" and plan.startswith("eof"):
        needle = "unexpected end"
    tokens, want = _reference(io, "off")
    with _engine(TRAINED, io=io, expert_cache="10%") as e:
        first = [e.eval(tokens[:N_PROMPT])]
        faults(plan)
        with pytest.raises(EdgemoeIOError, match=needle):
            for t in tokens[N_PROMPT:]:
                first.append(e.eval([t]))  # resident experts need no read: some may pass
        done = e.n_past - N_PROMPT
        assert done == len(first) - 1  # the failed decode left nothing behind
        faults(None)
        rest = [e.eval([t]) for t in tokens[N_PROMPT + done:]]
    got = np.concatenate(first + rest)
    assert got.shape == want.shape
    assert np.array_equal(got, want)


def test_a_failed_prefill_leaves_no_positions_behind(faults):
    """A batch of several ubatches that fails in a later one: llama.cpp rolls back only that
    ubatch; the engine removes the rest, so the sequence decodes again from where it was."""
    from edgemoe.errors import EdgemoeIOError

    tokens, want = _reference("direct", "off")
    with _engine(TRAINED, expert_cache="10%", n_batch=16, n_ubatch=4) as e:
        faults("eio@6+inf")  # a later ubatch's reads fail
        with pytest.raises(EdgemoeIOError):
            e.eval(tokens[:N_PROMPT])
        assert e.n_past == 0
        faults(None)
        got = _steps(e, tokens)
    # other ubatch sizes compute the prefill in other kernel shapes: compare to a like run
    with _engine(TRAINED, expert_cache="10%", n_batch=16, n_ubatch=4) as e:
        like = _steps(e, tokens)
    assert np.array_equal(got, like)


def test_a_bad_plan_is_refused(faults):
    from edgemoe import bindings as B
    from edgemoe.errors import InvalidArgumentError

    for plan in ("bogus@1", "eio", "eio@x", "delay@1", "eio@1+0"):
        with pytest.raises(InvalidArgumentError, match="fault rule"):
            B.check(B.edgemoe_fault_plan(plan.encode()))


# -- the model file under a running engine ---------------------------------------------------

@pytest.fixture
def model_copy(tmp_path):
    path = tmp_path / "model.gguf"
    shutil.copyfile(TRAINED, path)
    return path


def _change(path, how):
    if how == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "replaced":
        other = path.with_name("other.gguf")
        shutil.copyfile(TRAINED, other)
        os.replace(other, path)
    elif how == "rewritten":
        before = path.stat().st_mtime_ns
        with open(path, "r+b") as f:  # same size, other bytes in an expert tensor
            f.seek(path.stat().st_size - 4096)
            f.write(b"\x7f" * 64)
        if path.stat().st_mtime_ns == before:  # a coarse clock: the write must still show
            os.utime(path, ns=(before, before + 1_000_000_000))
    elif how == "removed":
        path.unlink()


@pytest.mark.parametrize("io", IOS)
@pytest.mark.parametrize("how, needle", [("truncated", "changed size"), ("replaced", "was replaced"),
                                         ("rewritten", "was modified"), ("removed", "was removed")])
def test_a_changed_model_file_is_refused_not_served(model_copy, io, how, needle):
    from edgemoe.errors import EdgemoeIOError

    with _engine(model_copy, io=io) as e:
        tokens = _tokens(e, N_PROMPT + 2)
        e.eval(tokens[:N_PROMPT])
        _change(model_copy, how)
        with pytest.raises(EdgemoeIOError, match=needle):
            e.eval(tokens[N_PROMPT:])
        assert e.n_past == N_PROMPT


def test_a_file_replaced_between_the_cache_and_llama_is_refused(model_copy, monkeypatch):
    """The cache opens the file first; a file replaced before llama.cpp opens it is caught at
    attach, so the two never read different files."""
    from edgemoe import engine as engine_mod
    from edgemoe.errors import EdgemoeError

    load = engine_mod.Engine._load_model

    def load_after_replace(self, *a, **kw):
        _change(model_copy, "replaced")
        return load(self, *a, **kw)

    monkeypatch.setattr(engine_mod.Engine, "_load_model", load_after_replace)
    with pytest.raises(EdgemoeError, match="was replaced"):
        _engine(model_copy)


# -- the CLI ---------------------------------------------------------------------------------

def _run(env, *args, **kw):
    return subprocess.run([sys.executable, "-m", "edgemoe", "run", "-p", "Once upon a time", "--temp", "0",
                           "--seed", "1", *args], env=env, capture_output=True, text=True, timeout=300, **kw)


def test_run_heals_transient_faults_and_reports_a_lasting_one_in_one_line(edgemoe_env, faults):
    clean = _run(edgemoe_env, "-n", "12", "--expert-cache", "25%")
    assert clean.returncode == 0, clean.stderr
    healed = _run(dict(edgemoe_env, EDGEMOE_FAULTS="eio@2+2,short@10+20"), "-n", "12", "--expert-cache", "25%")
    assert healed.returncode == 0, healed.stderr
    assert healed.stdout == clean.stdout
    assert "read again after 1 retry" in healed.stderr
    broken = _run(dict(edgemoe_env, EDGEMOE_FAULTS="eio@0+inf"), "-n", "12", "--expert-cache", "25%")
    assert_one_line_error(broken, "input/output error", "after 3 retries")


@pytest.mark.parametrize("how", ["replaced", "truncated"])
def test_run_refuses_a_model_changed_while_it_generates(edgemoe_env, model_copy, faults, how):
    """Slow reads keep the run going for seconds; the file changes meanwhile. A truncation that
    lands inside a decode may hit llama.cpp's own mapping of the dense weights (SIGBUS): that
    too ends in one line and status 1, not a core dump."""
    proc = subprocess.Popen([sys.executable, "-m", "edgemoe", "run", "-m", str(model_copy), "-p", "Once upon a time",
                             "-n", "400", "--temp", "0", "--expert-cache", "10%"],
                            env=dict(edgemoe_env, EDGEMOE_FAULTS="delay=20@0+inf"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.read(1)  # generation has begun
        assert first, proc.stderr.read()
        _change(model_copy, how)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"edgemoe: error: model file {model_copy} "), err
    assert ("was replaced while in use" in last) if how == "replaced" else \
        ("changed size while in use" in last or "was truncated" in last), err


def test_a_truncation_under_llamas_own_mapping_ends_in_one_line(model_copy, edgemoe_env):
    """With the file check skipped, the next decode reads dense weights from llama.cpp's mapping
    of a file cut to 1 MiB: SIGBUS there ends the process with one line and status 1."""
    script = f"""
import os
from edgemoe.engine import Engine
e = Engine({str(model_copy)!r}, expert_cache="25%", n_ctx=64, n_threads=2)
toks = e.tokenize("Once upon a time there was")
e.eval(toks[:4])
os.truncate({str(model_copy)!r}, 1 << 20)
e._cache.check_file = lambda: None
e.eval(toks[4:])
print("decoded from a truncated file")
"""
    proc = subprocess.run([sys.executable, "-c", script], env=edgemoe_env, capture_output=True, text=True,
                          timeout=120)
    assert "decoded from a truncated file" not in proc.stdout
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"edgemoe: error: model file {model_copy} was truncated or "
                                                    "failed to read under llama.cpp's mapping (SIGBUS)")


def test_a_route_queue_too_short_fails_the_decode_not_the_process():
    """Routes queued for one token of every layer, then a batch of two: the decode fails with
    StateError (before, abort()), nothing is consumed, and with the queue cleared the engine
    decodes on."""
    from edgemoe.errors import StateError

    with _engine(TRAINED) as e:
        cache = e.cache
        info = cache.layout
        tokens = _tokens(e, N_PROMPT + 2)
        e.eval(tokens[:N_PROMPT])
        routes = np.zeros((1, info.n_moe_layer, info.n_expert_used), dtype=np.int32)
        routes[..., :] = np.arange(info.n_expert_used, dtype=np.int32)
        cache.set_routes_all(routes)
        with pytest.raises(StateError, match="external routes of layer .* cover 1 tokens"):
            e.eval(tokens[N_PROMPT:N_PROMPT + 2])
        assert e.n_past == N_PROMPT
        cache.clear_routes()
        e.eval(tokens[N_PROMPT:N_PROMPT + 2])
        assert e.n_past == N_PROMPT + 2
