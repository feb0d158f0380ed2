"""Shared fixtures. Tests run offline (HF_HUB_OFFLINE=1) against the local model store.

The sample models are fetched once into the real store (``$EDGEKIT_HOME``, default
~/.cache/edgekit) by ``fetch_samples``, which is idempotent; tests that write bundles write
them under pytest's tmp_path. The serving tests' fixtures (bundles, the fake model, a daemon
process) live in the ``serve_fixtures`` plugin; constants and plain helpers in ``helpers``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import MINILM, SMOLLM, TINY, save_checkpoint

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["serve_fixtures"]


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "real_model: runs a real model in a worker (truth for what the fake model stands in for)")


@pytest.fixture(scope="session")
def sample_store() -> Path:
    """The local model store with both sample models in it."""
    from edgekit.export.samples import fetch_samples
    from edgekit.paths import kit_paths

    fetch_samples()
    return kit_paths().model_store


@pytest.fixture(scope="session")
def minilm_dir(sample_store: Path) -> Path:
    return sample_store / MINILM


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir: Path) -> Path:
    """A 2-layer random BERT with MiniLM's tokenizer: real export path, seconds instead of minutes."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, out / name)
    vocab = json.loads((minilm_dir / "tokenizer.json").read_text())["model"]["vocab"]
    (out / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sample_store):
    """A tiny random checkpoint per registered decoder case (tests/tiny_models.py): (folder, f16 conversion report)."""
    import tiny_models

    from edgekit.export.gguf.convert import convert_checkpoint

    results = {}

    def get(case: str):
        if case not in results:
            root = tmp_path_factory.mktemp(f"tiny-{case}")
            source = tiny_models.build(case, root / "hf", sample_store)
            results[case] = (source, convert_checkpoint(source, root / "f16.gguf", outtype="F16"))
        return results[case]

    return get


@pytest.fixture(scope="module")
def llama_smollm_dir(tmp_path_factory, sample_store) -> Path:
    """A tiny random llama with SmolLM2's tokenizer (byte-level BPE, GQA, tied embeddings)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("llama-smollm")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        shutil.copy(sample_store / SMOLLM / name, out / name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, **TINY)
    save_checkpoint(LlamaForCausalLM(config), out)
    return out
