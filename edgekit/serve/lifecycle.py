"""Which models are loaded: one worker per model, inside a memory budget, restarted after crashes.

- Loading: on first request or from the preload list, one load at a time, inside a memory
  budget: a model whose footprint exceeds the budget is refused; otherwise idle models are
  unloaded least-recently-used first until it fits. Idle models unload after a timeout.
- Crashes: a worker that dies fails only its in-flight requests; it is restarted at once unless it
  crashed ``restart_max`` times within ``restart_window_s``, then the model is marked failed until
  the window has passed.
- Versions: a model served through a link (``edgekit update`` switches ``DIR/<name>`` between kept
  versions) is reloaded in place when the link points elsewhere (checked every ``version_poll_s`` and
  on SIGHUP): the new version is verified and a worker is loaded on it (golden checks included) while
  the old worker serves; then new requests go to the new worker, the old one finishes its in-flight
  requests and stops. A version that fails is not served; the old one keeps serving and /health says
  why, so ``edgekit update --daemon`` switches the link back.

A model's state moves only along ``TRANSITIONS``; anything else is a bug and raises.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from edgekit.errors import BundleError, EdgekitError
from edgekit.runtime.placement import OMP_SPIN_COUNT, omp_env, worker_threads
from edgekit.runtime.verify import read_manifest_capped
from edgekit.schema.manifest import Manifest
from edgekit.serve.batching import MicroBatcher
from edgekit.serve.budget import MIB, effective_n_ctx, footprint_bytes, footprint_terms, memory_budget
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
    target: Path | None = None  # the folder behind ``path`` that the worker runs (a version, when ``path`` is a link)
    versioned: bool = False  # ``path`` is a link switched by `edgekit update`
    refused_target: Path | None = None  # a version the link pointed at that failed to load; the old one kept serving
    reload_error: str | None = None  # why ``refused_target`` was not served
    retiring_bytes: int = 0  # footprint of an old worker finishing its requests, or of a new one loading, after a switch

    def __post_init__(self) -> None:
        if self.target is None:
            self.target = Path(os.path.realpath(self.path))
            self.versioned = self.path.is_symlink()

    @property
    def version(self) -> str | None:
        """The version served (the link's target folder name), for a model managed by `edgekit update`."""
        return self.target.name if self.versioned and self.target is not None else None

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


def worker_spin_count(settings: ServeSettings) -> int | None:
    """The workers' GOMP_SPINCOUNT: ``--omp-spin-count`` when given; by default its long spin while the models directory
    holds at most one GGUF bundle, and the CLI tools' short one when it holds several (read at start)."""
    from edgekit.serve.discovery import bundle_dirs  # discovery imports this module

    if "omp_spin_count" in settings.model_fields_set:
        return settings.omp_spin_count
    gguf = 0
    for folder in bundle_dirs(settings.models):
        try:
            gguf += read_manifest_capped(folder).format == "gguf"
        except (BundleError, OSError, ValueError):
            continue  # discovery reports it
    # Two llama.cpp workers decoding at once on the same cores wait on each other's spinning threads: two SmolLM2
    # models, 2 streams each on 2 cores, decoded 38 tok/s together at 300,000 turns and 94 at 1,000.
    return settings.omp_spin_count if gguf <= 1 else OMP_SPIN_COUNT


class Lifecycle:
    """Starts, stops and restarts the workers of the catalog's models; owns the daemon's background tasks."""

    def __init__(self, settings: ServeSettings, catalog, metrics=None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.metrics = metrics
        self.budget, self.budget_source = memory_budget(settings)
        self.threads = worker_threads(settings.threads, settings.device)
        self.spin_count = worker_spin_count(settings)
        self._load_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.closing = False
        self.starting = True  # until discovery and the preload list are done: /health answers 503
        self._version_check = asyncio.Event()
        self._reloading: dict[str, asyncio.Task] = {}
        self._sighup = False

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
        entries = self.catalog.entries.values()
        return (sum(e.footprint for e in entries if e.state in (ModelState.READY, ModelState.LOADING) and e is not excluding)
                + sum(e.retiring_bytes for e in entries))

    @property
    def versions(self) -> dict[str, dict[str, str | None]]:
        """Models served through an `edgekit update` link: the version served, and a refused one with the reason."""
        return {e.name: {"serving": e.version, "refused": e.refused_target.name if e.refused_target else None,
                         "error": e.reload_error} for e in self.catalog.entries.values() if e.versioned}

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
            # the resolved version folder: a link switched meanwhile is a reload, never a worker on a mix of versions
            worker = WorkerProcess(entry.name, entry.target, self.worker_config(entry), self._worker_exited, self.worker_env(),
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
        return omp_env(self.spin_count)

    def worker_config(self, entry: ModelEntry, manifest: Manifest | None = None,
                      verified: list[FileIdentity] | None = None) -> WorkerConfig:
        """The worker settings for ``entry`` (or for another version of it: ``manifest`` and its ``verified`` files)."""
        s = self.settings
        manifest = manifest or entry.manifest
        verified = verified if manifest is not entry.manifest else entry.verified_files
        cpus = list(self.threads.cpus) if self.threads.cpus else None
        return WorkerConfig(n_ctx=effective_n_ctx(manifest, s), threads=self.threads.threads, cpus=cpus,
                            slots=s.slots if manifest.task == "text-generation" else 1, batch_max=s.batch_max,
                            batch_max_tokens=s.batch_max_tokens, max_prompt_chars=4 * s.max_input_chars + 65536,
                            plugins=list(s.worker_plugins), verified=verified,
                            special_in_content=s.allow_control_tokens_in_content,
                            prompt_cache_contexts=s.prompt_cache_contexts)

    async def _make_room(self, entry: ModelEntry, need: int | None = None, keep: bool = False) -> None:
        """Unload idle models until ``need`` (default: ``entry``'s footprint) fits; ``keep``: ``entry``'s own worker stays."""
        need = entry.footprint if need is None else need
        if need > self.budget:
            raise ApiError(507, f"model {entry.name!r} needs about {need // MIB} MiB "
                           f"({footprint_terms(entry.manifest, self.settings)}); "
                           f"the memory budget is {self.budget // MIB} MiB ({self.budget_source})",
                           param="model", code="insufficient_memory")
        while self.used_bytes(excluding=None if keep else entry) + need > self.budget:
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

    # ---- switched versions: reload in place ------------------------------------------------------

    def check_versions_soon(self) -> None:
        """Look at every model's link now (SIGHUP, or a caller that just switched one)."""
        self._version_check.set()

    def _on_sighup(self) -> None:
        log.info("SIGHUP: checking the served version of every model (refused versions are tried again)")
        for entry in self.catalog.entries.values():
            entry.refused_target = None
        self.check_versions_soon()

    async def watch_versions(self) -> None:
        """Reload a model whose link points at another version (every ``version_poll_s``, and on SIGHUP)."""
        period = self.settings.version_poll_s
        while not self.closing:
            try:
                await asyncio.wait_for(self._version_check.wait(), period if period > 0 else None)
            except TimeoutError:
                pass
            self._version_check.clear()
            await self.catalog.discovered.wait()
            for entry in list(self.catalog.entries.values()):
                self._check_version(entry)

    def _check_version(self, entry: ModelEntry) -> None:
        try:
            target = Path(os.path.realpath(entry.path, strict=True))
        except OSError:
            return  # the link is being replaced or the bundle removed: nothing to switch to
        entry.versioned = entry.path.is_symlink()  # a plain folder adopted by `edgekit update` becomes a link
        if target == entry.target:
            entry.refused_target = entry.reload_error = None  # switched back (or never left): nothing is refused
            return
        if target == entry.refused_target or entry.name in self._reloading:
            return
        task = self.spawn(self.reload(entry, target), f"reload-{entry.name}")
        self._reloading[entry.name] = task
        task.add_done_callback(lambda _: self._reloading.pop(entry.name, None))

    async def reload(self, entry: ModelEntry, target: Path) -> bool:
        """Serve ``entry`` from the version folder ``target``: verify it, load it beside the running worker, swap, retire the old one."""
        log.info("model %s: the link now points at %s; reloading", entry.name, target.name)
        started = time.perf_counter()
        try:
            manifest, files = await self._verify_version(entry, target)
        except BundleError as exc:
            return self._refuse_version(entry, target, f"verification failed: {exc}")
        need = footprint_bytes(manifest, self.settings)
        if not entry.serving:  # nothing running: the new version is the model now; load it so its checks run at once
            async with self._load_lock:
                if entry.state is ModelState.LOADING or entry.serving:
                    pass  # a load started meanwhile on the old version: swap below like any running worker
                else:
                    self._adopt_version(entry, target, manifest, need, files)
                    if entry.state is ModelState.FAILED:
                        entry.move(ModelState.AVAILABLE)
                        entry.crashes.clear()
            if not entry.serving and entry.target == target:
                try:
                    await self.ensure_loaded(entry)
                except ApiError as exc:
                    log.error("model %s: version %s is not served: %s", entry.name, target.name, exc.message)
                    return False
                log.info("model %s: now serving %s (loaded in %.2f s)", entry.name, target.name, time.perf_counter() - started)
                return True
        async with self._load_lock:
            if self.closing:
                return False
            if not entry.serving:  # its worker died meanwhile: the restart loads whatever the entry points at
                self._adopt_version(entry, target, manifest, need, files)
                return True
            try:
                await self._make_room(entry, need, keep=True)
            except ApiError as exc:
                return self._refuse_version(entry, target, f"no memory to run both versions during the switch: {exc.message}")
            entry.retiring_bytes += need  # the new worker, charged while it loads beside the old one
            worker = WorkerProcess(entry.name, target, self.worker_config(entry, manifest, files), self._worker_exited,
                                   self.worker_env(), heartbeat=(self.settings.heartbeat_interval_s, self.settings.heartbeat_timeout_s))
            try:
                ready = await worker.start(self.settings.load_timeout_s)
            except EdgekitError as exc:  # bundle refused at load, golden checks failed, or the worker died loading
                return self._refuse_version(entry, target, str(exc))
            except BaseException:
                await worker.kill()
                raise
            finally:
                entry.retiring_bytes -= need
            old, old_bytes = entry.worker, entry.footprint
            self._adopt_version(entry, target, manifest, need, ready.files or files)
            entry.worker, entry.loads, entry.last_used = worker, entry.loads + 1, time.monotonic()
            entry.retiring_bytes += old_bytes
        log.info("model %s: now serving %s (loaded in %.2f s beside the old worker, pid %s -> %s); the old worker finishes "
                 "%d in-flight request(s)", entry.name, target.name, time.perf_counter() - started, old.pid, worker.pid,
                 len(old.pending))
        self.spawn(self._retire(entry, old, old_bytes), f"retire-{entry.name}-{old.pid}")
        return True

    async def _verify_version(self, entry: ModelEntry, target: Path) -> tuple[Manifest, list[FileIdentity] | None]:
        """Hash and check ``target`` in the verifier subprocess (as discovery does); its manifest must name the same model."""
        from edgekit.serve.discovery import Folder, fingerprint, verify_bundles

        prints = await asyncio.to_thread(fingerprint, target)

        rows = verify_bundles([target], self.settings.verify_timeout_s, self.settings.worker_plugins)
        row = None
        try:
            async for row in rows:
                break
        finally:
            await rows.aclose()
        if row is None or not row.ok:
            raise BundleError(row.error if row is not None else "the verifier gave no answer")
        manifest = await asyncio.to_thread(read_manifest_capped, target)
        if manifest.name != entry.name:
            raise BundleError(f"{target} holds model {manifest.name!r}, not {entry.name!r}")
        # discovery's record of the folder behind the link: a lookup's refresh must not verify (or replace) it again
        self.catalog.folders[entry.path] = Folder(prints, name=entry.name)
        return manifest, row.files

    def _adopt_version(self, entry: ModelEntry, target: Path, manifest: Manifest, footprint: int,
                       files: list[FileIdentity] | None) -> None:
        entry.target, entry.manifest, entry.footprint, entry.verified_files = target, manifest, footprint, files
        entry.verified, entry.refused_target, entry.reload_error = True, None, None

    def _refuse_version(self, entry: ModelEntry, target: Path, reason: str) -> bool:
        entry.refused_target, entry.reload_error = target, reason
        still = f"{entry.target.name} keeps serving" if entry.serving else "the model is not loaded"
        log.error("model %s: version %s is not served (%s): %s", entry.name, target.name, still, reason)
        return False

    async def _retire(self, entry: ModelEntry, worker: WorkerProcess, footprint: int) -> None:
        """Let a replaced worker finish the requests it holds (each bounded by its request timeout), then stop it."""
        try:
            deadline = time.monotonic() + self.settings.request_timeout_s + self.settings.grace_s
            while worker.pending and worker.alive and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await worker.stop(self.settings.grace_s)
            log.info("model %s: the old worker (pid %s) stopped", entry.name, worker.pid)
        finally:
            entry.retiring_bytes -= footprint

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
            log.info("serving %d model(s) from %s: %s; memory budget %d MiB (%s); %s per model; OpenMP spin %s turns",
                     len(self.catalog.entries), self.settings.models, ", ".join(sorted(self.catalog.entries)) or "none",
                     self.budget // MIB, self.budget_source, self.threads.describe(),
                     "inherited" if self.spin_count is None else f"{self.spin_count:,}")
        finally:
            try:
                await preloading
            finally:
                self.starting = False

    def start_background(self) -> None:
        self.spawn(self.startup(), "startup")
        self.spawn(self.reap_idle(), "idle-reaper")
        self.spawn(self.watch_versions(), "version-watch")
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
                self._sighup = True
            except (NotImplementedError, RuntimeError):
                pass

    async def close(self) -> None:
        """Stop every worker (each finishes or is killed within the grace period)."""
        self.closing = True
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self.unload(e) for e in self.catalog.entries.values() if e.worker is not None),
                             return_exceptions=True)
