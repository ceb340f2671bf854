"""The FastAPI app: OpenAI-compatible routes over a `ModelRegistry` and a `Batcher`, plus the chat page at `/`.

    GET  /                      the chat page (static files, nothing loaded from elsewhere)
    GET  /health                {"status": "ok", decoding rows, waiting requests, counters}
    GET  /v1/models             the run's stages that have a checkpoint; GET /v1/models/{stage}
    POST /v1/chat/completions   ChatML prompt (`babyllama.data.chat_template.render_prompt`), reply until <|im_end|>
    POST /v1/completions        plain continuation of `prompt` (e.g. a pretrain checkpoint), until </s>

Safe by default: an API key (when set) is required on every API route (the static page itself holds no data and
asks for the key); a POST body must be `application/json` (so a page on another site cannot send one without a CORS
preflight, and there is no CORS unless `cors_origins` is given); served on loopback, a `Host` header naming another
host is refused (DNS rebinding).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from babyllama.data.chat_template import render_prompt
from babyllama.errors import UserError
from babyllama.serve.batcher import Batcher, Busy, Job, Params, asyncio_emitter
from babyllama.serve.models import ModelRegistry, Served
from babyllama.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    chat_choice,
    chat_delta,
    completion_choice,
    envelope,
    error_body,
    new_id,
    parse_chat,
    parse_completion,
    usage,
)

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
# The browser itself refuses anything the page would load or send elsewhere, and inline scripts.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


@dataclass
class Settings:
    api_key: str | None = None
    max_tokens: int | None = None  # cap on a request's max_tokens (None: the model's context)
    max_body_bytes: int = 1 << 20
    cors_origins: list[str] = field(default_factory=list)
    loopback_only: bool = True  # refuse Host headers that do not name this machine
    default_model: str = "sft"  # the stage the chat page picks first


def create_app(registry: ModelRegistry, batcher: Batcher, settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()  # waiting clients get an error event instead of hanging

    app = FastAPI(title="babyllama", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
                  dependencies=[Depends(_host_check(settings))])
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    _install_error_handlers(app)
    api = APIRouter(dependencies=[Depends(_key_check(settings))])
    handler = _Handler(registry, batcher, settings)

    @api.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "default_model": settings.default_model, "loaded": handler.loaded(),
                **batcher.load()}

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(s, p) for s, p in registry.available().items()]}

    @api.get("/v1/models/{stage}")
    async def model(stage: str) -> dict[str, Any]:
        found = registry.available().get(stage)
        if found is None:
            raise _unknown_model(registry, stage)
        return _model_card(stage, found)

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _read_json(request, settings.max_body_bytes)
        return await handler.answer(request, parse_chat(body, batcher.max_rows))

    @api.post("/v1/completions")
    async def complete(request: Request) -> Response:
        body = await _read_json(request, settings.max_body_bytes)
        return await handler.answer(request, parse_completion(body, batcher.max_rows))

    app.include_router(api)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class _Handler:
    """Turns a checked request into a `Job` and its events into a JSON reply or a server-sent event stream."""

    def __init__(self, registry: ModelRegistry, batcher: Batcher, settings: Settings):
        self.registry, self.batcher, self.settings = registry, batcher, settings

    def loaded(self) -> list[str]:
        return sorted(self.registry._loaded)  # noqa: SLF001 (read-only view for /health)

    async def answer(self, request: Request, req: ChatRequest | CompletionRequest) -> Response:
        served = await self._served(req.model)
        chat = isinstance(req, ChatRequest)
        prompt = render_prompt(req.messages, served.tokenizer) if chat else served.tokenizer.encode(req.prompt,
                                                                                                      bos=True)
        params = self._params(req, served, len(prompt), "messages" if chat else "prompt")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stops = served.chat_stops if chat else [served.tokenizer.eos_id]
        job = Job(served, prompt, params, stops, asyncio_emitter(loop, events))
        try:
            self.batcher.submit(job)
        except Busy as e:
            raise ApiError(429, f"the server is busy: {e}; retry shortly", code="server_busy",
                           kind="rate_limit_error") from None
        kind = ("chat.completion" if chat else "text_completion")
        rid = new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            return StreamingResponse(self._stream(job, events, req, rid, kind, len(prompt)),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request, job, events, req, rid, kind, len(prompt))

    async def _served(self, stage: str) -> Served:
        try:
            served = await run_in_threadpool(self.registry.get, stage)
        except UserError as e:  # the checkpoint exists but cannot be used: the operator's problem, said plainly
            raise ApiError(500, f"model '{stage}' cannot be loaded: {e}", "model", kind="server_error") from None
        if served is None:
            raise _unknown_model(self.registry, stage)
        return served

    def _params(self, req: Sampling, served: Served, prompt_len: int, prompt_param: str) -> Params:
        cap = min(self.settings.max_tokens or served.context, served.context)
        if req.max_tokens is not None and req.max_tokens > cap:
            key = "max_tokens"
            raise ApiError(400, f"'{key}' is {req.max_tokens}, above this server's limit of {cap} tokens", key,
                           "invalid_value")
        room = served.context - prompt_len
        if room < 1:
            raise ApiError(400, f"this model's context is {served.context} tokens and the {prompt_param} take "
                                f"{prompt_len}, leaving no room for a reply; shorten them", prompt_param,
                           "context_length_exceeded")
        seed = req.seed if req.seed is not None else random.SystemRandom().getrandbits(63)
        return Params(max_tokens=min(req.max_tokens or cap, room), temperature=req.temperature, top_p=req.top_p,
                      top_k=req.top_k, stop=req.stop, seed=seed % 2**64, n=req.n)

    async def _collect(self, request: Request, job: Job, events: asyncio.Queue, req: Sampling, rid: str, kind: str,
                       prompt_len: int) -> JSONResponse:
        texts, finish, produced = [""] * req.n, [None] * req.n, [0] * req.n
        try:
            while None in finish:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse({}, status_code=499)  # nobody reads it
                    continue
                if event[0] == "error":
                    raise ApiError(500, event[1], kind="server_error")
                if event[0] == "text":
                    texts[event[1]] += event[2]
                else:
                    finish[event[1]], produced[event[1]] = event[2], event[3]
        finally:
            job.cancel()  # a no-op once every row ended; frees the rows when this task is cancelled
        make = chat_choice if kind == "chat.completion" else completion_choice
        choices = [make(i, t, f) for i, (t, f) in enumerate(zip(texts, finish))]
        return JSONResponse(envelope(rid, kind, req.model, choices, usage=usage(prompt_len, sum(produced))))

    async def _stream(self, job: Job, events: asyncio.Queue, req: Sampling, rid: str, kind: str,
                      prompt_len: int) -> AsyncIterator[str]:
        """Server-sent events: one chunk per text piece, a last chunk per choice with its finish_reason, a usage
        chunk when asked (stream_options.include_usage), then `data: [DONE]`. A client that goes away cancels the
        job (Starlette cancels this generator), which frees its rows at the next step."""
        chat = kind == "chat.completion"
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if req.include_usage else {}

        def chunk(choice: dict[str, Any], **more: Any) -> str:
            return _sse(envelope(rid, chunk_kind, req.model, [choice], **extra, **more))

        def piece(i: int, text: str) -> dict[str, Any]:
            return chat_delta(i, {"content": text}) if chat else completion_choice(i, text, None)

        def last(i: int, finish: str) -> dict[str, Any]:
            return chat_delta(i, {}, finish) if chat else completion_choice(i, "", finish)

        try:
            if chat:  # the role comes first, as OpenAI sends it
                for i in range(req.n):
                    yield chunk(chat_delta(i, {"role": "assistant", "content": ""}))
            open_rows, produced = req.n, 0
            while open_rows:
                event = await events.get()
                if event[0] == "error":
                    yield _sse(error_body(event[1], "server_error"))
                    break
                if event[0] == "text":
                    yield chunk(piece(event[1], event[2]))
                else:
                    open_rows, produced = open_rows - 1, produced + event[3]
                    yield chunk(last(event[1], event[2]))
            else:
                if req.include_usage:
                    yield _sse(envelope(rid, chunk_kind, req.model, [], usage=usage(prompt_len, produced)))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _model_card(stage: str, checkpoint: Path) -> dict[str, Any]:
    return {"id": stage, "object": "model", "created": int(checkpoint.stat().st_mtime), "owned_by": "babyllama",
            "checkpoint": checkpoint.name}


def _unknown_model(registry: ModelRegistry, stage: str) -> ApiError:
    have = ", ".join(registry.available()) or "none (train a stage first)"
    return ApiError(404, f"the model '{stage}' does not exist; this run has: {have}", "model", "model_not_found")


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 415 unless sent as JSON, 413 past `limit` bytes (counted as it arrives), 400 if malformed."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "send the body as JSON with 'Content-Type: application/json'", code="unsupported_media")
    too_large = ApiError(413, f"the request body is larger than this server's limit of {limit:,} bytes",
                         code="request_too_large")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None


def _key_check(settings: Settings) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>' (the key given to "
                                "the server with --api-key or BABYLLAMA_API_KEY)", code="invalid_api_key")
    return check


def _host_check(settings: Settings) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if not settings.loopback_only:
            return
        host = urlsplit("//" + request.headers.get("host", "")).hostname or ""
        if host not in LOOPBACK_HOSTS:
            raise ApiError(403, f"this server listens on loopback only and does not answer for host '{host}'",
                           code="forbidden_host")
    return check


def _install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's schema, whatever raised it."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(e.errors()[:1]), "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)


def key_from_env(flag: str | None) -> str | None:
    """--api-key, else BABYLLAMA_API_KEY, else None (no key)."""
    return flag or os.environ.get("BABYLLAMA_API_KEY") or None
