"""The HTTP routes of the daemon on two routers: the API (Host, key and body-size checks) and /health (no key).

Routes parse a body (``schemas``), look the model up (``discovery``), go through ``admission`` and
answer with the typed responses of ``schemas``. Everything they use comes from the app's
``Services`` through ``Depends``; nothing lives at module level.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from edgekit.runtime import tool_formats
from edgekit.serve import handoff
from edgekit.serve.admission import (
    CLASSIFY_TASKS,
    EMBEDDING_TASKS,
    GENERATION_TASKS,
    Admission,
    Generation,
    require_task,
)
from edgekit.serve.discovery import Catalog
from edgekit.serve.errors import ApiError, bad_param
from edgekit.serve.guard import allowed_host, authenticated, body_within_limit, json_body, read_body, same_origin
from edgekit.serve.lifecycle import Lifecycle, ModelEntry
from edgekit.serve.metrics import ServeMetrics
from edgekit.serve.protocol import DeltaMessage, Done, Generate, HandBack
from edgekit.serve.schemas import (
    AssistantMessage,
    ChatBody,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Classification,
    ClassificationList,
    ClassifyBody,
    Completion,
    CompletionBody,
    CompletionChoice,
    Embedding,
    EmbeddingList,
    EmbeddingsBody,
    FunctionCallOut,
    Health,
    InputUsage,
    LabelScore,
    ModelCard,
    ModelInfo,
    ModelList,
    TokenClassification,
    ToolCall,
    Usage,
    WorkerThreads,
    parse_body,
)
from edgekit.serve.settings import ServeSettings

log = logging.getLogger("edgekit.serve")

T = TypeVar("T")


@dataclass(frozen=True)
class Services:
    """What the routes of one app use (``app.state.services``)."""

    settings: ServeSettings
    metrics: ServeMetrics
    catalog: Catalog
    lifecycle: Lifecycle
    admission: Admission


def services(request: Request) -> Services:
    return request.app.state.services


Svc = Annotated[Services, Depends(services)]

api = APIRouter(dependencies=[Depends(allowed_host), Depends(same_origin), Depends(authenticated),
                               Depends(body_within_limit), Depends(json_body)])
probes = APIRouter(dependencies=[Depends(allowed_host), Depends(same_origin), Depends(body_within_limit)])


def check_chars(svc: Services, count: int, param: str) -> None:
    limit = svc.settings.max_input_chars
    if count > limit:
        raise ApiError(400, f"the input has {count} characters; this server accepts at most {limit} per request",
                       param=param, code="input_too_long")


async def model_entry(svc: Services, request: Request, name: str, tasks: tuple[str, ...], endpoint: str) -> ModelEntry:
    """The model a request names, serving and of the right task (404 / 503 / 400 otherwise)."""
    entry = await svc.catalog.lookup(name)
    svc.lifecycle.check_serving(entry)
    request.state.model = entry.name
    require_task(entry, tasks, endpoint)
    return entry


# ---- generation ---------------------------------------------------------------------------------------------


async def wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so receive() only reports disconnects)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_client_leaves(request: Request, work: Coroutine[Any, Any, T], release=None) -> T:
    """Await ``work`` (waiting in a model's queue) unless the client disconnects first: then it is dropped before it
    reaches a worker (``release`` undoes a result that arrived as the client left) and the request ends with 499."""
    task = asyncio.ensure_future(work)
    gone = asyncio.create_task(wait_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(gone, return_exceptions=True)
    try:
        result = await task
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():
            raise
        log.info("client left while its request waited in the queue; dropped before it reached a worker")
        raise ApiError(499, "client closed the request", code="client_closed") from None
    if gone.done() and not gone.cancelled() and release is not None:  # it got its turn just as the client left
        await release(result)
        raise ApiError(499, "client closed the request", code="client_closed")
    return result


async def collect(request: Request, generation: Generation) -> str:
    """Run a non-streamed generation to its end; a client that disconnects cancels it."""
    parts: list[str] = []

    async def run() -> None:
        try:
            async with asyncio.timeout(generation.remaining()):
                while True:
                    message, _ = await generation.stream.next()
                    if isinstance(message, DeltaMessage):
                        parts.append(message.delta.text)
                    elif isinstance(message, Done):
                        generation.record(message)
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


def _dumps(data: object) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _event(chunk: ChatCompletionChunk | Completion) -> str:
    """One server-sent event; ``usage`` appears only in the chunk that carries it."""
    return chunk.model_dump_json(exclude=None if chunk.usage is not None else {"usage"})


class ChatEvents:
    """The chunks of a streamed chat completion."""

    def __init__(self, rid: str, created: int, model: str) -> None:
        self.base = {"id": rid, "created": created, "model": model}

    def first(self) -> ChatCompletionChunk:
        return self.text_or_role({"role": "assistant", "content": ""})

    def text(self, text: str) -> ChatCompletionChunk:
        return self.text_or_role({"content": text})

    def text_or_role(self, delta: dict[str, Any]) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.base, choices=[ChatChunkChoice(delta=delta)])

    def finish(self, reason: str) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.base, choices=[ChatChunkChoice(delta={}, finish_reason=reason)])

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.base, choices=[], usage=usage)


class CompletionEvents:
    """The chunks of a streamed text completion."""

    def __init__(self, rid: str, created: int, model: str) -> None:
        self.base = {"id": rid, "created": created, "model": model}

    def first(self) -> None:
        return None

    def text(self, text: str) -> Completion:
        return Completion(**self.base, choices=[CompletionChoice(text=text)])

    def finish(self, reason: str) -> Completion:
        return Completion(**self.base, choices=[CompletionChoice(text="", finish_reason=reason)])

    def usage(self, usage: Usage) -> Completion:
        return Completion(**self.base, choices=[], usage=usage)


def stream_response(request: Request, generation: Generation, events: ChatEvents | CompletionEvents,
                    include_usage: bool) -> StreamingResponse:
    """SSE: one chunk per text delta, then the finish chunk, optional usage chunk, and [DONE]. The text chunks are
    written by the worker itself where the connection allows (handoff.py), else relayed from its frames."""
    # Text chunks differ only in their text: render the JSON once, splice each delta in (the per-token path).
    marker = "\x00delta\x00"
    prefix, suffix = _event(events.text(marker)).split(_dumps(marker))

    async def sse() -> AsyncIterator[str]:
        direct = False  # the worker holds the client's socket: the daemon writes nothing until it hands it back
        try:
            if (first := events.first()) is not None:
                yield f"data: {_event(first)}\n\n"
            # The headers (and the first event) are in the socket now: the worker may write after them.
            direct = generation.proceed(handoff.client_socket(request.scope), f"data: {prefix}", f"{suffix}\n\n")
            generation.admission.metrics.streams.labels(generation.entry.name, "worker" if direct else "daemon").inc()
            async with asyncio.timeout(generation.remaining()):  # one timer for the whole stream
                while True:
                    message, _ = await generation.stream.next()
                    if isinstance(message, DeltaMessage):
                        yield f"data: {prefix}{_dumps(message.delta.text)}{suffix}\n\n"
                    elif isinstance(message, HandBack):
                        direct = False
                        if not message.complete:  # the client left or stalled: an event now would follow a cut one
                            handoff.drop_connection(request.scope)
                            return
                    elif isinstance(message, Done):
                        generation.record(message)
                        yield f"data: {_event(events.finish(generation.finish_reason))}\n\n"
                        if include_usage:
                            yield f"data: {_event(events.usage(Usage(**generation.usage)))}\n\n"
                        yield "data: [DONE]\n\n"
                        return
        except TimeoutError:
            if direct and not await handed_back(generation):
                handoff.drop_connection(request.scope)
                return
            yield f"data: {_dumps(generation.timed_out().body())}\n\n"
        except ApiError as exc:  # the worker crashed mid-stream
            if direct:  # it may have died inside an event it was writing: an event now would corrupt the stream
                handoff.drop_connection(request.scope)
                return
            yield f"data: {_dumps(exc.body(generation.admission.settings.models))}\n\n"
        finally:
            generation.stream.cancel()  # no await here: this may run inside a cancelled scope

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(generation.finish))


async def handed_back(generation: Generation, within: float = handoff.HAND_BACK_WAIT_S) -> bool:
    """Cancel a handed-over stream and wait for the worker to give the socket back; True if it did with every delta
    written (the daemon may write after them)."""
    generation.stream.cancel()
    try:
        async with asyncio.timeout(within):
            while True:
                message, _ = await generation.stream.next()
                if isinstance(message, HandBack):
                    return message.complete
    except (TimeoutError, ApiError):
        return False


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_answer(reader: tool_formats.CallReader, finish_reason: str | None,
                call_ids: list[str] | None = None) -> tuple[AssistantMessage, str | None]:
    """The assistant message of a whole generation in a tool-call format, and its finish reason.

    Fail closed: a call always comes back as ``tool_calls``, never as text; an answer cut short (max_tokens, a
    cancel) is neither a call nor text. ``call_ids``: the ids a stream already gave the calls, in order."""
    parsed = reader.answer()
    if parsed is None:
        if finish_reason == "stop":  # the grammar ends only on a complete answer: this is a bug, not the model
            raise ApiError(500, "the model's answer does not follow the tool-call format", code="tool_format_error")
        return AssistantMessage(content=None), finish_reason
    if parsed.calls:
        ids = call_ids or [new_call_id() for _ in parsed.calls]
        calls = [ToolCall(id=call_id, function=FunctionCallOut(name=call.name, arguments=call.arguments))
                 for call_id, call in zip(ids, parsed.calls, strict=True)]
        return AssistantMessage(content=None, tool_calls=calls), "tool_calls"
    return AssistantMessage(content=parsed.content), finish_reason


def tool_stream_response(generation: Generation, events: ChatEvents, include_usage: bool,
                         fmt: tool_formats.ToolFormat) -> StreamingResponse:
    """SSE of a generation in a tool-call format, as OpenAI streams calls: per call, ``delta.tool_calls`` with its
    index (0, 1, ...), id, type and name once the name is complete, then its arguments' text fragment by fragment as
    it is generated; a text answer comes whole at the end (it is known not to be a call only then); the finish chunk,
    usage and [DONE]."""

    async def sse() -> AsyncIterator[str]:
        reader, call_ids = tool_formats.CallReader(fmt), []
        try:
            yield f"data: {_event(events.first())}\n\n"
            async with asyncio.timeout(generation.remaining()):
                while True:
                    message, _ = await generation.stream.next()
                    if isinstance(message, DeltaMessage):
                        for delta in reader.feed(message.delta.text):
                            if delta.name is not None:
                                call_ids.append(new_call_id())
                                call = {"index": delta.index, "id": call_ids[-1], "type": "function",
                                        "function": {"name": delta.name, "arguments": ""}}
                            else:
                                call = {"index": delta.index, "function": {"arguments": delta.arguments}}
                            yield f"data: {_event(events.text_or_role({'tool_calls': [call]}))}\n\n"
                    elif isinstance(message, Done):
                        generation.record(message)
                        answer, reason = tool_answer(reader, generation.finish_reason, call_ids)
                        if not answer.tool_calls and answer.content:
                            yield f"data: {_event(events.text(answer.content))}\n\n"
                        yield f"data: {_event(events.finish(reason))}\n\n"
                        if include_usage:
                            yield f"data: {_event(events.usage(Usage(**generation.usage)))}\n\n"
                        yield "data: [DONE]\n\n"
                        return
        except TimeoutError:
            yield f"data: {_dumps(generation.timed_out().body())}\n\n"
        except ApiError as exc:  # the worker crashed mid-stream, or the answer broke the format
            yield f"data: {_dumps(exc.body(generation.admission.settings.models))}\n\n"
        finally:
            generation.stream.cancel()

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(generation.finish))


def tool_format(entry: ModelEntry) -> tool_formats.ToolFormat:
    """The tool format of a model: its chat template's own where it has one (read from the manifest), else generic."""
    return tool_formats.detect(entry.manifest.runtime.chat_template)


@api.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(request: Request, svc: Svc) -> Response | ChatCompletion:
    body = parse_body(ChatBody, await read_body(request, svc.settings.max_body_bytes))
    body.check_supported(svc.settings.max_tokens_cap)
    check_chars(svc, body.chars(), "messages")
    plan = body.structured()  # schema checks and grammar here: a 400 before the request is queued
    entry = await model_entry(svc, request, body.model, GENERATION_TASKS, "/v1/chat/completions")
    if (fmt := tool_format(entry)) is not plan.format:  # earlier calls and results render in it even without tools
        # The same checks passed: with tools only the grammar and the turns change.
        plan = body.structured(fmt) if plan.tools else plan.model_copy(update={"tool_format": fmt.name})
    given = {"tools": plan.template_tools} if plan.template_tools is not None else {}
    job = partial(Generate, messages=body.template_messages(plan), sampling=body.sampling(plan), **given)
    text_stream = body.stream and not plan.tools  # its worker starts once the response has begun (stream_response)
    started = svc.admission.start_generation(entry, job, "messages", proceed=not text_stream)
    generation = await unless_client_leaves(request, started, Generation.finish)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream and plan.tools:
        return tool_stream_response(generation, ChatEvents(rid, created, entry.name), include_usage, plan.format)
    if body.stream:
        return stream_response(request, generation, ChatEvents(rid, created, entry.name), include_usage)
    text = await collect(request, generation)
    if plan.tools:
        reader = tool_formats.CallReader(plan.format)
        reader.feed(text)  # what a stream reads piece by piece, read at once: the same arguments text
        message, reason = tool_answer(reader, generation.finish_reason)
    else:
        message, reason = AssistantMessage(content=text), generation.finish_reason
    return ChatCompletion(id=rid, created=created, model=entry.name, usage=Usage(**generation.usage),
                          choices=[ChatChoice(message=message, finish_reason=reason)])


@api.post("/v1/completions", response_model=Completion)
async def completions(request: Request, svc: Svc) -> Response | Completion:
    body = parse_body(CompletionBody, await read_body(request, svc.settings.max_body_bytes))
    body.check_supported(svc.settings.max_tokens_cap)
    check_chars(svc, len(body.text), "prompt")
    entry = await model_entry(svc, request, body.model, GENERATION_TASKS, "/v1/completions")
    job = partial(Generate, prompt=body.text, sampling=body.sampling())
    started = svc.admission.start_generation(entry, job, "prompt", proceed=not body.stream)
    generation = await unless_client_leaves(request, started, Generation.finish)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_response(request, generation, CompletionEvents(rid, created, entry.name), include_usage)
    text = await collect(request, generation)
    return Completion(id=rid, created=created, model=entry.name, usage=Usage(**generation.usage),
                      choices=[CompletionChoice(text=text, finish_reason=generation.finish_reason)])


# ---- encoders -----------------------------------------------------------------------------------------------


@api.post("/v1/embeddings")
async def embeddings(request: Request, svc: Svc) -> EmbeddingList:
    body = parse_body(EmbeddingsBody, await read_body(request, svc.settings.max_body_bytes))
    texts = body.texts(svc.settings.max_embedding_inputs)
    check_chars(svc, sum(map(len, texts)), "input")
    entry = await model_entry(svc, request, body.model, EMBEDDING_TASKS, "/v1/embeddings")
    results = await unless_client_leaves(request, svc.admission.encode(entry, texts))
    width = len(results[0][0]) if results else 0
    if body.dimensions is not None and body.dimensions != width:
        raise bad_param("dimensions", f"this model gives {width}-dimensional embeddings; it cannot give {body.dimensions}",
                        "unsupported_value")
    data = []
    for index, (vector, _) in enumerate(results):
        value = base64.b64encode(vector.tobytes()).decode("ascii") if body.encoding_format == "base64" else vector.tolist()
        data.append(Embedding(index=index, embedding=value))
    tokens = sum(n for _, n in results)
    return EmbeddingList(data=data, model=entry.name, usage=InputUsage(prompt_tokens=tokens, total_tokens=tokens))


@api.post("/v1/classify")
async def classify(request: Request, svc: Svc) -> ClassificationList:
    body = parse_body(ClassifyBody, await read_body(request, svc.settings.max_body_bytes))
    texts = body.texts(svc.settings.max_embedding_inputs)
    check_chars(svc, sum(map(len, texts)), "input")
    entry = await model_entry(svc, request, body.model, CLASSIFY_TASKS, "/v1/classify")
    results = await unless_client_leaves(request, svc.admission.encode(entry, texts))
    labels = entry.manifest.runtime.labels
    data: list[Classification | TokenClassification] = []
    for index, (scores, _) in enumerate(results):
        if entry.task == "token-classification":
            data.append(TokenClassification(index=index, entities=scores))
            continue
        ranked = sorted(((labels[i] if i < len(labels) else str(i), float(p)) for i, p in enumerate(scores)),
                        key=lambda pair: -pair[1])[: body.top_k]
        data.append(Classification(index=index, label=ranked[0][0], score=ranked[0][1],
                                   labels=[LabelScore(label=label, score=score) for label, score in ranked]))
    tokens = sum(n for _, n in results)
    return ClassificationList(data=data, model=entry.name, usage=InputUsage(prompt_tokens=tokens, total_tokens=tokens))


# ---- service endpoints --------------------------------------------------------------------------------------


@api.get("/v1/models")
async def list_models(svc: Svc) -> ModelList:
    return ModelList(data=[
        ModelCard(id=e.name, created=int(e.manifest.created.timestamp()), task=e.task, format=e.manifest.format,
                  quantization=e.manifest.quantization, state=e.state, footprint_bytes=e.footprint)
        for e in sorted(svc.catalog.entries.values(), key=lambda e: e.name)
    ])


@api.get("/v1/models/{name}")
async def get_model(name: str, svc: Svc) -> ModelInfo:
    entry = await svc.catalog.lookup(name)
    svc.lifecycle.check_serving(entry)
    return ModelInfo(id=entry.name, created=int(entry.manifest.created.timestamp()), task=entry.task, state=entry.state)


@api.get("/metrics")
async def metrics_endpoint(svc: Svc) -> Response:
    return Response(svc.metrics.render(svc.catalog.entries.values()), media_type=svc.metrics.content_type)


@probes.api_route("/health", methods=["GET", "HEAD"], response_model=Health)
async def health(svc: Svc) -> Response | Health:
    loading = svc.lifecycle.loading
    if svc.lifecycle.starting or loading:
        verifying = sorted(svc.catalog.verifying)
        what = ", ".join(loading) if loading else (f"verifying {', '.join(verifying)}" if verifying else "starting")
        return JSONResponse({"status": "loading", "error": {"message": f"Loading model ({what})", "type": "unavailable_error",
                             "param": None, "code": "loading"}}, status_code=503, headers={"Retry-After": "1"})
    rejected, failed = sorted(svc.catalog.rejected), svc.lifecycle.failed
    return Health(status="degraded" if rejected or failed else "ok", models=len(svc.catalog.entries),
                  loaded=sorted(e.name for e in svc.lifecycle.loaded), rejected=rejected, failed=failed,
                  verifying=sorted(svc.catalog.verifying), versions=svc.lifecycle.versions,
                  threads=WorkerThreads(threads=svc.lifecycle.threads.threads, cpus=svc.lifecycle.threads.cpus,
                                        source=svc.lifecycle.threads.source))
