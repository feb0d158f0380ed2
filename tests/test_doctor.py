"""`edgekit doctor` on real bundles: golden checks, speed next to fit's prediction, the CPU check before anything loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli
from serve_fixtures import MINILM_NAME, Q4KM, RARE_TOKEN, SMOLLM_NAME, link_bundles

from edgekit.bundle import MANIFEST_NAME
from edgekit.cli import doctor
from edgekit.runtime import cpu, probe

pytestmark = pytest.mark.slow


def run_doctor(*args: str, features: str | None = None) -> subprocess.CompletedProcess:
    """`edgekit doctor` in this process (its checks run in child processes of their own either way)."""
    # A wide console: the table's layout must not depend on how long this run's temp paths are.
    return run_cli("doctor", *args, unset=(cpu.FEATURES_ENV,), env={} if features is None else {cpu.FEATURES_ENV: features},
                   columns=200)


def doctor_process(*args: str, features: str | None = None) -> subprocess.CompletedProcess:
    """`python -m edgekit doctor`, as installed boards run it."""
    env = {k: v for k, v in os.environ.items() if k != cpu.FEATURES_ENV} | {"COLUMNS": "200"}
    if features is not None:
        env[cpu.FEATURES_ENV] = features
    return subprocess.run([sys.executable, "-m", "edgekit", "doctor", *args], capture_output=True, text=True, env=env)


def unwrapped(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


def write_pack(folder: Path, features: list[str], machine: str = "x86_64", target: str = "x86-64-v3") -> Path:
    """A pack.json as `edgekit pack` writes it, with the parts doctor reads (the rest of the file is the installer's)."""
    from edgekit.schema.device import load_device

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / doctor.PACK_MANIFEST
    device = json.loads(load_device("x86-64-avx2-generic").model_dump_json())
    target_record = {"name": target, "machine": machine, "cpu_features": {f: cpu.FEATURE_DESCRIPTIONS.get(f, f) for f in features},
                     "cmake_args": []}
    path.write_text(json.dumps({"schema_version": 1, "device": device, "target": target_record}))
    return path


def test_doctor_passes_the_sample_bundles_and_measures_them(tmp_path, minilm_bundle, smollm2_q4km):  # noqa: F811
    models = link_bundles(tmp_path / "models", minilm_bundle, smollm2_q4km)
    done = run_doctor(str(models), "--device", "x86-64-avx2-generic", "--runs", "1", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["exit_code"] == 0 and report["device"] == "x86-64-avx2-generic"
    assert [(r["module"], r["ok"]) for r in report["runtimes"]] == [("llama_cpp", True), ("onnxruntime", True)]
    assert report["runtimes"][0]["detail"] == "0.3.36"
    by_name = {b["name"]: b for b in report["bundles"]}
    assert sorted(by_name) == [MINILM_NAME, Q4KM]
    gguf, onnx = by_name[Q4KM], by_name[MINILM_NAME]
    assert gguf["format"] == "gguf" and gguf["golden"]["passed"] and gguf["golden"]["recorded"]
    assert [c["ids_equal"] for c in gguf["golden"]["checks"]] == [True, True, True]
    assert onnx["format"] == "onnx" and all(c["cosine"] > 0.99999 for c in onnx["golden"]["checks"])
    assert set(gguf["measured"]) == set(gguf["predicted"]) == {"decode_tok_s", "prompt_tok_s"}
    assert all(v > 0 for v in [*gguf["measured"].values(), *gguf["predicted"].values()])
    assert set(onnx["measured"]) == set(onnx["predicted"]) == {"batch1_p50_ms"}


def test_a_tampered_golden_record_exits_1_naming_it(tmp_path, minilm_bundle, smollm2_q4km, smollm_bundle):  # noqa: F811
    models = link_bundles(tmp_path / "models", minilm_bundle, smollm2_q4km, smollm_bundle)
    manifest_path = models / Q4KM / MANIFEST_NAME
    data = json.loads(manifest_path.read_text())  # the manifest is not hashed: a record can be edited
    data["golden"]["prompts"][1]["ids"][4:] = [RARE_TOKEN] * 12
    manifest_path.unlink()  # a hard link to the fixture's file: replace it, do not write through it
    manifest_path.write_text(json.dumps(data))
    done = run_doctor(str(models), "--no-speed", "--json")
    assert done.returncode == 1, done.stderr
    assert f"golden check failed for {Q4KM}: prompt 2: greedy tokens differ from step 4" in unwrapped(done.stderr)
    report = json.loads(done.stdout)
    by_name = {b["name"]: b for b in report["bundles"]}
    assert by_name[Q4KM]["exit_code"] == 1 and by_name[Q4KM]["golden"]["checks"][1]["top1_agreement"] == 0.25
    assert by_name[MINILM_NAME]["golden"]["passed"] and by_name[MINILM_NAME]["exit_code"] == 0
    assert by_name[SMOLLM_NAME]["golden"]["recorded"] is False and by_name[SMOLLM_NAME]["exit_code"] == 0  # not a failure
    assert by_name[Q4KM]["measured"] == {}  # --no-speed

    failing = link_bundles(tmp_path / "failing", models / Q4KM, smollm_bundle)  # the table: a failed record, one not recorded
    table = run_doctor(str(failing), "--no-speed")
    assert table.returncode == 1
    assert "FAIL" in table.stdout and "not recorded" in table.stdout


def test_a_missing_cpu_feature_exits_3_before_anything_loads(tmp_path, smollm2_q4km):  # noqa: F811
    pack = write_pack(tmp_path / "release", ["sse2", "avx2", "fma"])
    done = doctor_process(str(smollm2_q4km), "--pack", str(pack), "--json", features="sse2 fma")
    assert done.returncode == 3
    assert ("this CPU lacks avx2 (x86 AVX2 (256-bit integer SIMD)), which the runtime built for x86-64-avx2-generic "
            "(x86-64-v3) needs (features from EDGEKIT_CPU_FEATURES)\n") in done.stderr
    assert "nothing was loaded (1 missing feature(s): avx2)" in unwrapped(done.stderr)
    report = json.loads(done.stdout)
    assert report["cpu"]["missing"] == ["avx2"] and report["cpu"]["source"] == cpu.FEATURES_ENV
    assert report["runtimes"] == [] and report["bundles"] == []  # no import probed, no bundle loaded


def test_the_pack_next_to_the_prefix_supplies_bundles_device_and_target(tmp_path, minilm_bundle):  # noqa: F811
    release = tmp_path / "opt" / "edgekit" / "releases" / "1"
    link_bundles(release / "bundles", minilm_bundle)
    pack = write_pack(release, ["sse2"])
    assert doctor.find_pack(release / "venv") == pack
    assert doctor.find_pack(release / "venv" / "lib" / "python3") == pack  # 3 levels up
    assert doctor.find_pack(release / "venv" / "lib" / "python3" / "site-packages") is None  # 4: too far
    info = doctor.read_pack(release)
    assert (info.device.id, info.target_name, info.machine, info.required_features, info.bundles) == (
        "x86-64-avx2-generic", "x86-64-v3", "x86_64", ("sse2",), release / "bundles")
    done = run_doctor("--pack", str(pack), "--no-speed", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["cpu"]["required"] == ["sse2"] and report["cpu"]["missing"] == []
    assert [b["name"] for b in report["bundles"]] == [MINILM_NAME]
    assert report["device"] == "x86-64-avx2-generic"


def test_a_pack_for_another_machine_exits_3_before_anything_loads(tmp_path):
    pack = write_pack(tmp_path / "release", ["asimd", "asimddp"], machine="aarch64", target="armv8.2-a-dotprod")
    done = run_doctor("--pack", str(pack), "--json")
    assert done.returncode == 3
    assert unwrapped(done.stderr) == (f"error: this machine is {os.uname().machine}; the installed pack (x86-64-avx2-generic, "
                                      "armv8.2-a-dotprod) is for aarch64 boards; nothing was loaded")
    assert json.loads(done.stdout)["runtimes"] == []


def test_a_runtime_killed_by_sigill_is_reported_not_shared():
    found = cpu.CpuFeatures(frozenset({"fp", "asimd", "evtstrm", "crc32", "cpuid"}), "getauxval", "aarch64")
    crashed = doctor.run_probe("llama_cpp", [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"],
                             found, None)
    assert (crashed.ok, crashed.returncode) == (False, -signal.SIGILL)
    assert crashed.detail == (
        "llama_cpp died with SIGILL (illegal instruction): it was built for instructions this CPU does not have; features "
        "builds for newer cores use that this CPU lacks: asimddp (Arm dot product (Armv8.2-A)), fphp (Arm half-precision "
        "scalar arithmetic (Armv8.2-A)), asimdhp (Arm half-precision SIMD arithmetic (Armv8.2-A)), i8mm (Arm int8 matrix multiply (Armv8.6-A)), bf16 (Arm BFloat16 "
        "arithmetic (Armv8.6-A)), sve (Arm Scalable Vector Extension)")
    missing = doctor.run_probe("nosuchruntime", [sys.executable, "-m", "edgekit.runtime.probe", "nosuchruntime:start"], found, None)
    assert (missing.ok, missing.returncode) == (False, probe.NOT_INSTALLED)
    assert missing.detail == "nosuchruntime is not installed or does not import: No module named 'nosuchruntime'"


def test_the_probe_starts_each_registered_engine():
    import llama_cpp
    import onnxruntime

    found = cpu.detect()
    probes = {m: doctor.run_probe(m, doctor.probe_command(m), found, None) for m in doctor.RUNTIME_MODULES}
    assert {m: (p.ok, p.returncode, p.detail) for m, p in probes.items()} == {
        "llama_cpp": (True, 0, llama_cpp.__version__), "onnxruntime": (True, 0, onnxruntime.__version__)}
