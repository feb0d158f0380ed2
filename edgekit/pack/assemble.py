"""Assemble an offline installer for one board: ``make_pack(request) -> PackResult``.

The pack is staged next to its destination and published with one rename (like a bundle), then
archived as DIR.tar.gz. Its layout:

    install.sh  pack_check.py  pack.json  <device-id>.yaml  edgekit.service
    wheels/     edgekit, llama-cpp-python (built for the board's instruction set), every runtime dependency, pip
    bundles/    the verified bundles, one folder each
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata, resources
from pathlib import Path

import yaml

from edgekit.bundle import sha256_file
from edgekit.errors import BundleError, ConfigError, GateFailed
from edgekit.pack.llama_build import PACKAGE as LLAMA_PACKAGE
from edgekit.pack.llama_build import LlamaWheel, llama_wheel
from edgekit.pack.manifest import (
    PACK_MANIFEST_NAME,
    BuildRecord,
    BundleRecord,
    PackManifest,
    ServiceRecord,
    TargetRecord,
    Versions,
)
from edgekit.pack.targets import BOARD_GLIBC, BuildTarget, select_target
from edgekit.pack.wheelhouse import build_edgekit_wheel, checkout_root, download, resolve, wheel_version
from edgekit.paths import KitPaths
from edgekit.schema.device import Device
from edgekit.schema.manifest import FileEntry
from edgekit.serve.settings import ServeSettings

# Where install.sh installs unless told otherwise.
DEFAULT_PREFIX = Path("/opt/edgekit")
# Stands for the install prefix in the pack's unit file; install.sh fills it in.
PREFIX_PLACEHOLDER = "@PREFIX@"
# Python versions of the boards' OSes: Debian 13 / Raspberry Pi OS (trixie) 3.13, Debian 12 (bookworm) 3.11.
PYTHONS = ("3.11", "3.12", "3.13")
DEFAULT_PYTHON = "3.13"
REQUIREMENT = "edgekit[runtime]"
SERVICE_FILE = "edgekit.service"
BOARD_FILES = ("install.sh", "pack_check.py")
STAGING_PREFIX = ".staging-pack-"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PackRequest:
    """Everything ``make_pack`` needs; the CLI fills it from flags."""

    device: Device
    device_ref: str  # catalog id or profile file, as given
    bundles: tuple[Path, ...]
    out_dir: Path
    python: str = DEFAULT_PYTHON
    edgekit_wheel: Path | None = None
    rebuild: bool = False
    serve: ServeSettings | None = None  # the daemon's settings on the board (models and threads are set here)


@dataclass(frozen=True)
class PackResult:
    manifest: PackManifest
    out_dir: Path
    archive: Path
    archive_bytes: int
    llama_wheel_bytes: int


def verify_bundles(bundles: tuple[Path, ...]) -> list[tuple[Path, object]]:
    """Every bundle checked as the daemon checks it (sha256, gates passed, servable, format headers)."""
    from edgekit.runtime.verify import verify_for_runtime

    if not bundles:
        raise ConfigError("no bundles given", hint="pass one or more bundle folders (edgekit bundles lists them)")
    verified, names = [], {}
    for path in bundles:
        try:
            manifest = verify_for_runtime(Path(path))
        except BundleError as exc:
            raise BundleError(f"bundle {path} fails verification, so it is not packed: {exc}") from exc
        if manifest.name in names:
            raise ConfigError(f"bundles {names[manifest.name]} and {path} are both named {manifest.name!r}")
        names[manifest.name] = path
        verified.append((Path(path), manifest))
    return verified


def board_settings(request: PackRequest):
    """The daemon's settings on the board: as given, bundles under the install prefix, a thread per inference core."""
    from edgekit.serve.settings import ServeSettings

    given = request.serve or ServeSettings()
    update: dict = {"models": Path(PREFIX_PLACEHOLDER) / "current" / "bundles"}
    if given.threads is None:
        update["threads"] = request.device.cpu.cores
    return given.model_copy(update=update)


# ServeSettings fields render_unit writes on ExecStart itself (edgekit/serve/systemd.py).
ON_EXEC_START = frozenset({"models", "host", "port", "memory_budget_mb", "grace_s", "api_key_file", "preload", "threads"})


def settings_environment(settings) -> str:
    """Settings given for the board that ExecStart does not carry, as an Environment= line (ServeSettings reads EDGEKIT_*)."""
    pairs = []
    for name in sorted(settings.model_fields_set - ON_EXEC_START):
        value = getattr(settings, name)
        text = "null" if value is None else value if isinstance(value, str) else json.dumps(value)
        pairs.append(json.dumps(f"EDGEKIT_{name.upper()}={text}"))  # systemd unquotes C-style double quotes
    return f"Environment={' '.join(pairs)}\n" if pairs else ""


def size_service(request: PackRequest, manifests: list) -> tuple[ServiceRecord, str]:
    """The unit sized for the board: every bundle must fit the RAM the board offers models on its own.

    The budget is the sum of the bundles' footprints when they fit together, else what the board
    offers (the daemon then unloads the least recently used model to load another).
    """
    from edgekit.serve.budget import MIB, device_budget, footprint_bytes
    from edgekit.serve.systemd import render_unit

    settings = board_settings(request)
    offered, _ = device_budget(request.device_ref)
    rows = [(m.name, footprint_bytes(m, settings)) for m in manifests]
    too_big = [f"{name} needs {n / MIB:.0f} MiB" for name, n in rows if n > offered]
    if too_big:
        raise GateFailed(f"{request.device.id} offers {offered / MIB:.0f} MiB to models; {', '.join(too_big)} with these "
                         "settings", hint="pack a smaller bundle, or lower --n-ctx / --prompt-cache-contexts / --batch-max-tokens / --slots "
                         "(edgekit fit shows footprints)")
    if settings.memory_budget_mb is not None:
        if settings.memory_budget_mb * MIB > offered:
            raise GateFailed(f"--memory-budget-mb {settings.memory_budget_mb} is more than {request.device.id} offers "
                             f"({offered // MIB} MiB)")
        budget, source = settings.memory_budget_mb * MIB, "--memory-budget-mb"
    elif sum(n for _, n in rows) <= offered:
        budget, source = sum(n for _, n in rows), "sum of the footprint estimates of " + ", ".join(name for name, _ in rows)
    else:
        budget, source = offered, f"usable RAM of {request.device.id}; the bundles take turns (least recently used unloads)"
    unit = render_unit(settings, PREFIX_PLACEHOLDER + "/current/venv/bin/edgekit", budget, source)
    unit = unit.replace("\nRestart=", "\n" + settings_environment(settings) + "Restart=", 1)
    record = ServiceRecord(unit=SERVICE_FILE, memory_budget_mb=max(16, -(-budget // MIB)), threads=settings.threads,
                           together=sum(n for _, n in rows) <= budget)
    return record, unit


def llama_version(checkout: Path | None) -> str:
    """The llama-cpp-python version edgekit is tested with: the checkout's constraints pin, else the installed one."""
    if checkout is not None and (checkout / "constraints.txt").is_file():
        for line in (checkout / "constraints.txt").read_text().splitlines():
            name, _, version = line.partition("==")
            if name.strip().lower().replace("_", "-") == LLAMA_PACKAGE:
                return version.strip()
    try:
        return metadata.version(LLAMA_PACKAGE)
    except metadata.PackageNotFoundError as exc:
        raise ConfigError(f"cannot tell which {LLAMA_PACKAGE} version to build: no constraints.txt pin and none "
                          "installed") from exc


def glibc_needed(wheels: list[Path], llama: LlamaWheel) -> str:
    """The newest glibc any wheel needs: its oldest manylinux tag, and what the llama.cpp libraries reference."""
    from packaging.utils import parse_wheel_filename

    need = tuple(map(int, llama.glibc_min.split(".")))
    for wheel in wheels:
        floors = []
        for tag in parse_wheel_filename(wheel.name)[3]:
            if tag.platform.startswith("manylinux_"):
                floors.append(tuple(map(int, tag.platform.split("_")[1:3])))
            elif tag.platform.startswith("manylinux2014"):
                floors.append((2, 17))
        if floors:
            need = max(need, min(floors))
    return f"{need[0]}.{need[1]}"


def pack_entries(root: Path) -> list[FileEntry]:
    """Size and sha256 of every file of the pack but pack.json, sorted by path."""
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != PACK_MANIFEST_NAME)
    return [FileEntry(path=p.relative_to(root).as_posix(), bytes=p.stat().st_size, sha256=sha256_file(p)) for p in paths]


def link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def board_file(name: str) -> str:
    text = resources.files("edgekit.pack").joinpath("board", name).read_text(encoding="utf-8")
    return text.replace("@DEFAULT_PREFIX@", str(DEFAULT_PREFIX))


def pack_id(device: Device, python: str, files: list) -> str:
    listing = json.dumps([(f.path, f.sha256) for f in files]).encode()
    return f"{device.id}-cp{python.replace('.', '')}-{hashlib.sha256(listing).hexdigest()[:12]}"


def write_archive(pack_dir: Path) -> Path:
    """DIR.tar.gz beside DIR, written under a temporary name and renamed, and DIR.tar.gz.sha256 (sha256sum -c) for the copy."""
    archive = pack_dir.with_name(pack_dir.name + ".tar.gz")
    fd, tmp = tempfile.mkstemp(prefix=f".{pack_dir.name}-", suffix=".tar.gz", dir=pack_dir.parent)
    os.close(fd)
    try:
        def owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            return info

        # Level 1: wheels and quantized weights barely compress (a Q4_K_M GGUF: 94.8 % at level 1, 94.5 % at level 6 for
        # 10 % more CPU time).
        with tarfile.open(tmp, "w:gz", compresslevel=1) as tar:
            for path in [pack_dir, *sorted(pack_dir.rglob("*"))]:
                tar.add(path, arcname=str(Path(pack_dir.name) / path.relative_to(pack_dir)), recursive=False, filter=owner)
        os.replace(tmp, archive)
        archive.with_name(archive.name + ".sha256").write_text(f"{sha256_file(archive)}  {archive.name}\n")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return archive


def publish(staged: Path, out_dir: Path) -> None:
    """Move the staged pack to ``out_dir`` in one rename; an older pack there is replaced only then."""
    if out_dir.exists():
        if not (out_dir / PACK_MANIFEST_NAME).is_file() and any(out_dir.iterdir()):
            raise ConfigError(f"{out_dir} exists and is not an edgekit pack", hint="choose another --out folder")
        retired = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}old-", dir=out_dir.parent))
        os.replace(out_dir, retired / "pack")
        os.replace(staged, out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staged, out_dir)


def make_pack(request: PackRequest, paths: KitPaths, progress: Progress) -> PackResult:
    """Verify, build, download and assemble; returns the manifest written as pack.json."""
    from edgekit.pack.board.pack_check import verify_files

    started = time.monotonic()
    if request.python not in PYTHONS:
        raise ConfigError(f"--python {request.python}: packs are made for Python {', '.join(PYTHONS)}")
    target: BuildTarget = select_target(request.device)
    progress("verifying bundles")
    verified = verify_bundles(request.bundles)
    service, unit_text = size_service(request, [m for _, m in verified])

    checkout = checkout_root()
    out_dir = request.out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir.parent))
    try:
        wheels_dir = staged / "wheels"
        wheels_dir.mkdir()
        if request.edgekit_wheel is not None:
            if not request.edgekit_wheel.is_file():
                raise ConfigError(f"--edgekit-wheel {request.edgekit_wheel}: no such file")
            edgekit_wheel = request.edgekit_wheel
        elif checkout is not None:
            progress("building edgekit's wheel")
            edgekit_wheel = build_edgekit_wheel(checkout, staged / "edgekit-build")
        else:
            raise ConfigError("edgekit is not running from a source checkout, so it cannot build its own wheel",
                              hint="pass --edgekit-wheel FILE (the edgekit wheel to install on the board)")
        edgekit_version = wheel_version(edgekit_wheel)

        llama = llama_wheel(target, llama_version(checkout), builds=paths.llama_builds, downloads=paths.downloads,
                            progress=progress, rebuild=request.rebuild)
        progress(f"resolving {REQUIREMENT} for Python {request.python} on {target.machine}")
        platform_tags = target.platform.pip_platforms(BOARD_GLIBC)
        requirements = [f"{REQUIREMENT} @ {edgekit_wheel.resolve().as_uri()}", f"{LLAMA_PACKAGE} @ {llama.path.as_uri()}",
                        f"pip=={metadata.version('pip')}"]
        constraints = checkout / "constraints.txt" if checkout is not None and (checkout / "constraints.txt").is_file() else None
        resolved = resolve(requirements, platform_tags=platform_tags, python=request.python, find_links=[],
                           constraints=constraints)
        progress(f"downloading {len(resolved)} wheels")
        files = download(resolved, paths.downloads / "wheels", platform_tags=platform_tags, python=request.python)
        for path in files:
            link_or_copy(str(path), str(wheels_dir / path.name))
        shutil.rmtree(staged / "edgekit-build", ignore_errors=True)

        progress("copying bundles")
        bundles_dir = staged / "bundles"
        for path, manifest in verified:
            shutil.copytree(path, bundles_dir / manifest.name, copy_function=link_or_copy)
        device_file = f"{request.device.id}.yaml"
        profile = request.device.model_dump(mode="json", exclude_none=True)
        (staged / device_file).write_text(yaml.safe_dump(profile, sort_keys=False))
        (staged / SERVICE_FILE).write_text(unit_text)
        for name in BOARD_FILES:
            (staged / name).write_text(board_file(name))
        (staged / "install.sh").chmod(0o755)

        entries = pack_entries(staged)
        versions = Versions(edgekit=edgekit_version, llama_cpp_python=llama.version,
                            onnxruntime=next((w.version for w in resolved if w.name.lower() == "onnxruntime"), "absent"))
        manifest = PackManifest(
            pack_id=pack_id(request.device, request.python, entries),
            device=request.device,
            target=TargetRecord(name=target.name, machine=target.machine, cpu_features=target.describe_features(),
                                cmake_args=list(llama.cmake_args)),
            python=request.python,
            platform_tags=platform_tags,
            glibc_min=glibc_needed(files, llama),
            versions=versions,
            requirement=REQUIREMENT,
            bundles=[BundleRecord(name=m.name, format=m.format, task=m.task, bytes=m.total_bytes) for _, m in verified],
            service=service,
            build=BuildRecord(created=datetime.now(timezone.utc).replace(microsecond=0),
                              pack_seconds=round(time.monotonic() - started, 1),
                              llama_build_seconds=llama.build_seconds, llama_build_cached=llama.cached,
                              host=f"{platform.machine()}, Python {platform.python_version()}"),
            files=entries,
        )
        (staged / PACK_MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        problems = verify_files(str(staged), json.loads((staged / PACK_MANIFEST_NAME).read_text()))
        if problems:  # the board runs this same check; a pack that would fail it is never published
            raise BundleError("the assembled pack does not verify: " + "; ".join(problems))
        progress("writing the pack and its archive")
        publish(staged, out_dir)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    archive = write_archive(out_dir)
    return PackResult(manifest, out_dir, archive, archive.stat().st_size, llama.path.stat().st_size)
