"""BatchGenerator: many requests decoded together in one n_parallel Engine give the texts a lone
sequence gives, end on stop strings and max_tokens with the right usage, reuse kept prefixes,
cancel cleanly, refuse what they must; the expert schedule's batches replay exactly with the
cache off.

Greedy requests only, on the shipped tiny models, so every expected text is computed, not stored.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import N_THREADS, REPO, needs_cache

pytestmark = needs_cache

DEFAULT = REPO / "models" / "edgemoe-tiny-q8_0.gguf"          # qwen3moe, top-8 of 64 experts
README = REPO / "models" / "edgemoe-tiny-readme-q8_0.gguf"    # readme router, top-1 of 16
N_CTX_SEQ = 64
PROMPTS = ["Once upon a time", "The cat sat on the", "In a small village there lived", "Hello",
           "Once upon a time there was a", "Tom and Lily went to the park. They"]
WAIT = 60  # seconds a threaded test waits for an event before it fails


def _engine(path=DEFAULT, **kw):
    from edgemoe.engine import Engine

    kw.setdefault("n_threads", N_THREADS)
    kw.setdefault("notice", lambda msg: None)
    n_seq = kw.setdefault("n_parallel", 1)
    kw.setdefault("n_ctx", N_CTX_SEQ * n_seq)
    return Engine(path, **kw)


def _greedy(max_tokens, **kw):
    from edgemoe.generator import SamplingOptions

    return SamplingOptions(max_tokens=max_tokens, temperature=0, **kw)


class Collector:
    """A request's callback: keeps its events; `done` is set at its DoneEvent or ErrorEvent."""

    def __init__(self, raise_on_text: bool = False):
        self.events = []
        self.done = threading.Event()
        self.first_text = threading.Event()
        self.raise_on_text = raise_on_text

    def __call__(self, event):
        from edgemoe.generator import DoneEvent, ErrorEvent, TextEvent

        self.events.append(event)
        if isinstance(event, (DoneEvent, ErrorEvent)):
            self.done.set()
        if isinstance(event, TextEvent):
            self.first_text.set()
            if self.raise_on_text:
                raise RuntimeError("a consumer that fails")

    @property
    def text(self) -> str:
        from edgemoe.generator import TextEvent

        return "".join(e.text for e in self.events if isinstance(e, TextEvent))

    @property
    def last(self):
        return self.events[-1]


@pytest.fixture(scope="module")
def lone():
    """A one-sequence engine (cache off) for reference generations, memoized."""
    memo = {}
    with _engine(n_ctx=2 * N_CTX_SEQ) as e:
        def generate(prompt, max_tokens):
            key = (tuple(prompt) if not isinstance(prompt, str) else prompt, max_tokens)
            if key not in memo:
                text = "".join(e.generate(prompt, max_tokens=max_tokens, temperature=0))
                memo[key] = (text, e.stats().n_generated)
            return memo[key]
        yield generate


def _submit_all(gen, engine, prompts, max_tokens):
    out = []
    for prompt, n in zip(prompts, max_tokens):
        c = Collector()
        tokens = engine.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        out.append((gen.submit(tokens, _greedy(n), c), c))
    return out


# -- 5. greedy generation equals a lone sequence; the expert schedule replays exactly ---------


def test_fifo_greedy_texts_equal_lone_generation(lone):
    """4 sequences, 6 requests of different lengths (two queue, then take over finished
    sequences; the first of them extends the prompt of the request that finished first, so it
    reuses that sequence's kept prompt): every text, finish reason and usage equals
    Engine.generate's on a one-sequence engine."""
    from edgemoe.generator import BatchGenerator, DoneEvent

    max_tokens = [4, 7, 10, 12, 9, 11]
    with _engine(n_parallel=4) as e:
        gen = BatchGenerator(e, schedule="fifo")
        jobs = _submit_all(gen, e, PROMPTS, max_tokens)
        gen.run_until_idle()
        m = gen.metrics()
    assert {job.seq for job, _c in jobs} == {0, 1, 2, 3}
    assert jobs[4][0].seq == jobs[0][0].seq
    assert jobs[4][1].last.usage.cached_tokens == len(jobs[0][0].tokens) > 0
    for (job, c), prompt, n in zip(jobs, PROMPTS, max_tokens):
        text, n_generated = lone(prompt, n)
        assert c.text == text, prompt
        assert isinstance(c.last, DoneEvent) and sum(isinstance(ev, DoneEvent) for ev in c.events) == 1
        assert c.last.finish_reason == ("length" if n_generated == n else "stop")
        assert c.last.usage.prompt_tokens == len(job.tokens)
        assert c.last.usage.completion_tokens == n_generated == len(job.generated)
        assert job.text == text
    assert m.requests_total == 6 and m.active == 0 and m.queue_depth == 0
    assert m.completion_tokens_total == sum(len(job.generated) for job, _c in jobs)
    assert m.prompt_tokens_total + m.cached_tokens_total == sum(len(job.tokens) for job, _c in jobs)
    assert m.cached_tokens_total == sum(c.last.usage.cached_tokens for _j, c in jobs)


class CallLog:
    """Wraps an engine's decode_batch and keep_prefix: every call, with each decode's logits."""

    def __init__(self, engine):
        self.calls = []
        decode, keep = engine.decode_batch, engine.keep_prefix

        def decode_batch(rows):
            rows = [(int(s), [int(t) for t in tokens]) for s, tokens in rows]
            outs = decode(rows)
            self.calls.append(("decode", rows, np.stack([engine.logits_at(i) for i in outs]),
                               engine.last_routes(sum(len(t) for _s, t in rows))))
            return outs

        def keep_prefix(seq, n):
            keep(seq, n)
            self.calls.append(("keep", seq, n))

        engine.decode_batch = decode_batch
        engine.keep_prefix = keep_prefix

    def replay(self, path, **kw):
        """The same calls on a fresh engine; asserts the same logits (and routes, where both
        engines report them) at every step; returns each sequence's rows' greedy tokens,
        split at each keep_prefix (one list per request the sequence served), each with whether
        it ends generation."""
        per_seq = {}
        with _engine(path, **kw) as e:
            for n, call in enumerate(self.calls):
                if call[0] == "keep":
                    _, seq, keep = call
                    e.keep_prefix(seq, keep)
                    per_seq.setdefault(seq, []).append([])
                    continue
                _, rows, logits, routes = call
                outs = e.decode_batch(rows)
                got = np.stack([e.logits_at(i) for i in outs])
                assert np.array_equal(got, logits), f"call {n}: logits differ by up to {np.abs(got - logits).max()}"
                if routes is not None and e.cache is not None:
                    assert np.array_equal(e.last_routes(len(routes)), routes), f"call {n}: routes differ"
                for (seq, _tokens), row in zip(rows, got):
                    token = int(np.argmax(row))
                    per_seq[seq][-1].append((token, e.is_eog(token)))
        return per_seq


def _assert_jobs_follow_replay(jobs, per_seq, engine_text):
    """Each job's sampled tokens are the argmax of its rows in the replay (prompts fit one
    chunk, so every row samples), an end-of-generation token last where it stopped there
    (no stop strings here)."""
    by_seq = {}
    for job, c in sorted(jobs, key=lambda jc: jc[0].id):
        by_seq.setdefault(job.seq, []).append((job, c))
    for seq, served in by_seq.items():
        assert len(per_seq[seq]) == len(served), f"sequence {seq}: one keep_prefix per request"
        for (job, c), picks in zip(served, per_seq[seq]):
            tokens = [t for t, _eog in picks]
            assert not any(eog for _t, eog in picks[:-1])
            if c.last.finish_reason == "stop":
                assert picks[-1][1]
                tokens = tokens[:-1]
            else:
                assert c.last.finish_reason == "length" and not picks[-1][1]
            assert job.generated == tokens
            assert c.text == engine_text(tokens)


def test_expert_schedule_replays_exactly_with_the_cache_off():
    """The expert schedule at 25 % picks which ready sequences step together (step_seqs 2 of 4
    makes it choose); every batch it decoded, replayed in a cache-off engine, gives bitwise
    the same logits, and every request's tokens are those logits' greedy picks."""
    from edgemoe.generator import BatchGenerator, StepRecord

    steps = []
    with _engine(n_parallel=4, expert_cache="25%") as e:
        log = CallLog(e)
        gen = BatchGenerator(e, schedule="expert", step_seqs=2, on_step=steps.append)
        jobs = _submit_all(gen, e, PROMPTS, [8, 6, 8, 5, 7, 6])
        gen.run_until_idle()
        m = gen.metrics()
    assert all(isinstance(s, StepRecord) for s in steps) and len(steps) == m.steps_total
    assert max(s.n_rows for s in steps) == 2
    assert m.hits + m.misses > 0 and m.bytes_read > 0
    per_seq = log.replay(DEFAULT, n_parallel=4)
    with _engine() as e:
        _assert_jobs_follow_replay(jobs, per_seq, lambda tokens: "".join(e.text_pieces(tokens)))


# -- 6. stop strings, length, usage, prefix reuse ----------------------------------------------------


def _pieces(engine, tokens):
    return [engine.token_to_bytes(t).decode("utf-8") for t in tokens]


def _run_one(engine, tokens, options, schedule="fifo"):
    from edgemoe.generator import BatchGenerator

    gen = BatchGenerator(engine, schedule=schedule)
    c = Collector()
    job = gen.submit(tokens, options, c)
    gen.run_until_idle()
    return job, c


def test_stop_strings_and_length(lone):
    """A stop string split across two tokens ends the request before it (finish "stop", the
    tokens up to the one completing it counted); text that could begin a stop string is held
    back until it cannot, never sent past a stop; max_tokens ends with "length"."""
    with _engine(n_parallel=2) as e:
        prompt = e.tokenize(PROMPTS[0])
        job, c = _run_one(e, prompt, _greedy(16))
        assert c.last.finish_reason == "length" and c.last.usage.completion_tokens == 16
        assert c.last.usage.prompt_tokens == len(prompt) and c.last.usage.cached_tokens == 0
        full = c.text
        assert full == lone(PROMPTS[0], 16)[0]
        pieces = _pieces(e, job.generated)
        assert "".join(pieces) == full
        # a boundary where both neighbours have two characters and the spanning string is new
        stop, j, at = None, None, None
        for j in range(len(pieces) - 1):
            cand = pieces[j][-2:] + pieces[j + 1][:2]
            at = len("".join(pieces[:j + 1])) - 2
            if len(pieces[j]) >= 2 and len(pieces[j + 1]) >= 2 and full.find(cand) == at:
                stop = cand
                break
        assert stop is not None, f"no usable token boundary in {pieces!r}"

        job, c = _run_one(e, prompt, _greedy(16, stop=(stop,)))
        assert c.text == full[:at] and job.text == full[:at]
        assert c.last.finish_reason == "stop"
        assert c.last.usage.completion_tokens == j + 2  # the token that completed the stop counts
        assert all(stop not in ev.text for ev in c.events[:-1])

        # two stops: the earliest in the text wins, whatever its place in the list
        early = pieces[0][:2] if len(pieces[0]) >= 2 else pieces[0]
        early_at = full.find(early)
        job, c = _run_one(e, prompt, _greedy(16, stop=(stop, early)))
        assert c.text == full[:min(at, early_at)]

        # a stop whose start appears but that never completes: held back, then all sent
        tease = pieces[j][-2:] + "\x00never"
        job, c = _run_one(e, prompt, _greedy(16, stop=(tease,)))
        assert c.text == full and c.last.finish_reason == "length"
        sent = ""
        for ev in c.events[:-1]:
            sent += ev.text
            assert full.startswith(sent)

        job, c = _run_one(e, prompt, _greedy(3))
        assert c.last.finish_reason == "length" and c.last.usage.completion_tokens == 3
        assert c.text == lone(PROMPTS[0], 3)[0]


def test_prefix_reuse(lone):
    """A second request whose prompt extends the first's prompt and output reuses the kept KV
    (cached_tokens = the first's prompt + output less its last token, which was sampled but
    never decoded) and gives the text a fresh engine gives for the whole prompt."""
    from edgemoe.generator import BatchGenerator

    with _engine(n_parallel=2) as e:
        gen = BatchGenerator(e, schedule="fifo")
        first = e.tokenize(PROMPTS[1])
        c1 = Collector()
        job1 = gen.submit(first, _greedy(8), c1)
        gen.run_until_idle()
        second = first + job1.generated + e.tokenize(" and then", add_special=False)
        c2 = Collector()
        job2 = gen.submit(second, _greedy(8), c2)
        gen.run_until_idle()
        m = gen.metrics()
    assert job2.seq == job1.seq
    usage = c2.last.usage
    assert usage.cached_tokens == len(first) + len(job1.generated) - 1 > 0
    assert usage.prompt_tokens == len(second)
    assert m.cached_tokens_total == usage.cached_tokens
    assert m.prompt_tokens_total == len(first) + len(second) - usage.cached_tokens
    text, n = lone(second, 8)
    assert c2.text == text and usage.completion_tokens == n


# -- 7. cancel, queue full, context full, shutdown, failing callbacks --------------------------------


def test_cancel_from_another_thread_frees_the_sequence(lone):
    """start() mode: a request cancelled mid-generation from another thread ends with
    DoneEvent("cancelled"); the next request gets its sequence (reusing its prompt's KV) and
    generates what a fresh engine does, while the other sequence's request runs on."""
    from edgemoe.generator import BatchGenerator, DoneEvent

    hold = threading.Event()
    with _engine(n_parallel=2) as e:
        gen = BatchGenerator(e, schedule="fifo")
        gen.start()
        try:
            long_ = Collector()
            long_job = gen.submit(e.tokenize(PROMPTS[2]), _greedy(40), long_)
            victim = Collector()
            orig = victim.__call__

            def blocking(event):  # holds the generator at the victim's first text until cancelled
                orig(event)
                if len(victim.events) == 1:
                    assert hold.wait(WAIT)

            victim_job = gen.submit(e.tokenize(PROMPTS[0]), _greedy(40), blocking)
            assert victim.first_text.wait(WAIT)
            victim_job.cancel()
            hold.set()
            assert victim.done.wait(WAIT)
            assert isinstance(victim.last, DoneEvent) and victim.last.finish_reason == "cancelled"
            assert victim.last.usage.completion_tokens == len(victim_job.generated) < 40
            assert not long_.done.is_set()  # still running when the next request comes
            nxt = Collector()
            next_job = gen.submit(e.tokenize(PROMPTS[0]), _greedy(10), nxt)
            assert nxt.done.wait(WAIT) and long_.done.wait(WAIT)
        finally:
            hold.set()
            gen.shutdown()
    assert next_job.seq == victim_job.seq != long_job.seq
    assert nxt.last.finish_reason == "length"
    assert nxt.last.usage.cached_tokens == len(next_job.tokens) - 1
    assert nxt.text == lone(PROMPTS[0], 10)[0]
    assert long_.text == lone(PROMPTS[2], 40)[0]


def test_queue_full_and_context_full():
    """max_queue requests waiting while every sequence is busy: the next submit raises
    QueueFullError (with a retry hint); a prompt of n_ctx_seq tokens raises ContextFullError,
    one token less fits and ends with "length" after one token."""
    from edgemoe.errors import ContextFullError, InvalidArgumentError, QueueFullError
    from edgemoe.generator import BatchGenerator

    with _engine(n_parallel=1) as e:
        gen = BatchGenerator(e, schedule="fifo", max_queue=1)
        a, b = Collector(), Collector()
        gen.submit([1, 2, 3], _greedy(3), a)
        gen.step()                        # a takes the only sequence
        gen.submit([4, 5], _greedy(3), b)  # waits: the queue is full now
        with pytest.raises(QueueFullError) as err:
            gen.submit([6], _greedy(3), Collector())
        assert err.value.retry_after >= 1
        assert gen.metrics().queue_depth == 1 and gen.metrics().requests_total == 2
        gen.run_until_idle()
        assert a.last.finish_reason == b.last.finish_reason == "length"

        n = e.n_ctx_seq
        with pytest.raises(ContextFullError):
            gen.submit(list(range(1, n + 1)), _greedy(3), Collector())
        with pytest.raises(InvalidArgumentError):
            gen.submit([], _greedy(3), Collector())
        with pytest.raises(InvalidArgumentError):
            gen.submit([e.n_vocab], _greedy(3), Collector())
        c = Collector()
        gen.submit(list(range(1, n)), _greedy(5), c)
        gen.run_until_idle()
        assert c.last.finish_reason == "length" and c.last.usage.completion_tokens == 1
        assert e.seq_past(0) == n - 1


def test_queue_bound_holds_for_a_burst():
    from edgemoe.errors import QueueFullError
    from edgemoe.generator import BatchGenerator

    with _engine(n_parallel=1) as e:
        gen = BatchGenerator(e, schedule="fifo", max_queue=1)
        accepted = 0
        for _ in range(4):
            try:
                gen.submit([1, 2], _greedy(2), Collector())
                accepted += 1
            except QueueFullError:
                pass
        gen.step()
        assert gen.metrics().queue_depth <= 1
        assert accepted == 2  # one for the free sequence, one waiting


def test_shutdown():
    """shutdown() lets a running request finish and cancels a waiting one; then submit raises
    StateError; shutdown(cancel_running=True) cancels a running one."""
    from edgemoe.errors import StateError
    from edgemoe.generator import BatchGenerator

    hold = threading.Event()
    with _engine(n_parallel=1) as e:
        gen = BatchGenerator(e, schedule="fifo")
        gen.start()
        running = Collector()
        orig = running.__call__

        def blocking(event):
            orig(event)
            if len(running.events) == 1:
                assert hold.wait(WAIT)

        gen.submit(e.tokenize(PROMPTS[0]), _greedy(12), blocking)
        assert running.first_text.wait(WAIT)
        waiting = Collector()
        gen.submit([1, 2, 3], _greedy(5), waiting)
        stopper = threading.Thread(target=gen.shutdown)
        stopper.start()
        try:
            assert waiting.done.wait(WAIT)  # cancelled at once, while the first still runs
            assert waiting.last.finish_reason == "cancelled" and waiting.last.usage.completion_tokens == 0
            assert not running.done.is_set()
        finally:
            hold.set()
            stopper.join(WAIT)
        assert not stopper.is_alive()
        assert running.last.finish_reason == "length" and running.last.usage.completion_tokens == 12
        with pytest.raises(StateError):
            gen.submit([1], _greedy(2), Collector())

        # cancel_running: the running request is cancelled (held at its first text until then)
        gen2 = BatchGenerator(e, schedule="fifo")
        gen2.start()
        hold2 = threading.Event()
        c = Collector()

        def blocking2(event):
            c(event)
            if len(c.events) == 1:
                assert hold2.wait(WAIT)

        job = gen2.submit([1, 2, 3], _greedy(50), blocking2)
        assert c.first_text.wait(WAIT)
        stopper = threading.Thread(target=gen2.shutdown, kwargs=dict(cancel_running=True))
        stopper.start()
        try:
            for _ in range(WAIT * 100):
                if job.cancelled:
                    break
                threading.Event().wait(0.01)
            assert job.cancelled
        finally:
            hold2.set()
            stopper.join(WAIT)
        assert not stopper.is_alive()
        assert c.done.is_set() and c.last.finish_reason == "cancelled"
        assert c.last.usage.completion_tokens == len(job.generated) < 50


def test_failing_callback_cancels_only_its_job(lone):
    from edgemoe.generator import BatchGenerator, DoneEvent, TextEvent

    with _engine(n_parallel=2) as e:
        gen = BatchGenerator(e, schedule="fifo")
        bad, good = Collector(raise_on_text=True), Collector()
        bad_job = gen.submit(e.tokenize(PROMPTS[1]), _greedy(12), bad)
        gen.submit(e.tokenize(PROMPTS[3]), _greedy(12), good)
        gen.run_until_idle()
        assert [type(ev) for ev in bad.events] == [TextEvent, DoneEvent]
        assert bad.last.finish_reason == "cancelled" and len(bad_job.generated) < 12
        assert good.text == lone(PROMPTS[3], 12)[0] and good.last.finish_reason == "length"
        after = Collector()  # the generator goes on, the sequence is free again
        gen.submit(e.tokenize(PROMPTS[1]), _greedy(6), after)
        gen.run_until_idle()
    assert after.text == lone(PROMPTS[1], 6)[0]


def test_decode_error_fails_its_requests_and_the_generator_goes_on(lone):
    """A decode that fails (fault injected) ends the requests of its batch with ErrorEvent and
    forgets their sequences' KV; the next request decodes exactly."""
    from edgemoe.errors import DecodeError
    from edgemoe.generator import BatchGenerator, ErrorEvent

    with _engine(n_parallel=1) as e:
        gen = BatchGenerator(e, schedule="fifo")
        real = e.decode_batch
        calls = []

        def failing_third(rows):
            calls.append(rows)
            if len(calls) == 3:
                raise DecodeError("injected")
            return real(rows)

        e.decode_batch = failing_third
        c = Collector()
        gen.submit(e.tokenize(PROMPTS[0]), _greedy(10), c)
        gen.run_until_idle()
        assert isinstance(c.last, ErrorEvent) and "injected" in c.last.message
        assert e.seq_past(0) == 0
        after = Collector()
        gen.submit(e.tokenize(PROMPTS[0]), _greedy(10), after)
        gen.run_until_idle()
    assert after.last.usage.cached_tokens == 0
    assert after.text == lone(PROMPTS[0], 10)[0]


# -- 8. the expert schedule on the readme model ------------------------------------------------------


def test_expert_schedule_readme_small_budget():
    """Readme model (routes known ahead) at 25 % with the expert schedule: every request ends,
    the distinct experts per decode step average a sensible number (at least 1, at most the
    experts a step's rows can name), and every batch replays bitwise in a cache-off engine (the
    cache stays on at 100 % there, as for every readme model) with the same routes."""
    from edgemoe.generator import BatchGenerator

    n_seq, step_seqs = 4, 3
    with _engine(README, n_parallel=n_seq, expert_cache="25%") as e:
        n_expert = e.cache.layout.n_expert
        log = CallLog(e)
        gen = BatchGenerator(e, schedule="expert", step_seqs=step_seqs)
        jobs = _submit_all(gen, e, PROMPTS, [8, 6, 8, 5, 7, 6])
        gen.run_until_idle()
        m = gen.metrics()
    assert all(c.last.finish_reason in ("length", "stop") for _j, c in jobs)
    assert m.decode_steps_total > 0
    per_step = m.unique_experts_sum / m.decode_steps_total
    assert 1.0 <= per_step <= min(n_expert, step_seqs * 1)  # top-1: a row names one expert per layer
    assert m.completion_tokens_total == sum(len(j.generated) for j, _c in jobs)
    per_seq = log.replay(README, n_parallel=n_seq)
    with _engine(README) as e:
        _assert_jobs_follow_replay(jobs, per_seq, lambda tokens: "".join(e.text_pieces(tokens)))
