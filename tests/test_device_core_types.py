"""Core types are catalog data: an unknown or mismatched core is refused when a profile loads (exit 2)."""

from __future__ import annotations

import pytest
import yaml
from helpers import REPO

from edgekit.bench.host import ARM_PARTS
from edgekit.errors import DeviceError
from edgekit.fit import speed
from edgekit.schema.device import CORE_TYPES, load_catalog, load_device_file


def _profile(tmp_path, **cpu):
    data = yaml.safe_load((REPO / "devices/rpi-5-8gb.yaml").read_text())
    data["cpu"].update(cpu)
    path = tmp_path / "rpi-5-8gb.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_schema_and_the_speed_model_know_the_same_cores():
    assert set(CORE_TYPES) == set(speed.CORE_TYPES)
    assert set(ARM_PARTS.values()) <= set(CORE_TYPES)
    assert {d.cpu.core_type for d in load_catalog(REPO / "devices").values()} <= set(CORE_TYPES)


def test_unknown_core_type_is_a_clear_load_error(tmp_path):
    with pytest.raises(DeviceError) as caught:
        load_device_file(_profile(tmp_path, core_type="cortex-a55"))
    assert caught.value.exit_code == 2
    message = str(caught.value)
    assert "core_type" in message and "cortex-a76" in message and "gracemont" in message


@pytest.mark.parametrize(("cpu", "words"), [
    ({"core_type": "gracemont"}, ["gracemont", "aarch64"]),
    ({"isa": {"neon": True, "avx2": True}}, ["avx2", "aarch64"]),
])
def test_core_and_isa_must_fit_the_machine_architecture(tmp_path, cpu, words):
    with pytest.raises(DeviceError) as caught:
        load_device_file(_profile(tmp_path, **cpu))
    assert caught.value.exit_code == 2 and all(w in str(caught.value) for w in words)
