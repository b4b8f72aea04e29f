"""edgemoe.serve.openai_api: request validation and the bodies of responses, on plain dicts."""

from __future__ import annotations

import pytest

from edgemoe.generator import Usage
from edgemoe.serve.openai_api import (ApiError, Reply, context_error, error_body, parse_chat_request,
                                      parse_completion_request, usage_body)

MODELS = ("tiny.gguf", "tiny")


def completion(**kw):
    return parse_completion_request(dict(prompt="hi", **kw), MODELS, n_vocab=100)


def chat(**kw):
    body = {"messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return parse_chat_request(body, MODELS)


def refused(fn, **kw) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(**kw)
    assert e.value.status == 400
    assert e.value.body()["error"]["type"] == "invalid_request_error"
    return e.value


def test_completion_defaults_are_openai_s():
    req = completion()
    assert (req.kind, req.prompt, req.max_tokens, req.temperature, req.top_p) == ("text", "hi", 16, 1.0, 1.0)
    assert (req.top_k, req.min_p, req.seed, req.stop, req.stream, req.include_usage) == (0, 0.0, None, (), False,
                                                                                       False)


def test_completion_parameters():
    req = completion(model="tiny", max_tokens=5, temperature=0, top_p=0.5, top_k=3, min_p=0.1, seed=7,
                     stop="\n", stream=True, stream_options={"include_usage": True}, n=1, echo=False,
                     logprobs=None, presence_penalty=0, user="someone")
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.min_p, req.seed) == (5, 0.0, 0.5, 3, 0.1, 7)
    assert req.stop == ("\n",) and req.stream and req.include_usage


@pytest.mark.parametrize("prompt, expect", [
    ("text", "text"), (["text"], "text"), ([5, 6], [5, 6]), ([[5, 6]], [5, 6]), ("", ""),
])
def test_prompt_forms(prompt, expect):
    assert parse_completion_request({"prompt": prompt}, MODELS, n_vocab=100).prompt == expect


@pytest.mark.parametrize("prompt, needle", [
    (None, "required"), (3, "must be"), ([], "empty"), (["a", "b"], "2 prompts"), ([1, "a"], "must be"),
    ([1, 100], "out of the vocabulary"), ([-1], "out of the vocabulary"), ([True], "must be"),
])
def test_bad_prompts(prompt, needle):
    body = {} if prompt is None else {"prompt": prompt}
    e = refused(parse_completion_request, body=body, models=MODELS, n_vocab=100)
    assert needle in e.message and e.param == "prompt"


@pytest.mark.parametrize("field, value, needle", [
    ("max_tokens", "5", "must be an integer"), ("max_tokens", 0, "at least 1"), ("max_tokens", True, "integer"),
    ("temperature", "hot", "must be a number"), ("temperature", 2.5, "between 0 and 2"),
    ("top_p", 1.5, "above 0 and at most 1"), ("top_p", 0, "above 0"), ("top_k", -1, "at least 0"), ("seed", 1.5, "integer"),
    ("stop", 3, "string or an array"), ("stop", ["a", "b", "c", "d", "e"], "at most 4"),
    ("stream", "yes", "boolean"), ("n", 2, "must be 1"), ("best_of", 3, "must be 1"),
    ("echo", True, "not supported"), ("logprobs", 1, "not supported"), ("logprobs", 0, "not supported"),
    ("suffix", "end", "not supported"), ("presence_penalty", 0.5, "not supported"),
    ("frequency_penalty", 3, "between"), ("logit_bias", {"5": 1}, "not supported"),
    ("model", "gpt-4o", "does not exist"), ("model", 5, "must be a string"),
    ("stream_options", "x", "must be an object"),
])
def test_bad_completion_fields(field, value, needle):
    e = refused(completion, **{field: value})
    assert needle in e.message and e.param == field


def test_unknown_model_has_openai_s_code():
    assert refused(completion, model="gpt-4o").code == "model_not_found"


def test_include_usage_only_with_stream():
    assert not completion(stream_options={"include_usage": True}).include_usage


def test_empty_stop_strings_are_dropped():
    assert completion(stop=["", "x"]).stop == ("x",)


def test_chat_parameters():
    req = chat(max_tokens=9, max_completion_tokens=7, logprobs=False, tools=[],
               response_format={"type": "text"})
    assert req.kind == "chat" and req.max_tokens == 7 and req.prompt is None
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert chat().max_tokens is None  # up to the context, as OpenAI


def test_chat_messages_pass_to_the_template_as_given():
    messages = [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}], "name": "ann"}]
    assert chat(messages=messages).messages == messages


@pytest.mark.parametrize("body, param", [
    ({"messages": None}, "messages"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
    ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "function"}]}, "tools"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_bad_chat_fields(body, param):
    assert refused(chat, **body).param == param


def test_sampling_options_fit_the_context():
    req = completion(max_tokens=100, stop=["a"])
    opts = req.sampling(room=10, extra_stop=("<|end|>", "a"))
    assert opts.max_tokens == 10 and opts.stop == ("a", "<|end|>") and opts.temperature == 1.0
    assert chat().sampling(room=50).max_tokens == 50


USAGE = Usage(prompt_tokens=5, completion_tokens=3, cached_tokens=2)


def test_usage_body():
    assert usage_body(USAGE) == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                                 "prompt_tokens_details": {"cached_tokens": 2}}


def test_completion_bodies():
    r = Reply("text", "tiny.gguf", created=123)
    assert r.id.startswith("cmpl-")
    full = r.full("abc", "length", USAGE)
    assert full == {"id": r.id, "object": "text_completion", "created": 123, "model": "tiny.gguf",
                    "choices": [{"index": 0, "text": "abc", "logprobs": None, "finish_reason": "length"}],
                    "usage": usage_body(USAGE)}
    chunk = r.chunk("x")
    assert chunk["choices"] == [{"index": 0, "text": "x", "logprobs": None, "finish_reason": None}]
    assert "usage" not in chunk and chunk["id"] == r.id
    assert r.chunk(finish_reason="stop", usage=USAGE)["usage"] == usage_body(USAGE)
    assert r.usage_chunk(USAGE)["choices"] == []


def test_chat_bodies():
    r = Reply("chat", "tiny.gguf", created=1)
    assert r.id.startswith("chatcmpl-")
    full = r.full("hi", "stop", USAGE)
    assert full["object"] == "chat.completion"
    assert full["choices"][0]["message"] == {"role": "assistant", "content": "hi", "refusal": None}
    assert full["choices"][0]["finish_reason"] == "stop" and full["usage"]["total_tokens"] == 8
    first = r.chunk(role=True, usage=None)
    assert first["object"] == "chat.completion.chunk" and first["usage"] is None
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert r.chunk("yo")["choices"][0]["delta"] == {"content": "yo"}
    last = r.chunk(finish_reason="stop")
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    u = r.usage_chunk(USAGE)
    assert u["object"] == "chat.completion.chunk" and u["choices"] == [] and u["usage"] == usage_body(USAGE)


def test_error_bodies():
    assert error_body("bad") == {"error": {"message": "bad", "type": "invalid_request_error", "param": None,
                                           "code": None}}
    e = context_error(70, 64, "messages")
    assert e.status == 400 and e.code == "context_length_exceeded" and e.param == "messages"
    assert "64" in e.message and "70" in e.message
