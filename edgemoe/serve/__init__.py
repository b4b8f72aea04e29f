"""`edgemoe serve`: an OpenAI-compatible HTTP server over the BatchGenerator.

Built on starlette and uvicorn: a small, well-kept ASGI toolkit and server with no framework
magic. Server-sent events are a StreamingResponse over an async generator, and a client that
leaves shows up as an `http.disconnect` message or a failed send, which is what cancelling its
generation at once needs.

Modules, one job each:
  cli.py         the click command: options, model load, the ready line
  server.py      uvicorn on a socket bound up front; SIGTERM/SIGINT drain and exit 0
  app.py         the starlette routes and the bridge from generator events to responses
  runtime.py     engine + generator + chat template, jobs in flight, the drain
  openai_api.py  request validation and response/chunk/error bodies, as plain dicts
  sse.py         SSE frames and a response that notices disconnects
  metrics.py     Prometheus text for GET /metrics

docs/serve.md describes the API and its choices.
"""
