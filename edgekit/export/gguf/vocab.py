"""Tokenizers into GGUF metadata: GPT-2-style byte-level BPE and SentencePiece.

llama.cpp re-implements each tokenizer family and picks the text-splitting rules from
``tokenizer.ggml.pre``. llama.cpp's own converter finds that name by hashing the token ids of
a probe string, which only works for tokenizers it has seen. Here the name is read from the
structure of ``tokenizer.json`` instead (normalizer + pre-tokenizer steps, each step's regex),
matched against ``PRE_TOKENIZERS``, so a retrained vocabulary with a known splitting scheme is
recognised and an unknown scheme is refused rather than guessed. The exporter then checks the
result token-for-token against the Hugging Face tokenizer before a bundle is accepted.

Special-token ids, add-BOS/EOS flags, merges and the chat template come from gguf's
``SpecialVocab``; SentencePiece pieces, scores and types from gguf's ``SentencePieceVocab``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFWriter, SentencePieceVocab, SpecialVocab, TokenType

from edgekit.errors import ExportError

# GPT-2's split pattern, used by tokenizers' ByteLevel(use_regex=True) and llama.cpp's "gpt-2".
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's split pattern (tokenizer.json of meta-llama/Llama-3.x; llama.cpp "llama-bpe").
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's: Llama 3's with single digits (tokenizer.json of Qwen/Qwen2.5-*; llama.cpp "qwen2").
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    """A known splitting scheme: the tokenizer.json steps that define it and llama.cpp's name for it."""

    name: str  # tokenizer.ggml.pre
    steps: tuple[tuple, ...]  # see _steps()
    normalizers: tuple[tuple[str, ...], ...]  # accepted normalizer fingerprints
    source: str
    # Unicode normalization the family's tokenizers apply and llama.cpp does not (the runtime applies it).
    normalization: str | None = None


# Sources: llama.cpp src/llama-vocab.cpp (the regexes behind each LLAMA_VOCAB_PRE_TYPE_*).
PRE_TOKENIZERS: tuple[PreTokenizer, ...] = (
    PreTokenizer("gpt-2", (("ByteLevel", True),), ((),), "LLAMA_VOCAB_PRE_TYPE_GPT2: the GPT-2 pattern"),
    # LLAMA_VOCAB_PRE_TYPE_SMOLLM (same regexes as STARCODER): "\p{N}" first, then the GPT-2 pattern.
    PreTokenizer("smollm", (("Digits", True), ("ByteLevel", True)), ((),), "SmolLM/SmolLM2, StarCoder"),
    PreTokenizer("llama-bpe", (("Split", LLAMA3_PATTERN), ("ByteLevel", False)), ((),), "Llama 3.x"),
    # Qwen2 tokenizers NFC-normalize first and llama.cpp does not: the manifest tells the runtime to.
    PreTokenizer("qwen2", (("Split", QWEN2_PATTERN), ("ByteLevel", False)), (("NFC",), ()), "Qwen2, Qwen2.5", "NFC"),
)


@dataclass(frozen=True)
class Vocabulary:
    """Everything the GGUF tokenizer keys hold."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre
    tokens: list[bytes]
    token_types: list[int]
    scores: list[float] | None
    add_space_prefix: bool | None
    special: SpecialVocab
    text_normalization: str | None = None  # applied to text before llama.cpp tokenizes it (RuntimeConfig)

    def write(self, writer: GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(writer, quiet=True)

    @property
    def chat_template(self) -> str | None:
        template = self.special.chat_template
        if isinstance(template, list):  # named templates: the default one is the chat template
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template


def _steps(pre_tokenizer: dict | None) -> tuple[tuple, ...]:
    """A comparable fingerprint of tokenizer.json's pre_tokenizer."""
    if pre_tokenizer is None:
        return ()
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return tuple(step for item in pre_tokenizer["pretokenizers"] for step in _steps(item))
    if kind == "ByteLevel":
        return (("ByteLevel", bool(pre_tokenizer.get("use_regex", True))),)
    if kind == "Digits":
        return (("Digits", bool(pre_tokenizer.get("individual_digits", False))),)
    if kind == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        regex = pattern.get("Regex", pattern.get("String"))
        return (("Split", regex, pre_tokenizer.get("behavior"), pre_tokenizer.get("invert")),)
    return ((kind,),)


def _normalizers(normalizer: dict | None) -> tuple[str, ...]:
    if normalizer is None:
        return ()
    if normalizer.get("type") == "Sequence":
        return tuple(n for item in normalizer["normalizers"] for n in _normalizers(item))
    return (normalizer.get("type"),)


def _matches(rule: PreTokenizer, steps: tuple[tuple, ...]) -> bool:
    if len(rule.steps) != len(steps):
        return False
    for want, got in zip(rule.steps, steps):
        if want[0] != got[0]:
            return False
        if want[0] == "Split":
            # Isolated split on the pattern, not inverted: the only form these schemes use.
            if got[1:] != (want[1], "Isolated", False):
                return False
        elif want != got:
            return False
    return True


def detect_pre_tokenizer(tokenizer_json: dict, where: Path) -> tuple[str, str | None]:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, and the Unicode normalization it needs.

    Unknown schemes are an ExportError.
    """
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    normalizers = _normalizers(tokenizer_json.get("normalizer"))
    for rule in PRE_TOKENIZERS:
        if _matches(rule, steps) and normalizers in rule.normalizers:
            return rule.name, (normalizers[0] if normalizers else None)
    raise ExportError(
        f"{where}: the tokenizer's splitting rules (normalizer {list(normalizers)}, pre-tokenizer {list(steps)}) "
        "match none that llama.cpp implements here",
        hint="known schemes: " + ", ".join(f"{r.name} ({r.source})" for r in PRE_TOKENIZERS),
    )


def _bpe_vocabulary(source: Path, tokenizer_json: dict, n_vocab: int) -> Vocabulary:
    model = tokenizer_json["model"]
    by_id: dict[int, str] = {index: token for token, index in model["vocab"].items()}
    added = {item["id"]: item for item in tokenizer_json.get("added_tokens", [])}
    for index, item in added.items():
        by_id[index] = item["content"]
    if by_id and max(by_id) >= n_vocab:
        raise ExportError(f"{source}: token id {max(by_id)} is outside the model's vocab_size {n_vocab}")
    tokens, types = [], []
    for index in range(n_vocab):
        if index not in by_id:
            # Embedding rows without a token (vocab padded for speed, e.g. Qwen2.5): never produced.
            tokens.append(f"[PAD{index}]".encode())
            types.append(TokenType.UNUSED)
        elif index in added:
            # Added tokens are matched as whole text before splitting: special ones are control
            # tokens (only parsed when asked), the others user-defined (always matched, as in HF).
            tokens.append(by_id[index].encode("utf-8"))
            types.append(TokenType.CONTROL if added[index].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index].encode("utf-8"))
            types.append(TokenType.NORMAL)
    pre, normalization = detect_pre_tokenizer(tokenizer_json, source / "tokenizer.json")
    return Vocabulary(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        token_types=[int(t) for t in types],
        scores=None,
        add_space_prefix=None,
        special=SpecialVocab(source, load_merges=True, n_vocab=n_vocab),
        text_normalization=normalization,
    )


def _sentencepiece_vocabulary(source: Path, n_vocab: int) -> Vocabulary:
    from sentencepiece import sentencepiece_model_pb2

    base = SentencePieceVocab(source)
    tokens, scores, types = [], [], []
    for text, score, kind in base.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(kind))
    if len(tokens) > n_vocab:
        raise ExportError(f"{source}: tokenizer has {len(tokens)} pieces, more than the model's vocab_size {n_vocab}")
    # Added tokens declared in tokenizer_config.json override the piece types (transformers' view).
    config_file = source / "tokenizer_config.json"
    decoder = json.loads(config_file.read_text(encoding="utf-8")).get("added_tokens_decoder", {}) if config_file.is_file() else {}
    for key, item in decoder.items():
        index = int(key)
        if index >= n_vocab:
            raise ExportError(f"{source}: added token id {index} is outside the model's vocab_size {n_vocab}")
        while len(tokens) <= index:
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            types.append(int(TokenType.UNUSED))
        tokens[index] = item["content"].encode("utf-8")
        types[index] = int(TokenType.CONTROL if item.get("special") else TokenType.USER_DEFINED)
    while len(tokens) < n_vocab:
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(base.fname_tokenizer.read_bytes())
    if proto.trainer_spec.model_type not in (1, 2):  # 1 = UNIGRAM, 2 = BPE: what llama.cpp's SPM tokenizer handles
        raise ExportError(f"{base.fname_tokenizer}: SentencePiece model type {proto.trainer_spec.model_type} is not supported")
    return Vocabulary(
        model="llama",
        pre="default",
        tokens=tokens,
        token_types=types,
        scores=scores,
        add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
        special=SpecialVocab(source, load_merges=False, n_vocab=n_vocab),
    )


def normalization_for_pre(pre: str | None) -> str | None:
    """The normalization a GGUF's pre-tokenizer family implies (for GGUF sources, which carry no tokenizer.json)."""
    return next((rule.normalization for rule in PRE_TOKENIZERS if rule.name == pre), None)


def build_vocabulary(source: Path, n_vocab: int) -> Vocabulary:
    """Read the checkpoint's tokenizer: byte-level BPE from tokenizer.json, else SentencePiece from tokenizer.model."""
    tokenizer_file = source / "tokenizer.json"
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8")) if tokenizer_file.is_file() else None
    if tokenizer_json is not None:
        model = tokenizer_json.get("model", {})
        decoder = tokenizer_json.get("decoder") or {}
        decoders = [d.get("type") for d in decoder.get("decoders", [decoder])]
        if model.get("type") == "BPE" and "ByteLevel" in decoders and not model.get("byte_fallback"):
            return _bpe_vocabulary(source, tokenizer_json, n_vocab)
    if (source / "tokenizer.model").is_file():
        return _sentencepiece_vocabulary(source, n_vocab)
    raise ExportError(
        f"{source}: no tokenizer this converter supports",
        hint="expected a byte-level BPE tokenizer.json (GPT-2 style) or a SentencePiece tokenizer.model",
    )
