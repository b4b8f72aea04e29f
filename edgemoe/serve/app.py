"""The starlette app: OpenAI's completion and chat endpoints, /v1/models, /health, /metrics.

A handler validates the body (openai_api), renders and tokenizes the prompt in the threadpool,
submits it to the generator and waits for its events on the loop. Every failure answers in
OpenAI's error shape; a client that leaves (streaming or not) cancels its job at once.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, List, Tuple

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgemoe.chat_session import chat_prompt_tokens
from edgemoe.errors import ContextFullError, EdgemoeError, InvalidArgumentError, QueueFullError, StateError
from edgemoe.generator import DoneEvent, ErrorEvent, TextEvent
from edgemoe.serve import metrics
from edgemoe.serve.openai_api import (ApiError, GenerationRequest, Reply, context_error, error_body, model_card,
                                      model_list, parse_chat_request, parse_completion_request)
from edgemoe.serve.runtime import Runtime
from edgemoe.serve.sse import DONE, EventStreamResponse, frame

MAX_BODY_BYTES = 16 << 20
_DISCONNECTED = object()  # put on a job's queue when its (non-streaming) client leaves


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down",
                    headers={"Connection": "close"})


def _api_error(e: Exception, param: str) -> ApiError:
    """The HTTP answer to an error of the generator, engine or chat template."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return ApiError(503, str(e) or "too many requests are waiting; try again later", type="server_error",
                        code="queue_full", headers={"Retry-After": str(max(1, e.retry_after))})
    if isinstance(e, ContextFullError):
        return ApiError(400, str(e), param=param, code="context_length_exceeded")
    if isinstance(e, StateError):
        return _shutting_down()
    if isinstance(e, InvalidArgumentError):  # ChatTemplateError too: the template refused the chat
        return ApiError(400, str(e), param=param)
    if isinstance(e, EdgemoeError):
        return ApiError(500, str(e), type="server_error")
    raise e


def _json_error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_json(request: Request) -> dict:
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES >> 20} MiB")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"We could not parse the JSON body of your request: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Api:
    """The endpoints, bound to one Runtime."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    # -- generation ---------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        try:
            body = await _read_json(request)
            req = parse_completion_request(body, self.runtime.model_names, self.runtime.n_vocab)
            return await self._generate(request, req, "prompt")
        except ApiError as e:
            return _json_error(e)

    async def chat_completions(self, request: Request) -> Response:
        try:
            body = await _read_json(request)
            req = parse_chat_request(body, self.runtime.model_names)
            if self.runtime.template is None:
                raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages",
                               code="no_chat_template")
            return await self._generate(request, req, "messages")
        except ApiError as e:
            return _json_error(e)

    def _prompt_tokens(self, req: GenerationRequest) -> Tuple[List[int], Tuple[str, ...]]:
        """The prompt's tokens and the template's stop strings (in the threadpool: jinja, tokenizer)."""
        if req.kind == "chat":
            template = self.runtime.template
            return chat_prompt_tokens(self.runtime.engine, template, req.messages), tuple(template.stop)
        if isinstance(req.prompt, str):
            return self.runtime.tokenize(req.prompt), ()
        return list(req.prompt), ()

    async def _generate(self, request: Request, req: GenerationRequest, param: str) -> Response:
        if self.runtime.draining:
            raise _shutting_down()
        try:
            tokens, extra_stop = await run_in_threadpool(self._prompt_tokens, req)
            if not tokens:
                raise ApiError(400, "the prompt is empty", param=param)
            n_ctx_seq = self.runtime.n_ctx_seq
            if len(tokens) >= n_ctx_seq:
                raise context_error(len(tokens), n_ctx_seq, param)
            options = req.sampling(n_ctx_seq - len(tokens), extra_stop)
            job, events = await self.runtime.submit(tokens, options)
        except Exception as e:
            raise _api_error(e, param) from None
        reply = Reply(req.kind, self.runtime.model_id)
        if req.stream:
            # cancelling a job that ended does nothing: on_close may always cancel
            return EventStreamResponse(self._frames(reply, job, events, req.include_usage),
                                       on_close=lambda: self.runtime.release(job, cancel=True))
        return await self._collect(request, reply, job, events)

    async def _collect(self, request: Request, reply: Reply, job: Any, events: asyncio.Queue) -> Response:
        """A non-streaming answer; a client that leaves cancels the job."""
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        watcher.add_done_callback(lambda _: events.put_nowait(_DISCONNECTED))
        parts: List[str] = []
        ended = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, TextEvent):
                    parts.append(event.text)
                    continue
                if event is _DISCONNECTED:
                    return Response(status_code=499)  # nobody reads it
                ended = True
                if isinstance(event, ErrorEvent):
                    return _json_error(ApiError(500, event.message, type="server_error"))
                if event.finish_reason not in ("stop", "length"):
                    return _json_error(ApiError(503, "the server shut down before the completion finished",
                                                type="server_error", code="shutting_down"))
                return JSONResponse(reply.full("".join(parts), event.finish_reason, event.usage))
        finally:
            watcher.cancel()
            self.runtime.release(job, cancel=not ended)

    async def _frames(self, reply: Reply, job: Any, events: asyncio.Queue, include_usage: bool
                      ) -> AsyncIterator[bytes]:
        """The SSE frames of one streamed answer. Without include_usage the usage rides on the
        chunk that carries finish_reason; with it, OpenAI's own way: `"usage": null` on every
        chunk and a last chunk with no choices and the usage."""
        ended = False
        null_usage = {"usage": None} if include_usage else {}
        try:
            if reply.kind == "chat":
                yield frame(reply.chunk(role=True, **null_usage))
            while True:
                event = await events.get()
                if isinstance(event, TextEvent):
                    if event.text:
                        yield frame(reply.chunk(event.text, **null_usage))
                    continue
                ended = True
                if isinstance(event, DoneEvent) and event.finish_reason in ("stop", "length"):
                    if include_usage:
                        yield frame(reply.chunk(finish_reason=event.finish_reason, usage=None))
                        yield frame(reply.usage_chunk(event.usage))
                    else:
                        yield frame(reply.chunk(finish_reason=event.finish_reason, usage=event.usage))
                elif isinstance(event, ErrorEvent):
                    yield frame(error_body(event.message, "server_error"))
                else:  # cancelled by a shutdown: say so, rather than end as if complete
                    yield frame(error_body("the server shut down before the completion finished",
                                           "server_error", code="shutting_down"))
                yield DONE
                return
        finally:
            self.runtime.release(job, cancel=not ended)

    # -- the rest -----------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        return JSONResponse(model_list(self.runtime.model_id, self.runtime.created))

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.runtime.model_names:
            return _json_error(ApiError(404, f"The model '{name}' does not exist", param="model",
                                        code="model_not_found"))
        return JSONResponse(model_card(self.runtime.model_id, self.runtime.created))

    async def health(self, request: Request) -> Response:
        if self.runtime.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        m = self.runtime.generator.metrics()
        text = metrics.render(m, getattr(self.runtime.generator, "n_parallel", None))
        return Response(text, media_type=metrics.CONTENT_TYPE)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}"
    else:
        message = exc.detail
    return JSONResponse(error_body(message, "invalid_request_error"), status_code=exc.status_code,
                        headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # starlette re-raises after this answer, so the server still logs the traceback
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


async def _api_error_handler(request: Request, exc: Exception) -> Response:
    return _json_error(exc)  # an ApiError raised past a handler's own try


def create_app(runtime: Runtime) -> Starlette:
    """The ASGI app. Its lifespan starts the generator and, at shutdown, drains it (running
    requests finish, up to runtime.shutdown_timeout) and closes the engine."""
    api = Api(runtime)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        runtime.start()
        try:
            yield
        finally:
            await runtime.close()

    routes = [
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.model, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: _http_error, ApiError: _api_error_handler,
                                         Exception: _internal_error})
