"""Which models are loaded: one worker per model, inside a memory budget, restarted after crashes.

- Loading: on first request or from the preload list, one load at a time, inside a memory
  budget: a model whose footprint exceeds the budget is refused; otherwise idle models are
  unloaded least-recently-used first until it fits. Idle models unload after a timeout.
- Crashes: a worker that dies fails only its in-flight requests; it is restarted at once unless it
  crashed ``restart_max`` times within ``restart_window_s``, then the model is marked failed until
  the window has passed.

A model's state moves only along ``TRANSITIONS``; anything else is a bug and raises.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from edgekit.errors import BundleError, EdgekitError
from edgekit.runtime.placement import worker_threads
from edgekit.schema.manifest import Manifest
from edgekit.serve.batching import MicroBatcher
from edgekit.serve.budget import MIB, effective_n_ctx, footprint_terms, memory_budget
from edgekit.serve.errors import ApiError
from edgekit.serve.protocol import FileIdentity, WorkerConfig
from edgekit.serve.settings import ServeSettings
from edgekit.serve.workers import GoldenCheckFailed, WorkerProcess, describe_exit

log = logging.getLogger("edgekit.serve")

RETRY_AFTER_S = 2


class ModelState(StrEnum):
    AVAILABLE = "available"  # verified, no worker
    LOADING = "loading"  # a worker is starting
    READY = "ready"  # a worker answers
    FAILED = "failed"  # refused at load or crashed too often; retried after the crash window


# Allowed moves; READY -> LOADING replaces a worker that died before its exit was handled.
TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    ModelState.AVAILABLE: frozenset({ModelState.LOADING}),
    ModelState.LOADING: frozenset({ModelState.READY, ModelState.AVAILABLE, ModelState.FAILED}),
    ModelState.READY: frozenset({ModelState.LOADING, ModelState.AVAILABLE, ModelState.FAILED}),
    ModelState.FAILED: frozenset({ModelState.AVAILABLE}),
}


@dataclass
class ModelEntry:
    """One servable bundle and its runtime state."""

    name: str
    path: Path
    manifest: Manifest
    footprint: int
    slots: asyncio.Semaphore
    state: ModelState = ModelState.AVAILABLE
    error: str | None = None
    worker: WorkerProcess | None = None
    load_task: asyncio.Task | None = None
    batcher: MicroBatcher | None = None
    active: int = 0  # requests holding or waiting for this model
    waiting: int = 0  # requests waiting for a generation slot or the load
    last_used: float = field(default_factory=time.monotonic)
    crashes: deque[float] = field(default_factory=deque)
    loads: int = 0
    preload: bool = False
    verified: bool = True  # False for a preloaded bundle until its worker has verified and loaded it
    verified_files: list[FileIdentity] | None = None  # the files as they were when last hashed in full

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def queue_depth(self) -> int:
        return self.waiting + (self.batcher.depth if self.batcher else 0)

    @property
    def serving(self) -> bool:
        return self.state is ModelState.READY and self.worker is not None and self.worker.alive

    def move(self, state: ModelState, error: str | None = None) -> None:
        """Change state along ``TRANSITIONS`` (staying put is allowed); ``error`` says why a model failed."""
        if state is not self.state and state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"model {self.name}: no transition from {self.state} to {state}")
        self.state, self.error = state, error


class Lifecycle:
    """Starts, stops and restarts the workers of the catalog's models; owns the daemon's background tasks."""

    def __init__(self, settings: ServeSettings, catalog, metrics=None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.metrics = metrics
        self.budget, self.budget_source = memory_budget(settings)
        self.threads = worker_threads(settings.threads, settings.device)
        self._load_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.closing = False
        self.starting = True  # until discovery and the preload list are done: /health answers 503

    # ---- state --------------------------------------------------------------------------------

    @property
    def loading(self) -> list[str]:
        return [e.name for e in self.catalog.entries.values() if e.state is ModelState.LOADING]

    @property
    def loaded(self) -> list[ModelEntry]:
        return [e for e in self.catalog.entries.values() if e.state is ModelState.READY]

    @property
    def failed(self) -> dict[str, str]:
        """Failed models and why (refused at load, golden check failed, or crashed too often)."""
        return {e.name: e.error or "failed" for e in self.catalog.entries.values() if e.state is ModelState.FAILED}

    def used_bytes(self, excluding: ModelEntry | None = None) -> int:
        return sum(e.footprint for e in self.catalog.entries.values()
                   if e.state in (ModelState.READY, ModelState.LOADING) and e is not excluding)

    def check_serving(self, entry: ModelEntry) -> None:
        """503 + Retry-After for a failed model, unless its crash window has passed (then it may load again)."""
        if entry.state is not ModelState.FAILED:
            return
        if entry.crashes and time.monotonic() - entry.crashes[-1] > self.settings.restart_window_s:
            entry.move(ModelState.AVAILABLE)
            entry.crashes.clear()
            return
        raise ApiError(503, f"model {entry.name!r} is unavailable: {entry.error}", param="model", code="model_unavailable",
                       headers={"Retry-After": str(int(self.settings.restart_window_s))})

    # ---- loading and the memory budget -------------------------------------------------------

    async def ensure_loaded(self, entry: ModelEntry) -> WorkerProcess:
        while True:
            if entry.serving:
                return entry.worker
            if entry.state is ModelState.FAILED:
                raise ApiError(503, f"model {entry.name!r} is unavailable: {entry.error}", param="model",
                               code="model_unavailable")
            if entry.load_task is None or entry.load_task.done():
                entry.load_task = self.spawn(self._load(entry), f"load-{entry.name}")
            await asyncio.shield(entry.load_task)

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        """Run ``coroutine`` as a task the daemon owns (cancelled at shutdown)."""
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _load(self, entry: ModelEntry) -> None:
        async with self._load_lock:
            if entry.serving:
                return
            if self.closing:
                raise ApiError(503, "the daemon is shutting down", code="shutting_down")
            if entry.state is ModelState.FAILED:  # it failed while this load waited for the lock
                raise ApiError(503, f"model {entry.name!r} is unavailable: {entry.error}", param="model",
                               code="model_unavailable")
            await self._make_room(entry)
            entry.move(ModelState.LOADING)
            started = time.perf_counter()
            worker = WorkerProcess(entry.name, entry.path, self.worker_config(entry), self._worker_exited, self.worker_env(),
                                   heartbeat=(self.settings.heartbeat_interval_s, self.settings.heartbeat_timeout_s))
            try:
                ready = await worker.start(self.settings.load_timeout_s)
            except BundleError as exc:
                entry.verified_files = None
                if not entry.verified:  # a preloaded bundle its worker refused: not served, like at discovery
                    self.catalog.reject(entry, str(exc))
                entry.move(ModelState.FAILED, f"bundle failed verification at load: {exc}")
                entry.crashes.append(time.monotonic())
                log.error("model %s: %s", entry.name, entry.error)
                raise ApiError(503, f"model {entry.name!r} is unavailable: {entry.error}", param="model",
                               code="model_unavailable") from exc
            except GoldenCheckFailed as exc:
                entry.move(ModelState.FAILED, str(exc))
                entry.crashes.append(time.monotonic())  # retried after the crash window, like any failed load
                log.error("model %s is not served: %s", entry.name, entry.error)
                raise ApiError(503, f"model {entry.name!r} is unavailable: {entry.error}", param="model",
                               code="model_unavailable") from exc
            except EdgekitError as exc:
                self._count_crash(entry, f"loading failed: {exc}")
                raise ApiError(503, f"model {entry.name!r} could not be loaded: {exc}", param="model",
                               code="model_load_failed") from exc
            except BaseException:
                await worker.kill()
                entry.move(ModelState.AVAILABLE)
                raise
            entry.worker, entry.loads, entry.verified = worker, entry.loads + 1, True
            entry.move(ModelState.READY)
            if ready.files is not None:  # the worker hashed the bundle: later loads may trust these files
                entry.verified_files = ready.files
                self.catalog.verified_by_worker(entry)
            entry.last_used = time.monotonic()
            log.info("model %s loaded in %.2f s (worker pid %s, footprint estimate %d MiB)", entry.name,
                     time.perf_counter() - started, worker.pid, entry.footprint // MIB)

    def worker_env(self) -> dict[str, str]:
        # llama.cpp's CPU backend runs its threads as an OpenMP team. With libgomp's default spin count a chat
        # generation next to an embeddings batch on 2 cores took 130 s instead of 3 s (median of 16-token chats in
        # an 8-client soak); 10,000 spins keep single-stream decode at the default's speed (scripts/bench_serve.py).
        count = self.settings.omp_spin_count
        if count is None:
            return {}
        return {"GOMP_SPINCOUNT": str(count), **({"OMP_WAIT_POLICY": "PASSIVE"} if count == 0 else {})}

    def worker_config(self, entry: ModelEntry) -> WorkerConfig:
        s = self.settings
        cpus = list(self.threads.cpus) if self.threads.cpus else None
        return WorkerConfig(n_ctx=effective_n_ctx(entry.manifest, s), threads=self.threads.threads, cpus=cpus,
                            slots=s.slots if entry.task == "text-generation" else 1, batch_max=s.batch_max,
                            batch_max_tokens=s.batch_max_tokens, max_prompt_chars=4 * s.max_input_chars + 65536,
                            plugins=list(s.worker_plugins), verified=entry.verified_files,
                            special_in_content=s.allow_control_tokens_in_content,
                            prompt_cache_contexts=s.prompt_cache_contexts)

    async def _make_room(self, entry: ModelEntry) -> None:
        need = entry.footprint
        if need > self.budget:
            raise ApiError(507, f"model {entry.name!r} needs about {need // MIB} MiB "
                           f"({footprint_terms(entry.manifest, self.settings)}); "
                           f"the memory budget is {self.budget // MIB} MiB ({self.budget_source})",
                           param="model", code="insufficient_memory")
        while self.used_bytes(excluding=entry) + need > self.budget:
            idle = sorted((e for e in self.loaded if e is not entry and e.active == 0 and e.queue_depth == 0),
                          key=lambda e: e.last_used)
            if not idle:
                raise ApiError(503, f"model {entry.name!r} needs {need // MIB} MiB and the budget of {self.budget // MIB} MiB "
                               "is held by busy models; retry shortly", param="model", code="insufficient_memory",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            log.info("unloading idle model %s (least recently used) to make room for %s", idle[0].name, entry.name)
            await self.unload(idle[0])

    async def unload(self, entry: ModelEntry) -> None:
        worker, entry.worker = entry.worker, None
        if entry.state is ModelState.READY:
            entry.move(ModelState.AVAILABLE)
        if entry.batcher is not None:
            batcher, entry.batcher = entry.batcher, None
            await batcher.close()
        if worker is not None:
            await worker.stop(self.settings.grace_s)

    def _count_crash(self, entry: ModelEntry, reason: str) -> None:
        now = time.monotonic()
        entry.crashes.append(now)
        while entry.crashes and now - entry.crashes[0] > self.settings.restart_window_s:
            entry.crashes.popleft()
        if len(entry.crashes) > self.settings.restart_max:
            entry.move(ModelState.FAILED, f"{reason} ({len(entry.crashes)} times within {self.settings.restart_window_s:.0f} s)")
            log.error("model %s marked failed: %s", entry.name, entry.error)
        else:
            entry.move(ModelState.AVAILABLE)

    def _worker_exited(self, worker: WorkerProcess) -> None:
        entry = next((e for e in self.catalog.entries.values() if e.worker is worker), None)
        if entry is None:
            return
        entry.worker = None
        replacing = entry.state is ModelState.LOADING  # a request already started a new worker: let that load finish
        if replacing:
            entry.crashes.append(time.monotonic())
        else:
            self._count_crash(entry, "worker stopped answering its heartbeat" if worker.hung
                              else f"worker stopped with {describe_exit(worker.returncode)}")
        if self.metrics is not None:
            self.metrics.worker_restarts.labels(model=entry.name).inc()
            if worker.hung:
                self.metrics.worker_hangs.labels(model=entry.name).inc()
        if not replacing and entry.state is ModelState.AVAILABLE and not self.closing:
            log.info("restarting the worker of model %s", entry.name)
            entry.load_task = self.spawn(self._load_quietly(entry), f"restart-{entry.name}")

    async def _load_quietly(self, entry: ModelEntry) -> None:
        try:
            await self._load(entry)
        except ApiError as exc:
            log.error("model %s: restart failed: %s", entry.name, exc.message)

    # ---- the daemon's life --------------------------------------------------------------------

    async def preload(self) -> None:
        for name in self.settings.preload:
            entry = self.catalog.entries.get(name)
            if entry is None:
                log.error("preload: no servable bundle named %s (rejected: %s)", name,
                          self.catalog.rejected.get(name, "not found"))
                continue
            entry.preload = True
            try:
                await self.ensure_loaded(entry)
            except ApiError as exc:
                log.error("preload of %s failed: %s", name, exc.message)

    async def reap_idle(self) -> None:
        """Unload models idle for longer than ``idle_unload_s`` (checked a few times per period)."""
        period = self.settings.idle_unload_s
        if period <= 0:
            return
        while not self.closing:
            await asyncio.sleep(max(0.2, min(30.0, period / 4)))
            now = time.monotonic()
            for entry in list(self.loaded):
                if entry.active == 0 and entry.queue_depth == 0 and now - entry.last_used > period:
                    log.info("unloading model %s after %.0f s idle", entry.name, now - entry.last_used)
                    await self.unload(entry)

    async def startup(self) -> None:
        """Discover bundles and load the preload list at the same time; /health is 503 until both are done.

        Each bundle is served as soon as it is verified, and each has its own time limit, so this
        always ends. A preloaded bundle is registered from its manifest and verified by its own worker, which
        checks hashes and headers before llama.cpp or onnxruntime opens a file (and refuses to load
        otherwise); the other bundles are verified by the discovery pass meanwhile.
        """
        provisional = self.catalog.register_unverified(self.settings.preload)
        preloading = self.spawn(self.preload(), "preload")
        try:
            try:
                await self.catalog.discover(skip=provisional)
            except Exception:  # a bug; logged, and the daemon still leaves "starting" with what it has verified
                log.exception("bundle discovery stopped")
            finally:
                self.catalog.discovered.set()
            log.info("serving %d model(s) from %s: %s; memory budget %d MiB (%s); %s per model", len(self.catalog.entries),
                     self.settings.models, ", ".join(sorted(self.catalog.entries)) or "none", self.budget // MIB,
                     self.budget_source, self.threads.describe())
        finally:
            try:
                await preloading
            finally:
                self.starting = False

    def start_background(self) -> None:
        self.spawn(self.startup(), "startup")
        self.spawn(self.reap_idle(), "idle-reaper")

    async def close(self) -> None:
        """Stop every worker (each finishes or is killed within the grace period)."""
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self.unload(e) for e in self.catalog.entries.values() if e.worker is not None),
                             return_exceptions=True)
