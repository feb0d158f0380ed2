"""The HF -> GGUF converter on tiny random models with real tokenizers, one per architecture and tokenizer family.

- llama + SmolLM2's byte-level BPE tokenizer ("smollm" pre-tokenizer), GQA, tied embeddings
- qwen2 + a Qwen2-style BPE tokenizer built here (NFC, Qwen2 split regex), q/k/v biases, padded vocab
- llama + a SentencePiece tokenizer trained here (byte fallback, BOS), explicit head_dim, Llama-3 rope scaling

Each is checked token-for-token against its Hugging Face tokenizer on the 2,737-string corpus and
next-token-for-next-token against PyTorch.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, TINY, gguf_tensor_values
from helpers import save_checkpoint as _save_model

from edgekit.errors import ConfigError, ExportError, SourceError
from edgekit.export.gguf import quality
from edgekit.export.gguf.convert import CheckpointTensors, convert_checkpoint
from edgekit.runtime.gguf_file import gguf_facts, read_gguf_header

CORPUS_FILE = REPO / "tests/data/tokenizer-corpus.jsonl"
CORPUS = [json.loads(line)["text"] for line in CORPUS_FILE.read_text(encoding="utf-8").splitlines()]
EVAL_TEXT = (REPO / "recipes/data/eval-text.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    import tiny_models
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("qwen2")
    n_vocab = tiny_models.qwen_tokenizer(out, None)  # 1216 embedding rows for 1200 tokens: Qwen2.5's padded vocabulary
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=n_vocab, tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, **TINY)
    _save_model(Qwen2ForCausalLM(config), out)
    return out


@pytest.fixture(scope="module")
def llama_spm_dir(tmp_path_factory) -> Path:
    import sentencepiece
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

    out = tmp_path_factory.mktemp("llama-spm")
    model = io.BytesIO()
    # Llama-2/TinyLlama-style SentencePiece: BPE, byte fallback, split digits, dummy prefix, BOS added.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in EVAL_TEXT.splitlines() if line.strip()]), model_writer=model,
        vocab_size=1000, model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        add_dummy_prefix=True, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizerFast(vocab_file=str(out / "tokenizer.model"), legacy=True, add_prefix_space=True,
                                   add_bos_token=True, add_eos_token=False, from_slow=True)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    config = LlamaConfig(vocab_size=1000, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, head_dim=32,
                         rope_scaling=rope, **TINY)
    _save_model(LlamaForCausalLM(config), out)
    return out


CASES = {"llama-smollm": "llama_smollm_dir", "qwen2": "qwen2_dir", "llama-spm": "llama_spm_dir"}
# (tokenizer.ggml.model, tokenizer.ggml.pre, text normalization, tensors)
EXPECTED = {
    "llama-smollm": ("gpt2", "smollm", None, 2 + 2 * 9),
    "qwen2": ("gpt2", "qwen2", "NFC", 2 + 2 * 12),
    "llama-spm": ("llama", "default", None, 4 + 2 * 9),
}


@pytest.fixture(scope="module")
def converted(request, tmp_path_factory):
    """f16 GGUF per case, converted once."""
    results = {}

    def get(case: str):
        if case not in results:
            source = request.getfixturevalue(CASES[case])
            out = tmp_path_factory.mktemp(f"gguf-{case}") / "f16.gguf"
            results[case] = (source, convert_checkpoint(source, out, outtype="F16"))
        return results[case]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_tokenization_is_identical_on_the_corpus(converted, case):
    source, report = converted(case)
    model, pre, normalization, n_tensors = EXPECTED[case]
    header = read_gguf_header(report.path)
    assert (header.get("tokenizer.ggml.model"), header.get("tokenizer.ggml.pre")) == (model, pre)
    assert report.vocabulary.text_normalization == normalization
    assert len(header.tensors) == report.n_tensors == n_tensors
    texts = CORPUS + list(quality.PROBE_TEXTS)
    assert len(texts) == 2747
    mismatches = quality.tokenization_mismatches(source, report.path, texts, normalization)
    assert [(m.text, m.expected, m.got) for m in mismatches[:3]] == []


@pytest.mark.slow
def test_qwen2_needs_nfc_to_match_and_the_manifest_says_so(converted):
    """Without NFC the combining-accent strings of the corpus split differently: that is why the runtime normalizes."""
    source, report = converted("qwen2")
    mismatches = quality.tokenization_mismatches(source, report.path, CORPUS, normalization=None)
    import unicodedata

    assert len(mismatches) > 0
    assert all(unicodedata.normalize("NFC", m.text) != m.text for m in mismatches)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_f16_gguf_predicts_like_pytorch(converted, case):
    source, report = converted(case)
    normalization = report.vocabulary.text_normalization
    windows = quality.text_windows(report.path, EVAL_TEXT, 128, max_tokens=512, normalization=normalization)
    assert sum(len(w) for w in windows) >= 512
    scorers = {"torch": quality.TorchScorer(source), "gguf": quality.GgufScorer(report.path, 128)}
    try:
        metrics = quality.compare(scorers, [("torch", "gguf")], windows)[("torch", "gguf")]
    finally:
        for scorer in scorers.values():
            scorer.close()
    # Random weights leave many near-tied logits that f16 rounding flips (SmolLM2 itself reaches 99.8 %); a wrong
    # layout (rope pairing, head order, bias) would show as a KL divergence orders of magnitude larger.
    assert metrics["top1_agreement"] >= 0.97
    assert metrics["kld_mean"] < 1e-3
    assert abs(metrics["ppl_increase"]) < 0.01


@pytest.mark.slow
def test_metadata_and_tensors_follow_the_config(converted):
    from gguf import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

    _, report = converted("llama-spm")
    header = read_gguf_header(report.path)
    facts = gguf_facts(header)
    shape = (facts.architecture, facts.n_layer, facts.n_head, facts.n_head_kv, facts.n_embd, facts.n_vocab)
    assert shape == ("llama", 2, 4, 2, 64, 1000)
    assert (facts.key_length, facts.value_length, facts.quant_type) == (32, 32, "F16")
    assert header.get("llama.rope.dimension_count") == 32
    assert header.get("tokenizer.ggml.add_bos_token") is True
    assert header.get("tokenizer.ggml.bos_token_id") == 1
    names = {t.name: t for t in header.tensors}
    allowed = {TENSOR_NAMES[t].format(bid=b) + suffix
               for t in MODEL_TENSORS[MODEL_ARCH.LLAMA] for b in range(2) for suffix in (".weight", ".bias")}
    assert set(names) <= allowed
    assert names["blk.0.attn_q.weight"].shape == (64, 128) and names["blk.0.attn_k.weight"].shape == (64, 64)
    assert names["output.weight"].ggml_type == "F16" and names["blk.1.ffn_norm.weight"].ggml_type == "F32"
    # Llama 3 rope scaling: 16 per-pair divisors, 1 for high frequencies, the factor for low ones.
    from gguf import GGUFReader

    factors = next(t for t in GGUFReader(str(report.path)).tensors if t.name == "rope_freqs.weight").data
    assert factors.shape == (16,)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and np.all(np.diff(factors) >= 0)


@pytest.mark.slow
def test_padded_vocabulary_rows_are_unused_tokens(converted):
    from gguf import GGUFReader

    _, report = converted("qwen2")
    reader = GGUFReader(str(report.path))
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    assert len(tokens) == 1216
    assert tokens[1200:1202] == ["[PAD1200]", "[PAD1201]"] and set(types[1200:]) == {5}  # 5 = UNUSED
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and types[:3] == [3, 3, 3]  # 3 = CONTROL
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == 2
    assert "<|im_start|>" in reader.get_field("tokenizer.chat_template").contents()
    assert {t.name for t in reader.tensors} >= {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"}
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["BF16", "F32"])
def test_bf16_and_f32_outputs_keep_the_source_values_exactly(llama_smollm_dir, tmp_path, outtype):
    report = convert_checkpoint(llama_smollm_dir, tmp_path / "m.gguf", outtype=outtype)
    header = read_gguf_header(report.path)
    assert gguf_facts(header).quant_type == outtype
    [tensor] = [t for t in header.tensors if t.name == "blk.1.ffn_down.weight"]
    stored = np.memmap(report.path, dtype=np.uint8, mode="r")[tensor.offset : tensor.offset + tensor.nbytes]
    source = CheckpointTensors(llama_smollm_dir)
    expected = source.load("model.layers.1.mlp.down_proj.weight")
    if outtype == "BF16":  # bf16 is the upper half of a float32
        got = (stored.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        got = stored.view(np.float32)
    assert np.array_equal(got.reshape(expected.shape), expected)


def test_unsupported_architecture_lists_the_registered_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
                                                      "num_hidden_layers": 2}))
    with pytest.raises(ConfigError) as caught:
        convert_checkpoint(tmp_path, tmp_path / "out.gguf")
    assert caught.value.exit_code == 2
    assert "architecture GPTNeoXForCausalLM is not registered" in str(caught.value)
    for name in ("LlamaForCausalLM (SmolLM2, TinyLlama, Llama-3.2)", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
                 "Gemma3ForCausalLM", "Phi3ForCausalLM", "SmolLM3ForCausalLM"):
        assert name in caught.value.hint


@pytest.mark.slow
def test_unknown_pre_tokenizer_is_refused_not_guessed(llama_smollm_dir, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(llama_smollm_dir, source)
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": False}, {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}
    (source / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ExportError, match="match none that llama.cpp implements") as caught:
        convert_checkpoint(source, tmp_path / "out.gguf")
    assert "smollm" in caught.value.hint and not (tmp_path / "out.gguf").exists()


@pytest.mark.slow
def test_pickle_only_checkpoint_needs_opt_in(llama_smollm_dir, converted, tmp_path):
    """docs/reliability.md case 4 on the GGUF path: pickle weights are refused unless the recipe opts in."""
    from transformers import AutoModelForCausalLM

    source = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(llama_smollm_dir)
    _save_model(model, source, safe=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(llama_smollm_dir / name, source / name)
    assert not list(source.glob("*.safetensors")) and list(source.glob("*.bin"))
    with pytest.raises(SourceError, match="only pickle weights") as caught:
        convert_checkpoint(source, tmp_path / "refused.gguf")
    assert "allow_pickle" in caught.value.hint
    report = convert_checkpoint(source, tmp_path / "allowed.gguf", allow_pickle=True)
    reference_source, reference = converted("llama-smollm")  # the safetensors checkpoint, converted to f16 likewise
    assert reference_source == llama_smollm_dir and reference.outtype == report.outtype == "F16"
    allowed = {name: values for name, (_, values) in gguf_tensor_values(report.path).items()}
    expected = {name: values for name, (_, values) in gguf_tensor_values(reference.path).items()}
    assert sorted(allowed) == sorted(expected) and len(allowed) == 20
    assert all(np.array_equal(allowed[name], expected[name]) for name in expected)
