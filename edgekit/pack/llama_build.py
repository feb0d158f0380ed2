"""llama-cpp-python built for one build target, on the workstation, with a real (cross) toolchain; cached by (version, target).

The sdist is built by its own backend (scikit-build-core, through ``pip wheel``) with CMake options
from the target's row: a toolchain file for Debian's cross compilers when the board is another
machine, no -march=native, the target's instruction set, OpenMP. Three things make the wheel small
and self-contained, all in the build: ``CMAKE_PLATFORM_NO_VERSIONED_SONAME`` (one file per library
instead of three copies: a wheel cannot hold the .so -> .so.0 -> .so.0.x symlinks), ``wheel.exclude``
(llama.cpp's own install rules also put every library, libllama-common, headers and CMake files in
site-packages/lib and include/, which llama_cpp never loads) and ``install.strip``. The OpenMP runtime
(libgomp) is copied next to the libraries, found through their RUNPATH $ORIGIN, since a minimal
Debian has no libgomp1. The wheel's platform tag is then set to the board's (``wheel tags``), and the
result is checked: right machine, every needed library either in the wheel or part of a Debian base
system, and on a matching host it is imported for real.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edgekit.bundle import sha256_file
from edgekit.errors import BackendError, ConfigError
from edgekit.pack.targets import BuildTarget, host_machine
from edgekit.pack.wheelhouse import pip_command, run_pip

PACKAGE = "llama-cpp-python"
BUILD_RECORD = "build.json"
# Libraries every Debian system has (libc6, libstdc++6, libgcc-s1 are required packages); anything else must be in the wheel.
SYSTEM_LIBRARIES = frozenset({"libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2",
                              "librt.so.1", "ld-linux-aarch64.so.1", "ld-linux-x86-64.so.2"})
# Libraries llama_cpp opens by file name (llama_cpp/llama_cpp.py, llama_cpp/_ggml.py).
LOADED_BY_NAME = ("libllama.so", "libggml.so")
VENDORED = ("libgomp.so.1",)
# ELF machine names readelf prints, per uname -m.
ELF_MACHINE = {"aarch64": "AArch64", "x86_64": "Advanced Micro Devices X86-64"}
# llama.cpp's extra install locations inside the wheel (gitignore syntax, anchored at the wheel root).
WHEEL_EXCLUDE = ("/lib/", "/include/")
NINJA_STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class LlamaWheel:
    """A built, checked llama-cpp-python wheel for one target."""

    path: Path
    version: str
    target: str
    cmake_args: tuple[str, ...]
    build_seconds: float
    glibc_min: str
    cached: bool


def toolchain_file(target: BuildTarget, directory: Path) -> Path | None:
    """A CMake toolchain file for Debian's cross compilers, or None when the board is this machine."""
    if target.machine == host_machine():
        return None
    triplet = target.platform.gnu_triplet
    path = directory / f"{triplet}.cmake"
    path.write_text(f"""set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR {target.machine})
set(CMAKE_C_COMPILER {triplet}-gcc)
set(CMAKE_CXX_COMPILER {triplet}-g++)
set(CMAKE_STRIP {shutil.which(f"{triplet}-strip") or f"{triplet}-strip"})
set(CMAKE_FIND_ROOT_PATH /usr/{triplet})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
""")
    return path


def compilers(target: BuildTarget) -> tuple[str, str]:
    """(C compiler, readelf) for the target; ConfigError naming the Debian packages when they are missing."""
    cross = target.machine != host_machine()
    prefix = f"{target.platform.gnu_triplet}-" if cross else ""
    cc, readelf = f"{prefix}gcc", f"{prefix}readelf"
    missing = [tool for tool in (cc, f"{prefix}g++", readelf) if shutil.which(tool) is None]
    if missing or shutil.which("cmake") is None:
        packages = " ".join(target.platform.cross_packages if cross else ("gcc", "g++"))
        raise ConfigError(f"building llama-cpp-python for {target.name} needs {', '.join(missing or ['cmake'])}",
                          hint=f"apt-get install {packages} cmake")
    return cc, readelf


def cmake_args(target: BuildTarget, toolchain: Path | None) -> list[str]:
    args = [*target.cmake_args, "-DCMAKE_PLATFORM_NO_VERSIONED_SONAME=ON"]
    return [f"-DCMAKE_TOOLCHAIN_FILE={toolchain}", *args] if toolchain else args


def download_sdist(version: str, downloads: Path) -> Path:
    """The pinned sdist, fetched once (pip reuses a file already in ``downloads``)."""
    downloads.mkdir(parents=True, exist_ok=True)
    name = f"llama_cpp_python-{version}.tar.gz"
    if not (downloads / name).is_file():
        run_pip(pip_command("download", "--no-deps", "--no-binary=:all:", "--quiet", "-d", str(downloads),
                            f"{PACKAGE}=={version}"), f"downloading the {PACKAGE} {version} sdist")
    if not (downloads / name).is_file():
        raise BackendError(f"pip download left no {name} in {downloads}")
    return downloads / name


def run_build(command: list[str], env: dict[str, str], log_path: Path, progress: Progress) -> None:
    """Run the build with its output in ``log_path``; progress shows ninja's [step/total]."""
    with log_path.open("w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace")
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if step := NINJA_STEP.match(line):
                progress(f"compiling {step.group(1)}/{step.group(2)}")
        code = process.wait()
    if code != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-20:])
        raise BackendError(f"building {PACKAGE} failed (exit {code}); the last lines of {log_path}:\n{tail}")


def readelf(tool: str, *args: str) -> str:
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True).stdout


def check_libraries(lib_dir: Path, target: BuildTarget, readelf_tool: str) -> str:
    """Machine, dependency closure and strip state of the wheel's libraries; returns the newest glibc they need."""
    libraries = sorted(lib_dir.glob("*.so*"))
    names = {p.name for p in libraries}
    missing = [n for n in LOADED_BY_NAME if n not in names]
    if missing:
        raise BackendError(f"the built wheel lacks {', '.join(missing)}, which llama_cpp opens by name")
    glibc = (2, 17)
    for library in libraries:
        header = readelf(readelf_tool, "--file-header", str(library))
        if ELF_MACHINE[target.machine] not in header:
            raise BackendError(f"{library.name} is not an {target.machine} library (cross toolchain not used?)")
        dynamic = readelf(readelf_tool, "--dynamic", str(library))
        for needed in re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic):
            if needed not in names and needed not in SYSTEM_LIBRARIES:
                raise BackendError(f"{library.name} needs {needed}, which is neither in the wheel nor on every Debian system")
        if library.name not in VENDORED and "$ORIGIN" not in dynamic:
            raise BackendError(f"{library.name} has no RUNPATH $ORIGIN; it would not find the libraries beside it")
        if ".symtab" in readelf(readelf_tool, "--section-headers", str(library)):
            raise BackendError(f"{library.name} still has its symbol table (install.strip did not run)")
        for major, minor in re.findall(r"GLIBC_(\d+)\.(\d+)", readelf(readelf_tool, "--version-info", str(library))):
            glibc = max(glibc, (int(major), int(minor)))
    return f"{glibc[0]}.{glibc[1]}"


def host_runs(target: BuildTarget) -> bool:
    """Whether this workstation can load the target's build (same machine, every required CPU feature, llama_cpp's imports)."""
    import importlib.util

    if target.machine != host_machine() or not all(importlib.util.find_spec(m) for m in ("numpy", "jinja2", "diskcache")):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.split(":")[0].strip() in ("flags", "Features")), [])
    return all(feature in flags for feature in target.cpu_features)


def import_check(unpacked: Path) -> None:
    """Load the built libraries for real: import llama_cpp from the unpacked wheel and ask llama.cpp a question."""
    done = subprocess.run([sys.executable, "-m", "edgekit.runtime.probe", "edgekit.runtime.probe:llama_cpp_build"],
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(unpacked), os.environ.get("PYTHONPATH")]))},
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise BackendError(f"the built llama_cpp does not import: {(done.stderr or done.stdout).strip()[-800:]}")
    where = Path(done.stdout.splitlines()[0])
    if not where.is_relative_to(unpacked):
        raise BackendError(f"the check imported llama_cpp from {where}, not from the build at {unpacked}")


def repack(built: Path, target: BuildTarget, cc: str, readelf_tool: str, out_dir: Path) -> tuple[Path, str]:
    """Vendor libgomp, check the libraries, re-tag the wheel for the board. Returns (wheel, glibc needed)."""
    with tempfile.TemporaryDirectory(prefix="edgekit-wheel-") as tmp:
        subprocess.run([sys.executable, "-m", "wheel", "unpack", "--dest", tmp, str(built)], check=True, capture_output=True)
        unpacked = next(Path(tmp).iterdir())
        lib_dir = unpacked / "llama_cpp" / "lib"
        for name in VENDORED:
            source = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()
            if not os.path.isabs(source):
                raise BackendError(f"{cc} does not know where {name} is", hint="apt-get install the gcc packages named above")
            shutil.copy(os.path.realpath(source), lib_dir / name)
        glibc_min = check_libraries(lib_dir, target, readelf_tool)
        if host_runs(target):
            import_check(unpacked)
        subprocess.run([sys.executable, "-m", "wheel", "pack", "--dest-dir", tmp, str(unpacked)], check=True, capture_output=True)
        packed = next(Path(tmp).glob("*.whl"))
        done = subprocess.run([sys.executable, "-m", "wheel", "tags", "--platform-tag", target.platform.wheel_platform,
                               "--remove", str(packed)], check=True, capture_output=True, text=True)
        tagged = Path(tmp) / Path(done.stdout.strip().splitlines()[-1]).name
        final = out_dir / tagged.name
        shutil.move(tagged, final)
    return final, glibc_min


def cached_build(directory: Path, version: str, target: BuildTarget, args: list[str]) -> LlamaWheel | None:
    """The cached wheel for (version, target) if it is intact and was built with today's options."""
    record_path = directory / BUILD_RECORD
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    wheel = directory / record["wheel"]
    if record.get("cmake_args") != args or not wheel.is_file() or sha256_file(wheel) != record["sha256"]:
        return None
    return LlamaWheel(wheel, version, target.name, tuple(args), record["build_seconds"], record["glibc_min"], cached=True)


@contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """One build per (version, target) at a time; a second pack waits and then finds the cached wheel."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def llama_wheel(target: BuildTarget, version: str, *, builds: Path, downloads: Path, progress: Progress,
                rebuild: bool = False) -> LlamaWheel:
    """The llama-cpp-python ``version`` wheel for ``target``: from ``builds/<version>/<target>/``, or built there now."""
    final_dir = builds / version / target.name
    cc, readelf_tool = compilers(target)
    cross = target.machine != host_machine()
    # What the cache is keyed on besides (version, target): the options, with the toolchain named by its file.
    recorded_args = cmake_args(target, Path(f"{target.platform.gnu_triplet}.cmake") if cross else None)
    with build_lock(final_dir.parent / f".{target.name}.lock"):
        if not rebuild and (hit := cached_build(final_dir, version, target, recorded_args)):
            return hit
        sdist = download_sdist(version, downloads / "sdist")
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{target.name}-", dir=final_dir.parent))
        try:
            started = time.monotonic()
            progress(f"building {PACKAGE} {version} for {target.name} (several minutes)")
            toolchain = toolchain_file(target, staging)
            env = {**os.environ, "CMAKE_ARGS": " ".join(cmake_args(target, toolchain)),
                   "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
            command = pip_command("wheel", "--no-deps", "--no-cache-dir", "--verbose", "-w", str(staging / "dist"),
                                  "--config-settings=install.strip=true",
                                  f"--config-settings=wheel.exclude={';'.join(WHEEL_EXCLUDE)}", str(sdist))
            run_build(command, env, staging / "build.log", progress)
            built = next((staging / "dist").glob("*.whl"))
            progress("checking and re-tagging the wheel")
            wheel, glibc_min = repack(built, target, cc, readelf_tool, staging)
            shutil.rmtree(staging / "dist")
            seconds = round(time.monotonic() - started, 1)
            record = {"package": PACKAGE, "version": version, "target": target.name, "cmake_args": recorded_args,
                      "wheel": wheel.name, "sha256": sha256_file(wheel), "bytes": wheel.stat().st_size, "glibc_min": glibc_min,
                      "build_seconds": seconds, "built": datetime.now(timezone.utc).isoformat(timespec="seconds"), "compiler": cc}
            (staging / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            if final_dir.exists():
                shutil.rmtree(final_dir)
            os.replace(staging, final_dir)
            return LlamaWheel(final_dir / wheel.name, version, target.name, tuple(recorded_args), seconds, glibc_min,
                              cached=False)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
