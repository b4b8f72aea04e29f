"""Stand-ins for the Engine, the BatchGenerator and a ChatTemplate that follow their contracts
(edgemoe/generator.py) without the native library, for testing edgemoe.serve on its own.

FakeGenerator answers every request with `pieces` (cut at max_tokens -> "length"), from a thread
per job as the real one answers from its worker thread; `delay` seconds between pieces.
"""

from __future__ import annotations

import threading
import time
from typing import List, Optional

from edgemoe.errors import ContextFullError, InvalidArgumentError, QueueFullError, StateError
from edgemoe.generator import DoneEvent, ErrorEvent, GeneratorMetrics, SamplingOptions, TextEvent, Usage


class FakeEngine:
    def __init__(self, model_path: str = "/models/fake-moe.gguf", n_ctx_seq: int = 64, n_vocab: int = 1000):
        self.model_path = model_path
        self.n_ctx_seq = n_ctx_seq
        self.n_vocab = n_vocab
        self.closed = False
        self.tokenized: List[str] = []

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> List[int]:
        self.tokenized.append((text, add_special))
        return ([1] if add_special else []) + [1 if w == "<s>" else 2 + len(w) for w in text.split()]

    def close(self) -> None:
        self.closed = True


class FakeTemplate:
    """Writes `bos_token` first, as many GGUF templates do."""

    stop = ("<|end|>",)
    bos_token = "<s>"

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant"):
                raise InvalidArgumentError(f"unknown role {m.get('role')!r}")
        text = "<s> " + " ".join(f"<|{m['role']}|> {m['content']} <|end|>" for m in messages)
        return text + (" <|assistant|>" if add_generation_prompt else "")


class FakeJob:
    def __init__(self, tokens: List[int], options: SamplingOptions, on_event):
        self.tokens = tokens
        self.options = options
        self.on_event = on_event
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def cancel(self) -> None:
        self.cancelled.set()


class FakeGenerator:
    def __init__(self, pieces=("Hello", ",", " world", "!"), delay: float = 0.0, n_parallel: int = 4,
                 error: Optional[str] = None, submit_error: Optional[Exception] = None,
                 n_ctx_seq: int = 64):
        self.pieces = tuple(pieces)
        self.delay = delay
        self.n_parallel = n_parallel
        self.error = error                # an ErrorEvent after the first piece
        self.submit_error = submit_error  # raised by submit
        self.n_ctx_seq = n_ctx_seq
        self.jobs: List[FakeJob] = []
        self.started = False
        self.shutdown_calls: list = []
        self._lock = threading.Lock()
        self._shut = False

    def start(self) -> None:
        self.started = True

    def submit(self, tokens, options: SamplingOptions, on_event) -> FakeJob:
        if self._shut:
            raise StateError("the generator is shut down")
        if self.submit_error is not None:
            raise self.submit_error
        if len(tokens) >= self.n_ctx_seq:
            raise ContextFullError(f"{len(tokens)} tokens do not fit a sequence of {self.n_ctx_seq}")
        job = FakeJob(list(tokens), options, on_event)
        with self._lock:
            self.jobs.append(job)
        job.thread = threading.Thread(target=self._run, args=(job,), daemon=True)
        job.thread.start()
        return job

    def _run(self, job: FakeJob) -> None:
        n = 0
        try:
            for piece in self.pieces[:job.options.max_tokens]:
                if job.cancelled.is_set():
                    job.on_event(DoneEvent("cancelled", Usage(len(job.tokens), n)))
                    return
                job.on_event(TextEvent(piece))
                n += 1
                if self.error is not None:
                    job.on_event(ErrorEvent(self.error))
                    return
                if self.delay:
                    job.cancelled.wait(self.delay)
            if job.cancelled.is_set():
                job.on_event(DoneEvent("cancelled", Usage(len(job.tokens), n)))
                return
            reason = "length" if len(self.pieces) > job.options.max_tokens else "stop"
            job.on_event(DoneEvent(reason, Usage(len(job.tokens), n, cached_tokens=1)))
        finally:
            job.done.set()

    def shutdown(self, cancel_running: bool = False, timeout: Optional[float] = None) -> None:
        self.shutdown_calls.append((cancel_running, timeout))
        self._shut = True
        with self._lock:
            jobs = list(self.jobs)
        for job in jobs:
            if cancel_running:
                job.cancel()
        end = time.monotonic() + (timeout or 10)
        for job in jobs:
            job.done.wait(max(0.0, end - time.monotonic()))

    @property
    def active(self) -> int:
        with self._lock:
            return sum(not j.done.is_set() for j in self.jobs)

    def metrics(self) -> GeneratorMetrics:
        return GeneratorMetrics(requests_total=len(self.jobs), prompt_tokens_total=10, cached_tokens_total=2,
                                completion_tokens_total=20, steps_total=7, decode_steps_total=4,
                                token_latency_ms_sum=50.0, token_latency_count=5, unique_experts_sum=10.0,
                                queue_depth=0, active=self.active, hits=3, misses=1, bytes_read=4096,
                                stall_ms=1.5, token_latency_ms=(10.0, 20.0, 10.0, 5.0, 5.0))


def queue_full() -> QueueFullError:
    return QueueFullError("64 requests are already waiting", retry_after=3)
