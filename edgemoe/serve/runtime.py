"""What the app serves: an engine and its BatchGenerator, the jobs in flight, and the shutdown.

The generator decodes on its own thread and calls each job's callback there; an EventQueue
hands those events to the asyncio loop with `call_soon_threadsafe`. The Runtime counts the
jobs the HTTP side still waits on, so that a drain can let them finish (up to a grace timeout)
before it shuts the generator down, and cancels them all when asked to hurry.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, List, Optional, Set, Tuple

from starlette.concurrency import run_in_threadpool

from edgemoe.errors import StateError
from edgemoe.generator import Event, SamplingOptions

logger = logging.getLogger("edgemoe.serve")


class EventQueue:
    """A job's callback: puts each event on an asyncio.Queue from the generator's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.queue: asyncio.Queue = asyncio.Queue()
        self._loop = loop

    def __call__(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass  # the loop is closed: nobody waits for this job any more


class Runtime:
    """The engine, its generator and chat template, shared by the app's handlers.

    Args:
        engine: an edgemoe.engine.Engine (tokenize, n_ctx_seq, n_vocab, model_path, close).
        generator: its BatchGenerator (submit, metrics, start, shutdown, n_parallel).
        template: a ChatTemplate (render, stop), or None where the model has none.
        shutdown_timeout: seconds a drain lets running requests finish before it cancels them.
    """

    def __init__(self, engine: Any, generator: Any, template: Any = None, shutdown_timeout: float = 30.0):
        self.engine = engine
        self.generator = generator
        self.template = template
        self.shutdown_timeout = shutdown_timeout
        self.model_id = os.path.basename(engine.model_path)
        stem = self.model_id[:-5] if self.model_id.endswith(".gguf") else self.model_id
        self.model_names: Tuple[str, ...] = tuple(dict.fromkeys((self.model_id, stem)))
        try:
            self.created = int(os.stat(engine.model_path).st_mtime)
        except OSError:
            self.created = int(time.time())
        self._jobs: Set[Any] = set()
        self._started = False
        self._draining = False
        self._drain_task: Optional[asyncio.Future] = None
        self._closed = False
        self._stopped = False  # the generator was shut down

    @property
    def n_ctx_seq(self) -> int:
        return self.engine.n_ctx_seq

    @property
    def n_vocab(self) -> Optional[int]:
        return getattr(self.engine, "n_vocab", None)

    @property
    def draining(self) -> bool:
        """True once shutdown began: new requests get 503 and /health says so."""
        return self._draining

    @property
    def jobs_in_flight(self) -> int:
        return len(self._jobs)

    def start(self) -> None:
        """Starts the generator's thread (once)."""
        if not self._started:
            self.generator.start()
            self._started = True

    def tokenize(self, text: str, add_special: bool = True) -> List[int]:
        """Text to tokens; special tokens written in the text (<|im_start|>) become those tokens."""
        return self.engine.tokenize(text, add_special=add_special, parse_special=True)

    async def submit(self, tokens: List[int], options: SamplingOptions) -> Tuple[Any, asyncio.Queue]:
        """Queues a request; returns its job and the queue its events arrive on.

        Raises what BatchGenerator.submit raises (QueueFullError, ContextFullError,
        InvalidArgumentError, StateError), and StateError once a drain began.
        """
        if self._draining:
            raise StateError("the server is shutting down")
        events = EventQueue(asyncio.get_running_loop())
        # in the threadpool: submit takes the generator's lock, which a decode step may hold
        job = await run_in_threadpool(self.generator.submit, tokens, options, events)
        self._jobs.add(job)
        return job, events.queue

    def release(self, job: Any, cancel: bool = False) -> None:
        """The HTTP side is done with a job: it ended, or its client left (cancel=True)."""
        if cancel:
            job.cancel()
        self._jobs.discard(job)

    def cancel_all(self) -> None:
        """Cancels every job in flight; each then ends with a "cancelled" DoneEvent."""
        for job in list(self._jobs):
            job.cancel()

    async def drain(self) -> None:
        """Stops taking requests, lets the running ones finish for up to shutdown_timeout
        seconds, cancels the rest, and shuts the generator down. Runs once; later calls wait
        for the first."""
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._drain_task)

    async def _drain(self) -> None:
        self._draining = True
        deadline = time.monotonic() + self.shutdown_timeout
        if self._jobs:
            logger.info("waiting up to %gs for %d request(s) to finish", self.shutdown_timeout, len(self._jobs))
        while self._jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._jobs:
            logger.warning("cancelling %d request(s) still running after %gs", len(self._jobs),
                           self.shutdown_timeout)
            self.cancel_all()
        await run_in_threadpool(self.stop)
        # the streams of cancelled jobs get their last event before the server closes them
        end = time.monotonic() + 5.0
        while self._jobs and time.monotonic() < end:
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        """Shuts the generator down now, cancelling what runs (once; blocking)."""
        if self._started and not self._stopped:
            self._stopped = True
            self.generator.shutdown(cancel_running=True, timeout=30.0)

    async def close(self) -> None:
        """Drains, then closes the engine (once)."""
        await self.drain()
        if not self._closed:
            self._closed = True
            await run_in_threadpool(self.engine.close)
