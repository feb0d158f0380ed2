"""The store's SmolLM2 checkpoint tokenizes exactly like llama.cpp on the upstream GGUF."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, SMOLLM, SMOLLM_GGUF

from edgekit.export.samples import SMOLLM_GGUF_NAME

CORPUS = [json.loads(line)["text"] for line in (REPO / "tests/data/tokenizer-corpus.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def upstream_llama(sample_store):
    from llama_cpp import Llama

    return Llama(str(sample_store / SMOLLM_GGUF / SMOLLM_GGUF_NAME), vocab_only=True, verbose=False)


def llama_ids(llama, text: str) -> list[int]:
    return llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)


@pytest.fixture(scope="module")
def upstream_corpus_ids(upstream_llama) -> list[list[int]]:
    """llama.cpp's token ids of every corpus string, computed once for the module's two comparisons."""
    return [llama_ids(upstream_llama, text) for text in CORPUS]


def test_corpus_is_large_and_varied():
    assert len(CORPUS) >= 1000
    assert any("½" in t for t in CORPUS) and any("👩‍👩‍👧" in t for t in CORPUS) and any("<|im_start|>" in t for t in CORPUS)


def test_repaired_tokenizer_matches_llama_cpp_on_every_string(sample_store, upstream_llama, upstream_corpus_ids):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sample_store / SMOLLM)
    encoded = tokenizer(CORPUS, add_special_tokens=True)["input_ids"]  # one Rust batch: the same ids as encode() per text
    mismatches = [t for t, ours, theirs in zip(CORPUS, encoded, upstream_corpus_ids, strict=True) if ours != theirs]
    assert mismatches == []
    assert tokenizer.encode("2024 ½²³") == llama_ids(upstream_llama, "2024 ½²³") == [34, 32, 34, 36, 216, 16738, 19133, 39050]
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 2
    assert tokenizer.encode("<|im_start|>user") == [1, 4093]


def test_transformers_gguf_loader_alone_is_not_faithful(sample_store, upstream_llama, upstream_corpus_ids):
    """Why the repair exists: transformers' own GGUF tokenizer splits digit runs differently and adds BOS."""
    from transformers import LlamaTokenizerFast
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    # The class AutoTokenizer picks for a llama GGUF, loaded directly: AutoTokenizer parses the GGUF twice (config, then
    # tokenizer), seconds each for this vocabulary.
    assert TOKENIZER_MAPPING_NAMES["llama"][1] == LlamaTokenizerFast.__name__
    naive = LlamaTokenizerFast.from_pretrained(sample_store / SMOLLM_GGUF, gguf_file=SMOLLM_GGUF_NAME)
    encoded = naive(CORPUS, add_special_tokens=False)["input_ids"]
    differing = sum(ours != theirs for ours, theirs in zip(encoded, upstream_corpus_ids, strict=True))
    assert differing >= 30  # measured: 39 of 2,737
    assert naive.encode("hi") == [1, 6004] and llama_ids(upstream_llama, "hi") == [6004]
