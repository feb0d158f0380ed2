"""Tiny randomly initialised checkpoints, one per registered decoder architecture, with real tokenizer families.

No real weights of these families are reachable offline, so each is built from its transformers config
class (a few layers, small widths) with a tokenizer of the family's kind:

- byte-level BPE: SmolLM2's tokenizer.json from the sample model store (llama, smollm3), or a Qwen2-style
  BPE (NFC, Qwen2 split regex) trained here on the test corpus (qwen2, qwen3);
- SentencePiece BPE with byte fallback, trained here: Llama-2/Phi-3.5 style with a dummy prefix (phi3),
  Gemma style without one, BOS added (gemma2, gemma3). No sample package ships a SentencePiece model.

Widths are chosen so the weights dominate the file (the fit estimator's metadata term is an estimate).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
CORPUS = [json.loads(line)["text"] for line in (REPO / "tests/data/tokenizer-corpus.jsonl").read_text(encoding="utf-8").splitlines()]
EVAL_TEXT = (REPO / "recipes/data/eval-text.txt").read_text(encoding="utf-8")
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Wide init: peaked next-token distributions, so f16 rounding rarely flips a near-tie.
TINY = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, initializer_range=0.5)
PHI3_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def smollm_tokenizer(out: Path, store: Path) -> int:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        shutil.copy(store / SMOLLM / name, out / name)
    return 49152


def qwen_tokenizer(out: Path, store: Path) -> int:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(EVAL_TEXT.splitlines() + CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return 1216  # padded embedding rows, as Qwen2.5/Qwen3 do


def _train_spm(out: Path, *, dummy_prefix: bool, ids: dict) -> None:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in EVAL_TEXT.splitlines() + CORPUS[:800] if line.strip()]), model_writer=model,
        vocab_size=2000, model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=dummy_prefix, minloglevel=2,
        **ids,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())


def llama_spm_tokenizer(out: Path, store: Path) -> int:
    from transformers import LlamaTokenizerFast

    _train_spm(out, dummy_prefix=True, ids=dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
    tokenizer = LlamaTokenizerFast(vocab_file=str(out / "tokenizer.model"), legacy=True, add_prefix_space=True,
                                   add_bos_token=True, add_eos_token=False, from_slow=True)
    # Phi-3.5's chat tokens after the SentencePiece pieces (its tokenizer_config.json, ids 32000-32010 there).
    tokenizer.add_special_tokens({"additional_special_tokens": PHI3_TOKENS})
    tokenizer.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    tokenizer.save_pretrained(out)
    return 2016


def gemma_spm_tokenizer(out: Path, store: Path) -> int:
    from transformers import GemmaTokenizerFast

    _train_spm(out, dummy_prefix=False, ids=dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                                  pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>"))
    tokenizer = GemmaTokenizerFast(vocab_file=str(out / "tokenizer.model"), from_slow=True, add_bos_token=True)
    tokenizer.save_pretrained(out)
    return 2000


def _config(case: str, n_vocab: int):
    import transformers as t

    base = dict(vocab_size=n_vocab, **TINY)
    if case == "llama":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
        return t.LlamaConfig(tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rope_scaling=rope, **base)
    if case == "qwen2":
        return t.Qwen2Config(tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, **base)
    if case == "qwen3":
        return t.Qwen3Config(tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, head_dim=128, **base)
    if case == "smollm3":
        return t.SmolLM3Config(tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                               **{**base, "num_hidden_layers": 4})
    if case == "gemma2":
        return t.Gemma2Config(head_dim=96, query_pre_attn_scalar=96, sliding_window=32, pad_token_id=0, eos_token_id=1,
                              bos_token_id=2, **base)
    if case == "gemma3":
        return t.Gemma3TextConfig(head_dim=96, query_pre_attn_scalar=96, sliding_window=32, pad_token_id=0, eos_token_id=1,
                                  bos_token_id=2, rope_theta=1_000_000.0, **{**base, "num_hidden_layers": 6})
    if case == "phi3":
        # Phi-4-mini's shape in small: partial rotary (3/4 of each head), GQA, tied embeddings, LongRoPE factors.
        rope_dims = int(0.75 * TINY["hidden_size"] // TINY["num_attention_heads"])
        rope = {"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(rope_dims // 2)],
                "long_factor": [1.0 + 0.5 * i for i in range(rope_dims // 2)]}
        return t.Phi3Config(tie_word_embeddings=True, partial_rotary_factor=0.75, rope_scaling=rope, pad_token_id=None,
                            bos_token_id=1, eos_token_id=2, original_max_position_embeddings=256,
                            **{**base, "max_position_embeddings": 1024})
    raise KeyError(case)


TOKENIZERS = {"llama": smollm_tokenizer, "qwen2": qwen_tokenizer, "qwen3": qwen_tokenizer, "smollm3": smollm_tokenizer,
              "gemma2": gemma_spm_tokenizer, "gemma3": gemma_spm_tokenizer, "phi3": llama_spm_tokenizer}
CASES = sorted(TOKENIZERS)


def build(case: str, out: Path, store: Path, tokenizer=None) -> Path:
    """Write a tiny random checkpoint of ``case`` (bf16 safetensors + tokenizer, default the case's) into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    n_vocab = (tokenizer or TOKENIZERS[case])(out, store)
    torch.manual_seed(0)
    config = _config(case, n_vocab)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return out
