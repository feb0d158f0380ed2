"""Encoder families end to end: BERT, DistilBERT, RoBERTa, XLM-RoBERTa and DeBERTa-v2/v3, each on feature-extraction,
text-classification and token-classification, exported to block-wise int8 ONNX and gated against PyTorch.

Tiny random checkpoints with a tokenizer of each family's kind (tests/tiny_models.py); each family x task is exported
once for the module. The real MiniLM sample is test_export_onnx.py's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_models
from helpers import REPO, write_recipe

from edgekit.bundle import verify_bundle
from edgekit.export import export
from edgekit.runtime.encoder import EncoderModel
from edgekit.runtime.golden import check_bundle
from edgekit.schema import load_recipe

FAMILIES = tiny_models.ENCODER_FAMILIES
TASKS = ("feature-extraction", "text-classification", "token-classification")
# What the recipe gates on, per task: the export fails below these. Measured on these checkpoints (worst family):
# embeddings cosine mean 0.9994 / worst text 0.9976; sequence labels agreement 0.979, logits cosine mean 0.9937
# (two near-zero logits can point anywhere: worst text 0.17, so no per-text cosine gate); token labels agreement
# 0.978, cosine mean 0.9987.
GATES = {
    "feature-extraction": {"min_cosine_mean": 0.999, "min_cosine_each": 0.99},
    "text-classification": {"min_cosine_mean": 0.99, "min_top1_agreement": 0.95},
    "token-classification": {"min_cosine_mean": 0.995, "min_top1_agreement": 0.95},
}
# Model inputs of optimum's export per family: only BERT has token types (DeBERTa-v3 has type_vocab_size 0).
INPUTS = {"bert": ["input_ids", "attention_mask", "token_type_ids"]}
PAD = {"bert": "[PAD]", "distilbert": "[PAD]", "roberta": "<pad>", "xlm-roberta": "<pad>", "deberta-v2": "[PAD]"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(manifest, bundle folder) of a tiny ``family`` checkpoint with the head of ``task``, exported on first use."""
    done, tokenizers = {}, {}

    def get(family: str, task: str):
        if (family, task) not in done:
            root = tmp_path_factory.mktemp(f"{family}-{task}")
            source = tiny_models.build_encoder(family, task, root / "hf", tokenizers)
            recipe = write_recipe(root / "recipe.yaml", source, name=f"{family}-{task}", task=task,
                                  validation={"samples_file": str(REPO / "recipes/data/validation-sentences.txt"),
                                              "gates": GATES[task]})
            [done[family, task]] = export(load_recipe(recipe), root / "out")
        return done[family, task]

    return get


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_exports_int8_and_passes_the_gates(exported, family, task):
    manifest, where = exported(family, task)
    assert manifest.passed, manifest.gates
    assert verify_bundle(where) == manifest
    assert manifest.quantization == "int8-dynamic-block128"
    assert manifest.metrics["samples"] == 240
    for gate, threshold in GATES[task].items():
        [result] = [g for g in manifest.gates if g.gate == gate]
        assert result.passed and result.threshold == threshold
    assert manifest.metrics["cosine_mean"] >= GATES[task]["min_cosine_mean"]
    if task != "feature-extraction":
        assert manifest.metrics["top1_agreement"] >= GATES[task]["min_top1_agreement"]
        assert manifest.runtime.labels == tiny_models.ENCODER_LABELS[task]
    assert manifest.runtime.input_names == INPUTS.get(family, ["input_ids", "attention_mask"])
    # the board-side golden record, rerun on the published bundle
    report = check_bundle(where)
    assert report.recorded and report.passed, report.reason
    assert len(report.checks) == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_bundle_pads_with_the_family_pad_token_and_padding_changes_nothing(exported, family):
    manifest, where = exported(family, "feature-extraction")
    padding = json.loads((where / "tokenizer.json").read_text())["padding"]
    source = json.loads((where.parent.parent / "hf" / "special_tokens_map.json").read_text())
    assert padding["pad_token"] == PAD[family] == source["pad_token"]
    assert padding["strategy"] == "BatchLongest"
    model = EncoderModel(where, manifest.runtime)
    assert model.tokenizer.padding["pad_id"] == model.tokenizer.token_to_id(PAD[family])
    short, long = "Nice.", "A much longer sentence about boards, parcels and the weather in Lisbon, with numbers 1 2 3."
    alone = model.embed([short])[0]
    batched = model.embed([short, long])
    assert model.tokenize([short, long])["input_ids"][0, -1] == model.tokenizer.token_to_id(PAD[family])
    np.testing.assert_allclose(batched[0], alone, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_labels_agree_with_pytorch_on_a_sentence(exported, family):
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    manifest, where = exported(family, "token-classification")
    source = where.parent.parent / "hf"
    text = "Ana flew from Lisbon to Tokyo on Monday."
    encoded = AutoTokenizer.from_pretrained(source)(text, return_tensors="pt")
    with torch.inference_mode():
        reference = AutoModelForTokenClassification.from_pretrained(source)(**encoded).logits[0].numpy()
    model = EncoderModel(where, manifest.runtime)
    assert model.tokenize([text])["input_ids"][0].tolist() == encoded["input_ids"][0].tolist()
    probabilities = model.classify([text])[0]
    assert probabilities.shape == reference.shape == (len(encoded["input_ids"][0]), 4)
    # int8 may flip a random model's near-tied tokens; wherever PyTorch's top two labels are 0.1 apart it may not
    reference_probabilities = np.sort(torch.softmax(torch.from_numpy(reference), -1).numpy(), axis=-1)
    clear = reference_probabilities[:, -1] - reference_probabilities[:, -2] >= 0.1
    assert clear.sum() >= 3
    assert (probabilities.argmax(-1) == reference.argmax(-1))[clear].all()
