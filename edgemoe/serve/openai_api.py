"""OpenAI's API in plain data: request validation, response and stream-chunk bodies, error bodies.

Nothing here touches HTTP or the engine, so every rule is testable on dicts. Parameters edgemoe
cannot honour (echo, logprobs, n > 1, penalties, tools, ...) are refused with a 400 that names
them rather than ignored; parameters OpenAI does not know and does not forbid are ignored, as
OpenAI-compatible servers commonly do. top_k and min_p are accepted as extensions (llama.cpp's
names); their defaults leave them off, so that an OpenAI request samples as OpenAI documents.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Collection, Dict, List, Optional, Tuple, Union

from edgemoe.generator import SamplingOptions, Usage

MAX_STOP = 4  # OpenAI's limit on stop sequences
_MISSING = object()


class ApiError(Exception):
    """A request that gets an OpenAI-style error body instead of a completion."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    """`{"error": {message, type, param, code}}`, as OpenAI answers a failed request."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _bad(param: str, message: str, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# -- typed fields -----------------------------------------------------------------------------

def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _int(body: dict, name: str, default: Any = None, lo: Optional[int] = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"'{name}' must be an integer, not {_type_name(value)}")
    if lo is not None and value < lo:
        raise _bad(name, f"'{name}' must be at least {lo}, not {value}")
    return value


def _number(body: dict, name: str, default: Any, lo: float, hi: float, lo_open: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"'{name}' must be a number, not {_type_name(value)}")
    if not (lo < value if lo_open else lo <= value) or value > hi:
        rng = f"above {lo:g} and at most {hi:g}" if lo_open else f"between {lo:g} and {hi:g}"
        raise _bad(name, f"'{name}' must be {rng}, not {value:g}")
    return float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"'{name}' must be a boolean, not {_type_name(value)}")
    return value


def _unsupported(body: dict, name: str, allowed: Collection = (None, False, 0)) -> None:
    value = body.get(name)
    if any(value is a or (value == a and type(value) is type(a)) for a in allowed):
        return
    if isinstance(value, (list, dict)) and not value:  # [] and {} mean "none" too
        return
    raise _bad(name, f"'{name}' is not supported by edgemoe serve")


# -- requests ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationRequest:
    """A validated /v1/completions ("text") or /v1/chat/completions ("chat") request."""

    kind: str
    prompt: Union[str, List[int], None] = None     # text: a string or token ids
    messages: Optional[List[dict]] = None          # chat: {"role", "content": str, ...}
    max_tokens: Optional[int] = None               # None: up to the sequence's context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False

    def sampling(self, room: int, extra_stop: Tuple[str, ...] = ()) -> SamplingOptions:
        """The generator's options; `room` caps max_tokens (context left after the prompt)."""
        wanted = self.max_tokens if self.max_tokens is not None else room
        stop = tuple(dict.fromkeys(self.stop + tuple(extra_stop)))
        return SamplingOptions(max_tokens=max(1, min(wanted, room)), temperature=self.temperature,
                               top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, seed=self.seed,
                               stop=stop)


def _check_model(body: dict, models: Collection[str]) -> None:
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise _bad("model", f"'model' must be a string, not {_type_name(model)}")
    if model not in models:
        raise ApiError(400, f"The model '{model}' does not exist; this server serves "
                            f"{', '.join(repr(m) for m in models)}", param="model", code="model_not_found")


def _stop(body: dict) -> Tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _bad("stop", "'stop' must be a string or an array of strings")
    if len(value) > MAX_STOP:
        raise _bad("stop", f"'stop' takes at most {MAX_STOP} sequences, not {len(value)}")
    return tuple(s for s in value if s)


def _common(body: dict, kind: str, models: Collection[str]) -> dict:
    """The parameters both endpoints share, validated."""
    _check_model(body, models)
    for name in ("n", "best_of"):
        n = _int(body, name, 1)
        if n != 1:
            raise _bad(name, f"'{name}' must be 1: edgemoe serve generates one choice per request")
    for name in ("presence_penalty", "frequency_penalty"):
        _number(body, name, 0.0, -2.0, 2.0)
        _unsupported(body, name, (None, 0, 0.0))
    _unsupported(body, "logit_bias")
    stream = _bool(body, "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:  # ignored without stream, where usage is always in the response
        if not isinstance(options, dict):
            raise _bad("stream_options", "'stream_options' must be an object")
        include_usage = _bool(options, "include_usage")
    return dict(kind=kind, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), top_k=_int(body, "top_k", 0, lo=0),
                min_p=_number(body, "min_p", 0.0, 0.0, 1.0), seed=_int(body, "seed"), stop=_stop(body),
                stream=stream, include_usage=stream and include_usage)


def _prompt(body: dict, n_vocab: Optional[int]) -> Union[str, List[int]]:
    prompt = body.get("prompt", _MISSING)
    if prompt is _MISSING or prompt is None:
        raise _bad("prompt", "'prompt' is required")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one: one string, or one array of token ids
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if not prompt:
            raise _bad("prompt", "'prompt' is empty")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if t < 0 or (n_vocab is not None and t >= n_vocab)]
            if bad:
                raise _bad("prompt", f"token id {bad[0]} is out of the vocabulary (0 to {n_vocab - 1})"
                           if n_vocab is not None else f"token id {bad[0]} is negative")
            return list(prompt)
        if all(isinstance(p, (str, list)) for p in prompt):
            raise _bad("prompt", f"'prompt' holds {len(prompt)} prompts; edgemoe serve takes one per request")
    raise _bad("prompt", "'prompt' must be a string, an array of one string, or an array of token ids")


def parse_completion_request(body: dict, models: Collection[str],
                             n_vocab: Optional[int] = None) -> GenerationRequest:
    """Validates a /v1/completions body.

    Args:
        body: the decoded JSON object.
        models: names the "model" field may take (it may also be absent).
        n_vocab: the vocabulary size, to check token-id prompts.
    """
    fields = _common(body, "text", models)
    for name in ("echo",):
        if _bool(body, name):
            raise _bad(name, f"'{name}' is not supported by edgemoe serve")
    _unsupported(body, "logprobs", (None,))
    _unsupported(body, "suffix", (None, ""))
    return GenerationRequest(prompt=_prompt(body, n_vocab), max_tokens=_int(body, "max_tokens", 16, lo=1), **fields)


def _messages(body: dict) -> List[dict]:
    """The messages as given; their roles and content are the chat template's to check
    (edgemoe.chat_template), whose InvalidArgumentError the app answers with a 400."""
    messages = body.get("messages")
    if messages is None:
        raise _bad("messages", "'messages' is required")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty array")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object, not {_type_name(m)}")
        if m.get("tool_calls"):
            raise _bad(f"messages[{i}].tool_calls", "tool calls are not supported by edgemoe serve")
    return [dict(m) for m in messages]


def parse_chat_request(body: dict, models: Collection[str]) -> GenerationRequest:
    """Validates a /v1/chat/completions body (max_completion_tokens wins over max_tokens)."""
    fields = _common(body, "chat", models)
    _unsupported(body, "logprobs", (None, False))
    _unsupported(body, "top_logprobs", (None,))
    _unsupported(body, "tools")
    _unsupported(body, "functions")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad("response_format", "only the 'text' response_format is supported by edgemoe serve")
    max_tokens = _int(body, "max_completion_tokens", lo=1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", lo=1)
    return GenerationRequest(messages=_messages(body), max_tokens=max_tokens, **fields)


def context_error(n_prompt: int, n_ctx_seq: int, param: str = "prompt") -> ApiError:
    """The 400 for a prompt that leaves no room in a sequence's context."""
    return ApiError(400, f"This model's maximum context length is {n_ctx_seq} tokens per sequence; "
                         f"the prompt has {n_prompt} tokens, which leaves no room to generate",
                    param=param, code="context_length_exceeded")


# -- responses --------------------------------------------------------------------------------

def usage_body(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


class Reply:
    """The bodies of one response: the full object, or its stream chunks, sharing id and created.

    Args:
        kind: "text" (a completion) or "chat".
        model: the model id to report.
    """

    def __init__(self, kind: str, model: str, created: Optional[int] = None):
        if kind not in ("text", "chat"):
            raise ValueError(f"unknown kind {kind!r}")
        self.kind = kind
        self.model = model
        self.created = int(time.time()) if created is None else created
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, finish_reason: str, usage: Usage) -> dict:
        """The non-streaming response."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": finish_reason}
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._head("text_completion")
        body["choices"] = [choice]
        body["usage"] = usage_body(usage)
        return body

    def chunk(self, text: Optional[str] = None, finish_reason: Optional[str] = None, role: bool = False,
              usage: Any = _MISSING) -> dict:
        """One stream chunk: new text, or the role (chat's first chunk), or the finish reason.

        usage: a Usage to attach, None for an explicit `"usage": null`, or absent.
        """
        if self.kind == "chat":
            delta: dict = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif text is not None:
                delta = {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = self._head("text_completion")
        body["choices"] = [choice]
        if usage is not _MISSING:
            body["usage"] = None if usage is None else usage_body(usage)
        return body

    def usage_chunk(self, usage: Usage) -> dict:
        """The last chunk with stream_options.include_usage: no choices, the usage."""
        body = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        body["choices"] = []
        body["usage"] = usage_body(usage)
        return body


def model_list(model_id: str, created: int) -> dict:
    """GET /v1/models: the one model this server serves."""
    return {"object": "list", "data": [model_card(model_id, created)]}


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "edgemoe"}
