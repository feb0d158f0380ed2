"""Measure this machine into device-profile blocks: CPU, RAM, memory bandwidth, storage. Standard library + numpy only."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edgekit.runtime import placement
from edgekit.schema.device import BandwidthSpec, CoreClusterSpec, CpuSpec, IsaFeatures, MemorySpec, StorageSpec

MIB = 1 << 20
# Arm "CPU part" codes in /proc/cpuinfo -> core type (Arm's MIDR part numbers, as listed in the Linux
# kernel's arch/arm64/include/asm/cputype.h).
ARM_PARTS = {"0xd03": "cortex-a53", "0xd08": "cortex-a72", "0xd0b": "cortex-a76", "0xd41": "cortex-a78ae",
             "0xd42": "cortex-a78ae"}
GRACEMONT_MODELS = ("N100", "N150", "N95", "N97", "N200", "N250", "N300", "N305", "N355")


def _cpuinfo() -> list[dict[str, str]]:
    blocks, current = [], {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current = {}
            continue
        key, _, value = line.partition(":")
        current[key.strip()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def cpu_model_name() -> str:
    info = _cpuinfo()
    first = info[0] if info else {}
    return first.get("model name") or first.get("Hardware") or os.uname().machine


def host_label() -> str:
    """What a calibration point measured here names as its board: host name and CPU model."""
    return f"{platform.node() or 'this host'}: {cpu_model_name()}"


def isa_features(flags: set[str]) -> IsaFeatures:
    """ISA features from /proc/cpuinfo flags (x86) or Features (Arm)."""
    return IsaFeatures(
        neon="asimd" in flags or "neon" in flags, dotprod="asimddp" in flags, i8mm="i8mm" in flags,
        fp16="asimdhp" in flags or "fphp" in flags, avx2="avx2" in flags and "fma" in flags,
        avx_vnni="avx_vnni" in flags, avx512_vnni="avx512_vnni" in flags,
    )


def _clock_ghz(info: list[dict[str, str]], cpu: int = 0) -> tuple[float, str]:
    max_freq = placement.SYS_CPU / f"cpu{cpu}" / "cpufreq" / "cpuinfo_max_freq"
    if max_freq.is_file():
        return int(max_freq.read_text()) / 1e6, "cpufreq cpuinfo_max_freq"
    mhz = [float(b["cpu MHz"]) for b in info if "cpu MHz" in b]
    if mhz:
        return round(max(mhz) / 1000, 3), "/proc/cpuinfo cpu MHz (current clock)"
    return 1.0, "unknown (assumed 1 GHz)"


def cpu_spec() -> CpuSpec:
    info = _cpuinfo()
    clusters = placement.core_clusters(placement.physical_cores(sorted(os.sched_getaffinity(0))))
    cores = len(clusters[0].cpus)  # inference runs on the fastest cluster (the big cores of big.LITTLE)
    big = clusters[0].cpus[0]
    # the block of a big core: on big.LITTLE, cpu0 is usually a little one with another CPU part
    first = next((b for b in info if b.get("processor") == str(big)), info[0] if info else {})
    machine = os.uname().machine
    flags = set((first.get("flags") or first.get("Features") or "").split())
    clock, clock_from = _clock_ghz(info, big)
    if machine == "x86_64":
        name = first.get("model name", "")
        core_type = "gracemont" if any(m in name for m in GRACEMONT_MODELS) else "x86-64-v3"
    else:
        core_type = ARM_PARTS.get(first.get("CPU part", ""), "cortex-a76")
    arch = machine if machine in ("aarch64", "armv7l", "x86_64") else "x86_64"
    return CpuSpec(arch=arch, cores=cores, core_type=core_type, clock_ghz=round(clock, 3), isa=isa_features(flags),
                   clusters=[CoreClusterSpec(cpus=list(c.cpus), capacity=c.capacity) for c in clusters],
                   source="measured: /proc/cpuinfo, sched_getaffinity, sysfs topology and cpu_capacity/cpufreq",
                   note=f"{cpu_model_name()}; clock from {clock_from}; core type mapped from the model name / CPU part")


def memory_spec() -> MemorySpec:
    meminfo = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        meminfo[key] = int(value.split()[0]) * 1024
    total = meminfo["MemTotal"] // MIB
    used = (meminfo["MemTotal"] - meminfo.get("MemAvailable", meminfo["MemTotal"])) // MIB
    return MemorySpec(total_mib=total, os_reserved_mib=min(used, total - 1), source="measured: /proc/meminfo",
                      note="os_reserved_mib = MemTotal - MemAvailable at measurement time (everything else running counts)")


def stream_copy_gb_s(threads: int, mib_per_buffer: int = 256, repeats: int = 5, cpu_clock: bool = False) -> tuple[float, float]:
    """STREAM-like copy and triad bandwidth (GB/s, read + write counted as STREAM does), best of ``repeats``.

    numpy releases the GIL inside array kernels, so one thread per core streams its own slice at once.
    ``cpu_clock`` times one thread in process CPU time, which leaves out time other processes hold the
    core (for a shared machine).
    """
    if cpu_clock and threads != 1:
        raise ValueError("CPU-time bandwidth is only meaningful with one thread")
    clock = time.process_time if cpu_clock else time.perf_counter
    n = mib_per_buffer * MIB // 8
    a, b, c = np.zeros(n), np.ones(n), np.full(n, 2.0)
    bounds = np.linspace(0, n, threads + 1, dtype=np.int64)
    slices = [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def copy(s):
        np.copyto(a[s], b[s])

    def triad(s):
        np.multiply(c[s], 3.0, out=a[s])
        np.add(a[s], b[s], out=a[s])

    best_copy = best_triad = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = clock()
            list(pool.map(copy, slices))
            best_copy = max(best_copy, 2 * a.nbytes / (clock() - start) / 1e9)
            start = clock()
            list(pool.map(triad, slices))
            # STREAM counts triad as 3 arrays; numpy needs two passes (5 array transfers), counted as done.
            best_triad = max(best_triad, 5 * a.nbytes / (clock() - start) / 1e9)
    return best_copy, best_triad


def bandwidth_spec(threads: int, mib_per_buffer: int = 256, cpu_clock: bool = False) -> BandwidthSpec:
    copy, triad = stream_copy_gb_s(threads, mib_per_buffer, cpu_clock=cpu_clock)
    timing = "process CPU time" if cpu_clock else "wall clock"
    return BandwidthSpec(gb_s=round(copy, 2), source="measured: edgekit profile-host STREAM-like numpy copy",
                         note=f"{threads} threads, {mib_per_buffer} MiB buffers, best of 5, {timing}; "
                              f"triad (2 numpy passes) {triad:.2f} GB/s")


def _storage_kind(path: Path) -> str:
    try:
        device = os.stat(path).st_dev
        name = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}").resolve().name
    except OSError:
        return "unknown"
    if name.startswith("nvme"):
        return "nvme"
    if name.startswith("mmcblk"):
        return "microsd"
    if name.startswith(("sd", "vd")):
        return "sata-ssd"
    return "unknown"


def read_speed_mb_s(path: Path) -> float:
    """Sequential read of ``path`` after asking the kernel to drop its cached pages (posix_fadvise DONTNEED)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start, total = time.perf_counter(), 0
        while chunk := os.read(fd, 8 * MIB):
            total += len(chunk)
        return total / (time.perf_counter() - start) / 1e6
    finally:
        os.close(fd)


def storage_spec(sample: Path | None = None, scratch: Path | None = None) -> StorageSpec:
    """Read speed of a bundle's model file, or of a 128 MiB scratch file written (and synced) for the purpose."""
    if sample is not None:
        from edgekit.formats import FORMATS

        files = [f for spec in FORMATS.values() for f in sorted(Path(sample).glob(f"*{spec.model_suffix}"))]
        target = files[0] if files else None
    else:
        target = None
    if target is not None:
        speed = read_speed_mb_s(target)
        return StorageSpec(kind=_storage_kind(target), read_mb_s=round(speed, 1), source="measured: edgekit profile-host",
                           note=f"sequential read of {target.name} after POSIX_FADV_DONTNEED")
    directory = Path(scratch or tempfile.gettempdir())
    with tempfile.NamedTemporaryFile(dir=directory) as handle:
        block = os.urandom(MIB)
        for _ in range(128):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
        speed = read_speed_mb_s(Path(handle.name))
        return StorageSpec(kind=_storage_kind(Path(handle.name)), read_mb_s=round(speed, 1),
                           source="measured: edgekit profile-host",
                           note=f"sequential read of a 128 MiB scratch file in {directory} after POSIX_FADV_DONTNEED")
