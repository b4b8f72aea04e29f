"""Ctrl-C and SIGTERM on a busy machine (a CPU hog beside each test): `run` and `convert` end
within 5 s, cleaned up, with one line and status 128 + the signal's number; and the pieces of
edgemoe.interrupt that get them there. `bench` (cgroups, read-ahead) is in test_bench.py."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from conftest import N_THREADS, SIGNAL_BOUND_S, assert_interrupted, interrupt, needs_cache, start_edgemoe

SIGNALS = pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])


def _wait_for(predicate, proc, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the command ended before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s")
        time.sleep(0.02)


def _leftovers(directory, keep) -> list:
    return sorted(set(os.listdir(directory)) - set(keep))


def _sizes(directory, keep) -> list:
    out = []
    for name in _leftovers(directory, keep):
        try:
            out.append((directory / name).stat().st_size)
        except FileNotFoundError:  # removed meanwhile
            pass
    return out


def _processes_naming(text: str) -> list:
    """Pids of processes whose command line holds `text` (a child left running)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            pass
    return out


# -- run -------------------------------------------------------------------------------------

@needs_cache
@SIGNALS
def test_run_ends_cleaned_up(signum, tiny_models, edgemoe_env, tmp_path, cpu_hog):
    """Ctrl-C (to the process group) or SIGTERM (to the process) while text streams: exit in
    5 s, the --stats-json temporary file gone and the file already at that path untouched."""
    stats = tmp_path / "stats.json"
    stats.write_text("the user's\n")
    with open(tmp_path / "out.txt", "w") as out:
        proc = start_edgemoe(["run", "-m", tiny_models["qwen3moe"], "-n", "19000", "-c", "20000", "-t", N_THREADS,
                              "--expert-cache", "50%", "--stats-json", stats], edgemoe_env, stdout=out)
        try:
            _wait_for(lambda: (tmp_path / "out.txt").stat().st_size > 0, proc, "text")
            err, seconds = interrupt(proc, signum, group=signum == signal.SIGINT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert_interrupted(proc, err, signum)
    assert seconds < SIGNAL_BOUND_S
    assert stats.read_text() == "the user's\n"
    assert _leftovers(tmp_path, ["stats.json", "out.txt"]) == []


# -- convert ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_source(tmp_path_factory, llama_spm_vocab):
    """48 MiB of F16 experts: seconds of llama.cpp's q4_k_m quantization, one native call."""
    from edgemoe.synth import SynthConfig, write_model

    path = tmp_path_factory.mktemp("slow") / "slow-qwen3moe.gguf"
    write_model(path, SynthConfig(arch="qwen3moe", vocab=str(llama_spm_vocab), n_layer=2, n_embd=256, n_ff=512,
                                  n_ff_exp=512, n_expert=32, n_expert_used=4, n_head=4, n_head_kv=2,
                                  expert_type="F16", weight_type="F16", embd_type="F16", tie_output=True, seed=7))
    return path


@needs_cache
@SIGNALS
def test_convert_ends_cleaned_up(signum, slow_source, edgemoe_env, tmp_path, cpu_hog):
    """Ctrl-C or SIGTERM while llama.cpp quantizes (in a child process, which Python could not
    interrupt in-process): exit in 5 s, no temporary file beside OUT, the child gone, and the
    OUT that was there untouched."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.gguf"
    out.write_bytes(b"the user's")
    proc = start_edgemoe(["convert", slow_source, "-o", out, "--outtype", "q4_k_m", "-t", N_THREADS], edgemoe_env,
                         stdout=None)
    def quantizing() -> bool:  # llama.cpp has begun writing its output, a temporary file
        return any(size > 0 for size in _sizes(out_dir, ["m.gguf"]))

    try:
        _wait_for(quantizing, proc, "quantization")
        err, seconds = interrupt(proc, signum, group=signum == signal.SIGINT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert_interrupted(proc, err, signum)
    assert seconds < SIGNAL_BOUND_S
    assert out.read_bytes() == b"the user's"
    assert _leftovers(out_dir, ["m.gguf"]) == []
    assert _processes_naming(str(out_dir)) == []  # the quantizer went with it


# -- edgemoe.interrupt -----------------------------------------------------------------------

def _signal_main(signum=signal.SIGINT) -> None:
    signal.pthread_kill(threading.main_thread().ident, signum)


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler for the test, also where this test run inherited SIGINT
    ignored (a background job of a shell script)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@needs_cache
def test_ctrl_c_inside_a_ctypes_callback_is_not_lost(monkeypatch, python_sigint):
    """llama.cpp calls edgemoe.log._on_log through ctypes while a model loads; ctypes prints an
    exception raised there ("Exception ignored") and drops it. A Ctrl-C that Python acted on
    inside it was lost and `run` went on; interruptible() sends it again once the callback
    has returned."""
    from edgemoe import log
    from edgemoe.interrupt import interruptible

    sent = []

    class Stderr:  # where _on_log writes with verbose on: the signal comes inside the callback
        def write(self, text):
            if not sent:
                sent.append(text)
                _signal_main()  # Python acts on it before this returns

        def flush(self):
            pass

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    monkeypatch.setattr(log, "_verbose", True)
    monkeypatch.setattr(sys, "stderr", Stderr())
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with interruptible():
            log._callback(2, b"a line of llama.cpp's log\n", None)  # through ctypes, as llama.cpp calls it
            while time.monotonic() - t0 < 5:
                time.sleep(0.01)
    assert sent and unraisable == []
    assert time.monotonic() - t0 < 1


def test_sigterm_raises_terminated_and_handlers_come_back():
    from edgemoe.interrupt import Terminated, interruptible, signum_of

    int_before, term_before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as info:
        with interruptible():
            _signal_main(signal.SIGTERM)
            time.sleep(5)
    assert isinstance(info.value, KeyboardInterrupt) and signum_of(info.value) == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is int_before and signal.getsignal(signal.SIGTERM) is term_before


def test_an_ignored_sigint_stays_ignored():
    """A background job of a shell script inherits SIGINT ignored: edgemoe leaves it so."""
    from edgemoe.interrupt import interruptible

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interruptible():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("inside", [True, False], ids=["interruptible", "python_default"])
def test_held_signals_act_when_the_block_ends(inside, python_sigint):
    """Where a Popen or a cleanup runs: a Ctrl-C waits for the block's end, then acts as it
    would have; with Python's own handler too (held() puts it back first)."""
    import contextlib

    from edgemoe.interrupt import held, interruptible

    before = signal.getsignal(signal.SIGINT)
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interruptible() if inside else contextlib.nullcontext():
            with held():
                with held():
                    _signal_main()
                    time.sleep(0.05)
                    reached.append("inner")
                time.sleep(0.05)
                reached.append("outer")  # not cut short
    assert reached == ["inner", "outer"]
    assert signal.getsignal(signal.SIGINT) is before


def test_held_also_when_another_thread_takes_the_signal(python_sigint):
    """A process-directed signal goes to any thread that does not block it (run has the
    cache's reading threads): held() still defers it, a mask on the main thread would not."""
    from edgemoe.interrupt import held, interruptible

    done = threading.Event()
    other = threading.Thread(target=done.wait)
    other.start()
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with interruptible():
                with held():
                    signal.pthread_kill(other.ident, signal.SIGINT)
                    time.sleep(0.05)
                    reached.append("end")
    finally:
        done.set()
        other.join()
    assert reached == ["end"]


def test_wait_child_sees_a_signal_that_another_thread_took(python_sigint):
    """The kernel may give a process-directed signal to any thread (numpy's, llama.cpp's); a
    main thread asleep in a blocking waitpid would not wake for it until the child ends."""
    import subprocess

    from edgemoe.interrupt import interruptible, wait_child

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    def take_it() -> None:
        time.sleep(0.2)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # to this thread, not the main one

    other = threading.Thread(target=take_it)
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            with interruptible():
                other.start()
                wait_child(child)
        assert time.monotonic() - t0 < 2
    finally:
        other.join()
        child.kill()
        child.wait()
