"""`python run_fake_server.py PIECES DELAY SHUTDOWN_TIMEOUT`: edgemoe.serve's real uvicorn server
over the fake generator, on a free loopback port, printing the ready line (for test_serve_server)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from edgemoe.serve.app import create_app  # noqa: E402
from edgemoe.serve.runtime import Runtime  # noqa: E402
from edgemoe.serve.server import bind, serve, url_of  # noqa: E402
from serve_fakes import FakeEngine, FakeGenerator, FakeTemplate  # noqa: E402


def main() -> int:
    pieces, delay, timeout = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    engine = FakeEngine(n_ctx_seq=4096)
    runtime = Runtime(engine, FakeGenerator(pieces=["x"] * pieces, delay=delay, n_ctx_seq=4096), FakeTemplate(),
                      shutdown_timeout=timeout)
    sock = bind("127.0.0.1", 0)
    url = url_of(sock)
    runtime.start()
    serve(create_app(runtime), runtime, sock, lambda: print(f"edgemoe: serving fake on {url} (4 sequences)",
                                                            file=sys.stderr, flush=True))
    print(f"engine closed: {engine.closed}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
