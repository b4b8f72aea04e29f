"""edgemoe.serve.server: the real uvicorn server over the fake generator, in a child process,
for what only signals show: drain on SIGTERM/SIGINT, 503 meanwhile, exit 0, streams intact.
Also the command's one-line errors that come before the model loads."""

from __future__ import annotations

import json
import pathlib
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import assert_one_line_error

httpx = pytest.importorskip("httpx")

HERE = pathlib.Path(__file__).resolve().parent


class Child:
    """A server process and its URL (from the ready line)."""

    def __init__(self, args, env, ready_timeout=60.0):
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
                                     text=True, bufsize=1)
        self.lines = []
        self.url = None
        end = time.monotonic() + ready_timeout
        while self.url is None:
            line = self.readline(end - time.monotonic())
            if line is None:
                self.proc.kill()
                raise AssertionError(f"no ready line; stderr: {''.join(self.lines)}")
            if " serving " in line and " on http://" in line:
                self.url = line.split(" on ", 1)[1].split()[0]

    def readline(self, timeout):
        if timeout <= 0 or not select.select([self.proc.stderr], [], [], timeout)[0]:
            return None
        line = self.proc.stderr.readline()
        if not line:
            return None
        self.lines.append(line)
        return line

    def finish(self, timeout=30.0):
        """Waits for the exit; returns (code, all of stderr)."""
        code = self.proc.wait(timeout)
        rest = self.proc.stderr.read()
        return code, "".join(self.lines) + rest

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def fake_server(edgemoe_env):
    children = []

    def start(pieces=20, delay=0.01, shutdown_timeout=30.0):
        child = Child([sys.executable, str(HERE / "run_fake_server.py"), str(pieces), str(delay),
                       str(shutdown_timeout)], edgemoe_env)
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()


def data_lines(lines, n=None):
    """Up to n SSE payloads from an iterator over a streamed response's lines (all with n=None).
    Take one `response.iter_lines()` for every call: a loop left early closes httpx's stream."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line[6:])
            if n is not None and len(out) == n:
                break
    return out


def test_sigterm_lets_a_stream_finish_and_exits_0(fake_server):
    child = fake_server(pieces=60, delay=0.02)
    with httpx.Client(base_url=child.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions",
                           json={"prompt": "x", "stream": True, "max_tokens": 60}) as r:
            lines = r.iter_lines()
            first = data_lines(lines, 2)
            child.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            with httpx.Client(base_url=child.url, timeout=5) as other:
                assert other.get("/health").status_code == 503
                r2 = other.post("/v1/completions", json={"prompt": "x"})
                assert r2.status_code == 503 and r2.json()["error"]["code"] == "shutting_down"
            rest = data_lines(lines)
    events = first + rest
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "x" * 60
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] == 60
    code, err = child.finish()
    assert code == 0, err
    assert "Traceback" not in err and "engine closed: True" in err


def test_shutdown_timeout_cuts_a_stream_cleanly(fake_server):
    child = fake_server(pieces=10000, delay=0.01, shutdown_timeout=0.5)
    with httpx.Client(base_url=child.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions",
                           json={"prompt": "x", "stream": True, "max_tokens": 10000}) as r:
            lines = r.iter_lines()
            first = data_lines(lines, 2)
            t0 = time.monotonic()
            child.proc.send_signal(signal.SIGTERM)
            rest = data_lines(lines)
            assert time.monotonic() - t0 < 10
    events = first + rest
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutting_down"
    code, err = child.finish()
    assert code == 0, err
    assert "Traceback" not in err


def test_second_signal_cancels_at_once(fake_server):
    child = fake_server(pieces=10000, delay=0.01, shutdown_timeout=60)
    with httpx.Client(base_url=child.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 10000}) as r:
            lines = r.iter_lines()
            data_lines(lines, 2)
            t0 = time.monotonic()
            child.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            child.proc.send_signal(signal.SIGINT)
            rest = data_lines(lines)
            assert time.monotonic() - t0 < 10
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == "shutting_down"
    code, err = child.finish()
    assert code == 0, err


@pytest.mark.parametrize("stream", [True, False])
def test_client_leaving_frees_its_sequence(fake_server, stream):
    child = fake_server(pieces=10000, delay=0.01)
    body = {"prompt": "x", "stream": stream, "max_tokens": 10000}
    with httpx.Client(base_url=child.url, timeout=30) as client:
        if stream:
            with client.stream("POST", "/v1/completions", json=body) as r:
                data_lines(r.iter_lines(), 2)  # leaving the loop closes the stream
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/completions", json=body, timeout=0.5)

        def active() -> str:
            text = client.get("/metrics").text
            return next(line for line in text.splitlines() if line.startswith("edgemoe_active_sequences "))

        end = time.monotonic() + 2.0
        while active() != "edgemoe_active_sequences 0":
            assert time.monotonic() < end, active()
            time.sleep(0.05)
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}).json()["choices"][0][
            "text"] == "xxx"
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish()[0] == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_idle_server_exits_0(fake_server, sig):
    child = fake_server()
    with httpx.Client(base_url=child.url, timeout=5) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 200
    child.proc.send_signal(sig)
    code, err = child.finish(10)
    assert code == 0, err
    assert "Traceback" not in err


def test_port_in_use_is_one_line(edgemoe_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "edgemoe", "serve", "--port", str(port)],
                              capture_output=True, text=True, env=edgemoe_env, timeout=60)
    assert proc.returncode == 1
    assert_one_line_error(proc, "cannot listen", str(port), "in use")


@pytest.mark.parametrize("args, needle", [
    (["--expert-cache", "lots"], "budget"), (["--port", "70000"], "port"), (["--schedule", "random"], "schedule"),
])
def test_bad_options_are_one_line(edgemoe_env, args, needle):
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "serve", *args], capture_output=True, text=True,
                          env=edgemoe_env, timeout=60)
    assert_one_line_error(proc, needle)


def test_help(edgemoe_env):
    proc = subprocess.run([sys.executable, "-m", "edgemoe", "serve", "--help"], capture_output=True, text=True,
                          env=edgemoe_env, timeout=60)
    assert proc.returncode == 0
    for option in ("--model", "--host", "--port", "--parallel", "--ctx-size", "--batch-size", "--threads",
                   "--expert-cache", "--policy", "--io", "--prefetch", "--schedule", "--max-wait", "--max-queue",
                   "--shutdown-timeout", "--seed", "--verbose"):
        assert option in proc.stdout
