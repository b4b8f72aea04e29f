"""edgemoe.serve.sse: frames, and a response that ends its stream however the client leaves."""

from __future__ import annotations

import asyncio

from edgemoe.serve.sse import DONE, EventStreamResponse, frame


def test_frame():
    assert frame({"a": "é", "b": [1]}) == 'data: {"a":"é","b":[1]}\n\n'.encode()
    assert DONE == b"data: [DONE]\n\n"


def run(response, receive, send):
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}
    asyncio.run(response(scope, receive, send))


def test_a_whole_stream_then_on_close():
    sent, closed = [], []

    async def frames():
        yield frame({"n": 1})
        yield DONE

    async def receive():
        await asyncio.sleep(10)

    async def send(message):
        sent.append(message)

    run(EventStreamResponse(frames(), on_close=lambda: closed.append(1)), receive, send)
    assert sent[0]["type"] == "http.response.start"
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    assert b"".join(m.get("body", b"") for m in sent[1:]) == frame({"n": 1}) + DONE
    assert closed == [1]


def test_client_gone_mid_stream_closes_the_generator():
    state = {"finally": False}

    async def frames():
        try:
            while True:
                yield b"data: x\n\n"
                await asyncio.sleep(0.01)
        finally:
            state["finally"] = True

    async def receive():
        await asyncio.sleep(0.1)
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    closed = []
    run(EventStreamResponse(frames(), on_close=lambda: closed.append(1)), receive, send)
    assert state["finally"] and closed == [1]


def test_client_gone_before_the_first_frame_still_closes():
    started = []

    async def frames():
        started.append(1)
        yield DONE

    async def receive():
        await asyncio.sleep(10)

    async def send(message):
        raise OSError("connection reset")  # as an ASGI 2.4 server reports a client gone

    closed = []
    run(EventStreamResponse(frames(), on_close=lambda: closed.append(1)), receive, send)
    assert started == [] and closed == [1]
