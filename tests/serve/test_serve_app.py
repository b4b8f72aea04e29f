"""edgemoe.serve.app over a fake generator: routes, response shapes (checked by the official
openai client too), errors, disconnects and the drain. No native library."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from starlette.testclient import TestClient

from edgemoe.errors import InvalidArgumentError
from edgemoe.serve.app import create_app
from edgemoe.serve.runtime import Runtime
from serve_fakes import FakeEngine, FakeGenerator, FakeTemplate, queue_full

openai = pytest.importorskip("openai")


def make(gen=None, template=FakeTemplate(), engine=None, shutdown_timeout=5.0):
    engine = engine or FakeEngine()
    gen = gen or FakeGenerator()
    runtime = Runtime(engine, gen, template, shutdown_timeout=shutdown_timeout)
    return runtime, create_app(runtime)


@pytest.fixture
def served():
    runtime, app = make()
    with TestClient(app) as client:
        yield client, runtime


def sse(response) -> list:
    """The JSON payloads of an SSE body, and "[DONE]"."""
    out = []
    for block in response.text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(r, status, type_="invalid_request_error"):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == type_ and err["message"]
    return err


# -- shapes -----------------------------------------------------------------------------------

def test_completion(served):
    client, runtime = served
    r = client.post("/v1/completions", json={"model": "fake-moe.gguf", "prompt": "one two", "max_tokens": 10})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "fake-moe.gguf" and body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": "Hello, world!", "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 1}}
    job = runtime.generator.jobs[-1]
    assert job.tokens == [1, 5, 5] and job.options.max_tokens == 10 and job.options.temperature == 1.0


def test_completion_default_max_tokens_is_16_and_length(served):
    client, runtime = served
    runtime.generator.pieces = tuple("abcdefghijklmnopqrstuvwxyz")
    body = client.post("/v1/completions", json={"prompt": "x"}).json()
    assert body["choices"][0]["text"] == "abcdefghijklmnop" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 16


def test_token_id_prompt_skips_the_tokenizer(served):
    client, runtime = served
    assert client.post("/v1/completions", json={"prompt": [7, 8, 9]}).status_code == 200
    assert runtime.generator.jobs[-1].tokens == [7, 8, 9] and runtime.engine.tokenized == []


def test_completion_stream(served):
    client, _ = served
    r = client.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert [c["choices"][0]["text"] for c in chunks] == ["Hello", ",", " world", "!", ""]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["stop"]
    assert chunks[-1]["usage"]["total_tokens"] == 6  # usage rides on the finish chunk
    assert all("usage" not in c for c in chunks[:-1])


def test_chat(served):
    client, runtime = served
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi there"}],
                                                  "stop": ["X"]})
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello, world!", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 4
    # the template wrote the BOS: none added
    assert runtime.engine.tokenized == [("<s> <|user|> hi there <|end|> <|assistant|>", False)]
    job = runtime.generator.jobs[-1]
    assert job.tokens.count(1) == 1
    assert job.options.stop == ("X", "<|end|>")
    assert job.options.max_tokens == 64 - len(job.tokens)  # no max_tokens: the rest of the context


def test_chat_stream(served):
    client, _ = served
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
    chunks = sse(r)[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]] == ["Hello", ",", " world", "!"]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert chunks[-1]["usage"]["prompt_tokens"] > 0
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


def test_chat_stream_with_include_usage_is_openai_s_shape(served):
    client, _ = served
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True,
                                                  "stream_options": {"include_usage": True}})
    events = sse(r)
    assert events[-1] == "[DONE]"
    *chunks, last = events[:-1]
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert last["choices"] == [] and last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 4


def test_models_health_metrics(served):
    client, _ = served
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["fake-moe.gguf"]
    assert client.get("/v1/models/fake-moe.gguf").json()["id"] == "fake-moe.gguf"
    assert_error(client.get("/v1/models/gpt-4"), 404)
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE edgemoe_tpot_seconds summary" in r.text and "edgemoe_active_sequences 0" in r.text
    assert "edgemoe_parallel_sequences 4" in r.text


def test_official_client_parses_every_shape(served):
    client, _ = served
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    c = oai.completions.create(model="fake-moe.gguf", prompt="hi", max_tokens=3)
    assert c.choices[0].text == "Hello, world" and c.choices[0].finish_reason == "length"
    assert c.usage.total_tokens == c.usage.prompt_tokens + 3 and c.usage.prompt_tokens_details.cached_tokens == 1
    ch = oai.chat.completions.create(model="fake-moe", messages=[{"role": "user", "content": "hi"}])
    assert ch.choices[0].message.content == "Hello, world!" and ch.usage.completion_tokens == 4
    parts = list(oai.chat.completions.create(model="fake-moe.gguf", messages=[{"role": "user", "content": "hi"}],
                                             stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == "Hello, world!"
    assert parts[-1].usage.completion_tokens == 4
    text = "".join(p.choices[0].text for p in oai.completions.create(model="fake-moe.gguf", prompt="hi",
                                                                      stream=True))
    assert text == "Hello, world!"
    assert [m.id for m in oai.models.list()] == ["fake-moe.gguf"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="fake-moe.gguf", prompt="hi", echo=True)
    assert e.value.status_code == 400 and e.value.body["param"] == "echo"


# -- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"text"'])
def test_malformed_body(served, raw):
    client, _ = served
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert_error(client.post(path, content=raw, headers={"content-type": "application/json"}), 400)


def test_body_too_large(served):
    client, _ = served
    big = b'{"prompt": "' + b"x" * (16 << 20) + b'"}'
    assert_error(client.post("/v1/completions", content=big), 413)


def test_wrong_types_and_unknown_model(served):
    client, _ = served
    err = assert_error(client.post("/v1/completions", json={"prompt": "x", "max_tokens": "many"}), 400)
    assert err["param"] == "max_tokens"
    err = assert_error(client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": []}), 400)
    assert err["param"] == "model" and err["code"] == "model_not_found"


def test_prompt_longer_than_the_context(served):
    client, runtime = served
    err = assert_error(client.post("/v1/completions", json={"prompt": "w " * 100}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    err = assert_error(client.post("/v1/chat/completions",
                                   json={"messages": [{"role": "user", "content": "w " * 100}]}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert runtime.generator.jobs == []


def test_template_refusal_is_400(served):
    client, _ = served
    err = assert_error(client.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}),
                       400)
    assert "wizard" in err["message"]


def test_no_chat_template():
    _, app = make(template=None)
    with TestClient(app) as client:
        err = assert_error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}),
                           400)
        assert err["code"] == "no_chat_template"
        assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 200


def test_queue_full_is_503_with_retry_after():
    _, app = make(FakeGenerator(submit_error=queue_full()))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "x"})
        err = assert_error(r, 503, "server_error")
        assert r.headers["retry-after"] == "3" and err["code"] == "queue_full"


def test_generator_refusing_options_is_400():
    _, app = make(FakeGenerator(submit_error=InvalidArgumentError("top_k too large")))
    with TestClient(app) as client:
        assert "top_k" in assert_error(client.post("/v1/completions", json={"prompt": "x"}), 400)["message"]


def test_error_after_accepting(served):
    client, runtime = served
    runtime.generator.error = "llama_decode failed"
    err = assert_error(client.post("/v1/completions", json={"prompt": "x"}), 500, "server_error")
    assert err["message"] == "llama_decode failed"
    events = sse(client.post("/v1/completions", json={"prompt": "x", "stream": True}))
    assert events[0]["choices"][0]["text"] == "Hello"
    assert events[1]["error"]["message"] == "llama_decode failed" and events[-1] == "[DONE]"


def test_unknown_route_and_method(served):
    client, _ = served
    err = assert_error(client.get("/v1/nothing"), 404)
    assert err["message"] == "Invalid URL (GET /v1/nothing)"
    assert_error(client.get("/v1/completions"), 405)


def test_handler_bug_is_json_500():
    runtime, app = make()
    runtime.generator.metrics = lambda: 1 / 0
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/metrics")
        assert_error(r, 500, "server_error")
        assert "Traceback" not in r.text


# -- disconnects and shutdown -----------------------------------------------------------------

def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_dropped_stream_cancels_its_job():
    runtime, app = make(FakeGenerator(pieces=["x"] * 1000, delay=0.01))
    with TestClient(app) as client:
        with client.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True, "max_tokens": 1000}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert got[0].startswith("data: ")
        job = runtime.generator.jobs[-1]
        wait_for(job.cancelled.is_set)
        wait_for(lambda: runtime.jobs_in_flight == 0)
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


async def _call(app, body: dict, disconnect_after: float) -> list:
    """Runs one request through the ASGI app; the client leaves after `disconnect_after` s."""
    sent = []
    raw = json.dumps(body).encode()
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_cancels_at_once(stream):
    runtime, app = make(FakeGenerator(pieces=["x"] * 1000, delay=0.01))
    runtime.start()
    t0 = time.monotonic()
    asyncio.run(_call(app, {"prompt": "x", "max_tokens": 1000, "stream": stream}, disconnect_after=0.2))
    assert time.monotonic() - t0 < 2.0  # not the 10 s the whole answer takes
    job = runtime.generator.jobs[-1]
    assert job.cancelled.is_set() and runtime.jobs_in_flight == 0


def test_drain_lets_running_requests_finish_then_refuses():
    runtime, app = make(FakeGenerator(pieces=["x"] * 30, delay=0.01))
    with TestClient(app) as client:
        results = {}

        def stream():
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                          "stream": True, "max_tokens": 30})
            results["events"] = sse(r)

        t = threading.Thread(target=stream)
        t.start()
        wait_for(lambda: runtime.jobs_in_flight == 1)
        drained = threading.Thread(target=client.portal.call, args=(runtime.drain,))
        drained.start()
        wait_for(lambda: runtime.draining)
        r = client.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "shutting down"}
        err = assert_error(client.post("/v1/completions", json={"prompt": "x"}), 503, "server_error")
        assert err["code"] == "shutting_down"
        t.join(10)
        drained.join(10)
        events = results["events"]
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "stop"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "x" * 30
        assert runtime.generator.shutdown_calls == [(True, 30.0)]
    assert runtime.engine.closed


def test_drain_timeout_cuts_streams_cleanly():
    runtime, app = make(FakeGenerator(pieces=["x"] * 1000, delay=0.01), shutdown_timeout=0.2)
    with TestClient(app) as client:
        results = {}

        def stream():
            r = client.post("/v1/completions", json={"prompt": "x", "stream": True, "max_tokens": 1000})
            results["events"] = sse(r)

        t = threading.Thread(target=stream)
        t.start()
        wait_for(lambda: runtime.jobs_in_flight == 1)
        client.portal.call(runtime.drain)
        t.join(10)
        events = results["events"]
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down"
        assert events[0]["choices"][0]["text"] == "x"


def test_lifespan_closes_the_engine_once():
    runtime, app = make()
    with TestClient(app):
        assert runtime.generator.started
    assert runtime.engine.closed and runtime.generator.shutdown_calls == [(True, 30.0)]
    runtime.stop()
    assert len(runtime.generator.shutdown_calls) == 1
