"""The served version of each model on a board: kept versions, an atomic switch, rollback.

Layout under the bundles folder the daemon serves (``edgekit serve --models DIR``)::

    DIR/<name>                     -> .fleet/<name>/<version>   (a symlink, swapped in one rename)
    DIR/.fleet/<name>/<version>/   a verified bundle; <version> is the first 16 hex digits of its manifest digest
    DIR/.fleet/<name>/state.json   the installed versions, oldest first; the last one is current
    DIR/.fleet/<name>/.incoming/   staging of a pull in progress (a kill leaves only this, removed by the next update)

``.fleet`` has no manifest.json and starts with a dot, so the daemon's discovery never serves it directly.
An update resolves the reference, runs the caller's gate (signature, fit) on the OCI manifest alone,
downloads and verifies into ``.incoming``, runs the golden checks on the new version and only then
switches the symlink; a version that fails its golden checks is deleted and the current one stays. With
a running daemon to ask (``confirm``), the switch stays only once the daemon serves the new version through
a probation window; otherwise the link goes back to the previous version.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from edgekit.bundle import remove_stale_staging, sha256_file, verify_bundle
from edgekit.errors import ConfigError, GateFailed
from edgekit.fleet import artifact as oci
from edgekit.fleet.registry import RegistryClient, download, resolve
from edgekit.schema.manifest import MANIFEST_NAME

FLEET_DIR = ".fleet"
STATE_FILE = "state.json"
INCOMING = ".incoming"
LINK_PREFIX = ".fleet-link-"
VERSION_HEX = 16


@dataclass(frozen=True)
class GoldenOutcome:
    """What the golden checks said about one bundle folder."""

    passed: bool
    detail: str


@dataclass
class VersionRecord:
    version: str
    digest: str
    reference: str
    installed: str


@dataclass
class ModelState:
    """state.json: installed versions of one model, oldest first; the last is served."""

    name: str
    versions: list[VersionRecord] = field(default_factory=list)

    @property
    def current(self) -> VersionRecord | None:
        return self.versions[-1] if self.versions else None


@dataclass
class UpdateResult:
    name: str
    reference: str
    digest: str
    version: str
    previous: str | None
    changed: bool
    served_path: str
    kept: list[str]
    seconds: dict[str, float]


def version_id(digest: str) -> str:
    return digest.removeprefix("sha256:")[:VERSION_HEX]


def model_root(bundles_dir: Path, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{name!r} is not a model name")
    return Path(bundles_dir) / FLEET_DIR / name


def read_state(bundles_dir: Path, name: str) -> ModelState:
    path = model_root(bundles_dir, name) / STATE_FILE
    if not path.is_file():
        return ModelState(name=name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ModelState(name=data["name"], versions=[VersionRecord(**v) for v in data["versions"]])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable update state ({exc})", hint="remove it to start the history afresh") from exc


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_state(bundles_dir: Path, state: ModelState) -> None:
    root = model_root(bundles_dir, state.name)
    _write_atomically(root / STATE_FILE, json.dumps({"name": state.name, "versions": [asdict(v) for v in state.versions]}, indent=2) + "\n")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def locked(bundles_dir: Path, name: str) -> Iterator[Path]:
    """One update or rollback of a model at a time (a second one waits)."""
    root = model_root(bundles_dir, name)
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield root


def switch(bundles_dir: Path, name: str, version: str) -> Path:
    """Point ``bundles_dir/name`` at a kept version in one rename; a reader sees the old or the new bundle, never neither."""
    bundles_dir = Path(bundles_dir)
    target = Path(FLEET_DIR) / name / version
    if not (bundles_dir / target / MANIFEST_NAME).is_file():
        raise ConfigError(f"{bundles_dir / target}: version {version} of {name} is not on this board")
    link = bundles_dir / f"{LINK_PREFIX}{name}"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    served = bundles_dir / name
    if served.exists() and not served.is_symlink():
        link.unlink()
        raise ConfigError(f"{served} is a folder not managed by `edgekit update`", hint="adopt it first (update does so itself)")
    os.replace(link, served)
    _fsync_dir(bundles_dir)
    return served


def adopt(bundles_dir: Path, state: ModelState) -> None:
    """A plain bundle folder of this name (from `edgekit pull` or export) becomes the first kept version."""
    served = Path(bundles_dir) / state.name
    if not served.is_dir() or served.is_symlink():
        return
    manifest_hash = "sha256:" + sha256_file(served / MANIFEST_NAME)
    version = version_id(manifest_hash)
    root = model_root(bundles_dir, state.name)
    os.replace(served, root / version)
    # The name is missing from here until the symlink lands below: one rename later.
    state.versions = [v for v in state.versions if v.version != version]
    state.versions.append(VersionRecord(version=version, digest=manifest_hash, reference=f"local:{served}",
                                        installed=datetime.now(UTC).isoformat(timespec="seconds")))
    switch(bundles_dir, state.name, version)
    write_state(bundles_dir, state)


def prune(bundles_dir: Path, state: ModelState, keep: int) -> list[str]:
    """Drop the oldest versions beyond ``keep`` (the current one always stays); returns the versions kept."""
    root = model_root(bundles_dir, state.name)
    dropped, state.versions = state.versions[:-keep], state.versions[-keep:]
    for record in dropped:
        shutil.rmtree(root / record.version, ignore_errors=True)
    known = {v.version for v in state.versions}
    for folder in root.iterdir():  # versions of failed or killed updates that never made it into the state
        if folder.is_dir() and not folder.name.startswith(".") and folder.name not in known:
            shutil.rmtree(folder, ignore_errors=True)
    return [v.version for v in state.versions]


def update(client: RegistryClient, bundles_dir: Path, *, gate: Callable[[oci.Artifact], None],
           golden: Callable[[Path], GoldenOutcome] | None, keep: int = 3,
           progress: Callable[[str], None] = lambda _: None,
           confirm: Callable[[str, str], GoldenOutcome] | None = None,
           restored: Callable[[str, str], bool] | None = None) -> UpdateResult:
    """resolve -> gate (signature, fit; before any layer) -> pull + verify -> golden checks -> switch -> confirm -> keep ``keep``.

    ``golden`` (None: skipped, the daemon checks) runs before the switch; ``confirm(name, version)`` after it (the
    running daemon serves the new version through its probation window); when it fails the link is switched back
    to the previous version (``restored(name, previous)`` says whether the daemon serves it again) and the new one
    is deleted.
    """
    bundles_dir = Path(bundles_dir)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    art = resolve(client)
    gate(art)
    seconds["resolve_and_gate"] = time.perf_counter() - started
    version = version_id(art.digest)
    with locked(bundles_dir, art.name) as root:
        state = read_state(bundles_dir, art.name)
        adopt(bundles_dir, state)
        previous = state.current.version if state.current else None
        if previous == version and (bundles_dir / art.name).is_symlink():
            return UpdateResult(name=art.name, reference=str(client.ref), digest=art.digest, version=version, previous=previous,
                                changed=False, served_path=str(bundles_dir / art.name), kept=[v.version for v in state.versions],
                                seconds={k: round(v, 4) for k, v in seconds.items()})
        folder = root / version
        mark = time.perf_counter()
        if folder.is_dir():  # kept from an earlier install: re-verify instead of downloading again
            verify_bundle(folder)
        else:
            incoming = root / INCOMING
            remove_stale_staging(incoming)
            shutil.rmtree(incoming / art.name, ignore_errors=True)
            pulled = download(client, art, incoming, progress)
            os.replace(pulled, folder)
        seconds["pull_and_verify"] = time.perf_counter() - mark
        mark = time.perf_counter()
        progress(f"golden checks of {art.name} {version}")
        outcome = golden(folder) if golden is not None else GoldenOutcome(True, "left to the daemon")
        seconds["golden"] = time.perf_counter() - mark
        if not outcome.passed:
            if version not in {v.version for v in state.versions}:
                shutil.rmtree(folder, ignore_errors=True)
            served = f"{previous} stays served" if previous else "nothing was switched"
            raise GateFailed(f"{client.ref} ({version}) failed its golden checks on this board, {served}: {outcome.detail}")
        mark = time.perf_counter()
        served_path = switch(bundles_dir, art.name, version)
        seconds["switch"] = time.perf_counter() - mark
        state.versions = [v for v in state.versions if v.version != version]
        state.versions.append(VersionRecord(version=version, digest=art.digest, reference=str(client.ref),
                                            installed=datetime.now(UTC).isoformat(timespec="seconds")))
        write_state(bundles_dir, state)
        if confirm is not None:
            mark = time.perf_counter()
            checked = confirm(art.name, version)
            seconds["confirm"] = time.perf_counter() - mark
            if not checked.passed:
                _undo_switch(bundles_dir, state, previous, folder, restored, seconds)
                back = f"switched back to {previous}" if previous else "the link was removed (no earlier version)"
                confirmed = seconds.get("daemon_serves_previous")
                daemon = "" if confirmed is None else ("; the daemon serves it" if confirmed else "; the daemon did not confirm it yet")
                raise GateFailed(f"{client.ref} ({version}) was switched to, then {back}{daemon}: {checked.detail}")
        kept = prune(bundles_dir, state, keep)
        write_state(bundles_dir, state)
    seconds["total"] = time.perf_counter() - started
    return UpdateResult(name=art.name, reference=str(client.ref), digest=art.digest, version=version, previous=previous,
                        changed=True, served_path=str(served_path), kept=kept, seconds={k: round(v, 4) for k, v in seconds.items()})


def _undo_switch(bundles_dir: Path, state: ModelState, previous: str | None, folder: Path,
                 restored: Callable[[str, str], bool] | None, seconds: dict[str, float]) -> None:
    """Point the link back at ``previous`` (or remove it), forget and delete the new version."""
    mark = time.perf_counter()
    if previous is not None:
        switch(bundles_dir, state.name, previous)
    else:
        (Path(bundles_dir) / state.name).unlink(missing_ok=True)
    state.versions.pop()
    write_state(bundles_dir, state)
    shutil.rmtree(folder, ignore_errors=True)  # a worker still holding its files keeps them until it exits
    seconds["switch_back"] = time.perf_counter() - mark
    if previous is not None and restored is not None:
        seconds["daemon_serves_previous"] = float(restored(state.name, previous))
        seconds["restore"] = time.perf_counter() - mark


def managed_models(bundles_dir: Path) -> list[str]:
    root = Path(bundles_dir) / FLEET_DIR
    return sorted(p.name for p in root.iterdir() if (p / STATE_FILE).is_file()) if root.is_dir() else []


def rollback(bundles_dir: Path, name: str | None) -> UpdateResult:
    """Serve the version before the current one again (verified first); the rolled-back version is deleted."""
    bundles_dir = Path(bundles_dir)
    if name is None:
        models = managed_models(bundles_dir)
        if len(models) != 1:
            raise ConfigError(f"{bundles_dir}: {len(models)} models are managed by `edgekit update` ({', '.join(models) or 'none'})",
                              hint="name the model: edgekit update --rollback NAME")
        name = models[0]
    started = time.perf_counter()
    with locked(bundles_dir, name) as root:
        state = read_state(bundles_dir, name)
        if len(state.versions) < 2:
            raise ConfigError(f"{name}: no earlier version kept on this board to roll back to")
        bad, good = state.versions[-1], state.versions[-2]
        verify_bundle(root / good.version)
        served = switch(bundles_dir, name, good.version)
        state.versions.pop()
        write_state(bundles_dir, state)
        shutil.rmtree(root / bad.version, ignore_errors=True)
    return UpdateResult(name=name, reference=good.reference, digest=good.digest, version=good.version, previous=bad.version,
                        changed=True, served_path=str(served), kept=[v.version for v in state.versions],
                        seconds={"total": round(time.perf_counter() - started, 4)})
