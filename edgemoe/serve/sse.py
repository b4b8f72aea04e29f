"""Server-sent events: `data: {json}` frames, and a response that notices a client leaving.

Starlette's StreamingResponse already listens for `http.disconnect` under ASGI < 2.4 and maps a
failed send to ClientDisconnect under 2.4; EventStreamResponse does both whatever the server's
version, and closes the chunk generator in either case, so that its `finally` (which cancels
the generation) runs at once rather than when the garbage collector gets to it.
"""

from __future__ import annotations

import json
from typing import AsyncIterator, Callable, Optional

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def frame(obj: dict) -> bytes:
    """One SSE event carrying obj as compact JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """text/event-stream from an async generator of frames; stops it when the client leaves."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes], on_close: Optional[Callable[[], None]] = None):
        """on_close runs when the response ends, however it ends: also where the client left
        before the first frame, when the generator never started and its `finally` never runs."""
        super().__init__(frames, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._frames = frames
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client is gone (ASGI 2.4 servers raise on send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            aclose = getattr(self._frames, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
            if self._on_close is not None:
                self._on_close()
