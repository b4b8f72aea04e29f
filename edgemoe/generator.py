"""Many sequences in one context: requests queue, take a sequence, and decode together.

A BatchGenerator owns an Engine opened with n_parallel sequences. Each request gets a free
sequence (the one whose kept history shares the longest prefix with its prompt, so a chat's
next turn does not re-evaluate the history), its own sampler and stop conditions. Every step
decodes one batch: prompt chunks and one token of each sequence the scheduler picks
(edgemoe.scheduler). Events go to each request's callback on the generator's thread.

    gen = BatchGenerator(engine, schedule="expert")
    gen.start()
    job = gen.submit(tokens, SamplingOptions(max_tokens=64), on_event)
    ...
    gen.shutdown()
"""

from __future__ import annotations

import codecs
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from edgemoe._native import llama
from edgemoe.errors import (ContextFullError, EdgemoeError, InvalidArgumentError, QueueFullError,
                            StateError)
from edgemoe.scheduler import Candidate, StepLimits, make_scheduler


@dataclass(frozen=True)
class SamplingOptions:
    """What one request asks for, with OpenAI's names where it has them."""

    max_tokens: int = 128
    temperature: float = 0.8    # 0 or less: greedy
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: Optional[int] = None  # None: the engine's seed, else random
    stop: Tuple[str, ...] = ()  # generation ends before the first of these strings
    ignore_eos: bool = False    # go on past end-of-generation tokens (benchmarks: every stream max_tokens long)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0      # prompt tokens whose KV was kept from the sequence's last request

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextEvent:
    """New text of a request (a stop string and any text that may begin one are held back)."""

    text: str


@dataclass(frozen=True)
class DoneEvent:
    """The request ended. finish_reason: "stop" (end of generation or a stop string),
    "length" (max_tokens or the sequence's context), "cancelled" (Job.cancel or shutdown)."""

    finish_reason: str
    usage: Usage


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed after it was accepted (a decode error); the generator goes on."""

    message: str


Event = Union[TextEvent, DoneEvent, ErrorEvent]
EventCallback = Callable[[Event], None]


@dataclass(frozen=True)
class GeneratorMetrics:
    """Counters since the generator started (Prometheus counters), and gauges now."""

    requests_total: int = 0
    prompt_tokens_total: int = 0       # evaluated, i.e. without kept prefixes
    cached_tokens_total: int = 0
    completion_tokens_total: int = 0
    steps_total: int = 0
    decode_steps_total: int = 0        # steps with at least one generated token
    token_latency_ms_sum: float = 0.0  # time between a sequence's consecutive tokens, summed
    token_latency_count: int = 0
    unique_experts_sum: float = 0.0    # per decode step: distinct experts per MoE layer, mean over layers
    queue_depth: int = 0               # waiting for a sequence
    active: int = 0                    # holding a sequence
    hits: int = 0                      # expert cache (zeros without one)
    misses: int = 0
    bytes_read: int = 0
    stall_ms: float = 0.0
    token_latency_ms: Tuple[float, ...] = field(default=(), repr=False)  # the last 1024, for quantiles

    @property
    def hit_rate(self) -> Optional[float]:
        n = self.hits + self.misses
        return self.hits / n if n else None


@dataclass(frozen=True)
class StepRecord:
    """One decode step, for benchmarks (BatchGenerator's on_step)."""

    n_rows: int                       # sequences in the step
    n_tokens: int                     # tokens in the step (prompt chunks count their length)
    n_generated: int                  # tokens sampled
    prefill: bool                     # the step held a prompt chunk
    ms: float                         # the decode and sampling
    unique_experts: Optional[float]   # distinct experts per MoE layer the step used, mean over layers


class Job:
    """A submitted request; cancel() is safe from any thread."""

    def __init__(self, job_id: int, tokens: List[int], options: SamplingOptions, on_event: EventCallback,
                 arrival: int):
        self.id = job_id
        self.tokens = tokens
        self.options = options
        self.arrival = arrival
        self._on_event = on_event
        self._cancel = threading.Event()
        self.done = False
        # the generator's state while the job holds a sequence
        self.seq: Optional[int] = None
        self.pending: List[int] = []       # prompt tokens not yet evaluated, or the token to decode next
        self.prefilled = False
        self.n_cached = 0
        self.n_generated = 0
        self.sampler = None
        self.text = ""                     # generated text; text[:sent] went out
        self.sent = 0
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.last_token_at: Optional[float] = None
        self.waited = 0
        self.estimate: Optional[np.ndarray] = None  # experts of its next token [n_moe_layer, k]
        self.submitted_at = time.perf_counter()
        self.generated: List[int] = []              # sampled tokens, in order
        self.token_times: List[float] = []          # perf_counter() when each was sampled

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def emit(self, event: Event) -> None:
        if self.done:
            return
        if isinstance(event, (DoneEvent, ErrorEvent)):
            self.done = True
        try:
            self._on_event(event)
        except Exception:  # a consumer that fails must not stop the others' decoding
            self._cancel.set()


class BatchGenerator:
    """Decodes the requests of many clients together in one Engine (opened with n_parallel).

    Args:
        engine: an Engine; the generator decodes in it from its own thread (start()) or from
            the caller's (run_until_idle()), never both.
        schedule: "fifo" (every ready sequence each step, as llama-server) or "expert" (the
            ready sequences whose next experts overlap, or are resident, go together; see
            edgemoe.scheduler).
        max_queue: requests that may wait for a free sequence; more raise QueueFullError.
        max_wait: the expert schedule's fairness bound, in steps.
        step_seqs: sequences one step decodes (None: every ready one, as llama-server). Below
            n_parallel, more sequences are ready than a step takes, and the schedule picks
            which: fifo round-robin, expert the ones whose next experts overlap or are loaded.
        on_step: called with a StepRecord after every step (benchmarks).
    """

    def __init__(self, engine, schedule: str = "fifo", max_queue: int = 64, max_wait: int = 4,
                 on_step: Optional[Callable[[StepRecord], None]] = None, step_seqs: Optional[int] = None):
        if max_queue < 0 or max_wait < 0:
            raise InvalidArgumentError("max_queue and max_wait must be 0 or more")
        if step_seqs is not None and step_seqs < 1:
            raise InvalidArgumentError(f"step_seqs must be at least 1, not {step_seqs}")
        self.step_seqs = step_seqs
        self.engine = engine
        self.scheduler = make_scheduler(schedule)
        self.schedule = schedule
        self.max_queue = max_queue
        self.max_wait = max_wait
        self.on_step = on_step
        self.n_parallel = engine.n_parallel
        self.n_ctx_seq = engine.n_ctx_seq
        self._lock = threading.Condition()
        self._waiting: Deque[Job] = deque()
        self._active: Dict[int, Job] = {}          # seq -> job
        self._history: List[List[int]] = [[] for _ in range(self.n_parallel)]  # tokens in each sequence's KV
        self._ids = itertools.count(1)
        self._accepting = True
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._m = dict(requests_total=0, prompt_tokens_total=0, cached_tokens_total=0, completion_tokens_total=0,
                       steps_total=0, decode_steps_total=0, token_latency_ms_sum=0.0, token_latency_count=0,
                       unique_experts_sum=0.0)
        self._latencies: Deque[float] = deque(maxlen=1024)
        cache = engine.cache
        self._cache = cache
        self._readme = engine.router is not None

    # -- clients (any thread) ---------------------------------------------------------

    def submit(self, tokens: Sequence[int], options: SamplingOptions, on_event: EventCallback) -> Job:
        """Queues a request. Raises QueueFullError, ContextFullError (the prompt does not fit a
        sequence's context), InvalidArgumentError, or StateError once shutdown has begun."""
        tokens = [int(t) for t in tokens]
        _check_options(options)
        if not tokens:
            raise InvalidArgumentError("the prompt has no tokens")
        if len(tokens) >= self.n_ctx_seq:
            raise ContextFullError(f"the prompt has {len(tokens)} tokens; a sequence's context holds "
                                   f"{self.n_ctx_seq}, and the reply needs at least one more")
        self.engine.check_tokens(tokens)
        with self._lock:
            if not self._accepting:
                raise StateError("the server is shutting down")
            # requests the next step admits into free sequences do not count as queued
            free = self.n_parallel - len(self._active)
            if len(self._waiting) - max(0, free) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests already wait for one of "
                                     f"{self.n_parallel} sequences", retry_after=self._retry_after())
            job_id = next(self._ids)
            job = Job(job_id, tokens, options, on_event, arrival=job_id)
            self._waiting.append(job)
            self._m["requests_total"] += 1
            self._lock.notify_all()
        return job

    def _retry_after(self) -> int:
        # a rough wait: the running requests' remaining tokens at the recent token latency
        lat = (sum(self._latencies) / len(self._latencies) / 1e3) if self._latencies else 0.1
        left = sum(max(0, j.options.max_tokens - j.n_generated) for j in self._active.values())
        return max(1, min(60, int(lat * left / max(1, self.n_parallel)) + 1))

    def metrics(self) -> GeneratorMetrics:
        with self._lock:
            m = dict(self._m)
            lat = tuple(self._latencies)
            queue, active = len(self._waiting), len(self._active)
        cache = {}
        if self._cache is not None:
            s = self._cache.stats(-1)
            cache = dict(hits=s.hits, misses=s.misses, bytes_read=s.bytes_read, stall_ms=s.stall_ms)
        return GeneratorMetrics(**m, queue_depth=queue, active=active, token_latency_ms=lat, **cache)

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self._active

    # -- lifetime ---------------------------------------------------------------------

    def start(self) -> None:
        """Decodes on a thread of its own until shutdown()."""
        if self._thread is not None:
            raise StateError("the generator is already running")
        self._thread = threading.Thread(target=self._loop, name="edgemoe-generator", daemon=True)
        self._thread.start()

    def shutdown(self, cancel_running: bool = False, timeout: Optional[float] = None) -> None:
        """Stops taking requests and cancels the waiting ones; the running ones finish (or are
        cancelled); waits for the thread. After `timeout` seconds the running ones are cancelled."""
        with self._lock:
            self._accepting = False
            waiting = list(self._waiting)
            self._waiting.clear()
            if cancel_running:
                for job in self._active.values():
                    job.cancel()
            self._lock.notify_all()
        for job in waiting:
            job.emit(DoneEvent("cancelled", Usage(len(job.tokens), 0)))
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self._lock:
                    for job in self._active.values():
                        job.cancel()
                    self._lock.notify_all()
                self._thread.join()
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._active and not self._stop and self._accepting:
                    self._lock.wait()
                if self._stop or (not self._accepting and not self._waiting and not self._active):
                    return
            self.step()

    def run_until_idle(self) -> None:
        """Steps in the caller's thread until every submitted request has ended."""
        while not self.idle:
            self.step()

    # -- one step (the generator's thread) ------------------------------------------------

    def step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if not self._active:
            return
        t0 = time.perf_counter()
        plan_rows = self._plan()
        rows = [(job.seq, job.pending[:n]) for job, n in plan_rows]
        try:
            outs = self.engine.decode_batch(rows)
        except EdgemoeError as e:
            # the batch is lost; its sequences' requests fail, the others go on
            for job, _n in plan_rows:
                self._finish(job, error=f"decode failed: {e}")
            return
        prefill = any(job.pending and not job.prefilled for job, _n in plan_rows)
        routes = self.engine.last_routes(sum(len(t) for _s, t in rows))
        unique = None
        now = time.perf_counter()
        n_generated = 0
        row0 = 0
        for (job, n), out in zip(plan_rows, outs):
            self._history[job.seq].extend(job.pending[:n])
            del job.pending[:n]
            last_row = row0 + n - 1
            row0 += n
            if job.pending:
                continue  # more of its prompt to come
            job.prefilled = True
            if routes is not None:
                job.estimate = routes[last_row]
            token = self.engine.sample(job.sampler, out)
            n_generated += 1
            self._take_token(job, token, now)
        for job in self._active.values():
            job.waited += 1
        for job, _n in plan_rows:
            job.waited = 0
        if routes is not None and not prefill and len(routes):
            unique = _unique_per_layer(routes)
        ms = (time.perf_counter() - t0) * 1e3
        with self._lock:
            self._m["steps_total"] += 1
            if n_generated and not prefill:
                self._m["decode_steps_total"] += 1
                if unique is not None:
                    self._m["unique_experts_sum"] += unique
        if self.on_step is not None:
            self.on_step(StepRecord(n_rows=len(rows), n_tokens=sum(len(t) for _s, t in rows),
                                    n_generated=n_generated, prefill=prefill, ms=ms, unique_experts=unique))

    def _admit(self) -> None:
        """Gives waiting requests free sequences: the one whose kept history shares the longest
        prefix with the prompt, which is then not evaluated again."""
        while True:
            with self._lock:
                free = [s for s in range(self.n_parallel) if s not in self._active]
                if not free or not self._waiting:
                    return
                job = self._waiting.popleft()
                if job.cancelled:
                    job.emit(DoneEvent("cancelled", Usage(len(job.tokens), 0)))
                    continue
                seq = max(free, key=lambda s: (_common_prefix(self._history[s], job.tokens), -s))
                job.seq = seq
                self._active[seq] = job
            keep = min(_common_prefix(self._history[seq], job.tokens), len(job.tokens) - 1)
            self.engine.keep_prefix(seq, keep)
            del self._history[seq][keep:]
            job.n_cached = keep
            job.pending = job.tokens[keep:]
            job.sampler = self.engine.new_sampler(job.options)
            job.last_token_at = time.perf_counter()
            with self._lock:
                self._m["prompt_tokens_total"] += len(job.pending)
                self._m["cached_tokens_total"] += keep

    def _plan(self) -> List[Tuple[Job, int]]:
        """The jobs of this step and how many of their pending tokens each decodes."""
        jobs = sorted(self._active.values(), key=lambda j: j.arrival)
        n_decode = sum(1 for j in jobs if j.prefilled)
        room = max(1, self.engine.n_batch - n_decode)  # prompt chunks leave room for every decode token
        cands, sizes = [], {}
        for job in jobs:
            n = 1 if job.prefilled else min(len(job.pending), room)
            sizes[job.seq] = n
            experts = None
            if job.prefilled:
                experts = self._next_experts(job)
            cands.append(Candidate(seq=job.seq, n_tokens=n, waited=job.waited, arrival=job.arrival, experts=experts))
        resident = None
        if self.schedule == "expert" and self._cache is not None:
            resident = self._cache.resident()
        # no cap on a step's distinct experts (slots_per_layer): measured on the inflated default
        # model at 25 %, a step cut to what the pools hold decodes fewer tokens for less than
        # the loads it saves (BENCHMARKS.md); the schedule chooses among the ready instead
        plan = self.scheduler.plan(cands, StepLimits(max_tokens=self.engine.n_batch, max_wait=self.max_wait,
                                                     resident=resident, max_seqs=self.step_seqs))
        return [(self._active[s], sizes[s]) for s in plan.seqs]

    def _next_experts(self, job: Job) -> Optional[np.ndarray]:
        """The experts the job's next token uses: its router's routes (readme models: exact),
        else its previous token's (an estimate)."""
        if self.schedule != "expert":
            return None
        if self._readme:
            return self.engine.routes_ahead(job.seq, job.pending[0])
        return job.estimate

    def _take_token(self, job: Job, token: int, now: float) -> None:
        eng = self.engine
        with self._lock:
            if job.n_generated:  # the first token's wait is the prompt's, not a token latency
                ms = (now - job.last_token_at) * 1e3
                self._latencies.append(ms)
                self._m["token_latency_ms_sum"] += ms
                self._m["token_latency_count"] += 1
        job.last_token_at = now
        if eng.is_eog(token) and not job.options.ignore_eos:
            self._finish(job, "stop")
            return
        job.generated.append(token)
        job.token_times.append(now)
        job.n_generated += 1
        with self._lock:
            self._m["completion_tokens_total"] += 1
        job.text += job.utf8.decode(eng.token_to_bytes(token))
        if self._emit_text(job):
            self._finish(job, "stop")
            return
        if job.n_generated >= job.options.max_tokens or eng.seq_past(job.seq) + 1 >= self.n_ctx_seq:
            self._finish(job, "length")
            return
        job.pending = [token]

    def _emit_text(self, job: Job) -> bool:
        """Sends what cannot be the start of a stop string; True when a stop string appeared."""
        stops = job.options.stop
        text = job.text
        if stops:
            longest = max(len(s) for s in stops)
            start = max(0, job.sent - longest + 1)
            hits = [p for p in (text.find(s, start) for s in stops) if p >= 0]
            if hits:
                end = min(hits)
                job.text = text[:end]
                if end > job.sent:
                    job.emit(TextEvent(text[job.sent:end]))
                job.sent = end
                return True
            hold = max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                        if text.endswith(s[:k])), default=0)
            end = len(text) - hold
        else:
            end = len(text)
        if end > job.sent:
            job.emit(TextEvent(text[job.sent:end]))
            job.sent = end
        return False

    def _finish(self, job: Job, reason: str = "stop", error: Optional[str] = None) -> None:
        """Ends a job and frees its sequence; what its KV holds stays for the next prompt."""
        if error is None and reason != "cancelled":
            job.text += job.utf8.decode(b"", final=True)
            if not job.options.stop or not self._emit_text(job):
                if len(job.text) > job.sent:
                    job.emit(TextEvent(job.text[job.sent:]))
                    job.sent = len(job.text)
        if job.sampler is not None:
            llama.llama_sampler_free(job.sampler)
            job.sampler = None
        with self._lock:
            if job.seq is not None and self._active.get(job.seq) is job:
                del self._active[job.seq]
            self._lock.notify_all()
        if error is not None:
            # the sequence's KV may hold part of the failed batch: start it afresh
            if job.seq is not None:
                self._forget(job.seq)
            job.emit(ErrorEvent(error))
        else:
            job.emit(DoneEvent(reason, Usage(prompt_tokens=len(job.tokens), completion_tokens=job.n_generated,
                                             cached_tokens=job.n_cached)))

    def _forget(self, seq: int) -> None:
        try:
            self.engine.keep_prefix(seq, 0)
        except EdgemoeError:
            pass
        self._history[seq] = []

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [j for j in self._active.values() if j.cancelled]
        for job in gone:
            # a prompt cut short leaves what was evaluated in the KV, and the history says so
            self._finish(job, "cancelled")


def _check_options(o: SamplingOptions) -> None:
    if o.max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens must be at least 1, not {o.max_tokens}")
    if not 0.0 < o.top_p <= 1.0:
        raise InvalidArgumentError(f"top_p must be in (0, 1], not {o.top_p}")
    if o.top_k < 0:
        raise InvalidArgumentError(f"top_k must be 0 or more, not {o.top_k}")
    if not 0.0 <= o.min_p <= 1.0:
        raise InvalidArgumentError(f"min_p must be in [0, 1], not {o.min_p}")
    if o.temperature != o.temperature or o.temperature > 100:  # NaN or absurd
        raise InvalidArgumentError(f"temperature {o.temperature} is out of range")
    if any(not isinstance(s, str) or not s for s in o.stop):
        raise InvalidArgumentError("stop strings must be non-empty strings")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _unique_per_layer(routes: np.ndarray) -> Optional[float]:
    """Distinct experts per MoE layer over a step's rows [n_rows, n_moe_layer, k], mean over layers."""
    counts = []
    for layer in range(routes.shape[1]):
        ids = routes[:, layer].ravel()
        ids = ids[ids >= 0]
        if ids.size:
            counts.append(np.unique(ids).size)
    return float(np.mean(counts)) if counts else None
