"""Where a model worker's threads run: how many, and on which CPUs, from the board.

The default is the board's: the cores a device profile counts for inference (the big cores on big.LITTLE
SoCs), else the physical cores this process may use (``os.sched_getaffinity``; one per SMT pair). When
the CPUs this process may use form clusters of different speed (sysfs ``cpu_capacity``, else cpufreq's
``cpuinfo_max_freq``), the worker is pinned to the fastest cores: llama.cpp's threads meet at a barrier
after every operation, so one thread on a slow core holds back all the others.

Board side: standard library, psutil and the device schema only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYS_CPU = Path("/sys/devices/system/cpu")
# Turns llama.cpp's OpenMP threads spin at a barrier before they sleep (GOMP_SPINCOUNT; a turn is one pause, ~25 ns on
# this host's EPYC). A tool running llama.cpp in its own process (export's gates, doctor) may share the cores with other
# work, where a long spin waits on threads that have no core (docs/reliability.md case 44): it spins briefly.
OMP_SPIN_COUNT = 1_000
# A model worker decodes on the board's cores: libgomp's own default, as llama-server runs. Its threads stay awake through
# the Python between two decode steps (0.2-0.6 ms); at 1,000 turns they slept there, and 1 and 4 streams decoded at
# 0.95-0.98x llama-server instead of 1.02-1.04x (scripts/bench_serve.py; docs/report.md).
WORKER_OMP_SPIN_COUNT = 300_000


@dataclass(frozen=True)
class CoreCluster:
    """Physical cores of one speed: one logical CPU each (the first SMT sibling), and their relative speed."""

    cpus: tuple[int, ...]
    capacity: int  # sysfs cpu_capacity (1024 = the fastest core) or cpufreq max kHz; 0 when unknown


@dataclass(frozen=True)
class ThreadPlan:
    """The threads a worker runs llama.cpp / onnxruntime with and the CPUs it is pinned to (None: not pinned)."""

    threads: int
    cpus: tuple[int, ...] | None
    source: str

    def describe(self) -> str:
        where = f"pinned to CPUs {','.join(map(str, self.cpus))}" if self.cpus else "not pinned"
        return f"{self.threads} threads ({self.source}; {where})"


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def physical_cores(cpus: list[int], sys_cpu: Path = SYS_CPU) -> list[int]:
    """One logical CPU per physical core among ``cpus`` (sysfs topology; psutil's ratio when sysfs has none)."""
    seen: dict[tuple[int | None, int], int] = {}
    for cpu in sorted(cpus):
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        core = _read_int(topology / "core_id")
        if core is None:
            return _by_psutil_ratio(sorted(cpus))
        seen.setdefault((_read_int(topology / "physical_package_id"), core), cpu)
    return sorted(seen.values())


def _by_psutil_ratio(cpus: list[int]) -> list[int]:
    import psutil

    logical, physical = psutil.cpu_count(logical=True) or 1, psutil.cpu_count(logical=False) or 1
    keep = max(1, len(cpus) * physical // logical)
    return cpus[:keep]


def core_clusters(cpus: list[int], sys_cpu: Path = SYS_CPU) -> list[CoreCluster]:
    """``cpus`` grouped by speed, fastest first; one cluster when the kernel reports no difference."""
    def speed(cpu: int) -> int:
        base = sys_cpu / f"cpu{cpu}"
        return _read_int(base / "cpu_capacity") or _read_int(base / "cpufreq" / "cpuinfo_max_freq") or 0

    groups: dict[int, list[int]] = {}
    for cpu in cpus:
        groups.setdefault(speed(cpu), []).append(cpu)
    return [CoreCluster(tuple(sorted(groups[key])), key) for key in sorted(groups, reverse=True)]


def plan_threads(threads: int | None = None, device_cores: int | None = None, device_id: str | None = None, *,
                 allowed: set[int] | None = None, sys_cpu: Path = SYS_CPU) -> ThreadPlan:
    """Threads and pinning of a model worker: ``threads`` when given, else the device's cores, else this host's.

    With clusters of different speed the worker is pinned to the fastest physical cores, as many as it
    has threads; otherwise it keeps this process's affinity.
    """
    allowed_cpus = sorted(allowed if allowed is not None else os.sched_getaffinity(0))
    clusters = core_clusters(physical_cores(allowed_cpus, sys_cpu), sys_cpu)
    fastest_first = [cpu for cluster in clusters for cpu in cluster.cpus]
    if threads is not None:
        count, source = threads, "--threads"
    elif device_cores is not None:
        count = min(device_cores, len(fastest_first))
        source = f"device {device_id}: {device_cores} cores" + (
            f", capped at the {count} physical cores this process may use" if count < device_cores else "")
    elif len(clusters) > 1:
        count = len(clusters[0].cpus)
        source = f"the {count} fastest of the {len(fastest_first)} physical cores this process may use"
    else:
        count, source = len(fastest_first), "the physical cores this process may use"
    chosen = tuple(sorted(fastest_first[:count]))
    # pinning to every CPU this process may use anyway would change nothing: it is reported as not pinned
    pinned = chosen if len(clusters) > 1 and count <= len(fastest_first) and set(chosen) != set(allowed_cpus) else None
    return ThreadPlan(count, pinned, source)


def worker_threads(threads: int | None, device: str | None) -> ThreadPlan:
    """The daemon's plan from its settings: ``--threads``, else ``--device``'s profile, else this host."""
    if threads is None and device is not None:
        from edgekit.schema.device import load_device

        profile = load_device(device)
        return plan_threads(None, profile.cpu.cores, profile.id)
    return plan_threads(threads)


def omp_env(spin_count: int | None = OMP_SPIN_COUNT) -> dict[str, str]:
    """The OpenMP environment of a process running llama.cpp (None: the inherited one)."""
    # llama.cpp's threads meet at a barrier hundreds of times per token. With more OpenMP threads than cores in the
    # process libgomp cuts the count to 100 turns, or to at most 1,000 under ACTIVE (so a worker keeps to one team:
    # serve/worker.py's on_passing_thread). ACTIVE with a count spins that long, then sleeps: an idle worker sleeps.
    if spin_count is None:
        return {}
    return {"GOMP_SPINCOUNT": str(spin_count), "OMP_WAIT_POLICY": "PASSIVE" if spin_count == 0 else "ACTIVE"}


def bound_openmp_spin() -> None:
    """Give this process ``omp_env()`` unless its environment already says how OpenMP threads wait. Call it before
    llama.cpp first loads in the process: libgomp reads the settings once, when it loads."""
    # libgomp's default spins 300,000 turns at each barrier: on a busy machine the threads spin while the one they wait
    # for has no core, and the golden check of the sample model took 144 s instead of 1-2 s.
    if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
        os.environ.update(omp_env())