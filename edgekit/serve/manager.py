"""Which models exist, which are loaded, and who may use them now.

- Discovery: every bundle under the models directory is verified in a subprocess (the daemon
  itself never parses a model file); a bad bundle is logged and skipped, the others serve.
- Loading: on first request or from the preload list, one load at a time, inside a memory
  budget: a model whose footprint exceeds the budget is refused; otherwise idle models are
  unloaded least-recently-used first until it fits. Idle models unload after a timeout.
- Admission: ``slots`` concurrent generations per model and a bounded queue (503 + Retry-After
  beyond it); embeddings/classify go through a micro-batcher per model.
- Crashes: a worker that dies fails only its in-flight requests; it is restarted at once unless it
  crashed ``restart_max`` times within ``restart_window_s``, then the model is marked failed until
  the window has passed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.bundle import REJECTED_SUFFIX, STAGING_PREFIX, read_manifest
from edgekit.errors import BundleError, EdgekitError
from edgekit.schema.manifest import MANIFEST_NAME, Manifest
from edgekit.serve.batching import MicroBatcher
from edgekit.serve.budget import MIB, effective_n_ctx, footprint_bytes, memory_budget
from edgekit.serve.errors import ApiError
from edgekit.serve.settings import ServeSettings
from edgekit.serve.workers import WorkerProcess

log = logging.getLogger("edgekit.serve")

RETRY_AFTER_S = 2


@dataclass
class ModelEntry:
    """One verified bundle and its runtime state."""

    name: str
    path: Path
    manifest: Manifest
    footprint: int
    state: str = "available"  # available | loading | ready | failed
    error: str | None = None
    worker: WorkerProcess | None = None
    load_task: asyncio.Task | None = None
    batcher: MicroBatcher | None = None
    slots: asyncio.Semaphore | None = None
    active: int = 0  # requests holding or waiting for this model
    waiting: int = 0  # requests waiting for a generation slot or the load
    last_used: float = field(default_factory=time.monotonic)
    crashes: deque[float] = field(default_factory=deque)
    loads: int = 0
    preload: bool = False
    verified: bool = True  # False for a preloaded bundle until its worker has verified and loaded it

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def queue_depth(self) -> int:
        return self.waiting + (self.batcher.depth if self.batcher else 0)


def bundle_dirs(models_dir: Path) -> list[Path]:
    """Candidate bundles: directories with a manifest, minus rejected and half-written ones."""
    if not models_dir.is_dir():
        return []
    return sorted(
        p for p in models_dir.iterdir()
        if p.is_dir() and (p / MANIFEST_NAME).is_file()
        and not p.name.startswith(STAGING_PREFIX) and not p.name.endswith(REJECTED_SUFFIX)
    )


def verify_in_subprocess(paths: list[Path], timeout: float = 600.0) -> list[dict[str, Any]]:
    """Run the full bundle checks in a child process; a parser crash there cannot take the daemon down."""
    if not paths:
        return []
    done = subprocess.run(
        [sys.executable, "-m", "edgekit.serve.worker", "verify", *map(str, paths)],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    rows = {}
    for line in done.stdout.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "dir" in row:
            rows[row["dir"]] = row
    results = []
    for path in paths:  # a bundle the verifier did not report on crashed it
        results.append(rows.get(str(path)) or {"dir": str(path), "ok": False, "name": path.name,
                                               "error": f"the verifier stopped (exit {done.returncode}) on this bundle"})
    return results


class ModelManager:
    """Owns the model entries and their workers for one daemon."""

    def __init__(self, settings: ServeSettings, metrics=None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.entries: dict[str, ModelEntry] = {}
        self.rejected: dict[str, str] = {}
        self.budget, self.budget_source = memory_budget(settings)
        self._load_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self.discovered = asyncio.Event()
        self.starting = True  # until discovery and the preload list are done: /health answers 503

    # ---- discovery -------------------------------------------------------------------------

    async def discover(self, skip: set[Path] = frozenset()) -> None:
        """Verify every bundle under the models directory (except ``skip``) and register the good ones."""
        paths = [p for p in bundle_dirs(self.settings.models) if p not in skip]
        for row in await asyncio.to_thread(verify_in_subprocess, paths):
            self._register(Path(row["dir"]), row)
        log.info("serving %d model(s) from %s: %s; memory budget %d MiB (%s)", len(self.entries), self.settings.models,
                 ", ".join(sorted(self.entries)) or "none", self.budget // MIB, self.budget_source)

    def _register(self, path: Path, row: dict[str, Any]) -> ModelEntry | None:
        if not row.get("ok"):
            self.rejected[path.name] = row.get("error") or "verification failed"
            log.error("skipping bundle %s: %s", path, row.get("error"))
            return None
        try:
            manifest = read_manifest(path)
        except BundleError as exc:
            self.rejected[path.name] = str(exc)
            log.error("skipping bundle %s: %s", path, exc)
            return None
        if manifest.name in self.entries:
            log.error("skipping bundle %s: a bundle named %s is already served from %s", path, manifest.name,
                      self.entries[manifest.name].path)
            return None
        entry = ModelEntry(manifest.name, path, manifest, footprint_bytes(manifest, self.settings),
                           slots=asyncio.Semaphore(self.settings.slots))
        self.entries[entry.name] = entry
        return entry

    async def _find_new(self, name: str) -> ModelEntry | None:
        """A bundle published after the daemon started: verify and register it on first request."""
        path = self.settings.models / name
        if name in self.rejected or "/" in name or name.startswith(".") or path not in bundle_dirs(self.settings.models):
            return None
        rows = await asyncio.to_thread(verify_in_subprocess, [path])
        return self._register(path, rows[0])

    async def entry(self, name: str) -> ModelEntry:
        await self.discovered.wait()
        entry = self.entries.get(name) or await self._find_new(name)
        if entry is None:
            reason = self.rejected.get(name)
            if reason:
                raise ApiError(503, f"model {name!r} is not served: its bundle failed verification: {reason}",
                               param="model", code="model_unavailable")
            raise ApiError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        if entry.state == "failed":
            if entry.crashes and time.monotonic() - entry.crashes[-1] > self.settings.restart_window_s:
                entry.state, entry.error = "available", None
                entry.crashes.clear()
            else:
                raise ApiError(503, f"model {name!r} is unavailable: {entry.error}", param="model", code="model_unavailable",
                               headers={"Retry-After": str(int(self.settings.restart_window_s))})
        return entry

    def require_task(self, entry: ModelEntry, tasks: tuple[str, ...], endpoint: str) -> None:
        if entry.task not in tasks:
            raise ApiError(400, f"model {entry.name!r} is a {entry.task} model; {endpoint} needs one of: {', '.join(tasks)}",
                           param="model", code="model_not_supported")

    # ---- loading and the memory budget -------------------------------------------------

    @property
    def loading(self) -> list[str]:
        return [e.name for e in self.entries.values() if e.state == "loading"]

    @property
    def loaded(self) -> list[ModelEntry]:
        return [e for e in self.entries.values() if e.state == "ready"]

    def used_bytes(self, excluding: ModelEntry | None = None) -> int:
        return sum(e.footprint for e in self.entries.values() if e.state in ("ready", "loading") and e is not excluding)

    async def ensure_loaded(self, entry: ModelEntry) -> WorkerProcess:
        while True:
            if entry.state == "ready" and entry.worker is not None and entry.worker.alive:
                return entry.worker
            if entry.state == "failed":
                raise ApiError(503, f"model {entry.name!r} is unavailable: {entry.error}", param="model",
                               code="model_unavailable")
            if entry.load_task is None or entry.load_task.done():
                entry.load_task = self.spawn(self._load(entry), f"load-{entry.name}")
            await asyncio.shield(entry.load_task)

    def spawn(self, coroutine, name: str) -> asyncio.Task:
        """Run ``coroutine`` as a task the manager owns (cancelled at shutdown)."""
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _load(self, entry: ModelEntry) -> None:
        async with self._load_lock:
            if entry.state == "ready" and entry.worker is not None and entry.worker.alive:
                return
            if self._closing:
                raise ApiError(503, "the daemon is shutting down", code="shutting_down")
            await self._make_room(entry)
            entry.state = "loading"
            started = time.perf_counter()
            worker = WorkerProcess(entry.name, entry.path, self._worker_config(entry), self._worker_exited, self._worker_env())
            try:
                await worker.start(self.settings.load_timeout_s)
            except BundleError as exc:
                if not entry.verified:  # a preloaded bundle its worker refused: not served, like at discovery
                    self.entries.pop(entry.name, None)
                    self.rejected[entry.path.name] = str(exc)
                entry.state, entry.error = "failed", f"bundle failed verification at load: {exc}"
                entry.crashes.append(time.monotonic())
                log.error("model %s: %s", entry.name, entry.error)
                raise ApiError(503, f"model {entry.name!r} is unavailable: {entry.error}", param="model",
                               code="model_unavailable") from exc
            except EdgekitError as exc:
                self._count_crash(entry, f"loading failed: {exc}")
                raise ApiError(503, f"model {entry.name!r} could not be loaded: {exc}", param="model",
                               code="model_load_failed") from exc
            except BaseException:
                await worker.kill()
                entry.state = "available"
                raise
            entry.worker, entry.state, entry.loads, entry.verified = worker, "ready", entry.loads + 1, True
            entry.last_used = time.monotonic()
            if entry.task != "text-generation" and entry.batcher is None:
                entry.batcher = MicroBatcher(lambda texts, e=entry: self._run_batch(e, texts),
                                             max_batch=self.settings.batch_max, max_wait=self.settings.batch_wait_ms / 1000,
                                             max_queue=self.settings.queue_size, retry_after=RETRY_AFTER_S)
            log.info("model %s loaded in %.2f s (worker pid %s, footprint estimate %d MiB)", entry.name,
                     time.perf_counter() - started, worker.pid, entry.footprint // MIB)

    def _worker_env(self) -> dict[str, str]:
        # llama.cpp's CPU backend runs its threads as an OpenMP team. With libgomp's default spin count a chat
        # generation next to an embeddings batch on 2 cores took 130 s instead of 3 s (median of 16-token chats in
        # an 8-client soak); 10,000 spins keep single-stream decode at the default's speed (scripts/bench_serve.py).
        count = self.settings.omp_spin_count
        if count is None:
            return {}
        return {"GOMP_SPINCOUNT": str(count), **({"OMP_WAIT_POLICY": "PASSIVE"} if count == 0 else {})}

    def _worker_config(self, entry: ModelEntry) -> dict[str, Any]:
        s = self.settings
        return {"n_ctx": effective_n_ctx(entry.manifest, s), "threads": s.threads,
                "slots": s.slots if entry.task == "text-generation" else 1, "batch_max": s.batch_max,
                "batch_max_tokens": s.batch_max_tokens,
                "max_prompt_chars": 4 * s.max_input_chars + 65536, "plugins": list(s.worker_plugins)}

    async def _make_room(self, entry: ModelEntry) -> None:
        need = entry.footprint
        if need > self.budget:
            raise ApiError(507, f"model {entry.name!r} needs about {need // MIB} MiB (weights + KV cache for "
                           f"n_ctx {effective_n_ctx(entry.manifest, self.settings)} x {self.settings.slots} slot(s)); "
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
        if entry.state == "ready":
            entry.state = "available"
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
            entry.state = "failed"
            entry.error = f"{reason} ({len(entry.crashes)} times within {self.settings.restart_window_s:.0f} s)"
            log.error("model %s marked failed: %s", entry.name, entry.error)
        else:
            entry.state = "available"

    def _worker_exited(self, worker: WorkerProcess) -> None:
        from edgekit.serve.workers import describe_exit

        entry = next((e for e in self.entries.values() if e.worker is worker), None)
        if entry is None:
            return
        entry.worker = None
        self._count_crash(entry, f"worker stopped with {describe_exit(worker.returncode)}")
        if self.metrics is not None:
            self.metrics.worker_restarts.labels(model=entry.name).inc()
        if entry.state == "available" and not self._closing:
            log.info("restarting the worker of model %s", entry.name)
            entry.load_task = self.spawn(self._load_quietly(entry), f"restart-{entry.name}")

    async def _load_quietly(self, entry: ModelEntry) -> None:
        try:
            await self._load(entry)
        except ApiError as exc:
            log.error("model %s: restart failed: %s", entry.name, exc.message)

    # ---- admission ---------------------------------------------------------------------------

    async def acquire_slot(self, entry: ModelEntry, timeout: float) -> None:
        """Wait for one of the model's generation slots (loading it if needed); 503 + Retry-After when the queue is full."""
        if self._closing:
            raise ApiError(503, "the daemon is shutting down", code="shutting_down")
        if entry.slots.locked() and entry.waiting >= self.settings.queue_size:
            raise ApiError(503, f"model {entry.name!r} is busy and its queue of {self.settings.queue_size} is full; "
                           "retry shortly", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        entry.active += 1
        entry.waiting += 1
        try:
            async with asyncio.timeout(timeout):
                await self.ensure_loaded(entry)
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

    async def encode(self, entry: ModelEntry, texts: list[str]) -> list[Any]:
        """Embeddings or class scores for ``texts`` through the model's micro-batcher."""
        if self._closing:
            raise ApiError(503, "the daemon is shutting down", code="shutting_down")
        entry.active += 1
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                await self.ensure_loaded(entry)
                while entry.batcher is None:  # unloaded between the load and now
                    await asyncio.sleep(0)
                    await self.ensure_loaded(entry)
                return await entry.batcher.submit(texts)
        except TimeoutError:
            raise ApiError(504, f"the request did not finish within {self.settings.request_timeout_s:.0f} s",
                           code="timeout") from None
        finally:
            entry.active -= 1
            entry.last_used = time.monotonic()

    async def _run_batch(self, entry: ModelEntry, texts: list[str]) -> list[Any]:
        import array

        worker = await self.ensure_loaded(entry)
        op = "embed" if entry.task == "feature-extraction" else "classify"
        stream = await worker.submit({"type": op, "op": op, "texts": texts})
        try:
            header, payload = await stream.next()
        finally:
            stream.close()
        tokens = header["tokens"]
        if "entities" in header:
            return [(items, n) for items, n in zip(header["entities"], tokens)]
        rows, width = header["shape"] if header["shape"] else (0, 0)
        values = array.array("f")
        values.frombytes(payload)
        return [(values[i * width : (i + 1) * width], n) for i, n in zip(range(rows), tokens)]

    # ---- lifecycle ---------------------------------------------------------------------------

    async def preload(self) -> None:
        for name in self.settings.preload:
            entry = self.entries.get(name)
            if entry is None:
                log.error("preload: no servable bundle named %s (rejected: %s)", name, self.rejected.get(name, "not found"))
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
        while not self._closing:
            await asyncio.sleep(max(0.2, min(30.0, period / 4)))
            now = time.monotonic()
            for entry in list(self.loaded):
                if entry.active == 0 and entry.queue_depth == 0 and now - entry.last_used > period:
                    log.info("unloading model %s after %.0f s idle", entry.name, now - entry.last_used)
                    await self.unload(entry)

    async def startup(self) -> None:
        """Discover bundles and load the preload list at the same time; /health is 503 until both are done.

        A preloaded bundle is registered from its manifest and verified by its own worker, which
        checks hashes and headers before llama.cpp or onnxruntime opens a file (and refuses to load
        otherwise); the other bundles are verified by the discovery pass meanwhile.
        """
        provisional = set()
        candidates = set(bundle_dirs(self.settings.models))
        for name in self.settings.preload:
            path = self.settings.models / name
            if path in candidates:
                entry = self._register(path, {"ok": True})
                if entry is not None:
                    entry.verified = False
                    provisional.add(path)
        preloading = self.spawn(self.preload(), "preload")
        try:
            await self.discover(skip=provisional)
        finally:
            self.discovered.set()
        try:
            await preloading
        finally:
            self.starting = False

    def start_background(self) -> None:
        self.spawn(self.startup(), "startup")
        self.spawn(self.reap_idle(), "idle-reaper")

    async def close(self) -> None:
        """Stop every worker (each finishes or is killed within the grace period)."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self.unload(e) for e in self.entries.values() if e.worker is not None),
                             return_exceptions=True)
