"""Who may use a model now: generation slots with a bounded queue, micro-batched encoders, one generation's life.

- ``slots`` concurrent generations per model and a queue of ``queue_size`` (503 + Retry-After beyond
  it); embeddings/classify go through a micro-batcher per model, bounded the same way.
- A generation is admitted once its worker has tokenized the prompt: the daemon decides whether it
  fits the context, the worker then streams; ``Generation.finish`` cancels what is unfinished and
  gives the slot back exactly once.
"""

from __future__ import annotations

import array
import asyncio
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from edgekit.runtime.llm import PromptTooLong
from edgekit.serve.batching import MicroBatcher
from edgekit.serve.errors import ApiError
from edgekit.serve.lifecycle import RETRY_AFTER_S, Lifecycle, ModelEntry
from edgekit.serve.protocol import Direct, Done, Encode, Generate, Proceed, Prompt, ProtocolError, ToDaemon
from edgekit.serve.settings import ServeSettings
from edgekit.serve.workers import RequestStream

CANCEL_WAIT_S = 5.0  # how long a cancelled generation may take to acknowledge before its slot is released anyway

GENERATION_TASKS = ("text-generation",)
EMBEDDING_TASKS = ("feature-extraction",)
CLASSIFY_TASKS = ("text-classification", "token-classification")


def require_task(entry: ModelEntry, tasks: tuple[str, ...], endpoint: str) -> None:
    if entry.task not in tasks:
        raise ApiError(400, f"model {entry.name!r} is a {entry.task} model; {endpoint} needs one of: {', '.join(tasks)}",
                       param="model", code="model_not_supported")


def check_prompt(tokens: int, n_ctx: int, param: str) -> None:
    """The daemon's one decision on a prompt's length: 400 if empty or if no token would fit after it."""
    if tokens == 0:
        raise ApiError(400, "the prompt is empty", param="prompt", code="empty_prompt")
    if tokens >= n_ctx:
        raise ApiError(400, str(PromptTooLong(tokens, n_ctx)), param=param, code="context_length_exceeded")


def check_token_ids(texts: list, vocab_size: int | None) -> None:
    """400 for a token id the model does not have (before it joins a micro-batch with other requests)."""
    for index, text in enumerate(texts):
        if isinstance(text, list) and vocab_size is not None and max(text) >= vocab_size:
            raise ApiError(400, f"input[{index}] holds token id {max(text)}; this model's ids run from 0 to {vocab_size - 1}",
                           param=f"input[{index}]", code="invalid_value")


class Admission:
    """Slots, queues and micro-batchers of the catalog's models."""

    def __init__(self, settings: ServeSettings, lifecycle: Lifecycle, metrics) -> None:
        self.settings = settings
        self.lifecycle = lifecycle
        self.metrics = metrics

    def _refuse_when_closing(self) -> None:
        if self.lifecycle.closing:
            raise ApiError(503, "the daemon is shutting down", code="shutting_down")

    async def acquire_slot(self, entry: ModelEntry, timeout: float) -> None:
        """Wait for one of the model's generation slots (loading it if needed); 503 + Retry-After when the queue is full."""
        self._refuse_when_closing()
        if entry.slots.locked() and entry.waiting >= self.settings.queue_size:
            raise ApiError(503, f"model {entry.name!r} is busy and its queue of {self.settings.queue_size} is full; "
                           "retry shortly", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        entry.active += 1
        entry.waiting += 1
        try:
            async with asyncio.timeout(timeout):
                await self.lifecycle.ensure_loaded(entry)
                await entry.slots.acquire()
        except TimeoutError:
            entry.active -= 1
            raise ApiError(504, f"waited {timeout:.0f} s for model {entry.name!r} without getting a turn", code="timeout") from None
        except BaseException:
            entry.active -= 1
            raise
        finally:
            entry.waiting -= 1

    def release_slot(self, entry: ModelEntry) -> None:
        """Give back a slot taken with ``acquire_slot`` (synchronous: safe inside a cancelled task)."""
        entry.slots.release()
        entry.active -= 1
        entry.last_used = time.monotonic()

    async def start_generation(self, entry: ModelEntry, job: Callable[..., Generate], param: str,
                               proceed: bool = True) -> Generation:
        """Take a slot, send the job, admit its prompt (errors such as context length come before any token); without
        ``proceed`` the caller lets the worker generate (``Generation.proceed``)."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        await self.acquire_slot(entry, timeout=self.settings.request_timeout_s)
        try:
            worker = await self.lifecycle.ensure_loaded(entry)
            stream = await worker.submit(job)
        except BaseException:
            self.release_slot(entry)
            raise
        generation = Generation(self, entry, stream, deadline)
        try:
            await generation.admit(param)
            if proceed:
                generation.proceed()
        except BaseException:
            await generation.finish()
            raise
        return generation

    async def encode(self, entry: ModelEntry, texts: list[str | list[int]]) -> list[Any]:
        """Embeddings or class scores for ``texts`` through the model's micro-batcher."""
        self._refuse_when_closing()
        entry.active += 1
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                worker = await self.lifecycle.ensure_loaded(entry)
                check_token_ids(texts, worker.facts.vocab_size)
                return await self._batcher(entry).submit(texts)
        except TimeoutError:
            raise ApiError(504, f"the request did not finish within {self.settings.request_timeout_s:.0f} s",
                           code="timeout") from None
        finally:
            entry.active -= 1
            entry.last_used = time.monotonic()

    def _batcher(self, entry: ModelEntry) -> MicroBatcher:
        """The model's micro-batcher (made on its first use after a load; unloading closes it)."""
        if entry.batcher is None:
            entry.batcher = MicroBatcher(partial(self._run_batch, entry), max_batch=self.settings.batch_max,
                                         max_wait=self.settings.batch_wait_ms / 1000, max_queue=self.settings.queue_size,
                                         retry_after=RETRY_AFTER_S)
        return entry.batcher

    async def _run_batch(self, entry: ModelEntry, texts: list[str]) -> list[Any]:
        worker = await self.lifecycle.ensure_loaded(entry)
        op = "embed" if entry.task == "feature-extraction" else "classify"
        stream = await worker.submit(partial(Encode, type=op, texts=texts))
        try:
            result, payload = await stream.next()
        finally:
            stream.close()
        tokens = result.tokens
        if result.entities is not None:
            return [([label.model_dump() for label in labels], n) for labels, n in zip(result.entities, tokens)]
        rows, width = result.shape if result.shape else (0, 0)
        values = array.array("f")
        values.frombytes(payload)
        return [(values[i * width : (i + 1) * width], n) for i, n in zip(range(rows), tokens)]


class Generation:
    """One generation in flight: its worker stream, its slot, its deadline; ``finish()`` releases both exactly once."""

    def __init__(self, admission: Admission, entry: ModelEntry, stream: RequestStream, deadline: float) -> None:
        self.admission = admission
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
        return ApiError(504, f"the request did not finish within {self.admission.settings.request_timeout_s:.0f} s "
                        "and was cancelled", code="timeout")

    async def next(self) -> tuple[ToDaemon, bytes]:
        try:
            async with asyncio.timeout(self.remaining()):
                return await self.stream.next()
        except TimeoutError:
            raise self.timed_out() from None

    async def admit(self, param: str) -> None:
        """Wait for the worker's ``Prompt`` and decide whether it fits (``check_prompt``)."""
        prompt, _ = await self.next()
        if not isinstance(prompt, Prompt):
            raise ProtocolError(f"model {self.entry.name!r}: the worker sent {prompt.type!r} instead of the prompt")
        try:
            check_prompt(prompt.tokens, self.stream.worker.facts.n_ctx, param)
        except ApiError:
            self.stream.close()  # refused: the worker's "cancelled" answer is not a generation
            raise
        self.prompt_tokens = prompt.tokens

    def proceed(self, client: int | None = None, head: str = "", tail: str = "") -> bool:
        """Let the worker generate. With ``client`` (a TCP socket's fd) the worker takes the socket and writes each
        delta's event, ``head`` + JSON string + ``tail``, itself (handoff.py); True if it did."""
        direct = Direct(head=head, tail=tail, seconds=self.remaining())
        if client is not None and self.stream.worker.hand_over(self.stream.id, client, direct):
            return True
        self.stream.worker.send(Proceed(id=self.stream.id))
        return False

    def record(self, done: Done) -> None:
        finish = done.finish
        self.finish_reason = finish.reason
        prompt, completion = finish.prompt_tokens, finish.completion_tokens
        self.usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        metrics, model = self.admission.metrics, self.entry.name
        metrics.generations.labels(model=model, finish_reason=self.finish_reason).inc()
        metrics.tokens_generated.labels(model=model).inc(completion)
        metrics.prompt_tokens.labels(model=model).inc(prompt)
        if finish.decode_seconds and completion > 1:
            metrics.decode_rate.labels(model=model).set(completion / finish.decode_seconds)

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
                    self.admission.lifecycle.spawn(self._drain_late(), f"late-cancel-{self.stream.id}")
                except ApiError:
                    pass
        finally:
            if not late:
                self.stream.close()
            if not self.released:
                self.released = True
                self.admission.release_slot(self.entry)

    async def _drain(self) -> None:
        while not self.stream.finished:
            message, _ = await self.stream.next()
            if isinstance(message, Done):
                self.record(message)

    async def _drain_late(self) -> None:
        try:
            async with asyncio.timeout(self.admission.settings.request_timeout_s):
                await self._drain()
        except (TimeoutError, ApiError):
            pass
        finally:
            self.stream.close()
