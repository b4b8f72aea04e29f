"""`--expert-cache auto`: the expert-cache budget from the memory this process may use.

    room = limit - in use - non-expert weights - KV cache - compute buffers - margin

- **limit, in use.** The smaller of two figures. The cgroup's: over this process's memory
  cgroup and each ancestor up to the mount, the tightest of its limit (v2 `memory.max`, v1
  `memory.limit_in_bytes`) minus what the group holds that the kernel cannot reclaim, its usage
  less its page cache (`active_file` + `inactive_file`, v1's `total_` ones). Page cache counts as
  free: the model's own cached pages are what the run will use. The system's: `MemAvailable`,
  which already leaves out what is in use. On a Jetson the GPU allocates from the same RAM:
  outside any cgroup, but inside MemAvailable.
- **non-expert weights.** libedgemoe's inspection of the GGUF: what the run maps and reads
  whatever the budget.
- **KV cache.** llama.cpp's size: n_ctx rounded up to 256 cells, times, over the attention
  layers (`block_count` less `nextn_predict_layers`), head_count_kv × (key_length +
  value_length) elements, 2 bytes each in f16. MLA (deepseek2 with `key_length_mla`) keeps
  only K, of kv_lora_rank + the RoPE dims.
- **compute buffers.** 4 bytes × n_ubatch (at most n_ctx) × (max(n_vocab, A) + 4 n_embd +
  3 k n_ff_exp), where A is 0 with flash attention and (n_head + 1) × the KV cells without
  (the scores and the mask): llama.cpp's allocator reuses the logits' memory for them. The
  default model: 17.5 MiB measured (20.5 estimated) at n_ctx 4096 and n_ubatch 512; in f32,
  without flash attention, 60.3 (60.5).
- **margin.** 128 MiB + 5 % of the limit. The fixed part is what the estimates leave out:
  llama.cpp's vocabulary and graph metadata, the cache's I/O buffers, the interpreter's growth,
  the hot pages of the libraries. The share is for what else shares the limit and grows after
  this snapshot (other processes, their page cache).

Weights, KV cache and compute buffers count against this memory wherever they sit: on a
Jetson a GPU's buffers are the same RAM (the `mapped` pool is host memory too).

**A VRAM pool** (`-ngl` on a discrete GPU) is sized from the GPU instead: the room is the
device's free memory, less what the offloaded layers put there: their share of the non-expert
weights (n_gpu_layers of n_layer + 1, the output layer counting as one), the same share of the
KV cache, and the compute buffers. When every expert fits, the cache is off and the run is stock
`-ngl`, every expert in VRAM; the minimum is a GPU pool's (a whole layer's experts in every pool).

When every expert fits (expert bytes <= room), the cache is off and the run is stock
llama.cpp (mmap): the same graph and the same speed, warm or cold. Only the derivation comes
before it, before the load: the header without its vocabulary and libedgemoe's inspection.
Otherwise the budget is the room, never below the model's minimum; when even that does not
fit, the minimum, with the shortfall in the description.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from edgemoe.budget import Budget, format_bytes
from edgemoe.errors import EdgemoeError

MARGIN_FIXED = 128 << 20
MARGIN_FRACTION = 0.05
KV_CELL_PAD = 256  # llama.cpp rounds n_ctx up to a multiple of this
_KV_BYTES = {"f16": 2, "f32": 4}
# at or above this a cgroup limit means none (v1 writes PAGE_COUNTER_MAX pages, near 2**63)
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class MemoryRoom:
    """Where the room starts: a limit, and what of it is already in use."""

    source: str                   # "cgroup v2 limit", "cgroup v1 limit" or "MemAvailable"
    limit_bytes: int
    in_use_bytes: int = 0         # 0 for MemAvailable, which excludes it already
    cgroup: Optional[str] = None  # the group whose limit applies


@dataclass(frozen=True)
class ModelMemory:
    """What a model needs besides the expert cache, for one context."""

    expert_bytes: int
    non_expert_bytes: int
    min_budget_bytes: int
    kv_bytes: int
    compute_bytes: int

    @property
    def has_experts(self) -> bool:
        return self.expert_bytes > 0


@dataclass(frozen=True)
class AutoBudget:
    """The derivation of an `auto` budget, every term kept."""

    model: str
    room: MemoryRoom
    need: ModelMemory
    margin_bytes: int
    budget_bytes: Optional[int]  # None: the cache is off

    @property
    def room_bytes(self) -> int:
        """For experts: the limit less everything else (negative when even that is short)."""
        r, n = self.room, self.need
        return (r.limit_bytes - r.in_use_bytes - n.non_expert_bytes - n.kv_bytes - n.compute_bytes
                - self.margin_bytes)

    @property
    def short_bytes(self) -> int:
        """How much memory the minimum budget lacks (0 when it fits)."""
        if self.budget_bytes is None:
            return 0
        return max(0, self.need.min_budget_bytes - self.room_bytes)

    @property
    def budget(self) -> Optional[Budget]:
        return None if self.budget_bytes is None else Budget(bytes=self.budget_bytes)

    def terms(self) -> str:
        """`cgroup v1 limit 2.0 GiB - in use 85.0 MiB - non-expert ... = 1.2 GiB`."""
        r, n = self.room, self.need
        parts = [f"{r.source} {format_bytes(r.limit_bytes)}"]
        if r.source.startswith("cgroup"):  # MemAvailable and free VRAM exclude what is in use
            parts.append(f"in use {format_bytes(r.in_use_bytes)}")
        parts += [f"non-expert {format_bytes(n.non_expert_bytes)}", f"KV {format_bytes(n.kv_bytes)}",
                  f"compute {format_bytes(n.compute_bytes)}", f"margin {format_bytes(self.margin_bytes)}"]
        return " - ".join(parts) + f" = {_signed(self.room_bytes)}"

    def describe(self) -> str:
        """One line: what auto chose and how."""
        n = self.need
        if not n.has_experts:
            return f"expert cache auto: off, {self.model} has no routed experts"
        if self.budget_bytes is None:
            return (f"expert cache auto: off, every expert fits ({self.terms()} "
                    f">= {format_bytes(n.expert_bytes)} of experts)")
        share = f"{100 * self.budget_bytes / n.expert_bytes:.0f} % of {format_bytes(n.expert_bytes)} of experts"
        if self.short_bytes:
            return (f"expert cache auto: {format_bytes(self.budget_bytes)} ({share}), the minimum; "
                    f"memory is {format_bytes(self.short_bytes)} short of it ({self.terms()})")
        return f"expert cache auto: {format_bytes(self.budget_bytes)} ({share}; {self.terms()})"


def _signed(n: int) -> str:
    return format_bytes(n) if n >= 0 else "-" + format_bytes(-n)


# -- the limit ------------------------------------------------------------------------------

def _read_int(path: Path) -> Optional[int]:
    """An integer file's value; None where absent, unreadable or not a number (v2's `max`)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _read_stat(path: Path) -> dict:
    out = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
    except OSError:
        pass
    return out


def _group_room(version: int, group: Path) -> Optional[Tuple[int, int]]:
    """(limit, unreclaimable usage) of one group, None where it sets no limit."""
    limit = _read_int(group / ("memory.max" if version == 2 else "memory.limit_in_bytes"))
    if limit is None or limit >= _UNLIMITED:
        return None
    usage = _read_int(group / ("memory.current" if version == 2 else "memory.usage_in_bytes")) or 0
    stat = _read_stat(group / "memory.stat")
    prefix = "" if version == 2 else "total_"  # v1's own counters leave out the descendants
    cache = sum(stat.get(prefix + k, stat.get(k, 0)) for k in ("active_file", "inactive_file"))
    return limit, max(0, usage - cache)


def _cgroup_room(proc_self: Path) -> Optional[MemoryRoom]:
    from edgemoe.cgroup import own_memory_cgroups

    best: Optional[MemoryRoom] = None
    for version, group, top in own_memory_cgroups(proc_self):
        d = group
        while True:
            found = _group_room(version, d)
            if found is not None:
                limit, in_use = found
                if best is None or limit - in_use < best.limit_bytes - best.in_use_bytes:
                    best = MemoryRoom(f"cgroup v{version} limit", limit, in_use, str(d))
            if d == top or d.parent == d:
                break
            d = d.parent
    return best


def _mem_available(meminfo: Path) -> Optional[int]:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_room(proc_self: Path = Path("/proc/self"), meminfo: Path = Path("/proc/meminfo")) -> MemoryRoom:
    """The smaller of the cgroup's room and MemAvailable.

    Args:
        proc_self, meminfo: fake trees in tests.

    Raises:
        EdgemoeError: neither can be read.
    """
    cgroup = _cgroup_room(proc_self)
    available = _mem_available(meminfo)
    if available is None and cgroup is None:
        raise EdgemoeError(f"--expert-cache auto: cannot read MemAvailable from {meminfo} and no cgroup "
                           f"limit applies; give a size or a percentage")
    if available is None or (cgroup is not None and cgroup.limit_bytes - cgroup.in_use_bytes <= available):
        return cgroup
    return MemoryRoom("MemAvailable", available)


# -- what the model needs -------------------------------------------------------------------

def _per_layer(value, n_layer: int) -> List[int]:
    if isinstance(value, list):
        return [int(v) for v in value[:n_layer]]
    return [int(value or 0)] * n_layer


def _n_layer(header) -> int:
    arch = header.get("general.architecture", "")
    return int(header.get(f"{arch}.block_count", 0)) - int(header.get(f"{arch}.nextn_predict_layers", 0))


def kv_cache_bytes(header, n_ctx: int, kv_type: str = "f16") -> int:
    """llama.cpp's KV cache for one sequence of n_ctx tokens (header: edgemoe.gguf_header's)."""
    arch = header.get("general.architecture", "")

    def key(name, default=None):
        return header.get(f"{arch}.{name}", default)

    n_layer = _n_layer(header)
    heads = _per_layer(key("attention.head_count", 0), n_layer)
    kv_heads = key("attention.head_count_kv")
    heads_kv = heads if kv_heads is None else _per_layer(kv_heads, n_layer)
    n_head = heads[0] if heads and heads[0] else 1
    n_embd = int(key("embedding_length", 0))
    head_k = int(key("attention.key_length", n_embd // n_head))
    head_v = int(key("attention.value_length", n_embd // n_head))
    if key("attention.key_length_mla") and key("attention.value_length_mla"):
        head_v = 0  # MLA: the cache holds the compressed K (kv_lora_rank + RoPE dims) only
    cells = -(-n_ctx // KV_CELL_PAD) * KV_CELL_PAD
    return cells * sum(h * (head_k + head_v) for h in heads_kv) * _KV_BYTES[kv_type]


def compute_buffer_bytes(header, n_ctx: int, n_ubatch: int, flash_attn: bool = True) -> int:
    """An estimate of llama.cpp's compute buffers, from above (see the module's docstring).

    Args:
        n_ubatch: the engine's physical batch, at most its n_batch.
    """
    arch = header.get("general.architecture", "")

    def key(name, default=0):
        value = header.get(f"{arch}.{name}", default)
        return int(value[0] if isinstance(value, list) else value)

    tokens = header.get("tokenizer.ggml.tokens", [])
    n_vocab = key("vocab_size") or (tokens if isinstance(tokens, int) else len(tokens))
    n_ff_exp = key("expert_feed_forward_length") or key("feed_forward_length")
    n_ubatch = min(n_ubatch, n_ctx)  # llama.cpp's n_batch is at most n_ctx
    # the logits and, without flash attention, the scores and the mask are not live at once
    cells = -(-n_ctx // KV_CELL_PAD) * KV_CELL_PAD
    widest = max(n_vocab, 0 if flash_attn else (key("attention.head_count") + 1) * cells)
    return 4 * n_ubatch * (widest + 4 * key("embedding_length") + 3 * key("expert_used_count") * n_ff_exp)


def model_memory(model_path, n_ctx: int, n_ubatch: int, kv_type: str = "f16",
                 flash_attn: bool = True) -> ModelMemory:
    """What `model_path` needs besides the cache, for a context of n_ctx tokens."""
    from edgemoe.cache import inspect_model
    from edgemoe.gguf_header import read_header

    info = inspect_model(model_path)
    header = read_header(model_path, check_data=False, string_arrays=False)  # no vocabulary needed
    return ModelMemory(expert_bytes=info.expert_bytes if info.n_moe_layer else 0,
                       non_expert_bytes=info.non_expert_bytes, min_budget_bytes=info.min_budget_bytes,
                       kv_bytes=kv_cache_bytes(header, n_ctx, kv_type),
                       compute_bytes=compute_buffer_bytes(header, n_ctx, n_ubatch, flash_attn))


# -- the decision ---------------------------------------------------------------------------

def decide(model: str, room: MemoryRoom, need: ModelMemory) -> AutoBudget:
    """Off when every expert fits (or there are none); else the room, at least the minimum."""
    margin = MARGIN_FIXED + int(MARGIN_FRACTION * room.limit_bytes)
    out = AutoBudget(model=model, room=room, need=need, margin_bytes=margin, budget_bytes=None)
    if not need.has_experts or need.expert_bytes <= out.room_bytes:
        return out
    return AutoBudget(model=model, room=room, need=need, margin_bytes=margin,
                      budget_bytes=max(out.room_bytes, need.min_budget_bytes))


def vram_room(gpu) -> MemoryRoom:
    """A discrete GPU's free memory (edgemoe.cache.GpuInfo), which excludes what is in use."""
    return MemoryRoom(f"VRAM free on {gpu.name}", int(gpu.memory_free))


def offloaded(need: ModelMemory, n_layer: int, n_gpu_layers: int, min_gpu_budget_bytes: int) -> ModelMemory:
    """What of `need` sits in VRAM with n_gpu_layers offloaded: that share of the non-expert
    weights (the output layer is llama.cpp's layer n_layer) and of the KV cache, the compute
    buffers, and a GPU pool's minimum."""
    n = max(n_gpu_layers, 0)
    weights_share = min(n, n_layer + 1) / (n_layer + 1)
    kv_share = min(n, n_layer) / max(n_layer, 1)  # the output layer has no KV cache
    return ModelMemory(expert_bytes=need.expert_bytes, non_expert_bytes=int(need.non_expert_bytes * weights_share),
                       min_budget_bytes=min_gpu_budget_bytes, kv_bytes=int(need.kv_bytes * kv_share),
                       compute_bytes=need.compute_bytes)


def derive_auto_budget(model_path, n_ctx: int, n_ubatch: int = 512, kv_type: str = "f16",
                       flash_attn: bool = True, proc_self: Path = Path("/proc/self"),
                       meminfo: Path = Path("/proc/meminfo"), vram_gpu=None,
                       n_gpu_layers: int = 0) -> AutoBudget:
    """The `auto` budget of `model_path` for a context of n_ctx tokens, here and now.

    Args:
        n_ubatch: llama.cpp's physical batch (the compute buffers grow with it).
        kv_type: "f16" or "f32", the KV cache's element type.
        flash_attn: whether llama.cpp runs flash attention (no n_ctx-wide score matrix).
        proc_self, meminfo: fake trees in tests.
        vram_gpu: for a VRAM pool, the GPU (edgemoe.cache.GpuInfo) whose free memory is the
            room, with n_gpu_layers offloaded; None sizes from host memory.
    """
    need = model_memory(model_path, n_ctx, n_ubatch, kv_type, flash_attn)
    name = os.path.basename(os.fspath(model_path))
    if vram_gpu is None:
        return decide(name, memory_room(proc_self, meminfo), need)
    from edgemoe.cache import inspect_model

    info = inspect_model(model_path)
    return decide(name, vram_room(vram_gpu), offloaded(need, info.n_layer, n_gpu_layers, info.min_gpu_budget_bytes))
