"""The real SmolLM2-135M-Instruct end to end: conversion vs the upstream GGUF, tokenization identity, Q8_0 and Q4_K_M bundles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import REPO, SMOLLM, SMOLLM_GGUF, gguf_metadata, gguf_tensor_values

from edgekit.bundle import read_manifest, verify_bundle
from edgekit.errors import RecipeError
from edgekit.export import ExportJob
from edgekit.export.gguf import build, quality
from edgekit.export.gguf.convert import convert_checkpoint
from edgekit.export.sources import ResolvedSource
from edgekit.runtime.gguf_file import gguf_facts, read_gguf_header
from edgekit.schema.recipe import load_recipe

pytestmark = pytest.mark.slow

UPSTREAM = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_FILE = REPO / "tests/data/tokenizer-corpus.jsonl"
CORPUS = [json.loads(line)["text"] for line in CORPUS_FILE.read_text(encoding="utf-8").splitlines()]
TOKENIZER_KEYS = (
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
)


@pytest.fixture(scope="module")
def f16(tmp_path_factory, sample_store) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "f16.gguf"
    convert_checkpoint(sample_store / SMOLLM, out, outtype="F16")
    return out


@pytest.fixture(scope="module")
def upstream(sample_store) -> Path:
    return sample_store / SMOLLM_GGUF / UPSTREAM


def test_conversion_matches_the_upstream_gguf(f16, upstream):
    ours, theirs = read_gguf_header(f16), read_gguf_header(upstream)
    assert [ours.get(k) for k in TOKENIZER_KEYS] == [theirs.get(k) for k in TOKENIZER_KEYS]
    assert (ours.get("tokenizer.ggml.model"), ours.get("tokenizer.ggml.pre")) == ("gpt2", "smollm")
    assert [ours.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")] == [1, 2, 0, 2]
    full_ours, full_theirs = gguf_metadata(f16), gguf_metadata(upstream)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        assert isinstance(full_ours[key], list) and full_ours[key] == full_theirs[key], key
    assert len(full_ours["tokenizer.ggml.tokens"]) == 49152 and len(full_ours["tokenizer.ggml.merges"]) == 48900
    # strings are decoded with errors="replace": no replacement character means every byte was compared
    assert not any("\ufffd" in text for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges") for text in full_ours[key])
    assert {t.name: t.shape for t in ours.tensors} == {t.name: t.shape for t in theirs.tensors}
    assert len(ours.tensors) == 272
    assert gguf_facts(ours).model_dump(exclude={"quant_type", "bits_per_weight"}) == gguf_facts(theirs).model_dump(
        exclude={"quant_type", "bits_per_weight"})
    hparams = [k for k in theirs.metadata if k.startswith("llama.")]
    assert len(hparams) == 10 and {k: ours.get(k) for k in hparams} == {k: theirs.get(k) for k in hparams}


def test_tokenization_is_identical_to_transformers_and_upstream(f16, upstream, sample_store):
    texts = CORPUS + list(quality.PROBE_TEXTS)
    assert len(texts) == 2747
    assert quality.tokenization_mismatches(sample_store / SMOLLM, f16, texts) == []
    assert quality.gguf_tokenize(f16, texts) == quality.gguf_tokenize(upstream, texts)


def test_weights_match_the_upstream_dequantized(f16, upstream):
    """The checkpoint was rebuilt from the upstream Q4_1 file: after our q/k regrouping the values meet again (bf16 rounding)."""
    import numpy as np

    names = ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.29.attn_v.weight", "blk.7.ffn_down.weight")
    ours, theirs = gguf_tensor_values(f16, names), gguf_tensor_values(upstream, names)
    assert sorted(ours) == sorted(theirs) == sorted(names)
    for name in names:
        a, b = ours[name][1], theirs[name][1]
        assert np.abs(a - b).max() <= np.abs(b).max() / 128  # bf16 keeps 8 significant bits


@pytest.fixture(scope="module")
def bundles(smollm2_exported):
    """{quant type: (manifest, bundle)} of the shipped recipe (serve_fixtures exports it once per run)."""
    return {quant: (read_manifest(where), where) for quant, where in smollm2_exported.items()}


def test_bundles_pass_their_gates_and_verify(bundles):
    assert sorted(bundles) == ["Q4_K_M", "Q8_0"]
    for manifest, where in bundles.values():
        assert manifest.passed and len(manifest.gates) == 3
        assert where.name == manifest.name and verify_bundle(where) == manifest
        assert [f.path for f in manifest.files] == ["model.gguf"]


def test_quant_facts_and_sizes(bundles):
    q8, q4 = bundles["Q8_0"][0], bundles["Q4_K_M"][0]
    assert q8.gguf.quant_type == "Q8_0" and 8.45 < q8.gguf.bits_per_weight < 8.55
    # 576 columns are not a multiple of 256, so most K-quant matrices fall back to Q5_0/Q8_0: about 6.2 bits.
    assert q4.gguf.quant_type == "Q4_K_M" and 5.5 < q4.gguf.bits_per_weight < 6.5
    assert 140e6 < q8.file(".gguf").bytes < 150e6 and 100e6 < q4.file(".gguf").bytes < 110e6
    for manifest in (q8, q4):
        facts = manifest.gguf
        assert (facts.architecture, facts.context_length, facts.n_layer, facts.n_head, facts.n_head_kv, facts.n_embd,
                facts.n_vocab) == ("llama", 8192, 30, 9, 3, 576, 49152)
        assert manifest.parameters == 134_515_008


def test_quality_orders_with_bits_and_f16_matches_pytorch(bundles):
    q8, q4 = bundles["Q8_0"][0].metrics, bundles["Q4_K_M"][0].metrics
    for metrics in (q8, q4):
        assert metrics["eval_tokens"] == 511  # one window of 512: 511 next-token predictions
        assert metrics["torch_top1_agreement"] >= 0.99 and metrics["torch_kld_mean"] < 1e-4
        assert metrics["tokenizer_mismatches"] == 0 and metrics["tokenizer_texts"] == 53
        assert metrics["ppl_reference"] == pytest.approx(metrics["torch_ppl"], rel=1e-3)
    assert 0 < q8["kld_mean"] < q4["kld_mean"] < 0.2
    assert q8["top1_agreement"] > q4["top1_agreement"] > 0.75
    assert q8["ppl_increase"] < q4["ppl_increase"] < 0.2


def test_runtime_carries_the_chat_template(bundles, sample_store):
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(sample_store / SMOLLM).chat_template
    for manifest, _ in bundles.values():
        assert manifest.runtime.chat_template == template
        assert manifest.runtime.context_length == 8192 and manifest.runtime.text_normalization is None


def _job(recipe_path: Path, source_dir: Path, tmp_path: Path) -> ExportJob:
    loaded = load_recipe(recipe_path)
    (tmp_path / "stage").mkdir()
    (tmp_path / "scratch").mkdir()
    return ExportJob(loaded=loaded, target=loaded.recipe.targets[0],
                     source=ResolvedSource(source_dir, SMOLLM_GGUF, None, "store"),
                     staging=tmp_path / "stage", scratch=tmp_path / "scratch", memo={})


@pytest.mark.parametrize("opt_in", [False, True])
def test_requantizing_the_upstream_q4_1_needs_opt_in(sample_store, tmp_path, opt_in):
    recipe = {
        "name": "smollm2-from-gguf", "task": "text-generation",
        "source": {"id": SMOLLM_GGUF, "gguf_file": UPSTREAM},
        "targets": [{"format": "gguf", "name": "q4-0", "quant": "Q4_0", "allow_requantize": opt_in}],
        "validation": {"text_file": str(REPO / "recipes/data/eval-text.txt"), "max_eval_tokens": 256, "context_window": 256},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    job = _job(path, sample_store / SMOLLM_GGUF, tmp_path)
    if not opt_in:
        with pytest.raises(RecipeError, match="the source GGUF is Q4_1; requantizing an already low-bit file compounds"):
            build(job)
        return
    result = build(job)
    assert result.gguf.quant_type == "Q4_0" and result.gguf.requantized_from == "Q4_1"
    assert 0 < result.metrics["kld_mean"] < 0.5 and result.metrics["tokenizer_mismatches"] == 0
    assert result.parameters == 134_515_008
