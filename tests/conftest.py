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
from helpers import MINILM, SMOLLM, TINY, save_checkpoint, shared_temp

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["serve_fixtures"]


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "real_model: runs a real model in a worker (truth for what the fake model stands in for)")
    _pin_xdist_worker()


def _pin_xdist_worker() -> None:
    """Give each pytest-xdist worker its own share of the CPUs (inherited by the daemons and workers it starts).

    llama.cpp, onnxruntime and torch default to the CPUs their process may use; two workers each running
    an engine on every core would oversubscribe them, and the engines' spinning thread barriers then run
    many times slower than one thread on a core of its own.
    """
    name, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cpus = sorted(os.sched_getaffinity(0))
    if name.startswith("gw") and 1 < count <= len(cpus):
        os.sched_setaffinity(0, cpus[int(name[2:]) % count :: count])


# Files whose tests use the shipped SmolLM2 recipe's export (serve_fixtures.smollm2_exported, ~30 s of CPU once per run).
SMOLLM2_EXPORT_USERS = frozenset({"test_doctor.py", "test_gguf_smollm2.py", "test_golden.py", "test_structured_output.py",
                                  "test_tool_calls.py", "test_tool_formats.py"})


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, with the files using the SmolLM2 export as one unit: one worker exports and runs them in turn
    while the other runs other files, instead of idling on the export's file lock (each worker has its own CPUs)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedExportScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "smollm2-export" if Path(scope).name in SMOLLM2_EXPORT_USERS else scope

    return SharedExportScheduling(config, log)


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


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, sample_store):
    """A tiny random checkpoint per registered decoder case (tests/tiny_models.py): (folder, f16 conversion report).

    Each case is built once per run; pytest-xdist workers wait on a file lock for the first builder.
    """
    import pickle

    import tiny_models
    from filelock import FileLock

    from edgekit.export.gguf.convert import convert_checkpoint

    base = shared_temp(tmp_path_factory) / "tiny-decoders"
    base.mkdir(exist_ok=True)

    def get(case: str):
        root = base / case
        with FileLock(base / f".{case}.lock"):
            if not (root / "report.pickle").is_file():
                shutil.rmtree(root, ignore_errors=True)
                source = tiny_models.build(case, root / "hf", sample_store)
                report = convert_checkpoint(source, root / "f16.gguf", outtype="F16")
                (root / "report.pickle").write_bytes(pickle.dumps((source, report)))
        return pickle.loads((root / "report.pickle").read_bytes())

    return get


@pytest.fixture(scope="session")
def llama_smollm_dir(tmp_path_factory, sample_store) -> Path:
    """A tiny random llama with SmolLM2's tokenizer (byte-level BPE, GQA, tied embeddings); read-only for the tests.

    Built once per run; pytest-xdist workers wait on a file lock for the first builder.
    """
    import torch
    from filelock import FileLock
    from transformers import LlamaConfig, LlamaForCausalLM

    out = shared_temp(tmp_path_factory) / "llama-smollm"
    with FileLock(f"{out}.lock"):
        if not out.is_dir():
            partial = out.with_name(f"{out.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
                shutil.copy(sample_store / SMOLLM / name, partial / name)
            torch.manual_seed(0)
            config = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, **TINY)
            save_checkpoint(LlamaForCausalLM(config), partial)
            partial.rename(out)
    return out
