"""The FastAPI app: OpenAI-compatible routes over a `ModelRegistry` and a `Batcher`, plus the chat page at `/`.

    GET  /                      the chat page (static files, nothing loaded from elsewhere)
    GET  /health                {"status": "ok", decoding rows, waiting requests, counters}
    GET  /metrics               Prometheus' text format (`babyllama.serve.metrics`)
    GET  /v1/models             the run's stages that have a checkpoint; GET /v1/models/{stage}
    GET  /tokenizer_info, POST /tokenize, /detokenize   the run's tokenizer, as vLLM serves it
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
import time
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
from babyllama.model.grammar import Grammar, GrammarCompiler
from babyllama.serve.batcher import Batcher, Busy, Job, Params, asyncio_emitter
from babyllama.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from babyllama.serve.metrics import ServerMetrics
from babyllama.serve.models import ModelRegistry, Served
from babyllama.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Sampling,
    chat_choice,
    chat_delta,
    chat_logprobs,
    completion_choice,
    completion_logprobs,
    envelope,
    error_body,
    new_id,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
    usage,
)
from babyllama.serve.tools import CALL_BLOCK, CALL_OPEN, held_back, parse_calls, render_messages

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
# The browser itself refuses anything the page would load or send elsewhere, and inline scripts.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
COUNTED_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health"}
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
    metrics = ServerMetrics(batcher.load)
    batcher.metrics = metrics
    handler = _Handler(registry, batcher, settings, metrics)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Callable) -> Response:
        response = await call_next(request)
        route = request.url.path
        if route in COUNTED_ROUTES:  # a fixed set of labels, whatever paths clients try
            metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    @api.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type=METRICS_CONTENT_TYPE)

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

    # vLLM's tokenizer routes: what lm-evaluation-harness's `tokenizer_backend=remote` uses to send token ids
    @api.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        tok = registry.tokenizer
        return {"tokenizer_class": type(tok).__name__, "vocab_size": tok.vocab_size,
                "bos_token": tok.id_to_token(tok.bos_id), "eos_token": tok.id_to_token(tok.eos_id),
                "pad_token": tok.id_to_token(tok.pad_id)}

    @api.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        prompt, add_bos = parse_tokenize(await _read_json(request, settings.max_body_bytes))
        # special-token spellings are the tokens (as HF tokenizers and vLLM read them): "</s>" is the eos id
        tokens = registry.tokenizer.encode(prompt, bos=add_bos, allow_special=True)
        return {"tokens": tokens, "count": len(tokens)}

    @api.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        tokens = parse_detokenize(await _read_json(request, settings.max_body_bytes), registry.tokenizer.vocab_size)
        return {"prompt": registry.tokenizer.decode(tokens)}

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _read_json(request, settings.max_body_bytes)
        return await handler.answer(request, parse_chat(body, batcher.max_rows))

    @api.post("/v1/completions")
    async def complete(request: Request) -> Response:
        body = await _read_json(request, settings.max_body_bytes)
        return await handler.answer(request, parse_completion(body, batcher.max_rows, registry.tokenizer.vocab_size))

    app.include_router(api)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class _Handler:
    """Turns a checked request into a `Job` and its events into a JSON reply or a server-sent event stream."""

    def __init__(self, registry: ModelRegistry, batcher: Batcher, settings: Settings, metrics: ServerMetrics):
        self.registry, self.batcher, self.settings, self.metrics = registry, batcher, settings, metrics

    def loaded(self) -> list[str]:
        return sorted(self.registry._loaded)  # noqa: SLF001 (read-only view for /health)

    async def answer(self, request: Request, req: ChatRequest | CompletionRequest) -> Response:
        arrived = time.monotonic()
        served = await self._served(req.model)
        chat = isinstance(req, ChatRequest)
        tok = served.tokenizer
        prompts = [render_prompt(render_messages(req.messages, req.tools), tok)] if chat else [
            tok.encode(p, bos=True) if isinstance(p, str) else p for p in req.prompts]
        grammar = await run_in_threadpool(_grammar, req, tok) if chat else None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stops = served.chat_stops if chat else [tok.eos_id]
        jobs = []
        for p, prompt in enumerate(prompts):  # one job per prompt; choice p * n + c of the reply is its choice c
            params = self._params(req, served, len(prompt), "messages" if chat else "prompt", grammar)
            jobs.append(Job(served, prompt, params, stops, _numbered(asyncio_emitter(loop, events), p, req.n)))
        try:
            for job in jobs:
                self.batcher.submit(job)
        except Busy as e:
            for job in jobs:
                job.cancel()
            raise ApiError(429, f"the server is busy: {e}; retry shortly", code="server_busy",
                           kind="rate_limit_error") from None
        echoed = [p if isinstance(p, str) else tok.decode(p, skip_special=True) for p in req.prompts] if (
            not chat and req.echo) else None
        reply = _Reply(req, tok, echoed, sum(map(len, prompts)), _Observer(self.metrics, req.model, arrived))
        if req.stream:
            return StreamingResponse(self._stream(jobs, events, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request, jobs, events, reply)

    async def _served(self, stage: str) -> Served:
        try:
            served = await run_in_threadpool(self.registry.get, stage)
        except UserError as e:  # the checkpoint exists but cannot be used: the operator's problem, said plainly
            raise ApiError(500, f"model '{stage}' cannot be loaded: {e}", "model", kind="server_error") from None
        if served is None:
            raise _unknown_model(self.registry, stage)
        return served

    def _params(self, req: Sampling, served: Served, prompt_len: int, prompt_param: str,
                grammar: Grammar | None) -> Params:
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
        echo = getattr(req, "echo", False)
        return Params(max_tokens=min(cap if req.max_tokens is None else req.max_tokens, room),
                      temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, stop=req.stop,
                      seed=seed % 2**64, n=req.n, logprobs=req.logprobs,
                      score_prompt=echo and req.logprobs is not None, grammar=grammar)

    async def _collect(self, request: Request, jobs: list[Job], events: asyncio.Queue,
                       reply: "_Reply") -> JSONResponse:
        reply.opening()  # the echoed prompts
        try:
            while not reply.done:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        for job in jobs:
                            job.cancel()
                        return JSONResponse({}, status_code=499)  # nobody reads it
                    continue
                if event[0] == "error":
                    raise ApiError(500, event[1], kind="server_error")
                reply.take(event)
        finally:
            for job in jobs:
                job.cancel()  # a no-op once every row ended; frees the rows when this task is cancelled
        return JSONResponse(envelope(reply.id, reply.kind, reply.req.model, reply.choices(),
                                     usage=reply.usage()))

    async def _stream(self, jobs: list[Job], events: asyncio.Queue, reply: "_Reply") -> AsyncIterator[str]:
        """Server-sent events: one chunk per text piece, a last chunk per choice with its finish_reason, a usage
        chunk when asked (stream_options.include_usage), then `data: [DONE]`. A client that goes away cancels the
        jobs (Starlette cancels this generator), which frees their rows at the next step."""
        try:
            for chunk in reply.opening():
                yield _sse(chunk)
            while not reply.done:
                event = await events.get()
                if event[0] == "error":
                    yield _sse(error_body(event[1], "server_error"))
                    break
                for chunk in reply.take(event):
                    yield _sse(chunk)
            else:
                if reply.req.include_usage:
                    yield _sse(reply.envelope([], usage=reply.usage()))
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:
                job.cancel()


class _Reply:
    """One request's reply built from its jobs' events: the choices' text and scored tokens so far, and the stream
    chunks each event makes. Completions with `echo` start each choice with its prompt (and, with logprobs, the
    prompt's scored tokens, which the batcher sends first). With tools, a chat reply's `<tool_call>` blocks become
    `tool_calls` (`babyllama.serve.tools`): streamed text that may begin one is held back until it is decided."""

    def __init__(self, req: ChatRequest | CompletionRequest, tokenizer: Any, echoed: list[str] | None,
                 prompt_tokens: int, observer: "_Observer"):
        self.req, self.chat, self.observer = req, isinstance(req, ChatRequest), observer
        self.prompt_tokens = prompt_tokens
        self.kind = "chat.completion" if self.chat else "text_completion"
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.token_bytes = tokenizer.token_bytes if req.logprobs is not None else []
        self.special = set(tokenizer.special_tokens.values())  # their text is not in a reply
        self.tools = req.tools if self.chat else None
        n = req.n * (1 if self.chat else len(req.prompts))
        self.texts, self.scored = [""] * n, [[] for _ in range(n)]
        self.shown, self.unshown = [0] * n, [[] for _ in range(n)]  # with tools: text streamed, scored held
        self.finish: list[str | None] = [None] * n
        self._parsed: dict[int, tuple[str | None, list[dict[str, Any]]]] = {}
        self.produced, self.cached = 0, {}
        self.echoed = echoed  # each prompt's text, when echoing

    @property
    def done(self) -> bool:
        return None not in self.finish

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, self.produced, sum(self.cached.values()))

    def envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return envelope(self.id, kind, self.req.model, choices,
                        **{**({"usage": None} if self.req.include_usage else {}), **extra})

    def opening(self) -> list[dict[str, Any]]:
        """The chunks sent before any token: chat's role, completions' echoed prompts (unless they come scored)."""
        if self.chat:  # the role comes first, as OpenAI sends it
            return [self.envelope([chat_delta(i, {"role": "assistant", "content": ""})]) for i in range(self.req.n)]
        if self.echoed is None or self.req.logprobs is not None:
            return []
        return [chunk for c in range(len(self.texts)) for chunk in self._piece(c, self.echoed[c // self.req.n], [])]

    def take(self, event: tuple) -> list[dict[str, Any]]:
        """Record an event; returns the stream chunks it makes."""
        self.observer.saw(event)
        if event[0] == "prompt":
            _, p, scored = event
            return [chunk for c in range(p * self.req.n, (p + 1) * self.req.n)
                    for chunk in self._piece(c, self.echoed[p], scored)]
        if event[0] == "text":
            _, c, text, scored = event
            return self._piece(c, text, scored)
        _, c, finish, produced, scored, cached = event
        self.produced += produced
        self.cached[c // self.req.n] = cached  # every choice of a prompt shares its prefill
        chunks = self._piece(c, "", scored) if scored and self.tools is None else []
        if self.tools is not None:
            self.unshown[c] += scored
            chunks, finish = self._tool_end(c, finish)
        self.finish[c] = finish
        if self.done:
            self.observer.ended(self.prompt_tokens, sum(self.cached.values()))
        last = chat_delta(c, {}, finish) if self.chat else completion_choice(c, "", finish)
        return chunks + [self.envelope([last])]

    def _piece(self, c: int, text: str, scored: list) -> list[dict[str, Any]]:
        offset = len(self.texts[c])
        self.texts[c] += text
        self.scored[c] += scored
        if self.tools is not None:
            self.unshown[c] += scored
            text = self._releasable(c)
            if not text:
                return []
            scored, offset = self.unshown[c], self.shown[c]
            self.unshown[c], self.shown[c] = [], self.shown[c] + len(text)
        logprobs = self._logprobs(scored, offset) if self.req.logprobs is not None else None
        choice = (chat_delta(c, {"content": text}, logprobs=logprobs) if self.chat
                  else completion_choice(c, text, None, logprobs))
        return [self.envelope([choice])]

    def _releasable(self, c: int) -> str:
        """With tools: the text that can be streamed as content now (none once a call may have begun)."""
        text = self.texts[c]
        if self.tools.constrained or CALL_OPEN in text:
            return ""
        return text[self.shown[c]:len(text) - held_back(text)]

    def _tool_end(self, c: int, finish: str) -> tuple[list[dict[str, Any]], str]:
        """The last chunks of a choice with tools: the text not streamed yet, then its calls (finish "tool_calls")."""
        text, calls = self._calls(c)
        rest = text[self.shown[c]:] if not calls else CALL_BLOCK.sub("", self.texts[c][self.shown[c]:]).strip()
        logprobs = self._logprobs(self.unshown[c], self.shown[c]) if self.req.logprobs is not None else None
        chunks = [self.envelope([chat_delta(c, {"content": rest}, logprobs=logprobs)])] if rest or logprobs else []
        self.unshown[c], self.shown[c] = [], len(self.texts[c])
        if not calls:
            return chunks, finish
        delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}
        return chunks + [self.envelope([chat_delta(c, delta)])], "tool_calls"

    def _calls(self, c: int) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool calls) of a finished choice; calls are parsed once (their ids must not change)."""
        if c not in self._parsed:
            self._parsed[c] = parse_calls(self.texts[c], self.tools) if self.tools else (self.texts[c], [])
        return self._parsed[c]

    def _logprobs(self, scored: list, offset: int) -> dict[str, Any]:
        if self.chat:
            return chat_logprobs(scored, self.token_bytes)
        return completion_logprobs(scored, self.token_bytes, self.special, offset)

    def choices(self) -> list[dict[str, Any]]:
        """The whole reply's choices (non-streamed)."""
        out = []
        for c, (scored, finish) in enumerate(zip(self.scored, self.finish)):
            logprobs = self._logprobs(scored, 0) if self.req.logprobs is not None else None
            if not self.chat:
                out.append(completion_choice(c, self.texts[c], finish, logprobs))
                continue
            content, calls = self._calls(c)
            out.append(chat_choice(c, content, finish, logprobs, calls))
        return out


class _Observer:
    """A request's contribution to /metrics: time to its first token, its tokens, its latency."""

    def __init__(self, metrics: ServerMetrics, model: str, arrived: float):
        self.metrics, self.model, self.arrived = metrics, model, arrived
        self.first = True

    def saw(self, event: tuple) -> None:
        if self.first and event[0] in ("text", "end"):
            self.first = False
            self.metrics.first_token.labels(self.model).observe(time.monotonic() - self.arrived)
        if event[0] == "end":
            self.metrics.generation_tokens.labels(self.model).inc(event[3])

    def ended(self, prompt_tokens: int, cached: int) -> None:
        self.metrics.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.metrics.cached_tokens.labels(self.model).inc(cached)
        self.metrics.latency.labels(self.model).observe(time.monotonic() - self.arrived)


def _numbered(emit: Callable[[Any], None], prompt: int, n: int) -> Callable[[Any], None]:
    """An emitter that numbers a job's choices as the reply's (prompt p's choice c is p * n + c) and says whose
    scored prompt a "prompt" event is."""
    def numbered(event: tuple) -> None:
        if event[0] == "prompt":
            emit(("prompt", prompt, event[1]))
        elif event[0] in ("text", "end"):
            emit((event[0], prompt * n + event[1], *event[2:]))
        else:
            emit(event)
    return numbered


def _grammar(req: ChatRequest, tokenizer: Any) -> Grammar | None:
    """The grammar a chat reply must follow: its `response_format` schema, or a call of its required or named
    tool; a schema the engine refuses is a 400 naming the field."""
    compiler = GrammarCompiler.of(tokenizer)
    try:
        if req.json_schema is not None:
            return compiler.json_schema(req.json_schema, source="response_format")
        if req.tools is not None and req.tools.constrained:
            return compiler.tool_call(dict(req.tools.schemas()), source="tools")
    except UserError as e:
        raise ApiError(400, str(e), "response_format" if req.json_schema is not None else "tools",
                       "invalid_value") from None
    return None


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
