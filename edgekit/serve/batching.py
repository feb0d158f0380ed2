"""Micro-batching: concurrent embeddings/classify requests of one model run as one batch.

A request's texts wait in a queue; a single runner loop takes everything waiting (up to
``max_batch`` texts), waits ``max_wait`` more when the batch is not full, runs it on the worker
and hands each request its slice. One batch runs at a time, so requests that arrive while the
model is busy make the next batch bigger instead of queueing behind each other (TEI's design).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from edgekit.serve.errors import ApiError

RunBatch = Callable[[list[str]], Awaitable[list[Any]]]  # texts -> one result per text


@dataclass
class _Item:
    texts: list[str]
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MicroBatcher:
    """Collects texts from concurrent requests into batches of at most ``max_batch`` texts."""

    def __init__(self, run: RunBatch, *, max_batch: int, max_wait: float, max_queue: int, retry_after: int = 1) -> None:
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.retry_after = retry_after
        self.waiting: deque[_Item] = deque()
        self.busy = False
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return len(self.waiting)

    async def submit(self, texts: list[str]) -> list[Any]:
        """Results for ``texts`` in order; 503 when ``max_queue`` requests are already waiting."""
        if len(self.waiting) >= self.max_queue and (self.busy or self.waiting):
            raise ApiError(503, "the model's queue is full; retry shortly", code="queue_full",
                           headers={"Retry-After": str(self.retry_after)})
        item = _Item(list(texts))
        self.waiting.append(item)
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="micro-batcher")
        try:
            return await asyncio.shield(item.future)
        except asyncio.CancelledError:
            if item in self.waiting:  # the client left before its batch started
                self.waiting.remove(item)
            raise

    async def _take(self) -> list[_Item]:
        batch, size = [], 0
        deadline = None
        while True:
            while self.waiting and (not batch or size + len(self.waiting[0].texts) <= self.max_batch):
                item = self.waiting.popleft()
                batch.append(item)
                size += len(item.texts)
            if size >= self.max_batch or self.max_wait <= 0 or (batch and self.waiting):
                return batch
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.max_wait
            remaining = deadline - loop.time()
            if remaining <= 0:
                return batch
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return batch

    async def _loop(self) -> None:
        while self.waiting:
            batch = await self._take()
            if not batch:
                continue
            self.busy = True
            texts = [text for item in batch for text in item.texts]
            try:
                results = await self.run(texts)
            except Exception as exc:  # the batch failed (crash, bad input): every request in it gets the error
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            finally:
                self.busy = False
            offset = 0
            for item in batch:
                if not item.future.done():
                    item.future.set_result(results[offset : offset + len(item.texts)])
                offset += len(item.texts)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for item in self.waiting:
            if not item.future.done():
                item.future.set_exception(ApiError(503, "the model is being unloaded", code="model_unloading"))
        self.waiting.clear()
