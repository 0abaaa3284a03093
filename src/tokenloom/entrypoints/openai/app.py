"""The FastAPI app: routes, error handlers in OpenAI's shape, lifespan.

::

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models
    GET  /health   GET /version   GET /metrics   POST /tokenize   POST /detokenize

The lifespan starts the engine loop (and the periodic stats line) and stops
them; the engine itself (the loaded model) is built by the caller, so a test
can hold on to it. ``run_server`` serves the app with uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenloom import __version__
from tokenloom.engine.client import EngineClient
from tokenloom.engine.chat_template import ChatTemplateError
from tokenloom.engine.stats_logger import StatsLogger
from tokenloom.engine.tool_prompt import render_conversation
from tokenloom.entrypoints.openai.errors import SERVER_ERROR, OpenAIError, bad_request, engine_unavailable, error_body
from tokenloom.entrypoints.openai.metrics import ServerMetrics
from tokenloom.entrypoints.openai.middleware import APIKeyMiddleware, BodySizeLimitMiddleware
from tokenloom.entrypoints.openai.protocol import (
    UNSUPPORTED_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from tokenloom.entrypoints.openai.responses import DetokenizeResponse, ModelCard, ModelList, TokenizeResponse
from tokenloom.entrypoints.openai.server_config import ServerConfig
from tokenloom.entrypoints.openai.serving import OpenAIServing, QueueGate
from tokenloom.entrypoints.openai.serving_chat import OpenAIServingChat
from tokenloom.entrypoints.openai.serving_completion import OpenAIServingCompletion
from tokenloom.entrypoints.openai.streaming import ClientDisconnected
from tokenloom.sampling_params import InvalidParameter

logger = logging.getLogger("tokenloom.server")
_CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"


def build_app(engine: EngineClient, config: ServerConfig, model_name: str) -> FastAPI:
    """The app around an engine that is built but not started (the lifespan starts it)."""
    config.validate()
    gate = QueueGate(config.max_queued_requests)
    metrics = ServerMetrics(engine.stats, lambda: gate.num_queued)
    serving = OpenAIServing(engine, model_name, gate, metrics, config.log_prompts)
    app = FastAPI(title="tokenloom", version=__version__, lifespan=_lifespan(engine, config))
    app.state.serving = serving
    _add_openai_routes(app, serving, config)
    _add_service_routes(app, serving, config)
    _add_error_handlers(app)
    # add_middleware wraps: the last one added runs first.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_request_bytes)
    if config.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=["*"], allow_headers=["*"])
    return app


def _lifespan(engine: EngineClient, config: ServerConfig):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        stats_task = None
        if config.log_stats_interval_s > 0:
            stats_task = asyncio.create_task(_log_stats(StatsLogger(engine.stats),
                                                        config.log_stats_interval_s))
        try:
            yield
        finally:
            if stats_task is not None:
                stats_task.cancel()
                with suppress(asyncio.CancelledError):
                    await stats_task
            await engine.stop()

    return lifespan


async def _log_stats(stats_logger: StatsLogger, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        stats_logger.log_if_busy()


def _add_openai_routes(app: FastAPI, serving: OpenAIServing, config: ServerConfig) -> None:
    chat = OpenAIServingChat(serving, config.tool_call_parser)
    completion = OpenAIServingCompletion(serving)
    app.state.started_at = time.time()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await chat.create(body, raw)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await completion.create(body, raw)

    @app.get("/v1/models")
    async def models() -> ModelList:
        card = ModelCard(id=serving.model_name, created=int(app.state.started_at),
                         root=serving.engine.model_path, max_model_len=serving.max_model_len)
        return ModelList(data=[card])


def _add_service_routes(app: FastAPI, serving: OpenAIServing, config: ServerConfig) -> None:
    engine = serving.engine

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            reason = "" if engine.error is None else f": {engine.error}"
            raise engine_unavailable(f"the engine loop is not running{reason}")
        stalled_s = time.monotonic() - engine.last_step_time
        if stalled_s > config.health_stall_s:
            raise engine_unavailable(f"the engine loop has not turned for {stalled_s:.0f}s")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        content, media_type = serving.metrics.render()
        return Response(content, media_type=media_type)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        serving.check_model(body.model)
        tokenizer = serving.tokenizer
        if body.messages is not None:
            messages = [m.template_dict() for m in body.messages]
            add_generation_prompt = True if body.add_generation_prompt is None else body.add_generation_prompt
            try:
                tokens = tokenizer.encode(render_conversation(tokenizer, messages, None, add_generation_prompt))
            except ChatTemplateError as exc:
                raise bad_request("messages", str(exc)) from exc
        else:
            add_special_tokens = True if body.add_special_tokens is None else body.add_special_tokens
            tokens = tokenizer.encode(body.prompt or "", add_special_tokens=add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=serving.max_model_len, tokens=tokens)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        serving.check_model(body.model)
        serving.check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=serving.tokenizer.decode(body.tokens))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = _validation_error(exc)
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(InvalidParameter)
    async def invalid_parameter(request: Request, exc: InvalidParameter) -> JSONResponse:
        return JSONResponse(error_body(str(exc), param=exc.field_name), status_code=400)

    @app.exception_handler(ClientDisconnected)
    async def client_disconnected(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=_CLIENT_CLOSED_REQUEST)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), code=exc.status_code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body(f"internal error: {exc!r}", type=SERVER_ERROR), status_code=500)


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    """The first pydantic error as a 400 whose ``param`` is the field's dotted path."""
    error = exc.errors()[0]
    kind = error["type"]
    if kind == "json_invalid":
        return bad_request(None, f"Malformed JSON body: {error.get('ctx', {}).get('error', error['msg'])}")
    cause = error.get("ctx", {}).get("error")
    path = [str(part) for part in error["loc"] if part != "body"]
    if isinstance(cause, InvalidParameter):  # raised by a model's validator: the field is inside it
        return bad_request(".".join([*path, cause.field_name]), str(cause))
    param = ".".join(path) or None
    where = param or "the request body"
    if kind == "extra_forbidden":
        reason = UNSUPPORTED_FIELDS.get(path[-1]) if path else None
        return bad_request(param, f"{where}: {reason}" if reason else f"{where} is not a supported parameter")
    if kind == "missing":
        return bad_request(param, f"{where} is required")
    message = error["msg"].removeprefix("Value error, ")
    return bad_request(param, f"{where}: {message}")


def run_server(app: FastAPI, config: ServerConfig) -> None:
    """Serve ``app`` until interrupted (Ctrl-C / SIGTERM shut it down cleanly: uvicorn
    runs the lifespan's end, which stops the engine)."""
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port,
                                           log_level=config.log_level, timeout_graceful_shutdown=5))
    # uvicorn shuts down on SIGINT/SIGTERM, then raises the signal again: a KeyboardInterrupt
    # for both (not SIGTERM's default death) ends the process as a clean exit.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        server.run()
    except KeyboardInterrupt:
        return
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise SystemExit(1)  # uvicorn has logged why (e.g. the port is taken)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
