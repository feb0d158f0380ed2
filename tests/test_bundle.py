"""Bundle integrity: atomic publish, tamper detection, paths that leave the bundle (docs/reliability.md cases 3, 5, 6)."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.bundle import REJECTED_SUFFIX, file_entries, publish, remove_stale_staging, staging_dir, verify_bundle
from edgekit.errors import BundleError
from edgekit.runtime.checks import check_onnx_external_data
from edgekit.schema.manifest import Manifest, RuntimeConfig


def make_manifest(staged: Path, name: str = "demo", passed: bool = True) -> Manifest:
    return Manifest(
        name=name, recipe_name="demo", recipe_sha256="0" * 64, source_id="local", task="feature-extraction",
        format="onnx", quantization="fp32", parameters=3, files=file_entries(staged), runtime=RuntimeConfig(max_length=8),
        passed=passed, created=datetime(2026, 1, 1, tzinfo=timezone.utc),
    )


def publish_demo(out: Path, payload: bytes = b"weights", passed: bool = True) -> Path:
    with staging_dir(out, "demo") as staged:
        (staged / "model.bin").write_bytes(payload)
        (staged / "sub").mkdir()
        (staged / "sub" / "extra.txt").write_text("x")
        return publish(staged, make_manifest(staged, passed=passed), out)


def test_publish_then_verify_roundtrip(tmp_path):
    final = publish_demo(tmp_path)
    manifest = verify_bundle(final)
    assert final == tmp_path / "demo"
    assert [(f.path, f.bytes) for f in manifest.files] == [("model.bin", 7), ("sub/extra.txt", 1)]
    assert manifest.files[0].sha256 == "9a129038d9a00aed0cf6a7ea059ca50a813449061ab87848cf1a13eafdf33b2c"  # sha256(b"weights")
    assert not list(tmp_path.glob(".staging-*"))


def test_failed_gates_publish_aside(tmp_path):
    final = publish_demo(tmp_path, passed=False)
    assert final.name == "demo" + REJECTED_SUFFIX
    assert not (tmp_path / "demo").exists()


def test_republish_replaces_old_bundle_whole(tmp_path):
    publish_demo(tmp_path, b"old")
    final = publish_demo(tmp_path, b"newer")
    assert (final / "model.bin").read_bytes() == b"newer"
    assert verify_bundle(final).files[0].bytes == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_failure_inside_staging_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with staging_dir(tmp_path, "demo") as staged:
            (staged / "model.bin").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_is_removed(tmp_path):
    (tmp_path / ".staging-demo-abc").mkdir()
    assert [p.name for p in remove_stale_staging(tmp_path)] == [".staging-demo-abc"]
    assert list(tmp_path.iterdir()) == []


def test_tampered_file_is_refused(tmp_path):
    final = publish_demo(tmp_path)
    (final / "model.bin").write_bytes(b"weightz")  # same size, different content
    with pytest.raises(BundleError, match="sha256 differs"):
        verify_bundle(final)


def test_missing_and_resized_files_are_refused(tmp_path):
    final = publish_demo(tmp_path)
    (final / "sub" / "extra.txt").write_text("xx")
    with pytest.raises(BundleError, match="has 2 bytes, the manifest says 1"):
        verify_bundle(final)
    (final / "sub" / "extra.txt").unlink()
    with pytest.raises(BundleError, match="missing"):
        verify_bundle(final)


@pytest.mark.parametrize("bad_path", ["../outside.bin", "/etc/passwd", "sub/../../x"])
def test_manifest_paths_outside_the_bundle_are_refused(tmp_path, bad_path):
    final = publish_demo(tmp_path)
    manifest = verify_bundle(final)
    entry = manifest.files[0].model_copy(update={"path": bad_path})
    tampered = manifest.model_copy(update={"files": [entry]})
    (final / "manifest.json").write_text(tampered.model_dump_json())
    with pytest.raises(BundleError, match="leaves the bundle"):
        verify_bundle(final)


def test_symlink_out_of_the_bundle_is_refused(tmp_path):
    out = tmp_path / "out"
    final = publish_demo(out)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"weights")
    (final / "model.bin").unlink()
    os.symlink(secret, final / "model.bin")
    with pytest.raises(BundleError, match="outside the bundle"):
        verify_bundle(final)


def onnx_with_external_data(directory: Path, location: str) -> Path:
    """A one-node ONNX model whose weight claims to live at ``location``."""
    weight = numpy_helper.from_array(np.ones((2, 2), dtype=np.float32), name="w")
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], initializer=[weight],
    )
    path = directory / "model.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../../etc/shadow"])
def test_onnx_external_data_outside_bundle_is_refused(tmp_path, location):
    model = onnx_with_external_data(tmp_path, location)
    with pytest.raises(BundleError, match="outside the bundle"):
        check_onnx_external_data(model, tmp_path)


def test_onnx_external_data_symlink_out_is_refused(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    os.symlink(tmp_path / "weights.bin", bundle / "weights.bin")
    model = onnx_with_external_data(bundle, "weights.bin")
    with pytest.raises(BundleError, match="outside the bundle"):
        check_onnx_external_data(model, bundle)


def test_onnx_external_data_inside_bundle_is_accepted(tmp_path):
    (tmp_path / "weights.bin").write_bytes(np.ones((2, 2), dtype=np.float32).tobytes())
    model = onnx_with_external_data(tmp_path, "weights.bin")
    check_onnx_external_data(model, tmp_path)
    assert onnx.load(str(model)).graph.initializer[0].dims == [2, 2]
