"""Rerank end to end: tiny random cross-encoders (BERT with token types, XLM-R without) exported by a text-ranking
recipe, gated on score agreement with PyTorch, served by the daemon at /v1/rerank (llama-server's shape) and /rerank
(TEI's shape)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tiny_models
from helpers import REPO, write_recipe
from serve_fixtures import HTTP, Daemon

from edgekit.export import export
from edgekit.runtime.golden import check_bundle
from edgekit.schema import load_recipe

PAIRS = REPO / "recipes/data/rerank-pairs.tsv"
FAMILIES = ("bert", "xlm-roberta")
# Gates of the recipe; measured: worst per-query score cosine 0.9998, best document the same for 6 of 6 queries,
# largest score difference 0.017 (BERT 0.009, XLM-R 0.017).
GATES = {"min_cosine_each": 0.999, "min_top1_agreement": 0.8}
QUERY = "how do I reset the router"
DOCUMENTS = [line.split("\t")[1] for line in PAIRS.read_text(encoding="utf-8").splitlines() if line.startswith(QUERY + "\t")]


@functools.cache  # the BERT reference serves two tests
def reference_scores(source, query: str, documents: tuple[str, ...]) -> tuple[np.ndarray, int]:
    """PyTorch relevance (sigmoid of the one logit) of each (query, document) pair, and the tokens it read."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    encoded = tokenizer([query] * len(documents), list(documents), padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = AutoModelForSequenceClassification.from_pretrained(source)(**encoded).logits
    return torch.sigmoid(logits[:, 0]).numpy(), int(encoded["attention_mask"].sum())


@pytest.fixture(scope="module")
def cross_encoders(tmp_path_factory):
    """{family: (manifest, bundle, checkpoint)} exported by a text-ranking recipe into one models folder."""
    root = tmp_path_factory.mktemp("rerank")
    result = {}
    for family in FAMILIES:
        source = tiny_models.build_encoder(family, "text-ranking", root / f"hf-{family}")
        recipe = write_recipe(root / f"{family}.yaml", source, name=f"rerank-{family}", task="text-ranking",
                              validation={"samples_file": str(PAIRS), "gates": GATES})
        [(manifest, where)] = export(load_recipe(recipe), root / "models")
        result[family] = (manifest, where, source)
    return result


@pytest.fixture(scope="module")
def daemon(cross_encoders):
    models = next(iter(cross_encoders.values()))[1].parent
    server = Daemon(models, *[arg for _, where, _ in cross_encoders.values() for arg in ("--preload", where.name)])
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_recipe_exports_a_cross_encoder_gated_on_score_agreement(cross_encoders, family):
    manifest, where, _ = cross_encoders[family]
    assert manifest.task == "text-ranking" and manifest.passed
    assert manifest.quantization == "int8-dynamic-block128"
    assert manifest.metrics["samples"] == 24 and manifest.metrics["queries"] == 6
    assert manifest.metrics["cosine_min"] >= 0.999
    assert manifest.metrics["top1_agreement"] >= 0.8
    assert manifest.metrics["score_max_abs_diff"] <= 0.05
    assert {g.gate: g.passed for g in manifest.gates} == {"min_cosine_each": True, "min_top1_agreement": True}
    assert manifest.runtime.labels == ["relevance"]
    expected_inputs = ["input_ids", "attention_mask", "token_type_ids"] if family == "bert" else ["input_ids", "attention_mask"]
    assert manifest.runtime.input_names == expected_inputs
    report = check_bundle(where)  # golden record: scores of 3 "query<TAB>document" samples
    assert report.passed and len(report.checks) == 3


def test_a_pair_recipe_without_tabs_is_a_recipe_error(tmp_path, cross_encoders):
    from edgekit.errors import RecipeError

    _, _, source = cross_encoders["bert"]
    recipe = write_recipe(tmp_path / "bad.yaml", source, name="bad", task="text-ranking",
                          validation={"samples": ["no tab here"], "gates": {}})
    with pytest.raises(RecipeError, match="no tab between query and document"):
        export(load_recipe(recipe), tmp_path / "out")


@pytest.mark.parametrize("family", FAMILIES)
def test_rerank_scores_match_pytorch_through_the_daemon(daemon, cross_encoders, family):
    manifest, where, source = cross_encoders[family]
    response = HTTP.post(f"{daemon.url}/v1/rerank", timeout=60, json={
        "model": where.name, "query": QUERY, "documents": DOCUMENTS, "top_n": 3, "return_documents": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == where.name
    reference, tokens = reference_scores(source, QUERY, tuple(DOCUMENTS))
    results = body["results"]
    assert len(results) == 3
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["index"] == int(reference.argmax())
    for result in results:
        assert abs(result["relevance_score"] - reference[result["index"]]) <= 0.05
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}  # pairs tokenized as transformers does


def test_tei_rerank_shape_and_texts_alias(daemon, cross_encoders):
    _, where, source = cross_encoders["bert"]
    response = HTTP.post(f"{daemon.url}/rerank", timeout=60, json={"model": where.name, "query": QUERY, "texts": DOCUMENTS})
    assert response.status_code == 200, response.text
    ranks = response.json()
    assert sorted(r["index"] for r in ranks) == list(range(len(DOCUMENTS)))
    assert all(set(r) == {"index", "score"} for r in ranks)
    reference, _ = reference_scores(source, QUERY, tuple(DOCUMENTS))
    got = np.array([r["score"] for r in sorted(ranks, key=lambda r: r["index"])])
    assert np.abs(got - reference).max() <= 0.05


def test_rerank_bad_input_is_400_naming_param_and_the_daemon_keeps_serving(daemon, cross_encoders):
    """docs/reliability.md case 41: 0 or 10,000 documents, no query, non-string documents, a model of another task."""
    _, where, _ = cross_encoders["bert"]
    url = f"{daemon.url}/v1/rerank"
    cases = [
        ({"model": where.name, "query": QUERY, "documents": []}, "documents"),
        ({"model": where.name, "query": QUERY, "documents": ["d"] * 10_000}, "documents"),
        ({"model": where.name, "documents": ["d"]}, "query"),
        ({"model": where.name, "query": "", "documents": ["d"]}, "query"),
        ({"model": where.name, "query": QUERY, "documents": [1, 2]}, "documents[0]"),
        ({"model": where.name, "query": QUERY, "documents": ["d"], "top_n": 0}, "top_n"),
    ]
    for body, param in cases:
        response = HTTP.post(url, json=body, timeout=60)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["param"] == param, error
    wrong_task = HTTP.post(f"{daemon.url}/v1/classify", json={"model": where.name, "input": "x"}, timeout=60)
    assert wrong_task.status_code == 400 and wrong_task.json()["error"]["param"] == "model"
    assert HTTP.get(f"{daemon.url}/health", timeout=10).json()["status"] == "ok"
    again = HTTP.post(url, json={"model": where.name, "query": QUERY, "documents": DOCUMENTS[:2]}, timeout=60)
    assert again.status_code == 200 and len(again.json()["results"]) == 2
    assert daemon.proc.poll() is None
