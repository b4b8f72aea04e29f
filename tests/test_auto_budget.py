"""edgemoe.auto_budget: the room from fake cgroup v1/v2 and /proc/meminfo trees, the decision
(off, a byte budget, the minimum when short), and the KV and compute sizes against llama.cpp's
own log. The engine, `edgemoe run`, `edgemoe bench` and a real cgroup: test_auto_budget_engine.py."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys

import pytest

from conftest import needs_cache
from edgemoe.auto_budget import (KV_CELL_PAD, MARGIN_FIXED, MARGIN_FRACTION, MemoryRoom, ModelMemory, decide,
                                  derive_auto_budget, kv_cache_bytes, memory_room)
from edgemoe.budget import Budget, format_bytes
from edgemoe.errors import EdgemoeError

MiB, GiB = 1 << 20, 1 << 30
V1_UNLIMITED = "9223372036854771712\n"


def _proc(tmp_path, mountinfo: str, cgroup: str, available_kib=None):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    (proc / "self" / "cgroup").write_text(cgroup)
    meminfo = proc / "meminfo"
    if available_kib is not None:
        meminfo.write_text(f"MemTotal:       99999999 kB\nMemFree:          123456 kB\n"
                           f"MemAvailable:   {available_kib} kB\n")
    return proc / "self", meminfo


def _group(path, files: dict):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _v1_tree(tmp_path, limit, usage, stat, parent_files=None, available_kib=20 * GiB // 1024):
    v1 = tmp_path / "memory"
    _group(v1, {"memory.limit_in_bytes": V1_UNLIMITED, "memory.usage_in_bytes": str(50 * GiB)})
    _group(v1 / "jobs", parent_files or {"memory.limit_in_bytes": V1_UNLIMITED})
    mine = _group(v1 / "jobs" / "42", {"memory.limit_in_bytes": f"{limit}\n",
                                       "memory.usage_in_bytes": f"{usage}\n", "memory.stat": stat})
    mountinfo = (f"41 31 0:38 / {tmp_path / 'unified'} rw,relatime - cgroup2 cgroup2 rw\n"
                 f"35 31 0:32 / {v1} rw,relatime - cgroup cgroup rw,memory\n")
    return mine, _proc(tmp_path, mountinfo, "4:memory:/jobs/42\n1:cpu:/\n0::/\n", available_kib)

# -- the room ------------------------------------------------------------------------------

def test_v1_limit_less_what_is_not_page_cache(tmp_path):
    # the group's own file counters are left out of v1's hierarchical total_* ones: total_ wins
    stat = (f"cache {900 * MiB}\nactive_file {1 * MiB}\ninactive_file {1 * MiB}\n"
            f"total_active_file {300 * MiB}\ntotal_inactive_file {100 * MiB}\n")
    mine, (proc_self, meminfo) = _v1_tree(tmp_path, 2 * GiB, 500 * MiB, stat)
    room = memory_room(proc_self, meminfo)
    assert room == MemoryRoom("cgroup v1 limit", 2 * GiB, 100 * MiB, str(mine))


def test_v1_tighter_ancestor_wins(tmp_path):
    parent = {"memory.limit_in_bytes": f"{1 * GiB}\n", "memory.usage_in_bytes": f"{600 * MiB}\n",
              "memory.stat": f"total_active_file {100 * MiB}\ntotal_inactive_file 0\n"}
    mine, (proc_self, meminfo) = _v1_tree(tmp_path, 2 * GiB, 0, "", parent_files=parent)
    room = memory_room(proc_self, meminfo)
    assert (room.limit_bytes, room.in_use_bytes, room.cgroup) == (1 * GiB, 500 * MiB, str(mine.parent))


def test_v2_limit_and_file_pages(tmp_path):
    root = tmp_path / "cg2"
    _group(root, {"cgroup.subtree_control": "memory\n"})  # the root has no memory.max
    _group(root / "user.slice", {"memory.max": "max\n", "memory.current": str(8 * GiB)})
    scope = _group(root / "user.slice" / "app.scope",
                   {"memory.max": f"{3 * GiB}\n", "memory.current": f"{1 * GiB}\n",
                    "memory.stat": f"anon {200 * MiB}\nfile {800 * MiB}\nactive_file {600 * MiB}\n"
                                   f"inactive_file {200 * MiB}\n"})
    proc_self, meminfo = _proc(tmp_path, f"30 20 0:26 / {root} rw - cgroup2 cgroup2 rw\n",
                               "0::/user.slice/app.scope\n", available_kib=10 * GiB // 1024)
    room = memory_room(proc_self, meminfo)
    assert room == MemoryRoom("cgroup v2 limit", 3 * GiB, 224 * MiB, str(scope))


def test_v2_max_means_none_and_memavailable_is_used(tmp_path):
    root = tmp_path / "cg2"
    _group(root / "app", {"memory.max": "max\n", "memory.current": "1000\n"})
    proc_self, meminfo = _proc(tmp_path, f"30 20 0:26 / {root} rw - cgroup2 cgroup2 rw\n", "0::/app\n",
                               available_kib=5 * GiB // 1024)
    assert memory_room(proc_self, meminfo) == MemoryRoom("MemAvailable", 5 * GiB)


def test_no_cgroup_memavailable(tmp_path):
    proc_self, meminfo = _proc(tmp_path, "", "0::/\n", available_kib=7 * GiB // 1024)
    assert memory_room(proc_self, meminfo) == MemoryRoom("MemAvailable", 7 * GiB)


def test_memavailable_below_a_cgroup_limit_wins(tmp_path):
    _, (proc_self, meminfo) = _v1_tree(tmp_path, 8 * GiB, 0, "", available_kib=3 * GiB // 1024)
    assert memory_room(proc_self, meminfo) == MemoryRoom("MemAvailable", 3 * GiB)


def test_v1_inside_a_container_whose_mount_is_its_own_group(tmp_path):
    v1 = _group(tmp_path / "memory", {"memory.limit_in_bytes": f"{4 * GiB}\n",
                                      "memory.usage_in_bytes": f"{1 * GiB}\n",
                                      "memory.stat": f"total_inactive_file {1 * GiB}\n"})
    proc_self, meminfo = _proc(tmp_path, f"35 31 0:32 /docker/abc {v1} rw - cgroup cgroup rw,memory\n",
                               "4:memory:/docker/abc\n", available_kib=30 * GiB // 1024)
    assert memory_room(proc_self, meminfo) == MemoryRoom("cgroup v1 limit", 4 * GiB, 0, str(v1))


def test_nothing_readable_is_one_line(tmp_path):
    with pytest.raises(EdgemoeError) as info:
        memory_room(tmp_path / "nowhere", tmp_path / "nomeminfo")
    assert "auto" in str(info.value) and "\n" not in str(info.value)


# -- the decision --------------------------------------------------------------------------

NEED = ModelMemory(expert_bytes=3 * GiB, non_expert_bytes=300 * MiB, min_budget_bytes=60 * MiB,
                   kv_bytes=64 * MiB, compute_bytes=40 * MiB)


def _margin(limit):
    return MARGIN_FIXED + int(MARGIN_FRACTION * limit)


def test_every_expert_fits_is_off():
    room = MemoryRoom("MemAvailable", 8 * GiB)
    auto = decide("m.gguf", room, NEED)
    assert auto.budget_bytes is None and auto.budget is None and auto.short_bytes == 0
    assert auto.room_bytes == 8 * GiB - (300 + 64 + 40) * MiB - _margin(8 * GiB)
    line = auto.describe()
    assert line.startswith("expert cache auto: off, every expert fits (MemAvailable 8.0 GiB - non-expert 300.0 MiB")
    assert "in use" not in line and ">= 3.0 GiB of experts" in line and "\n" not in line


def test_part_of_the_experts_is_a_byte_budget():
    room = MemoryRoom("cgroup v1 limit", 2 * GiB, 100 * MiB, "/g")
    auto = decide("m.gguf", room, NEED)
    expect = 2 * GiB - 100 * MiB - (300 + 64 + 40) * MiB - _margin(2 * GiB)
    assert auto.budget_bytes == expect and auto.budget == Budget(bytes=expect)
    assert NEED.min_budget_bytes < expect < NEED.expert_bytes and auto.short_bytes == 0
    assert auto.describe() == (
        "expert cache auto: 1.3 GiB (43 % of 3.0 GiB of experts; cgroup v1 limit 2.0 GiB - in use 100.0 MiB "
        "- non-expert 300.0 MiB - KV 64.0 MiB - compute 40.0 MiB - margin 230.4 MiB = 1.3 GiB)")


def test_too_small_takes_the_minimum_and_says_by_how_much():
    room = MemoryRoom("cgroup v2 limit", 600 * MiB, 20 * MiB, "/g")
    auto = decide("m.gguf", room, NEED)
    room_bytes = 600 * MiB - 20 * MiB - (300 + 64 + 40) * MiB - _margin(600 * MiB)
    assert room_bytes < NEED.min_budget_bytes
    assert auto.budget_bytes == NEED.min_budget_bytes
    assert auto.short_bytes == NEED.min_budget_bytes - room_bytes
    assert auto.describe() == (
        "expert cache auto: 60.0 MiB (2 % of 3.0 GiB of experts), the minimum; memory is 42.0 MiB short of it "
        "(cgroup v2 limit 600.0 MiB - in use 20.0 MiB - non-expert 300.0 MiB - KV 64.0 MiB - compute 40.0 MiB "
        "- margin 158.0 MiB = 18.0 MiB)")
    # nothing left at all: the room is negative, the shortfall is the minimum and more
    none_left = decide("m.gguf", MemoryRoom("MemAvailable", 400 * MiB), NEED)
    assert none_left.budget_bytes == NEED.min_budget_bytes and none_left.room_bytes < 0
    assert none_left.short_bytes == NEED.min_budget_bytes - none_left.room_bytes
    assert f"= -{format_bytes(-none_left.room_bytes)})" in none_left.describe()


def test_dense_model_is_off():
    dense = ModelMemory(expert_bytes=0, non_expert_bytes=300 * MiB, min_budget_bytes=0, kv_bytes=0,
                        compute_bytes=0)
    auto = decide("dense.gguf", MemoryRoom("MemAvailable", 100 * MiB), dense)
    assert auto.budget is None and auto.describe() == "expert cache auto: off, dense.gguf has no routed experts"

# -- sizes against llama.cpp ---------------------------------------------------------------

def _llama_log(path, **kw):
    """llama.cpp's KV and compute buffer sizes (MiB) for an engine made with these arguments."""
    code = (f"from edgemoe.engine import Engine\n"
            f"Engine({str(path)!r}, verbose=True, expert_cache='off', **{kw!r}).close()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kv = re.search(r"KV buffer size =\s*([\d.]+) MiB", proc.stderr)
    compute = re.search(r"CPU compute buffer size =\s*([\d.]+) MiB", proc.stderr)
    return float(kv.group(1)), float(compute.group(1))


@pytest.fixture(scope="module")
def deepseek_model(tmp_path_factory):
    from conftest import _vocab
    from edgemoe.shapes import SHAPES, synth_config
    from edgemoe.synth import write_model

    vocab = _vocab("ggml-vocab-deepseek-llm.gguf")
    path = tmp_path_factory.mktemp("ds") / "ds.gguf"
    return write_model(path, synth_config(SHAPES["deepseek-v2-lite"], 0.08, vocab_dir=vocab.parent)).path


@needs_cache
@pytest.mark.parametrize("which, n_ctx, n_ubatch, kv_type", [
    ("default", 4096, 512, "f16"), ("default", 100, 64, "f16"), ("default", 1024, 128, "f32"),
    ("olmoe", 300, 512, "f16"), ("deepseek2", 512, 256, "f16"),
])
def test_kv_and_compute_sizes_match_llama_cpp(which, n_ctx, n_ubatch, kv_type, tiny_models, deepseek_model):
    from edgemoe.auto_budget import compute_buffer_bytes
    from edgemoe.default_model import default_model_path
    from edgemoe.gguf_header import read_header

    path = {"default": default_model_path(), "deepseek2": deepseek_model}.get(which) or tiny_models[which]
    header = read_header(path, string_arrays=False)  # as derive_auto_budget reads it
    kv_mib, compute_mib = _llama_log(path, n_ctx=n_ctx, n_ubatch=n_ubatch, kv_type=kv_type)
    assert kv_cache_bytes(header, n_ctx, kv_type) / MiB == pytest.approx(kv_mib, abs=0.006)
    estimate = compute_buffer_bytes(header, n_ctx, n_ubatch, flash_attn=kv_type != "f32") / MiB
    assert compute_mib <= estimate <= 1.5 * compute_mib + 1, (estimate, compute_mib)


def test_header_without_string_arrays_keeps_everything_else(tmp_path):
    from edgemoe.default_model import default_model_path
    from edgemoe.errors import ModelFormatError
    from edgemoe.gguf_header import read_header

    full, quick = read_header(default_model_path()), read_header(default_model_path(), string_arrays=False)
    strings = {k for k, (vtype, sub) in full.kv_types.items() if vtype == 9 and sub == 8}
    assert "tokenizer.ggml.tokens" in strings and "tokenizer.ggml.merges" in strings
    assert {k: len(v) for k, v in full.kv.items() if k in strings} == {k: quick.kv[k] for k in strings}
    assert {k: v for k, v in full.kv.items() if k not in strings} == \
           {k: v for k, v in quick.kv.items() if k not in strings}
    assert (full.tensors, full.data_offset) == (quick.tensors, quick.data_offset)
    # cut inside the vocabulary: still a format error, not a struct error
    data = default_model_path().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:data.index(b"<|endoftext|>") + 5000])
    with pytest.raises(ModelFormatError, match="truncated or corrupt"):
        read_header(cut, string_arrays=False)


def test_kv_bytes_of_the_default_model_by_the_formula():
    from edgemoe.default_model import default_model_path
    from edgemoe.gguf_header import read_header

    header = read_header(default_model_path())
    # qwen3moe: 8 layers, 2 KV heads of 64 (K) + 64 (V), f16, n_ctx rounded up to 256 cells
    assert kv_cache_bytes(header, 4096) == 4096 * 8 * 2 * (64 + 64) * 2 == 16 * MiB
    assert kv_cache_bytes(header, 1) == KV_CELL_PAD * 8 * 2 * 128 * 2
    assert kv_cache_bytes(header, 4096, "f32") == 32 * MiB


@needs_cache
def test_derive_from_a_fake_v1_limit_and_the_real_model(tmp_path):
    from edgemoe.cache import inspect_model
    from edgemoe.default_model import default_model_path

    path = default_model_path()
    info = inspect_model(path)
    # a limit with room for half the experts: limit - in use - the rest - margin = experts / 2
    probe = derive_auto_budget(path, n_ctx=4096, proc_self=tmp_path / "none", meminfo=_proc(
        tmp_path / "probe", "", "0::/\n", 64 * GiB // 1024)[1])
    rest = probe.need.non_expert_bytes + probe.need.kv_bytes + probe.need.compute_bytes
    limit = math.ceil((10 * MiB + rest + MARGIN_FIXED + info.expert_bytes // 2) / (1 - MARGIN_FRACTION))
    _, (proc_self, meminfo) = _v1_tree(tmp_path, limit, 10 * MiB, "")
    auto = derive_auto_budget(path, n_ctx=4096, proc_self=proc_self, meminfo=meminfo)
    assert auto.room.source == "cgroup v1 limit" and auto.need.expert_bytes == info.expert_bytes
    assert auto.need.non_expert_bytes == info.non_expert_bytes
    assert auto.budget_bytes == pytest.approx(info.expert_bytes // 2, abs=64)


# -- a VRAM pool -------------------------------------------------------------------------------

def _gpu(free):
    from edgemoe.cache import GpuInfo

    return GpuInfo(n_gpu=1, integrated=False, memory_free=free, memory_total=80 * GiB, name="FakeGPU",
                   description="FakeGPU (fake)")


def test_a_vram_pool_takes_the_free_vram_less_the_offloaded_share():
    from edgemoe.auto_budget import offloaded, vram_room

    gpu_min = 640 * MiB
    # every layer and the output offloaded: all of the weights, KV and compute buffers are in VRAM
    need = offloaded(NEED, n_layer=7, n_gpu_layers=99, min_gpu_budget_bytes=gpu_min)
    assert (need.non_expert_bytes, need.kv_bytes, need.min_budget_bytes) == (300 * MiB, 64 * MiB, gpu_min)
    auto = decide("m.gguf", vram_room(_gpu(2 * GiB)), need)
    assert auto.budget_bytes == 2 * GiB - (300 + 64 + 40) * MiB - _margin(2 * GiB)
    line = auto.describe()
    assert "VRAM free on FakeGPU 2.0 GiB - non-expert 300.0 MiB" in line and "in use" not in line
    # half the layers: half the KV cache, 4 of the 8 weight layers (the output layer is one)
    half = offloaded(NEED, n_layer=8, n_gpu_layers=4, min_gpu_budget_bytes=gpu_min)
    assert (half.non_expert_bytes, half.kv_bytes) == (int(300 * MiB * 4 / 9), 32 * MiB)
    # room for every expert: off, the run is stock -ngl with every expert in VRAM
    assert decide("m.gguf", vram_room(_gpu(8 * GiB)), need).budget_bytes is None
    # short of a layer's experts: the GPU minimum, not the host pool's top-k
    small = decide("m.gguf", vram_room(_gpu(1 * GiB)), need)
    assert small.budget_bytes == gpu_min and small.short_bytes > 0


@needs_cache
def test_derive_for_a_vram_pool_from_the_real_model():
    from edgemoe.cache import inspect_model
    from edgemoe.default_model import default_model_path

    path = default_model_path()
    info = inspect_model(path)
    assert info.min_gpu_budget_bytes == info.n_expert * info.slot_bytes_max  # one pool: a layer's experts
    probe = derive_auto_budget(path, n_ctx=4096, vram_gpu=_gpu(64 * GiB), n_gpu_layers=99)
    assert probe.budget_bytes is None and probe.room.source == "VRAM free on FakeGPU"
    rest = probe.need.non_expert_bytes + probe.need.kv_bytes + probe.need.compute_bytes
    assert probe.need.non_expert_bytes == info.non_expert_bytes  # every layer offloaded
    free = math.ceil((rest + MARGIN_FIXED + info.expert_bytes // 2) / (1 - MARGIN_FRACTION))
    half = derive_auto_budget(path, n_ctx=4096, vram_gpu=_gpu(free), n_gpu_layers=99)
    assert half.budget_bytes == pytest.approx(info.expert_bytes // 2, abs=64)
    tiny = derive_auto_budget(path, n_ctx=4096, vram_gpu=_gpu(rest), n_gpu_layers=99)
    assert tiny.budget_bytes == info.min_gpu_budget_bytes


def test_only_a_vram_pool_on_a_discrete_gpu_is_sized_from_vram(monkeypatch):
    import edgemoe.cache as cache
    from edgemoe.placement import vram_gpu

    monkeypatch.setattr(cache, "inspect_gpu", lambda: _gpu(GiB))
    assert vram_gpu("vram").name == "FakeGPU" and vram_gpu("gpu").name == "FakeGPU"
    assert vram_gpu("host") is None and vram_gpu("mapped") is None
    integrated = dataclasses.replace(_gpu(GiB), integrated=True)
    monkeypatch.setattr(cache, "inspect_gpu", lambda: integrated)
    assert vram_gpu("gpu") is None  # a Jetson: mapped host memory, sized from host memory
