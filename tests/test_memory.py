"""Memory: with the cache on, the process plus the model's page cache stay near the budget.

A ~360 MB model (3 layers x 64 experts, Q8_0, experts 84 % of bytes) runs in a child process
with a 25 % budget. Afterwards its peak RSS plus the model file's page-cache residency must
stay under non-expert bytes + budget + OVERHEAD. OVERHEAD covers the interpreter, numpy,
llama-cpp-python (about 60 MiB before the model), compute and KV buffers, and the non-expert
weights counted twice (mapped into RSS and present in the page cache). Measured here: 175 MiB
peak RSS + 65 MiB page cache = 240 MiB against a bound of 283 MiB. A cache-off run of the
same model (about 830 MiB) must exceed the bound, which shows the test can fail.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import N_THREADS, needs_cache, on_tmpfs

OVERHEAD = 150 << 20

_CHILD = r"""
import json, sys
from edgemoe.engine import Engine
path, budget = sys.argv[1], sys.argv[2]
with Engine(path, expert_cache=None if budget == "off" else budget, io="direct", n_ctx=256,
            n_threads=int(sys.argv[3]), notice=lambda m: None) as e:
    text = "".join(e.generate("Once upon a time", max_tokens=32, seed=1))
    s = e.stats()
# s.peak_rss_bytes is VmHWM: ru_maxrss would include the pytest parent's RSS at fork time
print(json.dumps(dict(peak_rss=s.peak_rss_bytes,
                      budget=s.expert_cache_bytes, misses=s.misses, bytes_read=s.bytes_read,
                      n_generated=s.n_generated)))
"""




def _drop_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _resident_bytes(path) -> int:
    """Bytes of the file in the page cache: mincore over a fresh mapping (which faults nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    size = os.path.getsize(path)
    n_pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            vec = (ctypes.c_ubyte * n_pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * mmap.PAGESIZE


@pytest.fixture(scope="module")
def big_model(tmp_path_factory, gpt2_vocab):
    from edgemoe.synth import SynthConfig, write_model

    directory = tmp_path_factory.mktemp("big")
    if on_tmpfs(directory):
        pytest.skip(f"{directory} is on tmpfs: page-cache residency cannot be dropped there")
    cfg = SynthConfig(arch="qwen3moe", vocab=str(gpt2_vocab), n_layer=3, n_embd=512, n_ff=1024,
                      n_ff_exp=1024, n_expert=64, n_expert_used=4, n_head=8, n_head_kv=4,
                      expert_type="Q8_0", embd_type="Q8_0", weight_type="F16", alignment=4096, seed=9)
    return write_model(directory / "big-qwen3moe.gguf", cfg)


def _run_child(path, budget, env):
    _drop_page_cache(path)
    before = _resident_bytes(path)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), budget, str(N_THREADS)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["resident"] = _resident_bytes(path)
    result["resident_before"] = before
    return result


@needs_cache
def test_rss_plus_page_cache_within_budget(big_model, edgemoe_env):
    from edgemoe.cache import inspect_model

    info = inspect_model(big_model.path)
    assert info.expert_bytes == big_model.expert_bytes
    r = _run_child(big_model.path, "25%", edgemoe_env)
    assert r["resident_before"] < (8 << 20), "the page cache was not dropped"
    assert r["n_generated"] > 0 and r["misses"] > 0
    assert r["budget"] <= info.expert_bytes * 0.25 + info.slot_bytes_max
    bound = info.non_expert_bytes + r["budget"] + OVERHEAD
    used = r["peak_rss"] + r["resident"]
    assert used <= bound, (
        f"peak RSS {r['peak_rss'] >> 20} MiB + page cache {r['resident'] >> 20} MiB = {used >> 20} MiB "
        f"> bound {bound >> 20} MiB (non-expert {info.non_expert_bytes >> 20} + budget "
        f"{r['budget'] >> 20} + overhead {OVERHEAD >> 20})")

    # the same measurement without the cache must break the bound, or the test proves nothing
    off = _run_child(big_model.path, "off", edgemoe_env)
    assert off["peak_rss"] + off["resident"] > bound
