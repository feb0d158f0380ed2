"""Checks install.sh runs on the board before it writes anything: standard library only (edgekit is not installed yet).

    python3 pack_check.py check PACK_DIR --prefix /opt/edgekit [--force-cpu]

verifies every file of pack.json (size, sha256, nothing unlisted: pip's --find-links would pick up a
stray wheel), then that this board runs the pack: same Python minor version, a new enough glibc, the
CPU features of the pack's llama.cpp build (edgekit.runtime.cpu, run from the packed wheel), room
under the prefix. On success it prints shell
assignments (PACK_ID=... ) for install.sh; on failure one line per problem on stderr and exit 1
(pack does not verify), 2 (wrong board or Python, no room) or 3 (this CPU lacks a feature).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import zipfile

MANIFEST = "pack.json"
SCHEMA_VERSION = 1
# Unpacked wheels take about this many times their compressed size in the venv.
UNPACKED_FACTOR = 3
SLACK_BYTES = 64 << 20

# edgekit's CPU check inside the packed edgekit wheel: the one place that reads this CPU's features.
CPU_CHECK = "edgekit/runtime/cpu.py"


class PackRefused(Exception):
    def __init__(self, lines: list[str], code: int) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines
        self.code = code


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(pack_dir: str) -> dict:
    path = os.path.join(pack_dir, MANIFEST)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as exc:
        raise PackRefused([f"{path}: cannot read the pack manifest: {exc}"], 1) from exc
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        raise PackRefused([f"{path}: not a version-{SCHEMA_VERSION} edgekit pack manifest"], 1)
    for key in ("pack_id", "files", "python", "target", "device", "glibc_min", "requirement", "service"):
        if key not in manifest:
            raise PackRefused([f"{path}: '{key}' is missing"], 1)
    return manifest


def verify_files(pack_dir: str, manifest: dict) -> list[str]:
    """Problems with the pack's files: missing, changed, outside the pack, or not listed."""
    problems = []
    root = os.path.realpath(pack_dir)
    listed = set()
    for entry in manifest["files"]:
        relative = entry.get("path", "")
        listed.add(relative)
        if not relative or os.path.isabs(relative) or ".." in relative.split("/"):
            problems.append(f"{relative!r}: path leaves the pack")
            continue
        path = os.path.join(root, relative)
        if os.path.islink(path) or not os.path.isfile(path):
            problems.append(f"{relative}: listed in {MANIFEST} but missing (or not a regular file)")
        elif os.path.getsize(path) != entry.get("bytes"):
            problems.append(f"{relative}: {os.path.getsize(path)} bytes, {MANIFEST} says {entry.get('bytes')}")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{relative}: sha256 differs from {MANIFEST}; the file was changed or corrupted")
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            relative = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if relative != MANIFEST and relative not in listed:
                problems.append(f"{relative}: not listed in {MANIFEST}")
    return problems


def python_problem(manifest: dict) -> str | None:
    here = "%d.%d" % sys.version_info[:2]
    if here != manifest["python"]:
        return (f"this pack's wheels are for Python {manifest['python']}; {sys.executable} is Python {here}: "
                f"make the pack with `edgekit pack --python {here}` "
                f"(or run install.sh with EDGEKIT_PYTHON=python{manifest['python']})")
    return None


def glibc_problem(manifest: dict) -> str | None:
    name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    if name != "glibc":
        return "this system's C library is not glibc; the pack's wheels need glibc " + manifest["glibc_min"]
    if tuple(map(int, version.split(".")[:2])) < tuple(map(int, manifest["glibc_min"].split(".")[:2])):
        return f"this system has glibc {version}; the pack's wheels need glibc {manifest['glibc_min']} or newer"
    return None


def edgekit_wheel(pack_dir: str, manifest: dict) -> str | None:
    for entry in manifest["files"]:
        name = entry["path"]
        if name.startswith("wheels/edgekit-") and name.endswith(".whl"):
            return os.path.join(pack_dir, name)
    return None


def cpu_problems(pack_dir: str, manifest: dict) -> tuple[list[str], int]:
    """Refusal lines when this CPU cannot run the pack's build (never loads the build itself)."""
    target = manifest["target"]
    meant = f"this pack is for {manifest['device']['id']} ({target['name']})"
    if platform.machine() != target["machine"]:
        return [f"this machine is {platform.machine()}: {meant}, a {target['machine']} board"], 2
    required = list(target["cpu_features"])
    if not required:
        return [], 0
    wheel = edgekit_wheel(pack_dir, manifest)
    if wheel is None or CPU_CHECK not in zipfile.ZipFile(wheel).namelist():
        return [f"the pack's edgekit wheel has no {CPU_CHECK} to check this CPU with: {meant}"], 1
    # edgekit's own check, run from the (verified) wheel: a wheel is a zip, importable as is, and the
    # module is standard library only. -S and cwd: no installed edgekit (site-packages) or folder named
    # edgekit may shadow the packed one.
    done = subprocess.run([sys.executable, "-S", "-m", "edgekit.runtime.cpu", "--require", ",".join(required),
                           "--target-name", target["name"]],
                          env={**os.environ, "PYTHONPATH": wheel}, cwd=pack_dir, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if done.returncode == 0:
        return [], 0
    said = [line for line in done.stdout.splitlines() if line.strip()] or [f"edgekit.runtime.cpu exited {done.returncode}"]
    return [*said, meant], 3


def space_problem(manifest: dict, prefix: str) -> str | None:
    existing = os.path.abspath(prefix)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    wheels = sum(f["bytes"] for f in manifest["files"] if f["path"].startswith("wheels/"))
    rest = sum(f["bytes"] for f in manifest["files"] if not f["path"].startswith("wheels/"))
    need = UNPACKED_FACTOR * wheels + rest + SLACK_BYTES
    free = shutil.disk_usage(existing).free
    if free < need:
        return f"{existing} has {free >> 20} MiB free; installing this pack needs about {need >> 20} MiB"
    return None


def check(pack_dir: str, prefix: str, force_cpu: bool) -> dict:
    """Everything install.sh must know before it writes; raises PackRefused."""
    manifest = load_manifest(pack_dir)
    problems = verify_files(pack_dir, manifest)
    if problems:
        raise PackRefused(["the pack does not verify, nothing was installed:", *problems], 1)
    for problem in (python_problem(manifest), glibc_problem(manifest)):
        if problem:
            raise PackRefused([problem], 2)
    if not force_cpu:
        lines, code = cpu_problems(pack_dir, manifest)
        if lines:
            advice = "nothing was installed; make a pack for this board's device profile, or pass --force-cpu"
            raise PackRefused([*lines, advice], code)
    problem = space_problem(manifest, prefix)
    if problem:
        raise PackRefused([problem], 2)
    wheel = edgekit_wheel(pack_dir, manifest)
    return {
        "PACK_ID": manifest["pack_id"],
        "PACK_DEVICE": manifest["device"]["id"],
        "PACK_TARGET": manifest["target"]["name"],
        "PACK_PYTHON": manifest["python"],
        "PACK_REQUIREMENT": manifest["requirement"],
        "PACK_UNIT": manifest["service"]["unit"],
        "PACK_PIP_WHEEL": next((f["path"] for f in manifest["files"] if f["path"].startswith("wheels/pip-")), ""),
        "PACK_EDGEKIT_WHEEL": os.path.relpath(wheel, pack_dir) if wheel else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("check", help="verify the pack and this board; print shell assignments")
    run.add_argument("pack_dir")
    run.add_argument("--prefix", required=True)
    run.add_argument("--force-cpu", action="store_true")
    args = parser.parse_args(argv)
    try:
        facts = check(args.pack_dir, args.prefix, args.force_cpu)
    except PackRefused as refused:
        for line in refused.lines:
            print(f"install.sh: {line}", file=sys.stderr)
        return refused.code
    for key, value in facts.items():
        print(f"{key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
