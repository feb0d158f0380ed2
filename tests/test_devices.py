"""Device catalog: the shipped boards are valid and sourced; bad profiles fail with file:field messages (exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run_cli

from edgekit.errors import DeviceError
from edgekit.fit.speed import CORE_TYPES
from edgekit.schema.device import load_catalog, load_device, load_device_file

DEVICES = REPO / "devices"
REQUIRED = {  # the boards the catalog promises, and the ids recipes already name
    "rpi-zero-2w", "rpi-3b-plus", "rpi-4-2gb", "rpi-4-4gb", "rpi-4-8gb", "rpi-5-4gb", "rpi-5-8gb", "rpi-5-16gb",
    "orange-pi-5-8gb", "jetson-orin-nano-8gb", "intel-n100-16gb", "x86-64-avx2-generic",
}
SPEC_BLOCKS = ("cpu", "memory", "memory_bandwidth", "storage")


def run_process(*args: str) -> subprocess.CompletedProcess:
    """`python -m edgekit` in a subprocess; the other CLI calls here run in this process (helpers.run_cli)."""
    return subprocess.run([sys.executable, "-m", "edgekit", *args], capture_output=True, text=True)


@pytest.mark.parametrize("path", sorted(DEVICES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_profile_is_valid_and_sourced(path):
    device = load_device_file(path)
    assert device.id == path.stem
    for block in SPEC_BLOCKS:
        spec = getattr(device, block)
        assert spec.source or (spec.estimate and spec.note), f"{path.name}: {block} has neither source nor estimate note"
    assert device.cpu.core_type in CORE_TYPES
    assert device.usable_ram_bytes == (device.memory.total_mib - device.memory.os_reserved_mib) * 2**20
    for point in device.calibration:
        assert point.source and point.measured_on
    if device.cpu.arch == "x86_64":
        assert device.cpu.isa.avx2 and not device.cpu.isa.neon
    else:
        assert device.cpu.isa.neon and not device.cpu.isa.avx2


def test_catalog_has_the_promised_boards():
    catalog = load_catalog()
    assert len(catalog) >= 10
    assert REQUIRED <= set(catalog)
    # the published calibration points of docs/device-facts.md are all present, each with its source
    decode_points = {(d, p.model, p.quant, p.decode_tok_s) for d, dev in catalog.items() for p in dev.calibration}
    assert ("rpi-5-8gb", "Llama 3.2 3B", "Q4_K_M", 4.61) in decode_points
    assert ("intel-n150-16gb", "Llama 3.2 3B", "Q4_K_M", 9.06) in decode_points
    assert ("rpi-zero-2w", "SmolLM 360M", "Q4_K_M", 2.6) in decode_points
    encoder_points = {(d, p.quant, p.latency_ms) for d, dev in catalog.items() for p in dev.calibration if p.format == "onnx"}
    assert encoder_points == {("x86-64-avx2-generic", "int8-dynamic", 2.22), ("x86-64-avx2-generic", "fp32", 3.04)}
    # prompt speed: the Raspberry Pi 5 with today's repacked kernels, each point naming the llama.cpp build it ran
    prompt_points = {(d, p.model, p.quant, p.prompt_tok_s, str(p.build_date)) for d, dev in catalog.items()
                     for p in dev.calibration if p.prompt_tok_s}
    assert {("rpi-5-8gb", "LFM2-700M", "Q6_K", 105.82, "2026-02-05"), ("rpi-5-8gb", "LFM2-350M", "Q5_K_M", 187.35, "2026-02-05"),
            ("rpi-4-8gb", "TinyLlama 1.1B", "Q8_0", 10.0, "2024-03-26")} <= prompt_points
    assert all(p.build for dev in catalog.values() for p in dev.calibration if p.prompt_tok_s)


def test_load_device_by_id_or_file(tmp_path):
    assert load_device("rpi-5-4gb").memory.total_mib == 4096
    copy = tmp_path / "board.yaml"
    shutil.copy(DEVICES / "rpi-5-4gb.yaml", copy)
    data = yaml.safe_load(copy.read_text())
    data["id"] = "board"
    copy.write_text(yaml.safe_dump(data))
    assert load_device(str(copy)).id == "board"
    with pytest.raises(DeviceError, match="unknown device 'rpi-9'"):
        load_device("rpi-9")


def _bad_profile(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load((DEVICES / "rpi-4-2gb.yaml").read_text())
    edit(data)
    path = tmp_path / "rpi-4-2gb.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda d: d.update(colour="red"), "colour: unknown key"),
    (lambda d: d["cpu"].update(clock_ghz="fast"), "cpu.clock_ghz: Input should be a valid number"),
    (lambda d: d["memory_bandwidth"].pop("source"), "memory_bandwidth: Value error, give a 'source'"),
    (lambda d: d["memory"].update(os_reserved_mib=4096), "memory: Value error, os_reserved_mib (4096) must be below total_mib (2048)"),
    (lambda d: d["calibration"][0].pop("decode_tok_s"), "calibration.0: Value error, a calibration point needs"),
    (lambda d: d["storage"].update(kind="floppy"), "storage.kind: Input should be"),
    (lambda d: d["cpu"].pop("cores"), "cpu.cores: required field is missing"),
    (lambda d: d.update(id="rpi-4-2-gb"), "id: 'rpi-4-2-gb' differs from the file name"),
])
def test_bad_profile_names_file_and_field(tmp_path, edit, expected):
    path = _bad_profile(tmp_path, edit)
    with pytest.raises(DeviceError) as caught:
        load_device_file(path)
    assert str(path) in str(caught.value)
    assert expected in str(caught.value)


def test_cli_devices_list_exit_2_on_bad_profile(tmp_path):
    shutil.copy(DEVICES / "rpi-5-8gb.yaml", tmp_path / "rpi-5-8gb.yaml")
    _bad_profile(tmp_path, lambda d: d["cpu"].update(cores=0))
    done = run_cli("devices", "list", "--catalog", str(tmp_path), "--json")
    assert done.returncode == 2
    rows = {r["file"]: r for r in json.loads(done.stdout)}
    assert rows["rpi-5-8gb.yaml"]["error"] is None
    assert "rpi-4-2gb.yaml: cpu.cores: Input should be greater than or equal to 1" in rows["rpi-4-2gb.yaml"]["error"]

    done = run_cli("fit", str(REPO / "tests/golden/bundles/smollm2-135m-instruct-q8-0"), "--catalog", str(tmp_path))
    assert done.returncode == 2 and "cpu.cores" in done.stderr


def test_cli_devices_list_and_show():
    done = run_process("devices", "list", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert REQUIRED <= {r["id"] for r in rows}
    done = run_cli("devices", "show", "rpi-zero-2w", "--json")
    assert done.returncode == 0
    shown = json.loads(done.stdout)
    assert shown["usable_ram_bytes"] == (512 - 170) * 2**20
    assert shown["calibration"][0]["decode_tok_s"] == 2.6
    assert run_process("devices", "show", "nope").returncode == 2


def test_profile_host_writes_a_loadable_profile(tmp_path):
    out = tmp_path / "this-host.yaml"
    done = run_cli("profile-host", "--out", str(out), "--bandwidth-mib", "16")
    assert done.returncode == 0, done.stderr
    device = load_device(str(out))
    assert device.id == "this-host"
    assert device.cpu.cores == len(os.sched_getaffinity(0))
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert device.memory.total_mib == int(meminfo["MemTotal"].split()[0]) * 1024 // 2**20
    assert device.memory_bandwidth.gb_s > 0.1 and device.storage.read_mb_s > 1
    flags = Path("/proc/cpuinfo").read_text()
    assert device.cpu.isa.avx2 == (" avx2" in flags and " fma" in flags)


def test_profile_host_id_follows_the_output_file_name(tmp_path):
    """A profile written to F is accepted by `fit --device F`: its id is F's name; a name that is no id is exit 2."""
    out = tmp_path / "my-board.yaml"
    done = run_cli("profile-host", "--out", str(out), "--bandwidth-mib", "16")
    assert done.returncode == 0, done.stderr
    assert load_device(str(out)).id == "my-board"
    done = run_cli("fit", str(REPO / "tests/golden/bundles/smollm2-135m-instruct-q8-0"), "--device", str(out), "--json")
    assert done.returncode in (0, 1), done.stderr  # a verdict on the board, not a refused profile
    assert [r["device"] for r in json.loads(done.stdout)] == ["my-board"]

    bad = tmp_path / "My Board.yaml"
    done = run_cli("profile-host", "--out", str(bad), "--bandwidth-mib", "16")
    assert done.returncode == 2 and "'My Board' is not a valid device id" in " ".join(done.stderr.split())
    assert not bad.exists()
    done = run_cli("profile-host", "--out", str(out), "--id", "other-board")
    assert done.returncode == 2 and "--id other-board differs from the file name" in " ".join(done.stderr.split())


def test_profile_host_times_gguf_decode_short_and_deep(tmp_path, tiny_llama_bundle, monkeypatch):
    """A tiny random llama (serve_fixtures.tiny_llama_gguf): the model's speed is not what is checked, so the 512-token
    prompt costs milliseconds instead of the sample model's seconds."""
    from edgekit.bench import profile
    from edgekit.fit import speed

    # Fewer tokens and one measurement per speed: what is checked is that each point is measured and written, not its value.
    monkeypatch.setattr(profile, "DECODE_TOKENS", 16)
    monkeypatch.setattr(profile, "REPEATS", 1)
    out = tmp_path / "this-host.yaml"
    shallow = run_cli("profile-host", "--bundle", str(tiny_llama_bundle), "--depth", "96")
    assert shallow.returncode == 2 and "--depth 96: use 512.." in shallow.stderr
    done = run_cli("profile-host", "--out", str(out), "--bandwidth-mib", "16", "--bundle", str(tiny_llama_bundle),
                   "--threads", "1", "--depth", "512")
    assert done.returncode == 0, done.stderr
    device = load_device(str(out))
    short, deep = device.calibration
    assert (short.context_tokens, short.n_layer, short.threads) == (0, 2, 1)
    assert short.decode_tok_s > 0 and short.prompt_tok_s > 0
    assert (deep.context_tokens, deep.n_head, deep.n_head_kv, deep.head_dim) == (512 + 16 // 2, 4, 2, 16)
    assert deep.decode_tok_s > 0 and deep.prompt_tok_s is None  # no speed comparison: timings are the benchmark's
    calibration = speed.calibrate(device, "decode")
    assert calibration.points == (f"this-host: {short.model} {short.quant}",)
    if calibration.attention_points:  # priced only when attention was a large enough share of the deep time
        assert calibration.attention_points == (f"this-host: {deep.model} {deep.quant} at 520 tokens of context",)
        assert speed.point_prediction(deep, device, "decode", calibration) == pytest.approx(deep.decode_tok_s)
