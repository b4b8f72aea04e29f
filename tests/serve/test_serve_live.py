"""`edgemoe serve` for real: the tiny default model behind the expert cache, in a child
process, driven by the official openai client and raw httpx. Skips without the native library."""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time

import pytest

from conftest import REPO, needs_cache

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = needs_cache

MODEL = REPO / "models" / "edgemoe-tiny-q8_0.gguf"
MODEL_ID = MODEL.name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m edgemoe serve` on a free loopback port, ready once /health says ok."""

    def __init__(self, env, *args, ready_timeout=120.0, model=MODEL):
        import subprocess

        if not MODEL.exists():
            pytest.skip(f"{MODEL} not found")
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "edgemoe", "serve", "-m", str(model),
                                      "--port", str(self.port), *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        end = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end, "the server did not become ready"
            time.sleep(0.1)

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", **kw)

    def stop(self, timeout=60.0) -> str:
        """SIGTERM, then the exit code must be 0; returns stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except Exception:
            self.proc.kill()
            raise
        err = self.proc.stderr.read()
        assert code == 0, err
        assert "Traceback" not in err, err
        assert f"edgemoe: serving {self.model} on {self.url} (" in err
        return err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(edgemoe_env):
    srv = Server(edgemoe_env, "--parallel", "4", "--expert-cache", "50%")
    try:
        yield srv
        srv.stop()
    finally:
        srv.kill()


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_completion(server):
    c = server.client().completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=12,
                                           temperature=0)
    assert c.object == "text_completion" and c.model == MODEL_ID and c.id.startswith("cmpl-")
    assert c.choices[0].finish_reason in ("stop", "length") and isinstance(c.choices[0].text, str)
    assert c.usage.prompt_tokens > 0 and 0 < c.usage.completion_tokens <= 12
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    again = server.client().completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=12,
                                               temperature=0)
    assert again.choices[0].text == c.choices[0].text  # greedy: the same text
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the sequence kept the prompt


def test_completion_stream(server):
    chunks = list(server.client().completions.create(model=MODEL_ID, prompt="The king", max_tokens=10,
                                                     stream=True))
    assert all(ch.id == chunks[0].id for ch in chunks)
    assert [ch.choices[0].finish_reason for ch in chunks][:-1] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens <= 10 and chunks[-1].usage.prompt_tokens > 0
    assert "".join(ch.choices[0].text for ch in chunks)


def test_chat(server):
    r = server.client().chat.completions.create(model=MODEL_ID, messages=[
        {"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Speak of the sea."}],
        max_completion_tokens=12)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5


def test_chat_stream_with_usage(server):
    chunks = list(server.client().chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=10, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 10
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and chunks[-1].usage.completion_tokens >= 1


def test_eight_concurrent_clients(server):
    before = metric(server.url, "edgemoe_requests_total")
    results, errors = {}, []

    def one(i):
        try:
            client = server.client()
            if i % 2:
                r = client.completions.create(model=MODEL_ID, prompt=f"Chapter {i}.", max_tokens=16, seed=i)
                results[i] = (r.choices[0].text, r.usage)
            else:
                stream = client.chat.completions.create(model=MODEL_ID, max_tokens=16, stream=True,
                                                        messages=[{"role": "user", "content": f"Number {i}?"}])
                chunks = list(stream)
                results[i] = ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                              chunks[-1].usage)
        except Exception as e:  # reported below, with the client's number
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(results) == list(range(8))
    for text, usage in results.values():
        assert 1 <= usage.completion_tokens <= 16 and usage.prompt_tokens > 0
    assert metric(server.url, "edgemoe_requests_total") == before + 8


def test_client_dropping_mid_stream(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json={"model": MODEL_ID, "prompt": "Long ago",
                                                            "max_tokens": 1500, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                got += line.startswith("data: ")
                if got == 2:
                    break  # leaving the loop closes the stream
        end = time.monotonic() + 3.0
        while metric(server.url, "edgemoe_active_sequences") != 0:
            assert time.monotonic() < end, "the dropped request still holds its sequence"
            time.sleep(0.05)
        r = client.post("/v1/completions", json={"prompt": "Again", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4


def test_errors(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": "lots"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
        assert r.status_code == 400 and "wizard" in r.json()["error"]["message"]
        r = client.get("/v1/none")
        assert r.status_code == 404 and r.json()["error"]["message"] == "Invalid URL (GET /v1/none)"
    with pytest.raises(openai.BadRequestError) as e:
        server.client(max_retries=0).completions.create(model="gpt-4o", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        server.client(max_retries=0).completions.create(model=MODEL_ID, prompt="the sea " * 2000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        server.client(max_retries=0).chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "the sea " * 2000}])
    assert e.value.body["code"] == "context_length_exceeded"


def test_models_health_metrics(server):
    assert [m.id for m in server.client().models.list()] == [MODEL_ID]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in ("edgemoe_requests_total", "edgemoe_prompt_tokens_total", "edgemoe_completion_tokens_total",
                 "edgemoe_tpot_seconds", "edgemoe_queue_depth", "edgemoe_active_sequences",
                 "edgemoe_expert_cache_hit_rate", "edgemoe_expert_cache_hits_total",
                 "edgemoe_expert_cache_misses_total", "edgemoe_expert_bytes_read_total",
                 "edgemoe_expert_stall_seconds_total", "edgemoe_unique_experts_per_step"):
        assert f"# TYPE {name} " in r.text
    assert metric(server.url, "edgemoe_expert_cache_hits_total") > 0  # the cache is on at 50 %
    assert 0 < metric(server.url, "edgemoe_expert_cache_hit_rate") <= 1


def test_queue_full_then_sigterm_during_a_stream(edgemoe_env):
    srv = Server(edgemoe_env, "--parallel", "1", "--max-queue", "0", "--expert-cache", "50%")
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json={"prompt": "Long ago", "max_tokens": 400,
                                                                "stream": True}) as r:
                lines = r.iter_lines()
                first = []
                for line in lines:
                    if line.startswith("data: "):
                        first.append(line[6:])
                        if len(first) == 2:
                            break
                busy = httpx.post(srv.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
                assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
                assert busy.json()["error"]["code"] == "queue_full"
                srv.proc.send_signal(signal.SIGTERM)
                rest = [line[6:] for line in lines if line.startswith("data: ")]
        events = first + rest
        assert events[-1] == "[DONE]"  # finished (or cut with an error frame), never torn
        last = json.loads(events[-2])
        assert last.get("error", {}).get("code") == "shutting_down" or \
            last["choices"][0]["finish_reason"] in ("stop", "length")
        srv.stop()
    finally:
        srv.kill()
