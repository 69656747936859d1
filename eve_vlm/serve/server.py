"""`eve serve MODEL_DIR`: an OpenAI-compatible chat server (FastAPI + uvicorn, the `serve` extra).

Endpoints: `POST /v1/chat/completions` (plain or streamed as server-sent events), `GET /v1/models`,
`GET /v1/models/{id}`, `GET /health`, and the web chat page at `GET /`. Requests are parsed and checked
(`protocol.py`, `prompt.py`, `media.py`) off the event loop, then decoded by the one `Engine` thread that owns
the model (`engine.py`). Every error is OpenAI's `{"error": {...}}` with a 4xx status for bad input (400, 404
for an unknown model, 503 when the queue is full); an internal failure is a 500 `server_error` without a
traceback, and an error after a stream has begun is sent in-band as `data: {"error": ...}` then `[DONE]`.
"""

import asyncio
import json
import logging
import time
from importlib import resources

from pydantic import ValidationError

from eve_vlm.serve.command import require_serve_extra
from eve_vlm.serve.engine import Delta, Done, Engine, EngineBusy, EngineStopped, Failed, Request, Sink
from eve_vlm.serve.prompt import PromptBuilder
from eve_vlm.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    ChunkWriter,
    completion_id,
    completion_response,
    error_body,
    model_card,
    models_list,
    validation_param,
)

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
ENGINE_STOPPED = "The server's model engine has stopped; restart the server."


def chat_page() -> str:
    return resources.files("eve_vlm.serve").joinpath("static/chat.html").read_text(encoding="utf-8")


def create_app(engine: Engine, builder: PromptBuilder, model_id: str):
    """The FastAPI app serving `model_id` with a started `engine`."""
    require_serve_extra()
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    created = int(time.time())
    app = FastAPI(title="eve-vlm", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(err: ApiError) -> JSONResponse:
        headers = {"x-should-retry": "false"} if err.status == 500 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_, err: ApiError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        return error_response(
            ApiError(400, first.get("msg", "Invalid request."), param=validation_param(first.get("loc", ())))
        )

    @app.exception_handler(HTTPException)
    async def _http(_, err: HTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(err.detail), kind),
            status_code=err.status_code,
            headers=getattr(err, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal(_, err: Exception):
        log.error("internal error: %s", err, exc_info=err)
        return error_response(ApiError(500, "Internal server error.", type="server_error"))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(chat_page())

    @app.get("/health")
    async def health():
        body = {
            "status": "ok" if engine.alive else "engine stopped",
            "model": model_id,
            "queued": engine.queued,
            "running": engine.stats.running,
        }
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/v1/models")
    async def models():
        return models_list(model_id, created)

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise ApiError(404, f"The model {name!r} does not exist.", param="model", code="model_not_found")
        return model_card(model_id, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        request = await parse_request(http)
        if request.model != model_id:
            raise ApiError(
                404,
                f"The model {request.model!r} does not exist; this server serves {model_id!r}.",
                param="model",
                code="model_not_found",
            )
        # A place among the waiting requests first: under overload a request is refused before its images
        # are decoded.
        try:
            engine.reserve()
        except EngineBusy:
            raise ApiError(
                503,
                "The server is busy: too many requests are waiting. Try again shortly.",
                type="server_error",
            ) from None
        except EngineStopped:
            raise ApiError(503, ENGINE_STOPPED, type="server_error") from None
        try:
            prepared = await asyncio.to_thread(builder.prepare, request)
        except BaseException:
            engine.release()
            raise
        sink = Sink(asyncio.get_running_loop())
        try:
            engine.submit(
                Request(prepared.input_ids, prepared.pixel_values, prepared.sampling, sink), reserved=True
            )
        except EngineStopped:
            raise ApiError(503, ENGINE_STOPPED, type="server_error") from None
        cid = completion_id()
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            writer = ChunkWriter(cid, model_id, include_usage)
            return StreamingResponse(
                stream(sink, writer), media_type="text/event-stream", headers=SSE_HEADERS
            )
        return await collect(http, sink, cid)

    async def next_event(sink: Sink):
        """The request's next event, or None after half a second without one; `Failed` once the engine has
        ended without answering."""
        try:
            return await asyncio.wait_for(sink.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            return Failed(ENGINE_STOPPED) if engine.ended and sink.events.empty() else None

    async def collect(http: HttpRequest, sink: Sink, cid: str):
        pieces = []
        while True:
            event = await next_event(sink)
            if event is None:
                if await http.is_disconnected():
                    sink.cancel()
                    return JSONResponse(error_body("Client disconnected.", "invalid_request_error"), 499)
                continue
            if isinstance(event, Delta):
                pieces.append(event.text)
            elif isinstance(event, Done):
                return completion_response(
                    cid,
                    model_id,
                    "".join(pieces),
                    event.finish_reason,
                    event.prompt_tokens,
                    event.completion_tokens,
                )
            else:
                raise ApiError(500, event.message, type="server_error")

    async def stream(sink: Sink, writer: ChunkWriter):
        try:
            yield sse(writer.delta({"role": "assistant", "content": ""}))
            while True:
                event = await next_event(sink)
                if isinstance(event, Delta):
                    yield sse(writer.delta({"content": event.text}))
                elif isinstance(event, Done):
                    yield sse(writer.delta({}, event.finish_reason))
                    if writer.include_usage:
                        yield sse(writer.usage_chunk(event.prompt_tokens, event.completion_tokens))
                    break
                elif isinstance(event, Failed):
                    yield sse(error_body(event.message, "server_error"))
                    break
            yield "data: [DONE]\n\n"
        finally:
            sink.cancel()  # the client went away (or the answer is complete, when this does nothing)

    return app


async def parse_request(http) -> ChatCompletionRequest:
    raw = await http.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"The request body is not valid JSON: {err}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = validation_param(first["loc"])
        message = first["msg"]
        if first["type"] == "missing":
            message = f"Missing required parameter: {where!r}."
        elif first["type"] in ("literal_error", "union_tag_invalid") and where and where.endswith("role"):
            message = f"Unknown role: {message}."
        return_error = ApiError(400, f"{message} ({where})" if where else message, param=where)
        raise return_error from None


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def build_server(model, processor, model_id: str, engine_config=None, limits=None):
    """`(app, engine)` serving a loaded model; the engine is started (stop it when done).

    Args:
        model: An `EveForConditionalGeneration` in eval mode.
        processor: Its `EveProcessor`.
        model_id: The id clients name in `model`.
        engine_config: Batching (`EngineConfig`; default batching on).
        limits: Request limits (`PromptLimits`; default: the LM's context, 4 images).
    """
    from eve_vlm.serve.engine import EngineConfig
    from eve_vlm.serve.prompt import PromptLimits

    require_serve_extra()
    if limits is None:
        limits = PromptLimits(context=int(model.config.text_config.max_position_embeddings))
    engine = Engine(model, processor.tokenizer, engine_config or EngineConfig()).start()
    return create_app(engine, PromptBuilder(processor, limits), model_id), engine
