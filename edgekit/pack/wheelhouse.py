"""The pack's wheelhouse: edgekit's own wheel plus every runtime dependency, as wheels for the board's platform and Python.

pip does the work. ``resolve`` asks pip what ``pip install edgekit[runtime]`` would install on the
board (``--dry-run --report`` with the board's platform tags and Python version, the freshly built
llama-cpp-python wheel offered through ``--find-links``), so the wheelhouse is exactly what the
board's ``pip install --no-index`` will need. ``download`` then fetches those pinned files into a
cache under EDGEKIT_HOME and checks each against the sha256 pip reported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from email.parser import BytesParser
from pathlib import Path
from urllib.parse import unquote, urlparse

from edgekit.bundle import sha256_file
from edgekit.errors import BackendError, ConfigError

# Never in a pack: the board side does not use them (workstation export stack).
FORBIDDEN = ("torch", "transformers", "optimum")
# Files and folders of a checkout that are not part of edgekit's wheel build.
CHECKOUT_IGNORE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "bench-results", "tests")


@dataclass(frozen=True)
class ResolvedWheel:
    """One wheel pip would install on the board."""

    name: str
    version: str
    filename: str
    url: str
    sha256: str | None

    @property
    def local(self) -> Path | None:
        """The file itself when pip resolved it from --find-links (edgekit, llama-cpp-python)."""
        parsed = urlparse(self.url)
        return Path(unquote(parsed.path)) if parsed.scheme == "file" else None


def checkout_root() -> Path | None:
    """The source checkout edgekit runs from, or None when it runs from an installed wheel."""
    import edgekit

    root = Path(edgekit.__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "edgekit" / "__init__.py").is_file() else None


def pip_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"]


def run_pip(command: list[str], what: str, *, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise BackendError(f"{what} failed (pip exit {done.returncode}):\n{tail}", hint="check the network to the package index")
    return done.stdout


def source_date_epoch(checkout: Path) -> str:
    """Commit time of the checkout (reproducible wheel timestamps), or the zip epoch when it is not a git work tree."""
    done = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%ct"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "315532800"


def build_edgekit_wheel(checkout: Path, out_dir: Path) -> Path:
    """``pip wheel --no-deps`` of a copy of the checkout (an in-tree build/ would leak stale files into the wheel)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgekit-src-") as tmp:
        source = Path(tmp) / "edgekit"
        shutil.copytree(checkout, source, ignore=shutil.ignore_patterns(*CHECKOUT_IGNORE), symlinks=True)
        env = {**os.environ, "SOURCE_DATE_EPOCH": source_date_epoch(checkout)}
        run_pip(pip_command("wheel", "--no-deps", "--quiet", "-w", str(out_dir), str(source)), "building edgekit's wheel",
                env=env)
    wheels = sorted(out_dir.glob("edgekit-*.whl"))
    if len(wheels) != 1:
        raise BackendError(f"building edgekit's wheel left {len(wheels)} wheels in {out_dir}")
    return wheels[0]


def wheel_metadata(wheel: Path) -> dict[str, list[str]]:
    """The METADATA headers of a wheel (Name, Version, Requires-Dist, ...), each as a list."""
    with zipfile.ZipFile(wheel) as archive:
        name = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1), None)
        if name is None:
            raise ConfigError(f"{wheel}: not a wheel (no .dist-info/METADATA)")
        message = BytesParser().parsebytes(archive.read(name))
    return {key: message.get_all(key, []) for key in set(message.keys())}


def wheel_version(wheel: Path) -> str:
    return wheel_metadata(wheel)["Version"][0]


def platform_args(platform_tags: list[str], python: str) -> list[str]:
    """pip options that resolve for the board (its platform tags, CPython ``python``) instead of this host."""
    nodot = python.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for abi in (f"cp{nodot}", "abi3", "none"):
        args += ["--abi", abi]
    for tag in platform_tags:
        args += ["--platform", tag]
    return args


def resolve(requirements: list[str], *, platform_tags: list[str], python: str, find_links: list[Path],
            constraints: Path | None) -> list[ResolvedWheel]:
    """What ``pip install REQUIREMENTS`` installs on the board: every wheel, pinned, with pip's sha256."""
    with tempfile.TemporaryDirectory(prefix="edgekit-resolve-") as tmp:
        report = Path(tmp) / "report.json"
        command = pip_command("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                              "--target", str(Path(tmp) / "target"), *platform_args(platform_tags, python))
        for folder in find_links:
            command += ["--find-links", str(folder)]
        if constraints is not None:
            command += ["-c", str(constraints)]
        run_pip([*command, *requirements], f"resolving {' '.join(requirements)} for Python {python} on {platform_tags[0]}")
        items = json.loads(report.read_text())["install"]
    wheels = []
    for item in items:
        info = item["download_info"]
        wheels.append(ResolvedWheel(
            name=item["metadata"]["name"], version=item["metadata"]["version"],
            filename=Path(unquote(urlparse(info["url"]).path)).name, url=info["url"],
            sha256=info.get("archive_info", {}).get("hashes", {}).get("sha256"),
        ))
    heavy = [w.name for w in wheels if w.name.lower() in FORBIDDEN]
    if heavy:
        raise ConfigError(f"the board's requirements pull in {', '.join(heavy)}; a pack never carries the export stack")
    return sorted(wheels, key=lambda w: w.filename)


def download(wheels: list[ResolvedWheel], cache: Path, *, platform_tags: list[str], python: str) -> list[Path]:
    """The resolved wheels as files: local ones as they are, index ones fetched once into ``cache`` and hash-checked."""
    cache.mkdir(parents=True, exist_ok=True)

    def cached(wheel: ResolvedWheel) -> bool:
        path = cache / wheel.filename
        return path.is_file() and (wheel.sha256 is None or sha256_file(path) == wheel.sha256)

    missing = [w for w in wheels if w.local is None and not cached(w)]
    if missing:
        run_pip(pip_command("download", "--no-deps", "--quiet", "-d", str(cache), *platform_args(platform_tags, python),
                            *[f"{w.name}=={w.version}" for w in missing]), f"downloading {len(missing)} wheels")
    files = []
    for wheel in wheels:
        path = wheel.local or cache / wheel.filename
        if not path.is_file():
            raise BackendError(f"pip did not leave {wheel.filename} in {cache}")
        if wheel.sha256 is not None and sha256_file(path) != wheel.sha256:
            raise BackendError(f"{path}: sha256 differs from what the index reported for {wheel.filename}",
                               hint=f"delete {path} and pack again")
        files.append(path)
    return files
