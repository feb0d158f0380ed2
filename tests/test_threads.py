"""Worker threads and CPU affinity come from the board: --threads, else the device profile, else this host's cores."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edgekit.runtime.placement import core_clusters, physical_cores, plan_threads, worker_threads
from edgekit.serve.app import create_app
from edgekit.serve.protocol import WorkerConfig
from edgekit.serve.settings import ServeSettings

BASE = "http://127.0.0.1"


def fake_sysfs(root: Path, cpus: dict[int, dict[str, int]]) -> Path:
    """A /sys/devices/system/cpu tree: per CPU its core_id, package and cpu_capacity and/or cpufreq max (kHz)."""
    for cpu, facts in cpus.items():
        base = root / f"cpu{cpu}"
        (base / "topology").mkdir(parents=True)
        (base / "topology" / "core_id").write_text(f"{facts['core']}\n")
        (base / "topology" / "physical_package_id").write_text(f"{facts.get('package', 0)}\n")
        if "capacity" in facts:
            (base / "cpu_capacity").write_text(f"{facts['capacity']}\n")
        if "max_khz" in facts:
            (base / "cpufreq").mkdir()
            (base / "cpufreq" / "cpuinfo_max_freq").write_text(f"{facts['max_khz']}\n")
    return root


@pytest.fixture
def rk3588(tmp_path: Path) -> Path:
    """RK3588's layout: cpu0-3 Cortex-A55 (capacity 414), cpu4-7 Cortex-A76 (1024), as its kernel reports them."""
    return fake_sysfs(tmp_path, {cpu: {"core": cpu % 4 if cpu < 4 else cpu - 4, "package": 0 if cpu < 4 else 1,
                                       "capacity": 414 if cpu < 4 else 1024} for cpu in range(8)})


def test_big_little_host_uses_and_pins_the_big_cores(rk3588):
    clusters = core_clusters(physical_cores(list(range(8)), rk3588), rk3588)
    assert [(c.cpus, c.capacity) for c in clusters] == [((4, 5, 6, 7), 1024), ((0, 1, 2, 3), 414)]
    plan = plan_threads(allowed=set(range(8)), sys_cpu=rk3588)
    assert (plan.threads, plan.cpus) == (4, (4, 5, 6, 7))


def test_device_profile_counts_the_cores_and_pins_the_fastest(rk3588):
    plan = plan_threads(None, 4, "orange-pi-5-8gb", allowed=set(range(8)), sys_cpu=rk3588)
    assert (plan.threads, plan.cpus) == (4, (4, 5, 6, 7))
    assert "orange-pi-5-8gb" in plan.source
    # four allowed CPUs, two of them big: a 4-core profile uses all four (nothing to pin), a 2-core one the big two
    plan = plan_threads(None, 4, "orange-pi-5-8gb", allowed={0, 1, 6, 7}, sys_cpu=rk3588)
    assert (plan.threads, plan.cpus) == (4, None)
    plan = plan_threads(None, 2, "two-big", allowed={0, 1, 6, 7}, sys_cpu=rk3588)
    assert (plan.threads, plan.cpus) == (2, (6, 7))


def test_explicit_threads_win_and_are_pinned_to_the_fastest_cores(rk3588):
    plan = plan_threads(2, allowed=set(range(8)), sys_cpu=rk3588)
    assert (plan.threads, plan.cpus, plan.source) == (2, (4, 5), "--threads")
    plan = plan_threads(8, allowed=set(range(8)), sys_cpu=rk3588)
    assert (plan.threads, plan.cpus) == (8, None)


def test_smt_siblings_count_once_and_uniform_cores_are_not_pinned(tmp_path):
    # 2 cores x 2 hardware threads: cpu0/cpu2 share core 0, cpu1/cpu3 core 1 (Linux numbers siblings this way on x86)
    sysfs = fake_sysfs(tmp_path, {cpu: {"core": cpu % 2, "max_khz": 3_000_000} for cpu in range(4)})
    assert physical_cores([0, 1, 2, 3], sysfs) == [0, 1]
    plan = plan_threads(allowed={0, 1, 2, 3}, sys_cpu=sysfs)
    assert (plan.threads, plan.cpus) == (2, None)
    assert plan_threads(allowed={1, 3}, sys_cpu=sysfs).threads == 1


def test_cpufreq_max_separates_clusters_without_cpu_capacity(tmp_path):
    sysfs = fake_sysfs(tmp_path, {0: {"core": 0, "max_khz": 1_800_000}, 1: {"core": 1, "max_khz": 1_800_000},
                                  2: {"core": 2, "max_khz": 2_400_000}, 3: {"core": 3, "max_khz": 2_400_000}})
    plan = plan_threads(allowed={0, 1, 2, 3}, sys_cpu=sysfs)
    assert (plan.threads, plan.cpus) == (2, (2, 3))


def host_physical_cores() -> int:
    return len(physical_cores(sorted(os.sched_getaffinity(0))))


def test_llama_cpp_runs_with_the_board_default_not_half_the_cores(sample_store):
    """llama-cpp-python's own default is half the logical CPUs; GgufModel gives llama.cpp the board's count."""
    from serve_fixtures import smollm_gguf

    from edgekit.runtime.llm import GgufModel

    model = GgufModel(smollm_gguf(sample_store), n_ctx=256)
    assert model.threads == host_physical_cores() == plan_threads().threads
    assert GgufModel(smollm_gguf(sample_store), n_ctx=256, threads=3).threads == 3


def test_worker_pins_itself_and_llama_cpp_gets_the_planned_threads(smollm_bundle):
    """The real worker and runner: the count in WorkerConfig is what llama.cpp runs with; cpus is the worker's mask."""
    from edgekit.serve.workers import WorkerProcess

    config = WorkerConfig(n_ctx=256, threads=1, cpus=[0], batch_max=1, batch_max_tokens=64, max_prompt_chars=10_000)

    async def start() -> tuple[int | None, str]:
        worker = WorkerProcess("smollm", smollm_bundle, config, on_exit=lambda _: None)
        ready = await worker.start(timeout=120)
        try:
            status = Path(f"/proc/{worker.pid}/status").read_text()
            allowed = next(line.split(":")[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
            return ready.threads, allowed
        finally:
            await worker.stop(grace=5)

    assert asyncio.run(start()) == (1, "0")


def test_health_and_startup_log_state_the_threads(tmp_path, caplog):
    models = tmp_path / "models"
    models.mkdir()
    with caplog.at_level(logging.INFO, logger="edgekit.serve"):
        with TestClient(create_app(ServeSettings(models=models)), base_url=BASE) as client:
            threads = client.get("/health").json()["threads"]
    assert threads == {"threads": host_physical_cores(), "cpus": None, "source": "the physical cores this process may use"}
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("serving "))
    assert f"{host_physical_cores()} threads (the physical cores this process may use; not pinned) per model" in line


def test_device_and_flag_set_the_daemon_threads(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    with TestClient(create_app(ServeSettings(models=models, device="rpi-zero-2w")), base_url=BASE) as client:
        threads = client.get("/health").json()["threads"]
    assert threads["threads"] == min(4, host_physical_cores())  # the Pi Zero 2 W's four Cortex-A53 cores
    assert "rpi-zero-2w" in threads["source"]
    with TestClient(create_app(ServeSettings(models=models, threads=1, device="rpi-zero-2w")), base_url=BASE) as client:
        assert client.get("/health").json()["threads"]["threads"] == 1
    assert worker_threads(None, "rpi-zero-2w").threads == min(4, host_physical_cores())


def test_help_states_the_default():
    done = subprocess.run([sys.executable, "-m", "edgekit", "serve", "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "400"})
    assert done.returncode == 0
    text = " ".join(done.stdout.replace("│", " ").split())
    assert "Default: the board's cores" in text and "(the big cores on big.LITTLE boards)" in text


def test_onnxruntime_threads_sleep_between_parallel_sections():
    """An encoder's intra-op threads do not spin: spinning, they take the cores a llama.cpp worker on the same board waits
    for (measured: a third fewer chats in a mixed load), and alone they were no faster."""
    from edgekit.runtime.encoder import session_options

    options = session_options(threads=2)
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
