"""Build a faithful Hugging Face tokenizer from a GGUF file's vocabulary.

transformers' GGUF loader rebuilds SmolLM2's tokenizer unfaithfully (it drops the
one-digit-at-a-time pre-tokenization, turns on add-BOS and saves a SentencePiece-style Llama
class). Here the tokenizer is assembled with the ``tokenizers`` library from the GGUF's own
tokens, merges, token types and pre-tokenizer name, so it splits text exactly as llama.cpp
does on that file; a test checks this token-for-token over a large corpus.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gguf import GGUFReader
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

# GGUF token types (gguf.TokenType): 3 = CONTROL, 4 = USER_DEFINED are matched whole in text.
SPECIAL_TOKEN_TYPES = {3, 4}


def _byte_level_digits_split() -> pre_tokenizers.PreTokenizer:
    # llama.cpp's "smollm" pre-tokenizer first isolates every \p{N} character, then applies
    # the GPT-2 pattern (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM). tokenizers' Digits
    # splits on Unicode numerics (Nd, Nl, No), the same class as \p{N}.
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# tokenizer.ggml.pre value -> pre-tokenizer equivalent to llama.cpp's. Add a row per family.
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "smollm": _byte_level_digits_split,
    "starcoder": _byte_level_digits_split,
    "gpt-2": _byte_level,
    "default": _byte_level,
}


def _field(reader: GGUFReader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def tokenizer_from_gguf(gguf_path: Path):
    """A ``PreTrainedTokenizerFast`` equivalent to the GGUF's BPE tokenizer, with its chat template."""
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(gguf_path))
    model = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre") or "default"
    if model != "gpt2":
        raise ValueError(f"{gguf_path}: tokenizer model {model!r}; only GPT-2-style BPE ('gpt2') is rebuilt here")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{gguf_path}: pre-tokenizer {pre!r} unknown; known: {', '.join(sorted(PRE_TOKENIZERS))}")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]

    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [t for t, kind in zip(tokens, types) if kind in SPECIAL_TOKEN_TYPES]
    backend.add_special_tokens(special)

    def token(key: str) -> str | None:
        index = _field(reader, key)
        return None if index is None else tokens[index]

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        additional_special_tokens=[t for t in special if t not in {token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")}],
        chat_template=_field(reader, "tokenizer.chat_template"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token")),
        add_eos_token=bool(_field(reader, "tokenizer.ggml.add_eos_token")),
        clean_up_tokenization_spaces=False,
        model_max_length=int(_field(reader, f"{_field(reader, 'general.architecture')}.context_length") or 2048),
    )
