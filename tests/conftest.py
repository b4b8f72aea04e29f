"""Shared fixtures: tiny synthetic models written once per session, and library checks.

Run with `pytest tests`. Native libraries come from `edgemoe/lib/` or `EDGEMOE_LIB_DIR`;
vocab GGUFs from `edgemoe/data/vocab/` or `EDGEMOE_VOCAB_DIR`. Tests that need libedgemoe
(the expert cache) skip only when that library is absent altogether; with
`EDGEMOE_REQUIRE_NATIVE=1` (for CI) a missing library or vocab fails the run instead, so a
broken install cannot pass as a row of skips.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

try:
    from edgemoe import _native
    _LLAMA_ERROR = None
except Exception as e:  # NativeLibraryError, or no llama_cpp at all
    _native = None
    _LLAMA_ERROR = str(e)

HAS_LLAMA = _native is not None
HAS_CACHE = HAS_LLAMA and _native.has_edgemoe_library()

needs_llama = pytest.mark.skipif(not HAS_LLAMA, reason=f"libllama not loadable: {_LLAMA_ERROR}")
needs_cache = pytest.mark.skipif(
    not HAS_CACHE,
    reason="libedgemoe.so not found in " + (str(_native.lib_dir()) if HAS_LLAMA else "EDGEMOE_LIB_DIR"),
)

def assert_one_line_error(proc, *needles) -> str:
    """A finished `edgemoe` subprocess failed the way users should see: non-zero exit, one
    `edgemoe: error:` line naming each needle (lower case), no traceback. Returns the line."""
    return assert_one_line_error_of(proc.returncode, proc.stderr, *needles)


def assert_one_line_error_of(code: int, stderr: str, *needles) -> str:
    """The same for an exit code and stderr (a command run in-process)."""
    assert code != 0, (code, stderr)
    err = stderr.strip()
    assert "Traceback" not in stderr
    assert len(err.splitlines()) == 1, stderr
    assert err.startswith("edgemoe: error: "), err
    for needle in needles:
        assert needle in err.lower(), err
    return err


def on_tmpfs(path) -> bool:
    """Whether `path` lies on a RAM file system (no page cache to measure, no O_DIRECT)."""
    best, fstype = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, typ, *_ = line.split()
            if str(path).startswith(mnt) and len(mnt) > len(best):
                best, fstype = mnt, typ
    return fstype in ("tmpfs", "ramfs")


REQUIRE_NATIVE = os.environ.get("EDGEMOE_REQUIRE_NATIVE", "") not in ("", "0")


def pytest_configure(config):
    if REQUIRE_NATIVE and not HAS_CACHE:
        why = _LLAMA_ERROR if not HAS_LLAMA else f"libedgemoe.so not found in {_native.lib_dir()}"
        raise pytest.UsageError(f"EDGEMOE_REQUIRE_NATIVE is set but the native libraries are missing: {why}")


# One thread count everywhere: reference and cached runs must use the same kernels.
N_THREADS = 2

# Tiny MoE models per architecture: 2 layers x 8 experts, top-2, gpt-2 vocab.
# qwen3moe gets 4 KiB alignment (expert slices of 8 KiB start on page boundaries, as
# O_DIRECT wants); the others keep llama.cpp's default 32, so both layouts are covered.
TINY = {
    "qwen3moe": dict(arch="qwen3moe", n_layer=2, n_embd=64, n_ff=128, n_ff_exp=64, n_expert=8,
                     n_expert_used=2, n_head=4, n_head_kv=2, alignment=4096, seed=1),
    "qwen2moe": dict(arch="qwen2moe", n_layer=2, n_embd=64, n_ff=96, n_ff_exp=64, n_expert=8,
                     n_expert_used=2, n_head=4, n_head_kv=2, seed=2),
    "olmoe": dict(arch="olmoe", n_layer=2, n_embd=64, n_ff=128, n_ff_exp=64, n_expert=8,
                  n_expert_used=2, n_head=4, n_head_kv=4, expert_type="F32", seed=3),
    # quantized experts: ggml repacks Q8_0 on Arm for other kernels; the pools then hold repacked slots
    "qwen3moe-q8_0": dict(arch="qwen3moe", n_layer=2, n_embd=64, n_ff=128, n_ff_exp=64, n_expert=8,
                          n_expert_used=2, n_head=4, n_head_kv=2, expert_type="Q8_0", seed=5),
}


def _vocab(name: str) -> pathlib.Path:
    if not HAS_LLAMA:
        pytest.skip(f"libllama not loadable: {_LLAMA_ERROR}")
    path = _native.vocab_dir() / name
    if not path.exists():
        if REQUIRE_NATIVE:
            pytest.fail(f"vocab file {path} not found (EDGEMOE_REQUIRE_NATIVE is set)")
        pytest.skip(f"vocab file {path} not found (set EDGEMOE_VOCAB_DIR)")
    return path


@pytest.fixture(scope="session")
def gpt2_vocab() -> pathlib.Path:
    return _vocab("ggml-vocab-gpt-2.gguf")


@pytest.fixture(scope="session")
def qwen2_vocab() -> pathlib.Path:
    return _vocab("ggml-vocab-qwen2.gguf")


@pytest.fixture(scope="session")
def llama_spm_vocab() -> pathlib.Path:
    """32000 tokens and no merges: the quickest vocab for gguf-py's reader to parse."""
    return _vocab("ggml-vocab-llama-spm.gguf")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_models(model_dir, gpt2_vocab) -> dict:
    """name (the arch, or arch-exptype) -> path of a tiny MoE GGUF."""
    from edgemoe.synth import SynthConfig, write_model

    out = {}
    for arch, kw in TINY.items():
        path = model_dir / f"tiny-{arch}.gguf"
        write_model(path, SynthConfig(vocab=str(gpt2_vocab), **kw))
        out[arch] = path
    return out


@pytest.fixture(scope="session")
def dense_model(model_dir, gpt2_vocab) -> pathlib.Path:
    from edgemoe.synth import SynthConfig, write_model

    path = model_dir / "tiny-qwen3-dense.gguf"
    write_model(path, SynthConfig(arch="qwen3", vocab=str(gpt2_vocab), n_layer=2, n_embd=64, n_ff=128,
                                  n_head=4, n_head_kv=2, seed=4))
    return path


@pytest.fixture(scope="session")
def edgemoe_env() -> dict:
    """Environment for subprocesses running `python -m edgemoe` from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# -- signals under load ------------------------------------------------------------------

SIGNAL_BOUND_S = 5.0  # from Ctrl-C or SIGTERM to a cleaned-up exit, on a busy machine


@pytest.fixture
def cpu_hog():
    """A busy machine for the test beside it: two busy-looping processes per CPU this process
    may run on, at its own priority, killed at teardown."""
    n = 2 * len(os.sched_getaffinity(0))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            for _ in range(n)]
    try:
        yield hogs
    finally:
        for h in hogs:
            h.kill()
        for h in hogs:
            h.wait()


def _as_a_terminal_job() -> None:
    # A shell script's background job inherits SIGINT ignored, and Python then leaves it
    # ignored: Ctrl-C would do nothing (the way .ci/run beside a compile lost it). A terminal's
    # foreground job, which Ctrl-C reaches, has it at the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_edgemoe(args, env, stdout=subprocess.PIPE, **kw) -> subprocess.Popen:
    """`python -m edgemoe ARGS` in a process group of its own, with SIGINT at its default as
    in a terminal's foreground job; stderr is a text pipe."""
    return subprocess.Popen([sys.executable, "-m", "edgemoe", *map(str, args)], env=env, stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_as_a_terminal_job, **kw)


def interrupt(proc: subprocess.Popen, signum: int, group: bool = True, bound: float = SIGNAL_BOUND_S):
    """Sends `signum` to the process group (Ctrl-C reaches a terminal's whole foreground job)
    or to the process alone (`kill PID`), and waits at most `bound` seconds for it to end.
    Returns (stderr, seconds); on a timeout the group is killed and the test fails."""
    t0 = time.monotonic()
    if group:
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    try:
        proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        where = _threads_of_group(proc.pid)  # where it waits, for the failure's message
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"{signal.Signals(signum).name} did not end the command within {bound:.0f} s; "
                    f"stderr: {err}; threads (pid tid name state wchan): {where}")
    seconds = time.monotonic() - t0
    _, err = proc.communicate()
    return err, seconds


def _threads_of_group(pgid: int) -> list:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                    wchan = f.read()
                name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
                out.append(f"{pid} {tid} {name} {rest.split()[0]} {wchan}")
        except OSError:  # gone meanwhile
            continue
    return out


def assert_interrupted(proc: subprocess.Popen, err: str, signum: int) -> None:
    """Ended by `signum` the way users should see: its last stderr line `edgemoe: aborted`
    (SIGINT) or `edgemoe: terminated` (SIGTERM), status 128 + signum, no traceback. After
    Ctrl-C, Python may end itself by SIGINT instead of exiting 130 (where an extension module
    that was loading saw the KeyboardInterrupt); a shell shows 130 for both."""
    word = "terminated" if signum == signal.SIGTERM else "aborted"
    ok = (128 + signum, -signal.SIGINT) if signum == signal.SIGINT else (128 + signum,)
    assert proc.returncode in ok, (proc.returncode, err)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1] == f"edgemoe: {word}", err
