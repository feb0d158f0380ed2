"""The OpenAI-compatible HTTP API of the daemon: ``create_app(settings) -> FastAPI``.

All state lives in the app (its ``ModelManager`` and metrics); nothing at module level, so tests
build as many apps as they like. Client mistakes become OpenAI-style errors via ``ApiError``;
only bugs reach the 500 handler.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgekit.serve.errors import ApiError, bad_param
from edgekit.serve.guard import Guard, read_api_key, read_body
from edgekit.serve.manager import ModelEntry, ModelManager
from edgekit.serve.metrics import ServeMetrics
from edgekit.serve.schemas import ChatBody, ClassifyBody, CompletionBody, EmbeddingsBody, parse_body
from edgekit.serve.settings import ServeSettings
from edgekit.serve.workers import RequestStream

log = logging.getLogger("edgekit.serve")

GENERATION_TASKS = ("text-generation",)
EMBEDDING_TASKS = ("feature-extraction",)
CLASSIFY_TASKS = ("text-classification", "token-classification")
CANCEL_WAIT_S = 5.0  # how long a cancelled generation may take to acknowledge before its slot is released anyway


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


class Generation:
    """One generation in flight: its worker stream, its slot, its deadline; ``finish()`` releases both exactly once."""

    def __init__(self, manager: ModelManager, entry: ModelEntry, stream: RequestStream, deadline: float) -> None:
        self.manager = manager
        self.entry = entry
        self.stream = stream
        self.deadline = deadline
        self.released = False
        self.prompt_tokens = 0
        self.finish_reason: str | None = None
        self.usage: dict[str, int] = {}

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def timed_out(self) -> ApiError:
        return ApiError(504, f"the request did not finish within {self.manager.settings.request_timeout_s:.0f} s "
                        "and was cancelled", code="timeout")

    async def next(self) -> tuple[dict[str, Any], bytes]:
        try:
            async with asyncio.timeout(self.remaining()):
                return await self.stream.next()
        except TimeoutError:
            raise self.timed_out() from None

    def record(self, done: dict[str, Any]) -> None:
        self.finish_reason = done["finish_reason"]
        prompt, completion = done.get("prompt_tokens", 0), done.get("completion_tokens", 0)
        self.usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        metrics = self.manager.metrics
        metrics.generations.labels(model=self.entry.name, finish_reason=self.finish_reason).inc()
        metrics.tokens_generated.labels(model=self.entry.name).inc(completion)
        metrics.prompt_tokens.labels(model=self.entry.name).inc(prompt)
        if done.get("decode_seconds") and completion > 1:
            metrics.decode_rate.labels(model=self.entry.name).set(completion / done["decode_seconds"])

    async def finish(self) -> None:
        """Cancel the generation if unfinished, wait briefly for the worker to stop it, release the slot."""
        if self.released:
            return
        late = False
        try:
            if not self.stream.finished:
                self.stream.cancel()
                try:
                    async with asyncio.timeout(CANCEL_WAIT_S):
                        await self._drain()
                except TimeoutError:
                    # The worker is slow to stop (an overloaded machine): free the slot now, count the
                    # generation when its last frame arrives; the worker runs the next request after it.
                    late = True
                    self.manager.spawn(self._drain_late(), f"late-cancel-{self.stream.id}")
                except ApiError:
                    pass
        finally:
            if not late:
                self.stream.close()
            if not self.released:
                self.released = True
                self.manager.release_slot(self.entry)

    async def _drain(self) -> None:
        while not self.stream.finished:
            header, _ = await self.stream.next()
            if header["type"] == "done":
                self.record(header)

    async def _drain_late(self) -> None:
        try:
            async with asyncio.timeout(self.manager.settings.request_timeout_s):
                await self._drain()
        except (TimeoutError, ApiError):
            pass
        finally:
            self.stream.close()


async def wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so receive() only reports disconnects)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(settings: ServeSettings) -> FastAPI:
    """The daemon as an ASGI app; models are discovered and preloaded by its lifespan."""
    logging.getLogger("edgekit").setLevel(settings.log_level.upper())
    api_key = read_api_key(settings)  # refuses a non-loopback bind without a key (docs/reliability.md case 9)
    metrics = ServeMetrics()
    manager = ModelManager(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.start_background()
        try:
            yield
        finally:
            await manager.close()

    app = FastAPI(title="edgekit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.manager = manager
    app.state.metrics = metrics
    app.state.settings = settings
    app.add_middleware(Guard, settings=settings, api_key=api_key, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} is not allowed on {request.url.path}"}
        error = ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=dict(exc.headers or {}))

    def check_chars(count: int, param: str) -> None:
        if count > settings.max_input_chars:
            raise ApiError(400, f"the input has {count} characters; this server accepts at most {settings.max_input_chars} "
                           "per request", param=param, code="input_too_long")

    async def model_entry(request: Request, name: str, tasks: tuple[str, ...], endpoint: str) -> ModelEntry:
        entry = await manager.entry(name)
        request.state.model = entry.name
        manager.require_task(entry, tasks, endpoint)
        return entry

    # ---- generation -------------------------------------------------------------------------

    async def start_generation(request: Request, entry: ModelEntry, job: dict[str, Any]) -> Generation:
        """Take a slot, send the job, wait for the worker's 'start' (errors such as context length come before it)."""
        deadline = time.monotonic() + settings.request_timeout_s
        await manager.acquire_slot(entry, timeout=settings.request_timeout_s)
        try:
            worker = await manager.ensure_loaded(entry)
            stream = await worker.submit(job)
        except BaseException:
            manager.release_slot(entry)
            raise
        generation = Generation(manager, entry, stream, deadline)
        try:
            header, _ = await generation.next()
            generation.prompt_tokens = header.get("prompt_tokens", 0)
        except BaseException:
            await generation.finish()
            raise
        return generation

    async def collect(request: Request, generation: Generation) -> str:
        """Run a non-streamed generation to its end; a client that disconnects cancels it."""
        parts: list[str] = []

        async def run() -> None:
            try:
                async with asyncio.timeout(generation.remaining()):
                    while True:
                        header, _ = await generation.stream.next()
                        if header["type"] == "delta":
                            parts.append(header["text"])
                        elif header["type"] == "done":
                            generation.record(header)
                            return
            except TimeoutError:
                raise generation.timed_out() from None

        work = asyncio.create_task(run())
        gone = asyncio.create_task(wait_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                log.info("client disconnected; cancelled generation on %s", generation.entry.name)
                raise ApiError(499, "client closed the request", code="client_closed")  # nobody reads it
            work.result()  # raises the worker's error (crash, timeout) if there was one
            return "".join(parts)
        finally:
            gone.cancel()
            work.cancel()
            await asyncio.gather(work, gone, return_exceptions=True)
            await generation.finish()

    def stream_response(generation: Generation, first: dict[str, Any] | None, chunk, include_usage: bool) -> StreamingResponse:
        """SSE: one chunk per text delta, then the finish chunk, optional usage chunk, and [DONE]."""
        # Text chunks differ only in their text: render the JSON once, splice each delta in (the per-token path).
        marker = "\x00delta\x00"
        prefix, suffix = _dumps(chunk(marker, None)).split(_dumps(marker))

        async def events() -> AsyncIterator[str]:
            try:
                if first is not None:
                    yield f"data: {_dumps(chunk(first, None))}\n\n"
                async with asyncio.timeout(generation.remaining()):  # one timer for the whole stream
                    while True:
                        header, _ = await generation.stream.next()
                        if header["type"] == "delta":
                            yield f"data: {prefix}{_dumps(header['text'])}{suffix}\n\n"
                        elif header["type"] == "done":
                            generation.record(header)
                            yield f"data: {_dumps(chunk(None, generation.finish_reason))}\n\n"
                            if include_usage:
                                yield f"data: {_dumps(chunk(None, None, usage=generation.usage))}\n\n"
                            yield "data: [DONE]\n\n"
                            return
            except TimeoutError:
                yield f"data: {_dumps(generation.timed_out().body())}\n\n"
            except ApiError as exc:  # the worker crashed mid-stream
                yield f"data: {_dumps(exc.body())}\n\n"
            finally:
                generation.stream.cancel()  # no await here: this may run inside a cancelled scope

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(generation.finish))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_body(ChatBody, await read_body(request, settings.max_body_bytes))
        body.check_supported(settings.max_tokens_cap)
        check_chars(body.chars(), "messages")
        entry = await model_entry(request, body.model, GENERATION_TASKS, "/v1/chat/completions")
        job = {"type": "generate", "op": "generate", "messages": body.template_messages(), "sampling": body.sampling()}
        generation = await start_generation(request, entry, job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if body.stream:
            def chunk(delta: dict | str | None, finish: str | None, usage: dict | None = None) -> dict:
                base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": entry.name}
                if usage is not None:
                    return {**base, "choices": [], "usage": usage}
                if isinstance(delta, dict):
                    content = delta
                else:
                    content = {"content": delta} if delta is not None else {}
                return {**base, "choices": [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]}

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return stream_response(generation, {"role": "assistant", "content": ""}, chunk, include_usage)
        text = await collect(request, generation)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": entry.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": generation.finish_reason}],
            "usage": generation.usage,
        })

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_body(CompletionBody, await read_body(request, settings.max_body_bytes))
        body.check_supported(settings.max_tokens_cap)
        check_chars(len(body.text), "prompt")
        entry = await model_entry(request, body.model, GENERATION_TASKS, "/v1/completions")
        job = {"type": "generate", "op": "generate", "prompt": body.text, "sampling": body.sampling()}
        generation = await start_generation(request, entry, job)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        if body.stream:
            def chunk(text: str | None, finish: str | None, usage: dict | None = None) -> dict:
                base = {"id": rid, "object": "text_completion", "created": created, "model": entry.name}
                if usage is not None:
                    return {**base, "choices": [], "usage": usage}
                return {**base, "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return stream_response(generation, None, chunk, include_usage)
        text = await collect(request, generation)
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": entry.name,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": generation.finish_reason}],
            "usage": generation.usage,
        })

    # ---- encoders -----------------------------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body = parse_body(EmbeddingsBody, await read_body(request, settings.max_body_bytes))
        texts = body.texts(settings.max_embedding_inputs)
        check_chars(sum(map(len, texts)), "input")
        entry = await model_entry(request, body.model, EMBEDDING_TASKS, "/v1/embeddings")
        results = await manager.encode(entry, texts)
        width = len(results[0][0]) if results else 0
        if body.dimensions is not None and body.dimensions != width:
            raise bad_param("dimensions", f"this model gives {width}-dimensional embeddings; it cannot give {body.dimensions}",
                            "unsupported_value")
        data = []
        for index, (vector, _) in enumerate(results):
            value = base64.b64encode(vector.tobytes()).decode("ascii") if body.encoding_format == "base64" else vector.tolist()
            data.append({"object": "embedding", "index": index, "embedding": value})
        tokens = sum(n for _, n in results)
        return JSONResponse({"object": "list", "data": data, "model": entry.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        body = parse_body(ClassifyBody, await read_body(request, settings.max_body_bytes))
        texts = body.texts(settings.max_embedding_inputs)
        check_chars(sum(map(len, texts)), "input")
        entry = await model_entry(request, body.model, CLASSIFY_TASKS, "/v1/classify")
        results = await manager.encode(entry, texts)
        labels = entry.manifest.runtime.labels
        data = []
        for index, (scores, _) in enumerate(results):
            if entry.task == "token-classification":
                data.append({"index": index, "object": "token_classification", "entities": scores})
                continue
            ranked = sorted(((labels[i] if i < len(labels) else str(i), float(p)) for i, p in enumerate(scores)),
                            key=lambda pair: -pair[1])[: body.top_k]
            data.append({"index": index, "object": "classification", "label": ranked[0][0], "score": ranked[0][1],
                         "labels": [{"label": label, "score": score} for label, score in ranked]})
        tokens = sum(n for _, n in results)
        return JSONResponse({"object": "list", "data": data, "model": entry.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # ---- service endpoints ---------------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        await manager.discovered.wait()
        data = [{"id": e.name, "object": "model", "created": int(e.manifest.created.timestamp()), "owned_by": "edgekit",
                 "task": e.task, "format": e.manifest.format, "quantization": e.manifest.quantization,
                 "state": e.state, "footprint_bytes": e.footprint}
                for e in sorted(manager.entries.values(), key=lambda e: e.name)]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> Response:
        entry = await manager.entry(name)
        return JSONResponse({"id": entry.name, "object": "model", "created": int(entry.manifest.created.timestamp()),
                             "owned_by": "edgekit", "task": entry.task, "state": entry.state})

    @app.get("/health")
    async def health() -> Response:
        loading = manager.loading
        if manager.starting or loading:
            what = ", ".join(loading) if loading else "starting"
            return JSONResponse({"status": "loading", "error": {"message": f"Loading model ({what})", "type": "unavailable_error",
                                 "param": None, "code": "loading"}}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok", "models": len(manager.entries), "loaded": sorted(e.name for e in manager.loaded),
                             "rejected": sorted(manager.rejected)})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(manager), media_type=metrics.content_type)

    return app
