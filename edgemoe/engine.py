"""Engine: one model, one context, and optionally an expert cache; eval, generate, stats."""

from __future__ import annotations

import codecs
import ctypes
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from edgemoe import log
from edgemoe.cpus import default_threads
from edgemoe.files import check_model_file
from edgemoe._native import llama
from edgemoe.bindings import IO_MODES, POLICIES
from edgemoe.budget import Budget, parse_budget
from edgemoe.cache import CacheStats, ExpertCache
from edgemoe.errors import (ContextFullError, DecodeError, InvalidArgumentError, ModelLoadError,
                            NoExpertsError, StateError)
from edgemoe.model_router import read_model_router
from edgemoe.placement import check_pool, cpu_moe_overrides, resolve_pool, vram_gpu
from edgemoe.router_runtime import RouterRuntime

# The patched loader keeps the *_exps tensors unread in the mmap when this key is true.
LAZY_EXPERTS_KEY = b"edgemoe.cache.lazy_experts"

_backend_ready = False


@dataclass(frozen=True)
class LayerStats:
    layer: int
    hits: int
    misses: int
    prefetch_hits: int
    prefetch_wasted: int
    bytes_read: int
    read_ms: float
    stall_ms: float
    hit_rate: Optional[float]
    prefetch_issued: int = 0
    pred_precision: Optional[float] = None  # lookahead predictor vs this layer's actual experts
    pred_recall: Optional[float] = None
    cache_ms: float = 0.0
    predict_ms: float = 0.0


@dataclass(frozen=True)
class TokenBreakdown:
    """Where a decode step's time goes, per generated token after the first: compute (the
    rest of the step), stall (waiting for expert reads), cache (the cache's own bookkeeping),
    predict (the lookahead predictor); with what the step read and CPU time over all threads."""

    tpot_ms: float
    compute_ms: float
    stall_ms: float
    cache_ms: float
    predict_ms: float
    router_ms: float
    bytes_read: float
    prefetch_hits: float
    prefetch_wasted: float
    cpu_s: float


@dataclass(frozen=True)
class EngineStats:
    """Names as in DESIGN.md. Timings cover the last generate(): ttft_ms from the start of
    the prefill to the first sampled token, tpot_ms the mean over the tokens after the first,
    tokens_per_s = 1000 / tpot_ms. Cache counters cover everything since reset_stats(); they
    are zero (hit_rate None) without a cache. peak_rss_bytes is the process's VmHWM."""

    ttft_ms: Optional[float] = None
    tpot_ms: Optional[float] = None
    tpot_p50_ms: Optional[float] = None
    tpot_p90_ms: Optional[float] = None
    tokens_per_s: Optional[float] = None
    hit_rate: Optional[float] = None
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    prefetch_wasted: int = 0
    prefetch_issued: int = 0
    prefetch_cancelled: int = 0
    pred_precision: Optional[float] = None
    pred_recall: Optional[float] = None
    bytes_read: int = 0
    read_ms: float = 0.0
    stall_ms: float = 0.0
    cpu_uses: int = 0           # hybrid: expert uses computed on the CPU (part of misses)
    cache_ms: float = 0.0
    predict_ms: float = 0.0
    router_ms: float = 0.0      # the readme router over every token since reset_stats()
    expert_cache_bytes: int = 0
    expert_pool: Optional[str] = None  # where the slots live: host, vram or mapped (None: no cache)
    peak_rss_bytes: int = 0
    n_prompt_tokens: int = 0
    n_generated: int = 0
    per_token: Optional[TokenBreakdown] = None  # the decode steps of the last generate()
    layers: List[LayerStats] = field(default_factory=list)

    def summary(self) -> dict:
        """The scalar fields, per_token flattened as `<name>_per_token` (no per-layer list)."""
        d = asdict(self)
        d.pop("layers")
        per_token = d.pop("per_token") or {}
        for name, value in per_token.items():
            if name != "tpot_ms":
                d[f"{name}_per_token"] = value
        return d


@dataclass(frozen=True)
class ModelDescription:
    desc: str      # llama_model_desc, e.g. "qwen3moe 30B.A3B Q8_0"
    size: int      # bytes of all weights
    n_params: int


# KV cache types by name -> enum ggml_type
_KV_TYPES = {"f32": 0, "f16": 1}



def _peak_rss_bytes() -> int:
    """Peak RSS of this process image. VmHWM, not ru_maxrss: after fork + exec, ru_maxrss
    still holds the parent's RSS at fork time (a benchmark's child would inherit it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _print_notice(msg: str) -> None:
    print(f"edgemoe: {msg}", file=sys.stderr, flush=True)


class Engine:
    """A model ready to evaluate and generate, with an optional expert cache.

    Args:
        model_path: a GGUF file.
        expert_cache: None/"off" for no cache; bytes (int), or a string such as "800MiB",
            "1.5GiB" or "25%" (of all expert bytes); "auto" sizes it from the memory this
            process may use, or turns it off where every expert fits (edgemoe.auto_budget).
        policy: cache policy, "default", "lru", "lfu", "belady", or "auto": belady for a
            model with a readme router whose routes load ahead, else "default".
        io: backing store of the cache, "direct", "buffered", "mmap" or "pinned" (a VRAM pool's
            misses DMA'd by the GPU from the pinned file).
        prefetch: "off"; "lookahead": each MoE layer applies the next `lookahead` layers'
            routers to its input and loads the experts they pick while it computes; "routes":
            a readme router's routes, computed before each decode, load ahead in order of
            first use; "auto" (what `edgemoe run` passes): routes for a model with a readme
            router, else lookahead where the model allows it, else off. With a readme router
            and "off", its routes are still obeyed but load when their layer runs.
        lookahead: layers ahead, 0 to 8 (0: the predictions only steer eviction).
        prefetch_top: predicted experts per token to load, most likely first (0: half of top-k).
        n_threads: compute threads (default: the CPUs this process may use).
        seed: default sampling seed of generate().
        route_recorder: a RouteRecorder to fill through the context's eval callback.
        verbose: let llama.cpp's log through to stderr.
        notice: called with one-line notices (default: printed to stderr).
        kv_type: type of the KV cache, "f16" (llama.cpp's default) or "f32" (with flash
            attention off: attention in f32 throughout, for comparing logits with a reference).
        n_parallel: sequences the context holds (edgemoe.generator decodes them together);
            each gets n_ctx // n_parallel positions. eval(), generate() and reset() use sequence 0.
        kv_unified: one KV buffer shared by the sequences (llama-server's default); False gives
            each its own stream, and llama.cpp then splits a batch by sequence.
        expert_pool: where the cache's slots live, and so where the expert matmuls run:
            "auto" (the GPU's when layers are offloaded with n_gpu_layers and a GPU is there,
            else the host), "host", "gpu" (VRAM on a discrete GPU, pinned host memory the GPU
            reads in place on an integrated one such as a Jetson), "vram" or "mapped".
        n_cpu_moe: without a cache, keep the routed experts of the first N layers in host
            memory and compute them on the CPU, as llama.cpp's --n-cpu-moe does.
        n_io_threads: the cache's reading threads (0: the native default, 4); with a VRAM pool
            each also uploads what it read, on its own stream.
        repack: let ggml's CPU backend repack quantized weights for its faster kernels where it
            can (Q4_0, Q4_K, IQ4_NL on AVX2; Q8_0 too on Arm): llama.cpp's default, which the
            cache's host pools follow, so cached experts use stock's kernels. False is
            llama.cpp's --no-repack, for the model's weights and the pools alike.
        hybrid: with a cache, a ubatch that fits in one wave computes the experts not ready in
            the pool on the CPU, from the model's mapped weights, while their reads go on behind
            instead of waiting for them. Meant for a VRAM pool, whose misses wait for PCIe copies.
    """

    def __init__(self, model_path: Union[str, os.PathLike], expert_cache: Union[None, str, int, Budget] = None,
                 policy: str = "auto", io: str = "direct", n_threads: Optional[int] = None,
                 n_ctx: int = 4096, n_batch: int = 512, n_ubatch: int = 512, n_gpu_layers: int = 0,
                 seed: Optional[int] = None, route_recorder=None, verbose: bool = False,
                 notice: Optional[Callable[[str], None]] = None, kv_type: str = "f16",
                 prefetch: str = "off", lookahead: int = 1, prefetch_top: int = 0, n_parallel: int = 1,
                 kv_unified: bool = True, expert_pool: str = "auto", n_cpu_moe: int = 0, n_io_threads: int = 0,
                 repack: bool = True, hybrid: bool = False):
        global _backend_ready
        self._model = None
        self._ctx = None
        self._cache: Optional[ExpertCache] = None
        self._batch = None
        self._closed = False
        self.model_path = os.fspath(model_path)
        self.seed = seed
        self._notice = notice or _print_notice
        self._recorder = route_recorder  # keep it alive as long as the context calls it
        self._reset_timings()

        if n_ctx <= 0 or n_batch <= 0 or n_ubatch <= 0:
            raise InvalidArgumentError("n_ctx, n_batch and n_ubatch must be positive")
        if not 1 <= n_parallel <= 256:
            raise InvalidArgumentError(f"n_parallel must be 1 to 256, not {n_parallel}")
        if n_ctx // n_parallel < 2:
            raise InvalidArgumentError(f"a context of {n_ctx} leaves fewer than 2 positions to each of "
                                       f"{n_parallel} sequences")
        self.n_parallel = n_parallel
        if kv_type not in _KV_TYPES:
            raise InvalidArgumentError(f"unknown kv_type {kv_type!r}; expected one of {', '.join(_KV_TYPES)}")
        self._kv_type = _KV_TYPES[kv_type]
        if policy not in POLICIES and policy != "auto":
            raise InvalidArgumentError(f"unknown policy {policy!r}; expected one of auto, {', '.join(POLICIES)}")
        if io not in IO_MODES:
            raise InvalidArgumentError(f"unknown io {io!r}; expected one of {', '.join(IO_MODES)}")
        check_pool(expert_pool)
        if n_cpu_moe < 0:
            raise InvalidArgumentError(f"n_cpu_moe must be 0 or more, not {n_cpu_moe}")
        budget = parse_budget(expert_cache)
        if hybrid and budget is None:
            raise InvalidArgumentError("hybrid computes the expert cache's misses on the CPU: it needs a cache")
        if budget is not None and n_cpu_moe:
            raise InvalidArgumentError("n_cpu_moe places experts without a cache (llama.cpp's --n-cpu-moe); "
                                       "with a cache, the expert pool decides where they are")
        log.install(verbose)
        check_model_file(self.model_path)
        # a readme router's choices are the routes: it runs here, before each decode
        router = read_model_router(self.model_path).readme
        self._router_ms = 0.0
        prefetch, policy = self._router_modes(router is not None, prefetch, policy)
        self.auto_budget = None  # with expert_cache="auto": how the budget was derived (AutoBudget)
        if budget is not None and budget.auto:
            from edgemoe.auto_budget import derive_auto_budget

            # a VRAM pool is sized from the GPU's free memory, every other from host memory
            self.auto_budget = derive_auto_budget(self.model_path, n_ctx=n_ctx, n_ubatch=min(n_ubatch, n_batch),
                                                  kv_type=kv_type, flash_attn=kv_type != "f32",
                                                  vram_gpu=vram_gpu(resolve_pool(expert_pool, n_gpu_layers)),
                                                  n_gpu_layers=n_gpu_layers)
            self._notice(self.auto_budget.describe())
            budget = self.auto_budget.budget
        if router is not None and budget is None:
            # routes are obeyed through the cache's graph hook: it stays on, holding every expert
            self._notice("notice: a readme model's routes come from its router through the expert cache; "
                         "the cache stays on at 100 %")
            budget = parse_budget("100%")

        try:
            if budget is not None:
                # before the model: a budget below the minimum fails in milliseconds
                try:
                    self._cache = ExpertCache(self.model_path, budget, policy=policy, io=io,
                                              prefetch=prefetch, lookahead=lookahead,
                                              prefetch_top=prefetch_top,
                                              pool=resolve_pool(expert_pool, n_gpu_layers),
                                              n_io_threads=n_io_threads, repack=repack, hybrid=hybrid)
                except NoExpertsError:
                    self._notice(f"notice: {os.path.basename(self.model_path)} has no routed experts "
                                 f"(dense model); running without an expert cache")
            if not _backend_ready:
                llama.llama_backend_init()
                _backend_ready = True
            self._load_model(n_gpu_layers, n_cpu_moe, repack)
            self._create_context(n_ctx, n_batch, n_ubatch, n_threads or default_threads(), kv_unified)
            if self._cache is not None:
                self._cache.attach(self._ctx)
        except BaseException:
            self.close()
            raise

        self._vocab = llama.llama_model_get_vocab(self._model)
        self.n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        self.n_ctx = llama.llama_n_ctx(self._ctx)
        self.n_ctx_seq = self.n_ctx // self.n_parallel  # each sequence's share, as llama-server's slots
        self.n_batch = llama.llama_n_batch(self._ctx)
        self.n_layer = llama.llama_model_n_layer(self._model)
        self._batch = llama.llama_batch_init(self.n_batch, 0, 1)
        self._seq_past = [0] * self.n_parallel  # positions used per sequence
        self._routers: List[RouterRuntime] = []
        self._ahead = {}  # seq -> (token, its routes) from routes_ahead(), used by its next decode
        if router is not None:
            first = RouterRuntime(router)
            self._routers = [first] + [first.new_sequence() for _ in range(self.n_parallel - 1)]

    # -- setup ------------------------------------------------------------------------

    @staticmethod
    def _router_modes(readme: bool, prefetch: str, policy: str):
        """The prefetch mode and policy to use, given whether the model has a readme router."""
        if readme:
            if prefetch == "lookahead":
                raise InvalidArgumentError("a readme model's routes are known before each token: --prefetch "
                                           "lookahead does not apply (auto loads its routes ahead, off on demand)")
            prefetch = "routes" if prefetch in ("auto", "routes") else prefetch
        elif prefetch == "routes":
            raise InvalidArgumentError("--prefetch routes needs a model with a readme router "
                                       "(docs/router-format.md)")
        if policy == "auto":
            policy = "belady" if prefetch == "routes" else "default"
        return prefetch, policy

    def _load_model(self, n_gpu_layers: int, n_cpu_moe: int, repack: bool) -> None:
        params = llama.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = repack
        if n_cpu_moe:
            self._buft_overrides = cpu_moe_overrides(n_cpu_moe)  # alive while llama.cpp reads it
            params.tensor_buft_overrides = ctypes.cast(self._buft_overrides, ctypes.c_void_p)
        params.load_mode = llama.LLAMA_LOAD_MODE_MMAP  # the cache needs the experts in a mapping
        if self._cache is not None:
            overrides = (llama.llama_model_kv_override * 2)()
            overrides[0].tag = llama.LLAMA_KV_OVERRIDE_TYPE_BOOL
            overrides[0].key = LAZY_EXPERTS_KEY
            overrides[0].value.val_bool = True
            # overrides[1].key stays empty: the terminator
            self._overrides = overrides  # llama.cpp reads it during the load only, but be safe
            params.kv_overrides = overrides
        log.take_error()  # forget older errors
        model = llama.llama_model_load_from_file(os.fsencode(self.model_path), params)
        if not model:
            reason = log.take_error()
            raise ModelLoadError(f"cannot load model {self.model_path}" + (f": {reason}" if reason else
                                 " (truncated or unsupported GGUF?)"))
        self._model = model

    def _create_context(self, n_ctx: int, n_batch: int, n_ubatch: int, n_threads: int, kv_unified: bool) -> None:
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch, n_batch)
        params.n_seq_max = self.n_parallel
        params.kv_unified = kv_unified
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.no_perf = True
        params.type_k = params.type_v = self._kv_type
        if self._kv_type == _KV_TYPES["f32"]:
            # the CPU flash-attention kernel rounds Q to f16, which an f32 cache is meant to avoid
            params.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        if self._cache is not None:
            # a host pool stays on the host: copying it to a GPU for large batches would cost
            # more than it saves, and compute the MoE with other kernels (a GPU pool is on the
            # GPU already)
            params.op_offload = False
        if self._recorder is not None:
            from edgemoe.bindings import edgemoe_route_recorder_eval_cb_address

            self._cb_eval = llama.ggml_backend_sched_eval_callback(edgemoe_route_recorder_eval_cb_address())
            params.cb_eval = self._cb_eval
            params.cb_eval_user_data = self._recorder.handle
        ctx = llama.llama_init_from_model(self._model, params)
        if not ctx:
            reason = log.take_error()
            raise ModelLoadError("cannot create a llama.cpp context" + (f": {reason}" if reason else ""))
        self._ctx = ctx

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Frees everything in the order the native side requires. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._cache is not None:
            try:
                self._cache.detach()
            except Exception:
                pass
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama.llama_model_free(self._model)
            self._model = None
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _live(self) -> None:
        if self._closed:
            raise StateError("the engine is closed")

    @property
    def cache(self) -> Optional[ExpertCache]:
        """The expert cache, or None (cache off, or a dense model)."""
        return self._cache

    def describe(self) -> ModelDescription:
        """What llama-bench prints about the model: llama.cpp's description, bytes, parameters."""
        self._live()
        buf = ctypes.create_string_buffer(256)
        llama.llama_model_desc(self._model, buf, len(buf))
        return ModelDescription(desc=buf.value.decode("utf-8", "replace"),
                                size=int(llama.llama_model_size(self._model)),
                                n_params=int(llama.llama_model_n_params(self._model)))

    @property
    def n_past(self) -> int:
        """Tokens in sequence 0 (the one eval() and generate() use)."""
        return self._seq_past[0]

    def seq_past(self, seq: int) -> int:
        """Tokens in sequence seq."""
        return self._seq_past[self._seq(seq)]

    # -- tokens -----------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> List[int]:
        self._live()
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama.llama_token * cap)()
        n = llama.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama.llama_token * cap)()
            n = llama.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise InvalidArgumentError("tokenization failed")
        return list(buf[:n])

    def detokenize(self, tokens: Sequence[int], remove_special: bool = False) -> str:
        self._live()
        arr = (llama.llama_token * len(tokens))(*tokens)
        cap = max(16, 8 * len(tokens))
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = llama.llama_detokenize(self._vocab, arr, len(tokens), buf, cap, remove_special, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            cap = -n
        raise InvalidArgumentError("detokenization failed")

    def token_to_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:max(n, 0)]

    # -- evaluation -------------------------------------------------------------------

    def _decode(self, tokens: Sequence[int], all_logits: bool, out: Optional[np.ndarray] = None) -> None:
        """Feeds tokens in chunks of n_batch; copies every token's logits into `out` if given."""
        past = self._seq_past[0]
        if past + len(tokens) > self.n_ctx_seq:
            raise ContextFullError(
                f"{len(tokens)} tokens do not fit: {past} of {self.n_ctx_seq} context positions used")
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            n = len(chunk)
            last_chunk = start + n == len(tokens)
            self._fill_and_decode([(0, chunk, all_logits, last_chunk)])
            if out is not None:
                # every token of the chunk is an output: its logits are rows 0..n-1, in order
                ptr = llama.llama_get_logits(self._ctx)
                out[start:start + n] = np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab))

    def _fill_and_decode(self, rows) -> None:
        """One llama_decode of rows (seq, tokens, all_logits, last_logits), in batch order; the
        positions continue each sequence. The caller keeps the batch within n_batch."""
        for _seq, tokens, _a, _l in rows:  # before any router or sequence moves
            self.check_tokens(tokens)
        b = self._batch
        i = 0
        for seq, tokens, all_logits, last_logits in rows:
            past = self._seq_past[seq]
            n = len(tokens)
            for j, tok in enumerate(tokens):
                b.token[i] = tok
                b.pos[i] = past + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = all_logits or (last_logits and j == n - 1)
                i += 1
        b.n_tokens = i
        if self._cache is not None:
            # a model file replaced or rewritten under the engine: refuse before llama.cpp's own
            # mapping of it is read (a truncated mapping would raise SIGBUS)
            self._cache.check_file()
        if self._routers:
            self._hand_routes(rows)
        rc = llama.llama_decode(self._ctx, b)
        if rc != 0:
            reason = log.take_error()
            fault = self._cache.take_fault() if self._cache is not None else None
            if self._routers:
                # the failed batch's routes must not feed the next one, nor its router states
                self._cache.clear_routes()
                for seq, _tokens, _a, _l in rows:
                    self._routers[seq].keep(self._seq_past[seq])
            # llama.cpp rolls back only the failed ubatch: drop every position this batch wrote,
            # so each sequence is as it was and the engine stays usable
            mem = llama.llama_get_memory(self._ctx)
            for seq, _tokens, _a, _l in rows:
                llama.llama_memory_seq_rm(mem, seq, self._seq_past[seq], -1)
            if fault is not None:
                raise fault  # EdgemoeIOError for a failed read or a replaced file
            raise DecodeError(f"llama_decode failed with status {rc}" + (f": {reason}" if reason else ""))
        for seq, tokens, _a, _l in rows:
            self._seq_past[seq] += len(tokens)

    def _hand_routes(self, rows) -> None:
        """Runs each sequence's router over its tokens (one step per token, its own KV cache)
        and queues every token's experts for every MoE layer, in batch order, before the
        backbone sees the batch."""
        t = time.perf_counter()
        routes = []
        for seq, tokens, _a, _l in rows:
            ahead = self._ahead.pop(seq, None)
            if ahead is not None and len(tokens) == 1 and ahead[0] == tokens[0]:
                routes.append(ahead[1][None])  # routes_ahead ran the router for this token already
            else:
                if ahead is not None:  # a different token comes: undo the step taken ahead
                    self._routers[seq].keep(self._seq_past[seq])
                routes.append(self._routers[seq].routes(tokens))
        self._router_ms += (time.perf_counter() - t) * 1e3
        self._cache.set_routes_all(routes[0] if len(routes) == 1 else np.concatenate(routes))

    def routes_ahead(self, seq: int, token: int) -> np.ndarray:
        """int32 [n_moe_layer, k]: the experts a readme model's router picks for the token that
        sequence seq decodes next; the decode reuses them (expert-aware scheduling)."""
        if not self._routers:
            raise StateError("only a model with a readme router knows its routes ahead")
        self._seq(seq)
        self.check_tokens([token])
        ahead = self._ahead.get(seq)
        if ahead is None or ahead[0] != token:
            self._routers[seq].keep(self._seq_past[seq])
            t = time.perf_counter()
            ahead = (token, self._routers[seq].routes([token])[0])
            self._router_ms += (time.perf_counter() - t) * 1e3
            self._ahead[seq] = ahead
        return ahead[1]

    # -- many sequences (edgemoe.generator) ---------------------------------------------

    def check_tokens(self, tokens: Sequence[int]) -> None:
        """InvalidArgumentError for a token id outside the vocabulary."""
        bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            raise InvalidArgumentError(f"token id {bad} outside the vocabulary of {self.n_vocab}")

    def _seq(self, seq: int) -> int:
        if not 0 <= seq < self.n_parallel:
            raise InvalidArgumentError(f"sequence {seq} outside 0..{self.n_parallel - 1}")
        return seq

    def decode_batch(self, rows: Sequence[tuple]) -> List[int]:
        """One llama_decode over several sequences: rows of (seq, tokens), each appended at its
        sequence's next positions, logits computed for each row's last token. Returns each row's
        output index for logits_at() and sample(). A sequence appears at most once; the tokens of
        all rows must fit n_batch and each sequence's n_ctx_seq."""
        self._live()
        if not rows:
            raise InvalidArgumentError("an empty batch")
        rows = [(seq, [int(t) for t in tokens]) for seq, tokens in rows]
        seen = set()
        total = 0
        for seq, tokens in rows:
            if self._seq(seq) in seen:
                raise InvalidArgumentError(f"sequence {seq} appears twice in one batch")
            seen.add(seq)
            if not tokens:
                raise InvalidArgumentError(f"sequence {seq} has no tokens in the batch")
            if self._seq_past[seq] + len(tokens) > self.n_ctx_seq:
                raise ContextFullError(f"{len(tokens)} tokens do not fit sequence {seq}: "
                                       f"{self._seq_past[seq]} of {self.n_ctx_seq} positions used")
            total += len(tokens)
        if total > self.n_batch:
            raise InvalidArgumentError(f"a batch of {total} tokens exceeds n_batch {self.n_batch}")
        self._fill_and_decode([(seq, tokens, False, True) for seq, tokens in rows])
        outs, i = [], 0
        for _seq, tokens in rows:
            i += len(tokens)
            outs.append(i - 1)
        return outs

    def logits_at(self, i: int) -> np.ndarray:
        """float32 [n_vocab]: the logits of output row i of the last decode_batch."""
        ptr = llama.llama_get_logits_ith(self._ctx, i)
        if not ptr:
            raise InvalidArgumentError(f"no logits at batch row {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def keep_prefix(self, seq: int, n: int) -> None:
        """Keeps the first n positions of a sequence (a prompt prefix shared with the next
        request), forgets the rest; n = 0 empties it."""
        self._live()
        self._seq(seq)
        n = max(0, min(n, self._seq_past[seq]))
        if not llama.llama_memory_seq_rm(llama.llama_get_memory(self._ctx), seq, n, -1):
            raise DecodeError(f"llama.cpp cannot shorten sequence {seq} to {n} positions")
        self._seq_past[seq] = n
        if self._routers:
            self._routers[seq].keep(n)
            self._ahead.pop(seq, None)

    def last_routes(self, n_rows: int) -> Optional[np.ndarray]:
        """int32 [n_rows, n_moe_layer, k]: each MoE layer's experts for the rows of the last
        decode (-1 where a layer skipped a row); None without an expert cache."""
        return self._cache.last_routes(n_rows) if self._cache is not None else None

    @property
    def router_ms(self) -> float:
        """The readme router's running total since reset_stats(), ms."""
        return self._router_ms

    @property
    def router(self) -> Optional[RouterRuntime]:
        """The readme router that picks this model's experts, or None."""
        return self._routers[0] if self._routers else None

    def eval(self, tokens: Sequence[int], last_only: bool = False) -> np.ndarray:
        """Appends tokens to the sequence and returns their logits, float32 [n_tokens, n_vocab].

        With last_only, llama.cpp computes only the last token's logits (as a prompt prefill
        does, without the output layer over every token) and the result is [1, n_vocab].
        """
        self._live()
        tokens = [int(t) for t in tokens]
        if last_only and tokens:
            self._decode(tokens, all_logits=False)
            ptr = llama.llama_get_logits_ith(self._ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(1, self.n_vocab)).copy()
        out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        if tokens:
            self._decode(tokens, all_logits=True, out=out)
        return out

    def reset(self) -> None:
        """Clears the KV cache; the next eval() starts a new sequence at position 0."""
        self._live()
        llama.llama_memory_clear(llama.llama_get_memory(self._ctx), True)
        self._seq_past = [0] * self.n_parallel
        if self._routers:
            for r in self._routers:
                r.reset()
            self._ahead.clear()
            self._cache.clear_routes()

    # -- generation -------------------------------------------------------------------

    def new_sampler(self, options):
        """A llama.cpp sampler chain for a request's SamplingOptions; free it with
        llama_sampler_free."""
        seed = options.seed
        if seed is None:
            seed = self.seed if self.seed is not None else llama.LLAMA_DEFAULT_SEED
        return self._sampler(options.temperature, seed & 0xFFFFFFFF, options.top_k, options.top_p, options.min_p)

    def sample(self, sampler, i: int) -> int:
        """Draws (and accepts) a token from output row i of the last decode."""
        return int(llama.llama_sampler_sample(sampler, self._ctx, i))

    def is_eog(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self._vocab, token))

    def _sampler(self, temperature: float, seed: int, top_k: int, top_p: float, min_p: float):
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        if temperature <= 0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
            return chain
        # llama.cpp's default order for these samplers: top-k, top-p, min-p, temperature, draw
        if top_k > 0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(top_k))
        if top_p < 1.0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(top_p, 1))
        if min_p > 0.0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_min_p(min_p, 1))
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(temperature))
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed))
        return chain

    def generate(self, prompt: Union[str, Sequence[int]], max_tokens: int = 128, temperature: float = 0.8,
                 seed: Optional[int] = None, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05) -> Iterator[str]:
        """Streams the text of up to max_tokens new tokens; starts a new sequence.

        Args:
            prompt: text (tokenized with BOS as the model wants) or token ids.
            temperature: 0 or less samples greedily.
            seed: sampling seed; default the engine's seed, else random.
            top_k, top_p, min_p: llama.cpp's defaults.
        """
        self._live()
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not tokens:
            tokens = [llama.llama_vocab_bos(self._vocab)]
        if seed is None:
            seed = self.seed if self.seed is not None else llama.LLAMA_DEFAULT_SEED
        return self._generate(tokens, max_tokens, self._sampler(temperature, seed & 0xFFFFFFFF,
                                                                top_k, top_p, min_p))

    def _generate(self, tokens: List[int], max_tokens: int, sampler) -> Iterator[str]:
        try:
            yield from self.text_pieces(self._sample_tokens(tokens, max_tokens, sampler))
        finally:
            llama.llama_sampler_free(sampler)

    def _sample_tokens(self, tokens: List[int], max_tokens: int, sampler) -> Iterator[int]:
        """Prefills, then yields sampled tokens (not the end-of-generation one), timing each."""
        self.reset()
        self._reset_timings()
        self._n_prompt = len(tokens)
        if max_tokens <= 0:
            return
        t0 = time.perf_counter()
        self._decode(tokens, all_logits=False)
        token = llama.llama_sampler_sample(sampler, self._ctx, -1)
        self._ttft_ms = (time.perf_counter() - t0) * 1e3  # the clock stops at the first token
        # the decode steps' share of the cache counters starts here
        self._decode_from = self._cache.stats(-1) if self._cache is not None else None
        self._decode_from_router_ms = self._router_ms
        while not llama.llama_vocab_is_eog(self._vocab, token):
            self._n_generated += 1
            yield token
            if self._n_generated >= max_tokens or self._seq_past[0] >= self.n_ctx_seq:
                break
            t, cpu = time.perf_counter(), time.process_time()
            self._decode([token], all_logits=False)
            token = llama.llama_sampler_sample(sampler, self._ctx, -1)
            self._tpot_ms.append((time.perf_counter() - t) * 1e3)
            self._decode_cpu_s += time.process_time() - cpu

    def text_pieces(self, tokens: Iterable[int]) -> Iterator[str]:
        """Text of a token stream, one piece per token, holding back partial UTF-8 characters."""
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # a character may span tokens
        for token in tokens:
            text = utf8.decode(self.token_to_bytes(token))
            if text:
                yield text
        tail = utf8.decode(b"", final=True)
        if tail:
            yield tail

    # -- statistics -------------------------------------------------------------------

    def _reset_timings(self) -> None:
        self._ttft_ms: Optional[float] = None
        self._tpot_ms: List[float] = []
        self._n_prompt = 0
        self._n_generated = 0
        self._decode_from: Optional[CacheStats] = None
        self._decode_from_router_ms = 0.0
        self._decode_cpu_s = 0.0

    def reset_stats(self) -> None:
        self._live()
        self._reset_timings()
        self._router_ms = 0.0
        if self._cache is not None:
            self._cache.reset_stats()

    def stats(self) -> EngineStats:
        self._live()
        tpot = np.array(self._tpot_ms, dtype=np.float64)
        timing = {}
        if tpot.size:
            mean = float(tpot.mean())
            timing = dict(tpot_ms=mean, tpot_p50_ms=float(np.percentile(tpot, 50)),
                          tpot_p90_ms=float(np.percentile(tpot, 90)),
                          tokens_per_s=1e3 / mean if mean > 0 else None)
        cache = {}
        layers: List[LayerStats] = []
        total = None
        if self._cache is not None:
            total = self._cache.stats(-1)
            info = self._cache.info()
            cache = dict(hit_rate=total.hit_rate, hits=total.hits, misses=total.misses,
                         prefetch_hits=total.prefetch_hits, prefetch_wasted=total.prefetch_wasted,
                         prefetch_issued=total.prefetch_issued, prefetch_cancelled=total.prefetch_cancelled,
                         pred_precision=total.pred_precision, pred_recall=total.pred_recall,
                         bytes_read=total.bytes_read, read_ms=total.read_ms, stall_ms=total.stall_ms,
                         cpu_uses=total.cpu_uses, cache_ms=total.book_ms, predict_ms=total.predict_ms,
                         expert_cache_bytes=info.budget_bytes, expert_pool=info.pool)
            for il in range(self.n_layer):
                s: CacheStats = self._cache.stats(il)
                layers.append(LayerStats(layer=il, hits=s.hits, misses=s.misses, prefetch_hits=s.prefetch_hits,
                                         prefetch_wasted=s.prefetch_wasted, bytes_read=s.bytes_read,
                                         read_ms=s.read_ms, stall_ms=s.stall_ms, hit_rate=s.hit_rate,
                                         prefetch_issued=s.prefetch_issued, pred_precision=s.pred_precision,
                                         pred_recall=s.pred_recall, cache_ms=s.book_ms, predict_ms=s.predict_ms))
        return EngineStats(ttft_ms=self._ttft_ms, **timing, **cache, router_ms=self._router_ms,
                           peak_rss_bytes=_peak_rss_bytes(),
                           n_prompt_tokens=self._n_prompt, n_generated=self._n_generated,
                           per_token=self._breakdown(tpot, total), layers=layers)

    def _breakdown(self, tpot: np.ndarray, total: Optional[CacheStats]) -> Optional[TokenBreakdown]:
        """Per decode step of the last generate(): the counters since its first token."""
        n = tpot.size
        if n == 0:
            return None
        zero = CacheStats()
        start = self._decode_from or zero
        now = total or zero
        tpot_ms = float(tpot.mean())
        stall = (now.stall_ms - start.stall_ms) / n
        cache = (now.book_ms - start.book_ms) / n
        predict = (now.predict_ms - start.predict_ms) / n
        router = (self._router_ms - self._decode_from_router_ms) / n
        return TokenBreakdown(tpot_ms=tpot_ms, compute_ms=max(0.0, tpot_ms - stall - cache - predict - router),
                              stall_ms=stall, cache_ms=cache, predict_ms=predict, router_ms=router,
                              bytes_read=(now.bytes_read - start.bytes_read) / n,
                              prefetch_hits=(now.prefetch_hits - start.prefetch_hits) / n,
                              prefetch_wasted=(now.prefetch_wasted - start.prefetch_wasted) / n,
                              cpu_s=self._decode_cpu_s / n)
