"""Bundles on disk: written atomically by the exporter, verified before the runtime loads them.

A bundle is a directory holding the model file(s), tokenizer files and ``manifest.json``.
Writing happens in a hidden staging directory next to the destination and ends with one
``rename``, so a bundle is either complete under its final name or not there at all
(an export killed mid-write leaves only a ``.staging-*`` directory that the next run removes).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from edgekit.errors import BundleError
from edgekit.schema.loading import describe_validation_error
from edgekit.schema.manifest import MANIFEST_NAME, FileEntry, Manifest

STAGING_PREFIX = ".staging-"
REJECTED_SUFFIX = ".rejected"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(bundle_dir: Path) -> list[FileEntry]:
    """Size and hash of every regular file under ``bundle_dir`` except the manifest, sorted by path."""
    entries = []
    for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        entries.append(FileEntry(path=path.relative_to(bundle_dir).as_posix(), bytes=path.stat().st_size, sha256=sha256_file(path)))
    return entries


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Delete staging directories left by interrupted exports; returns what was removed."""
    stale = [p for p in out_dir.glob(f"{STAGING_PREFIX}*") if p.is_dir()] if out_dir.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


@contextmanager
def staging_dir(out_dir: Path, name: str) -> Iterator[Path]:
    """A fresh directory on the same filesystem as ``out_dir``; removed on any failure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}-", dir=out_dir))
    try:
        yield path
    finally:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


def publish(staged: Path, manifest: Manifest, out_dir: Path) -> Path:
    """Write the manifest into ``staged`` and move it to its final name in one rename.

    A bundle whose gates failed is published as ``<name>.rejected`` so the work is kept for
    inspection but nothing serves it. An older bundle of the same name is replaced only after
    the new one is complete on disk.
    """
    (staged / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    _fsync_tree(staged)
    final = out_dir / (manifest.name if manifest.passed else manifest.name + REJECTED_SUFFIX)
    if final.exists():
        retired = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}old-", dir=out_dir))
        os.replace(final, retired / "bundle")
        os.replace(staged, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staged, final)
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def read_manifest(bundle_dir: Path) -> Manifest:
    """Parse ``manifest.json`` without checking file hashes (cheap; used by `fit` and listings)."""
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: no {MANIFEST_NAME}; not an edgekit bundle", hint="export it with `edgekit export`")
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise BundleError(describe_validation_error(path, exc)) from exc


def _inside(root: Path, relative: str) -> Path:
    """Resolve ``relative`` under ``root``; refuse absolute paths, '..' and symlinks that leave the bundle."""
    if not relative or os.path.isabs(relative) or "\\" in relative or ".." in Path(relative).parts:
        raise BundleError(f"{root}: file path {relative!r} leaves the bundle")
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise BundleError(f"{root}: {relative!r} resolves to {target}, outside the bundle (symlink?)")
    return target


def verify_bundle(bundle_dir: Path) -> Manifest:
    """Check every file against the manifest (size, sha256, stays inside the bundle). Returns the manifest."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    for entry in manifest.files:
        path = _inside(bundle_dir, entry.path)
        if not path.is_file():
            raise BundleError(f"{bundle_dir}: {entry.path} is listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry.bytes:
            raise BundleError(f"{bundle_dir}: {entry.path} has {size} bytes, the manifest says {entry.bytes}")
        if sha256_file(path) != entry.sha256:
            raise BundleError(f"{bundle_dir}: {entry.path} sha256 differs from the manifest; the file was changed or corrupted")
    return manifest


def bundle_path_inside(bundle_dir: Path, relative: str) -> Path:
    """Public form of the containment check, for format checks that follow references inside files."""
    return _inside(Path(bundle_dir), relative)
