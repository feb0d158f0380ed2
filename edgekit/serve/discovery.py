"""Which models exist: the bundles under the models directory that passed verification, and why the others did not.

Every bundle is verified in a subprocess (the daemon itself never parses a model file); a bad
bundle is logged and skipped, the others serve. A bundle published after the daemon started is
verified on its first request.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from pydantic import ValidationError

from edgekit.bundle import REJECTED_SUFFIX, STAGING_PREFIX, read_manifest
from edgekit.errors import BundleError
from edgekit.schema.manifest import MANIFEST_NAME
from edgekit.serve.budget import footprint_bytes
from edgekit.serve.errors import ApiError
from edgekit.serve.lifecycle import ModelEntry
from edgekit.serve.protocol import Verified
from edgekit.serve.settings import ServeSettings

log = logging.getLogger("edgekit.serve")


def bundle_dirs(models_dir: Path) -> list[Path]:
    """Candidate bundles: directories with a manifest, minus rejected and half-written ones."""
    if not models_dir.is_dir():
        return []
    return sorted(
        p for p in models_dir.iterdir()
        if p.is_dir() and (p / MANIFEST_NAME).is_file()
        and not p.name.startswith(STAGING_PREFIX) and not p.name.endswith(REJECTED_SUFFIX)
    )


def verify_in_subprocess(paths: list[Path], timeout: float = 600.0) -> list[Verified]:
    """Run the full bundle checks in a child process; a parser crash there cannot take the daemon down."""
    if not paths:
        return []
    done = subprocess.run(
        [sys.executable, "-m", "edgekit.serve.worker", "verify", *map(str, paths)],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
    )
    rows: dict[str, Verified] = {}
    for line in done.stdout.splitlines():
        try:
            row = Verified.model_validate_json(line)
        except ValidationError:
            continue  # not a result line (a library printed something)
        rows[row.dir] = row
    results = []
    for path in paths:  # a bundle the verifier did not report on crashed it
        results.append(rows.get(str(path)) or Verified(dir=str(path), ok=False, name=path.name,
                                                       error=f"the verifier stopped (exit {done.returncode}) on this bundle"))
    return results


class Catalog:
    """The servable models by name, and the refused bundles by folder name with the reason."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.entries: dict[str, ModelEntry] = {}
        self.rejected: dict[str, str] = {}
        self.discovered = asyncio.Event()

    async def discover(self, skip: Iterable[Path] = ()) -> None:
        """Verify every bundle under the models directory (except ``skip``) and register the good ones."""
        skipped = set(skip)
        paths = [p for p in bundle_dirs(self.settings.models) if p not in skipped]
        for row in await asyncio.to_thread(verify_in_subprocess, paths):
            self.register(Path(row.dir), row)

    def register_unverified(self, names: Iterable[str]) -> set[Path]:
        """Register the named bundles from their manifests alone (their workers verify them at load); their paths."""
        candidates = set(bundle_dirs(self.settings.models))
        paths = set()
        for name in names:
            path = self.settings.models / name
            if path in candidates and self.register(path, None) is not None:
                paths.add(path)
        return paths

    def register(self, path: Path, row: Verified | None) -> ModelEntry | None:
        """Serve the bundle at ``path`` (``row``: its verification, None: its worker verifies it at load)."""
        if row is not None and not row.ok:
            self.rejected[path.name] = row.error or "verification failed"
            log.error("skipping bundle %s: %s", path, row.error)
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
                           slots=asyncio.Semaphore(self.settings.slots), verified=row is not None,
                           verified_files=row.files if row is not None else None)
        self.entries[entry.name] = entry
        return entry

    def reject(self, entry: ModelEntry, reason: str) -> None:
        """Stop serving a bundle whose worker refused it (a preloaded bundle discovery never verified)."""
        self.entries.pop(entry.name, None)
        self.rejected[entry.path.name] = reason

    async def _find_new(self, name: str) -> ModelEntry | None:
        """A bundle published after the daemon started: verify and register it on first request."""
        path = self.settings.models / name
        if name in self.rejected or "/" in name or name.startswith(".") or path not in bundle_dirs(self.settings.models):
            return None
        rows = await asyncio.to_thread(verify_in_subprocess, [path])
        return self.register(path, rows[0])

    async def lookup(self, name: str) -> ModelEntry:
        """The entry serving ``name``: 404 if there is none, 503 if its bundle was refused."""
        await self.discovered.wait()
        entry = self.entries.get(name) or await self._find_new(name)
        if entry is None:
            reason = self.rejected.get(name)
            if reason:
                raise ApiError(503, f"model {name!r} is not served: its bundle failed verification: {reason}",
                               param="model", code="model_unavailable")
            raise ApiError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return entry
