"""ONNX export end to end: tiny random BERT for breadth, the real MiniLM sample for the numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import REPO, run_cli, write_recipe

from edgekit.bundle import verify_bundle
from edgekit.export import export
from edgekit.runtime.encoder import EncoderModel
from edgekit.schema import load_recipe


def test_hybrid_quantization_puts_attention_per_tensor_and_feed_forward_in_blocks(tmp_path, tiny_bert_dir):
    import onnx

    target = {"format": "onnx", "name": "int8", "quantization": {"mode": "dynamic", "per_tensor_matmuls": ["*/attention/*/MatMul"]}}
    [(manifest, where)] = export(load_recipe(write_recipe(tmp_path / "tiny.yaml", tiny_bert_dir, targets=[target])), tmp_path / "out")
    assert manifest.passed and manifest.quantization == "int8-dynamic-block128-hybrid"
    nodes = onnx.load(str(where / "model.onnx")).graph.node
    blockwise = sorted(n.name for n in nodes if n.op_type == "MatMulNBits")
    per_tensor = sorted(n.name for n in nodes if n.op_type == "MatMulInteger")
    # 2 layers: Q, K, V and attention output per tensor; the two feed-forward MatMuls in blocks
    assert len(per_tensor) == 8 and all("/attention/" in name for name in per_tensor)
    assert len(blockwise) == 4 and not any("/attention/" in name for name in blockwise)
    assert not [n for n in nodes if n.op_type == "MatMul"]
    assert manifest.metrics["cosine_min"] > 0.9


def test_per_tensor_pattern_that_matches_nothing_is_a_recipe_error(tmp_path, tiny_bert_dir):
    target = {"format": "onnx", "name": "int8", "quantization": {"mode": "dynamic", "per_tensor_matmuls": ["*/no_such_layer/*"]}}
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_bert_dir, targets=[target])
    done = run_cli("export", str(recipe), "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert "match no MatMul node" in done.stderr


def test_failing_gate_keeps_the_bundle_aside_and_exits_1(tmp_path, tiny_bert_dir):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_bert_dir,
                          validation={"samples": ["hello world", "ok"], "gates": {"min_cosine_each": 1.0}})
    done = run_cli("export", str(recipe), "--out", str(tmp_path / "out"), "--json")
    assert done.returncode == 1, done.stderr
    [row] = json.loads(done.stdout)
    assert row["passed"] is False and row["gates"][0]["gate"] == "min_cosine_each"
    assert row["gates"][0]["measured"] < 1.0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny-int8.rejected"]
    assert "quality gates failed for tiny-int8" in done.stderr


def test_gate_on_unmeasured_metric_is_a_recipe_error(tmp_path, tiny_bert_dir):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_bert_dir, validation={"samples": ["a"], "gates": {"max_kld": 0.1}})
    done = run_cli("export", str(recipe), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "gate 'max_kld' needs metric 'kld_mean'" in done.stderr


def test_export_killed_midway_leaves_no_bundle_and_the_rerun_publishes_a_verified_bundle(tmp_path, tiny_bert_dir):
    """docs/reliability.md case 6: SIGKILL during the export; nothing appears under the final name."""
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_bert_dir)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "edgekit", "export", str(recipe), "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(out.glob(".staging-tiny-int8-*/.work/*")):
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "tiny-int8").exists()
    leftovers = sorted(p.name for p in out.iterdir())
    assert leftovers and all(name.startswith(".staging-") for name in leftovers)
    assert any(name.startswith(".staging-tiny-int8-") for name in leftovers)
    [(manifest, where)] = export(load_recipe(recipe), out)
    assert sorted(p.name for p in out.iterdir()) == ["tiny-int8"]
    # The rerun's bundle, in full: the tiny BERT through the real export path.
    assert where == out / "tiny-int8"
    assert verify_bundle(where) == manifest
    assert manifest.passed and manifest.quantization == "int8-dynamic-block128"
    assert [f.path for f in manifest.files] == ["model.onnx", "tokenizer.json"]
    assert manifest.runtime.max_length == 64 and manifest.runtime.pooling == "mean" and not manifest.runtime.normalize
    assert manifest.runtime.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    # embeddings 30522*64 + 128*64 + 2*64 + LN 128 = 1,961,856; per layer 4*(64*64+64) + 2*128
    # + (64*128+128) + (128*64+64) = 33,472, two of them; pooler 64*64+64 = 4,160
    assert manifest.parameters == 1_961_856 + 2 * 33_472 + 4_160  # position_ids (int64 buffer) not counted
    assert manifest.metrics["samples"] == 3
    assert manifest.metrics["cosine_min"] > 0.9
    embedding = EncoderModel(where, manifest.runtime).embed(["hello world"])
    assert embedding.shape == (1, 64)


def test_classifier_with_seeded_head_keeps_its_labels_and_predictions(tmp_path, tiny_bert_dir):
    """A seeded 2-layer BERT classifier with MiniLM's tokenizer; the real MiniLM is the sample recipe's test below."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    # initializer_range 0.5: hidden states differ enough between texts that both labels are predicted (25/75 %
    # on the labelled file), as the real MiniLM with a random head does; at the default 0.02 every text gets one label.
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=128, initializer_range=0.5,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    source = tmp_path / "tiny-sentiment"
    BertForSequenceClassification(config).eval().save_pretrained(source, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (source / name).write_bytes((tiny_bert_dir / name).read_bytes())
    recipe = write_recipe(
        tmp_path / "cls.yaml", source, name="sentiment", task="text-classification", max_length=128,
        validation={"samples_file": str(REPO / "recipes/data/validation-sentences.txt"),
                    "labelled_file": str(REPO / "recipes/data/sentiment-labelled.jsonl"),
                    "gates": {"min_top1_agreement": 0.9, "max_accuracy_drop": 0.05}},
    )
    [(manifest, where)] = export(load_recipe(recipe), tmp_path / "out")
    assert manifest.runtime.labels == ["negative", "positive"]
    assert manifest.metrics["samples"] == 240
    assert manifest.metrics["top1_agreement"] >= 0.9
    assert manifest.metrics["accuracy_drop"] <= 0.05
    assert manifest.passed
    probabilities = EncoderModel(where, manifest.runtime).classify(["I love it", "terrible, broken on arrival"])
    assert probabilities.shape == (2, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    labelled = [json.loads(line)["text"] for line in (REPO / "recipes/data/sentiment-labelled.jsonl").read_text().splitlines()]
    assert set(EncoderModel(where, manifest.runtime).classify(labelled).argmax(axis=1)) == {0, 1}


@pytest.mark.slow
def test_minilm_sample_recipe_meets_the_quality_and_size_targets(minilm_bundle):
    """The shipped recipe's int8-dynamic target, exported once per run by serve_fixtures (the serving tests use it too)."""
    where = minilm_bundle
    manifest = verify_bundle(where)
    assert where.name == manifest.name == "all-minilm-l6-v2-int8-dynamic"
    assert manifest.passed
    assert manifest.metrics["samples"] == 240
    assert manifest.metrics["cosine_mean"] >= 0.99
    assert manifest.metrics["cosine_min"] >= 0.98
    assert manifest.parameters == 22_713_216  # float tensors only; config.json facts agree
    assert manifest.total_bytes <= 0.26 * 90.8e6  # fp32 bundle: 90.3 MB model + 0.5 MB tokenizer
    assert manifest.runtime.pooling == "mean" and manifest.runtime.normalize and manifest.runtime.max_length == 256
    assert manifest.onnx.n_layer == 6 and manifest.onnx.hidden_size == 384 and manifest.onnx.opset >= 14
    assert set(manifest.tools) >= {"torch", "transformers", "optimum", "onnxruntime"}
    vectors = EncoderModel(where, manifest.runtime).embed(["The parcel arrived on time.", "The package was delivered on time.", "Ich mag Käse."])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > 0.7 and unrelated < 0.2  # measured 0.79 and 0.02
