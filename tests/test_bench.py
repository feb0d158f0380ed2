"""`edgekit bench`: fresh-subprocess measurements, JSON shape and the PNG plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import run_cli, write_recipe

from edgekit.export import export
from edgekit.schema import load_recipe


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("bench")
    [(_, where)] = export(load_recipe(write_recipe(tmp / "tiny.yaml", tiny_bert_dir)), tmp / "out")
    return where


def test_bench_measures_an_onnx_bundle_in_a_subprocess(tmp_path, tiny_bundle):
    png = tmp_path / "plot.png"
    done = subprocess.run(
        [sys.executable, "-m", "edgekit", "bench", str(tiny_bundle), "--runs", "2", "--threads", "1", "--json", "--plot", str(png)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    [result] = report["results"]
    assert result["bundle"] == "tiny-int8" and result["format"] == "onnx"
    assert len(result["runs"]) == 2
    assert 0 < result["load_seconds"] < 60
    assert 20e6 < result["peak_rss_bytes"] < 2e9  # a python process with onnxruntime loaded
    stats = result["summary"]["batch1_p50_ms"]
    assert 0 < stats["min"] <= stats["median"] <= stats["max"]
    assert result["summary"]["batch32_texts_per_s"]["median"] > 0
    assert result["quality_metric"] == "cosine_mean" and 0.9 < result["quality"] <= 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_a_tampered_bundle(tmp_path, tiny_bundle):
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, copy)
    (copy / "tokenizer.json").write_text("{}")
    done = run_cli("bench", str(copy), "--runs", "1")
    assert done.returncode == 1
    assert "tokenizer.json has 2 bytes" in done.stderr


def test_bench_writes_calibration_points_that_fit_can_load(tmp_path, tiny_bundle):
    from edgekit.schema.device import load_device_file

    profile = tmp_path / "this-host.yaml"
    done = run_cli("profile-host", "--out", str(profile), "--bandwidth-mib", "16")
    assert done.returncode == 0, done.stderr
    before = len(load_device_file(profile).calibration)
    for _ in range(2):  # a second run replaces its own point instead of adding another
        done = run_cli("bench", str(tiny_bundle), "--runs", "1", "--threads", "1", "--calibrate", str(profile))
        assert done.returncode == 0, done.stderr
    points = load_device_file(profile).calibration
    assert len(points) == before + 1
    point = points[-1]
    assert (point.model, point.format, point.quant) == ("tiny-int8", "onnx", "int8-dynamic-block128")
    assert point.parameters == 2_032_960 and point.n_layer == 2 and point.hidden_size == 64
    assert point.seq_len == 5 and point.latency_ms > 0 and point.source.startswith("edgekit bench")
