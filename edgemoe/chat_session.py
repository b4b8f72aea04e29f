"""A chat in one Engine: the history, rendered with the model's template, one reply at a time.

`edgemoe run -i` drives it. Each turn renders the whole history (chat_prompt_tokens, the one
place that turns messages into tokens, as `edgemoe serve` does) and submits it to a
BatchGenerator stepped in the caller's thread. The generator keeps the sequence's KV, so the
next turn, whose prompt starts with this one's, evaluates only what is new
(`last_usage.cached_tokens`).

    session = ChatSession(engine, ChatTemplate.from_model(path), system="Be brief.")
    reply = session.send("Hello", on_text=print)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence

from edgemoe.errors import DecodeError
from edgemoe.generator import BatchGenerator, DoneEvent, ErrorEvent, SamplingOptions, TextEvent, Usage


def chat_prompt_tokens(engine, template, messages: Sequence[dict]) -> List[int]:
    """The prompt of a chat: `messages` rendered by `template` with the assistant's turn header,
    tokenized as llama.cpp's server does: special tokens parsed, and no BOS added where the
    rendered text already begins with the template's bos_token.

    Args:
        engine: anything with Engine's `tokenize(text, add_special, parse_special)`.
        template: a ChatTemplate.

    Raises:
        InvalidArgumentError: malformed messages. ChatTemplateError: the template refused them.
    """
    text = template.render(list(messages), add_generation_prompt=True)
    bos = template.bos_token
    return engine.tokenize(text, add_special=not (bos and text.startswith(bos)), parse_special=True)


@dataclass(frozen=True)
class TurnStats:
    """One reply: the generator's usage, why it ended, and its timings (None where it had no
    token to time: ttft_ms needs one, tokens_per_s two)."""

    usage: Usage
    finish_reason: str          # "stop", "length" or "cancelled"
    ttft_ms: Optional[float]    # from the submit to the first sampled token
    tokens_per_s: Optional[float]  # the decode rate after the first token

    def as_dict(self) -> dict:
        return dict(prompt_tokens=self.usage.prompt_tokens, cached_tokens=self.usage.cached_tokens,
                    completion_tokens=self.usage.completion_tokens, finish_reason=self.finish_reason,
                    ttft_ms=self.ttft_ms, tokens_per_s=self.tokens_per_s)


class _Trim:
    """Passes text pieces on without the reply's leading and trailing whitespace: what it has
    passed on, joined, is always the reply send() returns."""

    def __init__(self, on_text: Optional[Callable[[str], None]]):
        self._on_text = on_text
        self._held = ""
        self.text = ""

    def feed(self, piece: str) -> None:
        if not self.text:
            piece = (self._held + piece).lstrip()
            self._held = ""
            if not piece:
                return
        body = piece.rstrip()
        if not body:
            self._held += piece  # whitespace only goes out once text follows it
            return
        out = self._held + body
        self._held = piece[len(body):]
        self.text += out
        if self._on_text is not None:
            self._on_text(out)


class ChatSession:
    """A conversation with a model: its messages, an optional system prompt, and a generator
    that keeps the KV of the last turn for the next.

    Replies are returned and streamed without leading or trailing whitespace, as a chat
    transcript shows them, and kept in the history as generated: rendered again, a reply then
    gives the tokens the model generated, and the next turn reuses their KV.

    Args:
        engine: an Engine; the session decodes in it from the caller's thread.
        template: a ChatTemplate (edgemoe.chat_template); its stop strings end every reply.
        system: the system prompt, first in every rendered chat; reset() keeps it.
        options: default SamplingOptions of send(); the template's stop strings are added.
        schedule: the BatchGenerator's schedule.
    """

    def __init__(self, engine, template, system: Optional[str] = None,
                 options: SamplingOptions = SamplingOptions(), schedule: str = "fifo"):
        self.engine = engine
        self.template = template
        self.system = system
        self.options = options
        self._schedule = schedule
        self._generator = BatchGenerator(engine, schedule=schedule)
        self._messages: List[dict] = []
        self._job = None
        self._cancel_asked = False
        self.last_turn: Optional[TurnStats] = None
        self.reset()

    @property
    def messages(self) -> List[dict]:
        """A copy of the chat so far, the system prompt first."""
        return [dict(m) for m in self._messages]

    @property
    def last_usage(self) -> Optional[Usage]:
        """The last reply's usage; cached_tokens counts the prompt tokens it did not evaluate."""
        return self.last_turn.usage if self.last_turn is not None else None

    def reset(self) -> None:
        """Forgets the chat (the system prompt stays). The next prompt may still reuse KV of
        tokens it shares with the old chat's (the system prompt): they are the same tokens."""
        self._messages = [{"role": "system", "content": self.system}] if self.system else []

    def cancel(self) -> None:
        """Stops the reply in progress, if any (safe from a signal handler or another thread);
        send() then returns what was generated so far."""
        self._cancel_asked = True
        job = self._job
        if job is not None:
            job.cancel()

    def send(self, user_text: str, on_text: Optional[Callable[[str], None]] = None,
             options: Optional[SamplingOptions] = None) -> str:
        """Adds a user message, generates the reply, keeps it in the history and returns it.

        Args:
            on_text: called with each piece of the reply as it is generated.
            options: this reply's sampling options (default: the session's); the template's
                stop strings are added to its stop strings.

        A cancelled reply (cancel()) is kept as far as it went. Where the turn fails, the
        history stays as it was.

        Raises:
            InvalidArgumentError, ChatTemplateError: the template refused the chat.
            ContextFullError: the chat no longer fits the context (reset() starts over).
            DecodeError: decoding failed.
        """
        options = options or self.options
        stop = tuple(dict.fromkeys(tuple(options.stop) + tuple(self.template.stop)))
        messages = self._messages + [{"role": "user", "content": user_text}]
        tokens = chat_prompt_tokens(self.engine, self.template, messages)
        trim = _Trim(on_text)
        events: dict = {}
        raw: List[str] = []

        def on_event(event) -> None:
            if isinstance(event, TextEvent):
                raw.append(event.text)
                if "raised" in events:
                    return
                try:
                    trim.feed(event.text)
                except BaseException as e:  # e.g. a closed stdout: stop, and raise it from send()
                    events["raised"] = e
                    job.cancel()
            else:
                events["end"] = event

        self._cancel_asked = False
        job = self._generator.submit(tokens, replace(options, stop=stop), on_event)
        self._job = job
        try:
            if self._cancel_asked:
                job.cancel()
            self._generator.run_until_idle()
        except BaseException:
            # a step cut short (an interrupt in a decode) may leave the generator's idea of
            # the KV wrong: a fresh one starts the sequence over
            self._generator = BatchGenerator(self.engine, schedule=self._schedule)
            raise
        finally:
            self._job = None
        if "raised" in events:
            raise events["raised"]
        end = events.get("end")
        if isinstance(end, ErrorEvent):
            raise DecodeError(end.message)
        if not isinstance(end, DoneEvent):  # run_until_idle returns only once the job ended
            raise DecodeError("the reply ended without a result")
        self.last_turn = _turn_stats(job, end)
        self._messages = messages + [{"role": "assistant", "content": "".join(raw)}]
        return trim.text


def _turn_stats(job, end: DoneEvent) -> TurnStats:
    times = job.token_times
    ttft = (times[0] - job.submitted_at) * 1e3 if times else None
    rate = None
    if len(times) > 1 and times[-1] > times[0]:
        rate = (len(times) - 1) / (times[-1] - times[0])
    return TurnStats(usage=end.usage, finish_reason=end.finish_reason, ttft_ms=ttft, tokens_per_s=rate)

