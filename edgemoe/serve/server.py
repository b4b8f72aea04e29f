"""uvicorn on a socket we bound ourselves, and what SIGTERM/SIGINT do.

The socket is bound (and listening) before the model loads, so a port in use fails at once with
one line; connections made during the load wait in the backlog until the server is ready.

uvicorn's own first-signal behaviour is to close the listener and, after the connections end,
re-raise the signal, so the process dies of it. Ours, through `handle_exit`:

1. first SIGTERM/SIGINT: drain. The listener stays open; new requests get 503 and /health
   says 503, running requests finish (up to the shutdown timeout, then they are cancelled and
   their streams end with an error frame), the generator stops; then uvicorn shuts down,
   the app's lifespan closes the engine, and the process exits 0.
2. second: cancel every running request now (the drain then ends at once).
3. third: uvicorn's force exit.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from types import FrameType
from typing import Callable, Optional

import uvicorn

from edgemoe.serve.runtime import Runtime

# a backstop for uvicorn's wait on open connections once the drain is done
_CONNECTIONS_TIMEOUT_S = 5


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on host:port; OSError as the system reports it."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restarts within TIME_WAIT
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _log_to_stderr(verbose: bool) -> None:
    """uvicorn's log as `edgemoe: ...` lines; its info and access lines only with verbose."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("edgemoe: %(message)s"))
    for name in ("uvicorn", "edgemoe.serve"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.propagate = False
        log.setLevel(logging.INFO if verbose else logging.WARNING)


class Server(uvicorn.Server):
    """uvicorn.Server that drains the Runtime on the first signal and exits without re-raising it."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime, on_ready: Callable[[], None]):
        super().__init__(config)
        self.runtime = runtime
        self._on_ready = on_ready
        self._signals = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._drain_task: Optional[asyncio.Future] = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            self._on_ready()

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        # a Python signal handler: it runs on the loop's thread, between two bytecodes
        self._signals += 1
        if self._loop is None or not self.started:
            self.should_exit = True
        elif self._signals == 1:
            self._loop.call_soon_threadsafe(self._begin_drain)
        elif self._signals == 2:
            self._loop.call_soon_threadsafe(self.runtime.cancel_all)
        else:
            self.force_exit = True

    def _begin_drain(self) -> None:
        async def drain() -> None:
            try:
                await self.runtime.drain()
            finally:
                self.should_exit = True

        self._drain_task = asyncio.ensure_future(drain())


def serve(app, runtime: Runtime, sock: socket.socket, on_ready: Callable[[], None], verbose: bool = False) -> bool:
    """Serves app on sock until a signal drains it. Returns False if the server did not start
    (its lifespan failed; uvicorn logged why)."""
    _log_to_stderr(verbose)
    config = uvicorn.Config(app, log_config=None, log_level="info" if verbose else "warning",
                            access_log=verbose, lifespan="on", server_header=False,
                            timeout_graceful_shutdown=_CONNECTIONS_TIMEOUT_S)
    server = Server(config, runtime, on_ready)
    server.run(sockets=[sock])
    return server.started
