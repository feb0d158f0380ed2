"""Which models exist: the bundle folders under the models directory that passed verification, and why the others did not.

- Every bundle is verified in a subprocess (the daemon itself never parses a model file), one
  bundle after the other, each within ``verify_timeout_s``; a bundle that crashes or stalls the
  verifier is rejected with the reason and the verifier goes on with the next one in a new
  process. Each verified bundle is served as soon as its line arrives.
- Discovery is keyed by folder: a folder is verified once per change of its contents (the names,
  sizes and mtimes of its files), under a lock per folder, so simultaneous first requests share one
  verification and a folder that was incomplete (still being copied) is verified again once it
  changes. A bundle published after the daemon started is found on the first request that names it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from edgekit.bundle import REJECTED_SUFFIX, STAGING_PREFIX
from edgekit.errors import BundleError
from edgekit.runtime.verify import read_manifest_capped
from edgekit.schema.manifest import MANIFEST_NAME
from edgekit.serve.budget import footprint_bytes
from edgekit.serve.errors import ApiError
from edgekit.serve.lifecycle import ModelEntry, ModelState
from edgekit.serve.protocol import Verified, VerifyStarted
from edgekit.serve.settings import ServeSettings

log = logging.getLogger("edgekit.serve")

STARTUP_ALLOWANCE_S = 120.0  # the verifier's interpreter start and imports, before its first bundle
MAX_FINGERPRINT_FILES = 10_000  # a folder with more files than this is fingerprinted by its first ones only
STDERR_TAIL = 2000  # characters of a crashed verifier's stderr kept for the log and the reason

Fingerprint = tuple[tuple[str, int, int], ...]


def bundle_dirs(models_dir: Path) -> list[Path]:
    """Candidate bundles: directories with a manifest, minus rejected and half-written ones."""
    if not models_dir.is_dir():
        return []
    return sorted(
        p for p in models_dir.iterdir()
        if p.is_dir() and (p / MANIFEST_NAME).is_file()
        and not p.name.startswith(STAGING_PREFIX) and not p.name.endswith(REJECTED_SUFFIX)
    )


def fingerprint(folder: Path) -> Fingerprint:
    """Names, sizes and mtimes of the files under ``folder``: any copy, write or rename into it changes this."""
    rows: list[tuple[str, int, int]] = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            rows.append((os.path.relpath(os.path.join(root, name), folder), st.st_size, st.st_mtime_ns))
            if len(rows) >= MAX_FINGERPRINT_FILES:
                return tuple(rows)
    return tuple(rows)


async def verify_bundles(paths: list[Path], timeout: float, plugins: Iterable[str] = ()) -> AsyncIterator[Verified]:
    """Verify ``paths`` in a subprocess, yielding each result as it arrives.

    A bundle that crashes the verifier or takes longer than ``timeout`` is yielded as rejected with
    that reason (and the verifier's last words); the remaining bundles go on in a fresh verifier.
    """
    remaining = [str(p) for p in paths]
    command = [sys.executable, "-m", "edgekit.serve.worker", "verify"]
    if plugins := list(plugins):
        command += ["--plugins", ",".join(plugins)]
    while remaining:
        proc = await asyncio.create_subprocess_exec(*command, "--", *remaining, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    limit=16 * 1024 * 1024)
        stderr = asyncio.create_task(proc.stderr.read())
        current, wait = None, timeout + STARTUP_ALLOWANCE_S
        failure = None
        try:
            while remaining:
                try:
                    line = await asyncio.wait_for(proc.stdout.readline(), wait)
                except TimeoutError:
                    failure = f"verification did not finish within {timeout:.0f} s (raise --verify-timeout-s for slow storage)"
                    break
                if not line:
                    code = await proc.wait()
                    failure = f"the bundle verifier stopped with exit code {code} on this bundle"
                    break
                try:
                    started = VerifyStarted.model_validate_json(line)
                    current, wait = started.started, timeout
                    continue
                except ValidationError:
                    pass
                try:
                    row = Verified.model_validate_json(line)
                except ValidationError:
                    continue  # not a result line (a library printed something)
                if row.dir in remaining:
                    remaining.remove(row.dir)
                    current = None
                    yield row
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            words = (await stderr).decode("utf-8", "replace").strip()[-STDERR_TAIL:]
        if failure is not None and remaining:
            failed = current if current in remaining else remaining[0]
            remaining.remove(failed)
            last = words.splitlines()[-1] if words else ""
            if words:
                log.error("bundle verifier output for %s:\n%s", failed, words)
            yield Verified(dir=failed, ok=False, name=Path(failed).name, error=failure + (f": {last}" if last else ""))


@dataclass
class Folder:
    """What discovery last concluded about one bundle folder, and for which contents."""

    fingerprint: Fingerprint
    name: str | None = None  # the model it serves
    error: str | None = None  # why it is refused


class Catalog:
    """The servable models by name, and the refused bundle folders by folder name with the reason."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.entries: dict[str, ModelEntry] = {}
        self.rejected: dict[str, str] = {}
        self.folders: dict[Path, Folder] = {}
        self.verifying: set[str] = set()  # folder names being verified now
        self.discovered = asyncio.Event()  # the startup pass is over
        self._locks: dict[Path, asyncio.Lock] = {}
        self._refresh_lock = asyncio.Lock()

    def _lock(self, path: Path) -> asyncio.Lock:
        return self._locks.setdefault(path, asyncio.Lock())

    async def discover(self, skip: Iterable[Path] = ()) -> None:
        """Verify every bundle folder under the models directory (except ``skip``); register each good one as it passes."""
        skipped = set(skip)
        paths = [p for p in await asyncio.to_thread(bundle_dirs, self.settings.models) if p not in skipped]
        await self._verify(paths)

    async def _verify(self, paths: list[Path]) -> None:
        """Verify folders whose contents changed since they were last verified (one verification per folder at a time)."""
        locks = [self._lock(p) for p in paths]
        for lock in locks:  # in path order: two callers never wait for each other crosswise
            await lock.acquire()
        try:
            prints = {p: await asyncio.to_thread(fingerprint, p) for p in paths}
            todo = [p for p in paths if (known := self.folders.get(p)) is None or known.fingerprint != prints[p]]
            for path in todo:
                self._forget(path)
            if not todo:
                return
            self.verifying.update(p.name for p in todo)
            try:
                rows = verify_bundles(todo, self.settings.verify_timeout_s, self.settings.worker_plugins)
                async with aclosing(rows):  # a cancelled discovery kills its verifier now, not at garbage collection
                    async for row in rows:
                        path = Path(row.dir)
                        self.verifying.discard(path.name)
                        self.register(path, row, prints[path])
            finally:
                self.verifying.difference_update(p.name for p in todo)
        finally:
            for lock in locks:
                lock.release()

    def _forget(self, path: Path) -> None:
        """Drop what was concluded about a folder whose contents changed (a served model stays until it is re-verified)."""
        known = self.folders.pop(path, None)
        self.rejected.pop(path.name, None)
        if known is not None and known.name is not None:
            entry = self.entries.get(known.name)
            if entry is not None and entry.path == path and entry.worker is None and entry.active == 0:
                del self.entries[known.name]

    def register_unverified(self, names: Iterable[str]) -> set[Path]:
        """Register the named bundles from their manifests alone (their workers verify them at load); their paths."""
        candidates = set(bundle_dirs(self.settings.models))
        paths = set()
        for name in names:
            path = self.settings.models / name
            if path in candidates and self.register(path, None) is not None:
                paths.add(path)
        return paths

    def register(self, path: Path, row: Verified | None, prints: Fingerprint | None = None) -> ModelEntry | None:
        """Serve the bundle at ``path`` (``row``: its verification, None: its worker verifies it at load)."""
        if row is not None and not row.ok:
            return self._refuse(path, row.error or "verification failed", prints)
        try:
            manifest = read_manifest_capped(path)
        except BundleError as exc:
            return self._refuse(path, str(exc), prints)
        current = self.entries.get(manifest.name)
        if current is not None and current.path != path:
            return self._refuse(path, f"a bundle named {manifest.name!r} is already served from {current.path.name}", prints)
        if current is not None:  # re-verified while its worker runs: the worker checks the files again at its next load
            if prints is not None:
                self.folders[path] = Folder(prints, name=current.name)
            return current
        entry = ModelEntry(manifest.name, path, manifest, footprint_bytes(manifest, self.settings),
                           slots=asyncio.Semaphore(self.settings.slots), verified=row is not None,
                           verified_files=row.files if row is not None else None)
        self.entries[entry.name] = entry
        if prints is not None:
            self.folders[path] = Folder(prints, name=entry.name)
        return entry

    def _refuse(self, path: Path, reason: str, prints: Fingerprint | None) -> None:
        self.rejected[path.name] = reason
        if prints is not None:
            self.folders[path] = Folder(prints, error=reason)
        log.error("skipping bundle %s: %s", path, reason)

    def verified_by_worker(self, entry: ModelEntry) -> None:
        """A worker hashed ``entry``'s bundle at load (a preloaded bundle): its folder needs no verifier run."""
        if entry.path not in self.folders:
            self.folders[entry.path] = Folder(fingerprint(entry.path), name=entry.name)

    def reject(self, entry: ModelEntry, reason: str) -> None:
        """Stop serving a bundle whose worker refused it (a preloaded bundle discovery never verified)."""
        self.entries.pop(entry.name, None)
        self.rejected[entry.path.name] = reason

    async def refresh(self) -> None:
        """Verify folders that are new or changed since they were last verified (one pass at a time)."""
        async with self._refresh_lock:
            paths = await asyncio.to_thread(bundle_dirs, self.settings.models)
            served = {e.path for e in self.entries.values() if not e.verified}  # preloaded: their worker verifies them
            changed = []
            for path in paths:
                if path in served:
                    continue
                known = self.folders.get(path)
                if known is None or known.fingerprint != await asyncio.to_thread(fingerprint, path):
                    changed.append(path)
            if changed:
                await self._verify(changed)

    async def lookup(self, name: str) -> ModelEntry:
        """The entry serving ``name``: 404 if there is none, 503 if its bundle was refused."""
        entry = self.entries.get(name)
        if entry is None or entry.state is ModelState.FAILED:  # a failed bundle that was repaired since is verified anew
            await self.discovered.wait()
            await self.refresh()
            entry = self.entries.get(name)
        if entry is None:
            reason = self.rejected.get(name)
            if reason:
                raise ApiError(503, f"model {name!r} is not served: its bundle failed verification: {reason}",
                               param="model", code="model_unavailable")
            raise ApiError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return entry
