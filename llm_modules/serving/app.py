"""`llm-modules serve`: an OpenAI-compatible HTTP server (FastAPI) over saved modules, and a web chat at `/`.

Routes: GET /health (503 while loading, 200 when ready), GET /v1/models, POST /v1/chat/completions,
POST /v1/completions (streamed as server-sent events with `stream: true`), GET / (the web chat).
Generation runs in one engine thread (see `engine.py` for what is batched); handlers only lay out
prompts, check limits and turn engine events into responses.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from ..data import Example, encode_prompt
from .engine import Engine, Request
from .metrics import Metrics
from .protocol import (
    APIError, ChatRequest, CompletionRequest, Message, chat_chunk, chat_response, completion_response, new_id, usage,
    usage_chunk,
)
from .registry import Registry, ServedModule, load_registry
from ..inference.text import AnswerText


@dataclass
class ServeConfig:
    """Settings of `llm-modules serve` (each has a command-line flag)."""

    models: list[tuple[str, str]] = field(default_factory=list)
    api_key: str | None = None
    max_concurrent: int = 64
    """Requests generating or queued at once; more get 429 with Retry-After."""
    max_prompt_tokens: int | None = None
    """Longest prompt accepted (default: the module's context limit)."""
    max_answer_tokens: int = 1024
    """Largest max_tokens accepted (also the default when a request gives none, within the context)."""
    batch_window: float = 0.01
    max_batch: int = 16
    threads: int | None = None
    large_model: str | None = None
    """Where the knowledge source lives, when not where the modules were trained (e.g. another machine)."""


class Server:
    """Loading state, the registry and the engine behind the app."""

    def __init__(self, cfg: ServeConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.state, self.error = "loading", None
        self.registry: Registry | None = None
        self.engine: Engine | None = None
        self.metrics = Metrics()

    def load(self) -> "Server":
        try:
            self.registry = load_registry(self.cfg.models, self.log, self.cfg.large_model)
            modules = {n: m.module for n, m in self.registry.modules.items()}
            self.engine = Engine(modules, self.cfg.batch_window, self.cfg.max_batch, self.cfg.threads, self.metrics,
                                 self.log).start()
            self.state = "ready"
            self.log(f"ready: {len(modules)} module(s) on {len(self.registry.sources)} knowledge source(s)")
        except Exception as e:  # reported by /health and every route; the process keeps answering
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
            self.log(f"error: loading failed: {self.error}")
        return self

    def load_in_background(self) -> None:
        threading.Thread(target=self.load, name="llm-modules-load", daemon=True).start()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def require_ready(self) -> Registry:
        if self.state != "ready":
            raise APIError(503, f"the server is {self.state}" + (f": {self.error}" if self.error else ""),
                           "server_error", code="not_ready", headers={"Retry-After": "5"})
        return self.registry

    def module(self, name: str) -> ServedModule:
        m = self.require_ready().get(name)
        if m is None:
            raise APIError(404, f"The model {name!r} does not exist (served: {', '.join(self.registry.modules)})",
                           param="model", code="model_not_found")
        return m


def chat_prompt(sm: ServedModule, messages: list[Message]) -> Example:
    """Messages laid out in the module's training format: system messages become its system prompt
    (default: the one it was trained with), the rest alternate user/assistant and end with the user."""
    system = [m.text() for m in messages if m.role in ("system", "developer")] or None
    turns: list[tuple[str, str]] = []
    for m in messages:
        if m.role in ("system", "developer"):
            continue
        if turns and turns[-1][0] == m.role:  # consecutive messages of one role read as one
            turns[-1] = (m.role, turns[-1][1] + "\n\n" + m.text())
        else:
            turns.append((m.role, m.text()))
    if not turns or turns[-1][0] != "user":
        raise APIError(400, "the last message must come from the user", param="messages")
    if turns[0][0] != "user":
        raise APIError(400, "an assistant message must follow a user message", param="messages")
    sys_prompt = "\n\n".join(system) if system else sm.system_prompt
    return encode_prompt(sm.tokenizer, sm.format, turns[-1][1], turns[:-1], sys_prompt)


def answer_budget(server: Server, sm: ServedModule, prompt: Example, asked: int | None, param: str,
                  kind: str = "chat") -> int:
    """max_tokens for this request, or a 400 naming the limit it breaks."""
    cfg, n = server.cfg, len(prompt.input_ids)
    ctx = sm.context_limit
    where = "prompt" if kind == "completion" else "messages"
    if cfg.max_prompt_tokens and n > cfg.max_prompt_tokens:
        raise APIError(400, f"the prompt has {n} tokens; this server accepts at most {cfg.max_prompt_tokens}",
                       param=where, code="context_length_exceeded")
    if ctx and n >= ctx:
        raise APIError(400, f"the prompt has {n} tokens; this model's context is {ctx}", param=where,
                       code="context_length_exceeded")
    if asked is not None and asked > cfg.max_answer_tokens:
        raise APIError(400, f"{param} is {asked}; this server allows at most {cfg.max_answer_tokens}", param=param)
    room = (ctx - n) if ctx else cfg.max_answer_tokens
    want = asked if asked is not None else min(cfg.max_answer_tokens, room)
    if want > room:
        raise APIError(400, f"this model's context is {ctx} tokens: the prompt has {n} and {param} asks for {want}",
                       param=param, code="context_length_exceeded")
    return want


async def run_request(server: Server, sm: ServedModule, body: Any, prompt: Example, max_tokens: int,
                      tag: str = "") -> tuple[Request, AsyncIterator[tuple[str, str | None]]]:
    """Submit to the engine; the iterator yields (new text, finish reason or None) until the answer ends."""
    if server.engine.active >= server.cfg.max_concurrent:
        server.metrics.inc("llm_modules_requests_total", module=sm.name, outcome="rejected")
        raise APIError(429, f"{server.engine.active} requests in progress (the limit is {server.cfg.max_concurrent}); "
                       "retry shortly", "rate_limit_error", code="too_many_requests", headers={"Retry-After": "1"})
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(kind: str, value: Any) -> None:  # called from the engine thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone: nobody is listening
            req.cancelled = True

    req = Request(sm.name, prompt, max_tokens, emit, body.temperature, body.top_p, body.seed, tag=tag)
    text = AnswerText(sm.tokenizer, [*sm.stop_strings, *body.stop])
    server.engine.submit(req)  # now, so the concurrency count above includes it
    server.log(f"request {tag or req.id} ({sm.name}): {len(prompt.input_ids)} prompt tokens, at most {max_tokens} "
               f"new" + (", streamed" if getattr(body, "stream", False) else ""))

    async def events() -> AsyncIterator[tuple[str, str | None]]:
        try:
            while True:
                kind, value = await queue.get()
                if kind == "token":
                    piece = text.add(value)
                    if text.stopped:
                        req.ended = "stop"
                        yield piece, "stop"
                        return
                    if piece:
                        yield piece, None
                elif kind == "done":
                    yield text.flush(), value
                    return
                else:
                    raise APIError(500, value, "server_error", code="generation_failed")
        finally:
            req.cancelled = True  # finished, stopped by a stop sequence, failed, or the client went away

    return req, events()


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def stream_response(events: AsyncIterator, first: Callable[[], list[dict]], piece: Callable[[str, str | None], dict],
                    last: Callable[[], list[dict]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        for obj in first():
            yield sse(obj)
        try:
            async for text, finish in events:
                if text or finish:
                    yield sse(piece(text, finish))
        except APIError as e:  # a failure mid-stream: an error event, then the end of the stream
            yield sse(e.body())
        else:
            for obj in last():
                yield sse(obj)
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def collect(events: AsyncIterator, req: Request, http: HTTPRequest) -> tuple[str, str]:
    """The whole answer; stops generating when the client disconnects."""
    async def watch() -> None:
        while not req.done:
            if await http.is_disconnected():
                req.cancelled = True
                return
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    parts, finish = [], "stop"
    try:
        async for text, fin in events:
            parts.append(text)
            finish = fin or finish
    finally:
        watcher.cancel()
    return "".join(parts), finish


def add_routes(app: FastAPI, server: Server) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        if server.state != "ready":
            return JSONResponse({"status": server.state, "error": server.error}, status_code=503)
        return JSONResponse({"status": "ok", "models": list(server.registry.modules), "requests": server.engine.active,
                             "steps": server.engine.steps})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        # Prometheus' text format, version 0.0.4; outside /v1, so like /health it needs no API key.
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("llm_modules.serving").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(m) for m in server.require_ready().modules.values()]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str) -> dict:
        return model_card(server.module(name))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest) -> Any:
        sm = server.module(body.model)
        prompt = chat_prompt(sm, body.messages)
        asked = body.max_completion_tokens or body.max_tokens
        max_tokens = answer_budget(server, sm, prompt, asked, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        rid, n = new_id("chatcmpl"), len(prompt.input_ids)
        req, events = await run_request(server, sm, body, prompt, max_tokens, rid)
        if body.stream:
            with_usage = bool(body.stream_options and body.stream_options.include_usage)
            return stream_response(
                events, lambda: [chat_chunk(rid, sm.name, {"role": "assistant", "content": ""})],
                lambda text, fin: chat_chunk(rid, sm.name, {"content": text} if text else {}, fin),
                lambda: [usage_chunk(rid, sm.name, "chat.completion.chunk", usage(n, req.produced))] if with_usage else [])
        text, finish = await collect(events, req, http)
        return chat_response(rid, sm.name, text, finish, usage(n, req.produced))

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest, http: HTTPRequest) -> Any:
        sm = server.module(body.model)
        prompt = encode_prompt(sm.tokenizer, "raw", body.prompt)
        if not prompt.input_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        max_tokens = answer_budget(server, sm, prompt, body.max_tokens, "max_tokens", "completion")
        rid, n = new_id("cmpl"), len(prompt.input_ids)
        req, events = await run_request(server, sm, body, prompt, max_tokens, rid)
        if body.stream:
            with_usage = bool(body.stream_options and body.stream_options.include_usage)
            return stream_response(
                events, lambda: [], lambda text, fin: completion_response(rid, sm.name, text, fin),
                lambda: [usage_chunk(rid, sm.name, "text_completion", usage(n, req.produced))] if with_usage else [])
        text, finish = await collect(events, req, http)
        return completion_response(rid, sm.name, text, finish, usage(n, req.produced))


def model_card(m: ServedModule) -> dict[str, Any]:
    cfg = m.module.config
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "llm-modules", "parent": m.source_name,
            "root": m.source_name, "conditioning": cfg.conditioning, "format": m.format,
            "context_length": m.context_limit}


def add_error_handlers(app: FastAPI, server: Server) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = err.get("msg", "malformed request body")
        where = ".".join(loc)
        return JSONResponse(APIError(400, f"{where}: {msg}" if where else msg, param=where or None).body(),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        # What FastAPI and Starlette raise themselves (a body the JSON parser rejects, an unknown route or method):
        # the same shape as every other error.
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.middleware("http")
    async def auth(request: HTTPRequest, call_next: Callable) -> Any:
        key = server.cfg.api_key
        if key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return JSONResponse(APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                                             code="invalid_api_key").body(), status_code=401)
        return await call_next(request)


def create_app(server: Server, load: bool = True) -> FastAPI:
    """The ASGI app. With `load`, the modules load in a background thread at startup (/health says when)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if load and server.state == "loading" and server.registry is None:
            server.load_in_background()
        yield
        server.close()

    app = FastAPI(title="llm-modules", lifespan=lifespan, docs_url=None, redoc_url=None)
    add_error_handlers(app, server)
    add_routes(app, server)
    return app
