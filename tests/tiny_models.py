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


# ---- encoders ------------------------------------------------------------------------------------------
#
# One tiny random checkpoint per encoder family, each with a tokenizer of the family's kind assembled here with
# the `tokenizers` library from a vocabulary trained on the test corpus (no model hub; SentencePiece trains the
# WordPiece and Unigram vocabularies, since tokenizers' own trainers break ties differently on every run):
# - WordPiece, lower-cased (bert, distilbert);
# - byte-level BPE with RoBERTa's <s>/</s> template (roberta);
# - SentencePiece-style Unigram with a Metaspace pre-tokenizer (xlm-roberta: <s> <pad> </s> <unk> at 0-3;
#   deberta-v2, DeBERTa-v3's layout: [PAD] [CLS] [SEP] [UNK] at 0-3).

# initializer_range 0.2 (10x the released configs'): heads' outputs spread enough that label and ranking agreement
# measure something, rather than near-ties every rounding flips.
ENCODER_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, initializer_range=0.2)
ENCODER_VOCAB = 3000  # above the corpus alphabet (1,342 characters): Unigram keeps every character
ENCODER_LABELS = {"text-classification": ["negative", "positive"], "token-classification": ["O", "B-PER", "I-PER", "B-LOC"],
                  "text-ranking": ["relevance"]}


def _encoder_corpus() -> list[str]:
    return [line for line in EVAL_TEXT.splitlines() + CORPUS if line.strip()]


def _wordpiece(cls, out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # SentencePiece BPE on the pre-tokenized words, its pieces written WordPiece-style ("▁word" -> "word", "ing" ->
    # "##ing"): tokenizers' WordPieceTrainer breaks ties differently on every run.
    words = [" ".join(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)))
             for line in _encoder_corpus()]
    pieces = [piece for piece, _ in _spm_pieces(words, "bpe")]
    alphabet = sorted({c for word in words for c in word if not c.isspace()})
    vocab = dict.fromkeys([*specials, *alphabet, *(f"##{c}" for c in alphabet),
                           *(p[1:] if p.startswith("▁") else f"##{p}" for p in pieces if p not in ("▁", "<unk>"))])
    vocab.pop("##", None)
    backend.model = models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]")
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    cls(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", do_lower_case=True).save_pretrained(out)
    return backend.get_vocab_size()


def _byte_bpe(cls, out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    backend.train_from_iterator(_encoder_corpus(), trainers.BpeTrainer(
        vocab_size=ENCODER_VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    backend.post_processor = processors.RobertaProcessing(sep=("</s>", 2), cls=("<s>", 0), trim_offsets=True,
                                                          add_prefix_space=False)
    cls(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>").save_pretrained(out)
    return backend.get_vocab_size()


def _spm_pieces(lines: list[str], model_type: str) -> list[tuple[str, float]]:
    """SentencePiece's pieces (piece, score) of ``lines``, its <unk> first; the same on every run (one thread)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=ENCODER_VOCAB, model_type=model_type,
        character_coverage=1.0, hard_vocab_limit=False, normalization_rule_name="nfkc", unk_id=0, bos_id=-1, eos_id=-1,
        pad_id=-1, num_threads=1, minloglevel=2)
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    return [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]


def _spm_unigram_pieces(specials: list[str]) -> list[tuple[str, float]]:
    """A Unigram vocabulary (piece, log-probability) trained by SentencePiece, after ``specials``.

    SentencePiece, not tokenizers' UnigramTrainer: that one gives a different vocabulary on every run.
    """
    return [(token, 0.0) for token in specials] + _spm_pieces(_encoder_corpus(), "unigram")[1:]


def _unigram(cls, out: Path, specials: list[str], cls_token: str, sep_token: str, pair: str) -> int:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    unk = next(s for s in specials if "unk" in s.lower())
    backend = Tokenizer(models.Unigram(_spm_unigram_pieces(specials), unk_id=specials.index(unk), byte_fallback=False))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    ids = [(cls_token, backend.token_to_id(cls_token)), (sep_token, backend.token_to_id(sep_token))]
    backend.post_processor = processors.TemplateProcessing(single=f"{cls_token} $A {sep_token}", pair=pair, special_tokens=ids)
    pad = next(s for s in specials if "pad" in s.lower())
    mask = next(s for s in specials if "mask" in s.lower())
    cls(tokenizer_object=backend, bos_token=cls_token, eos_token=sep_token, sep_token=sep_token, cls_token=cls_token,
        unk_token=unk, pad_token=pad, mask_token=mask).save_pretrained(out)
    return backend.get_vocab_size()


def encoder_tokenizer(family: str, out: Path) -> int:
    """Train and save the family's kind of tokenizer into ``out``; returns its vocabulary size."""
    import transformers as t

    if family in ("bert", "distilbert"):
        return _wordpiece(t.BertTokenizerFast if family == "bert" else t.DistilBertTokenizerFast, out)
    if family == "roberta":
        return _byte_bpe(t.RobertaTokenizerFast, out)
    if family == "xlm-roberta":
        return _unigram(t.XLMRobertaTokenizerFast, out, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<s>", "</s>",
                        "<s> $A </s> </s> $B </s>")
    if family == "deberta-v2":
        return _unigram(t.DebertaV2TokenizerFast, out, ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"], "[CLS]", "[SEP]",
                        "[CLS] $A [SEP] $B:1 [SEP]:1")
    raise KeyError(family)


def _encoder_config(family: str, n_vocab: int, labels: list[str]):
    import transformers as t

    heads = dict(id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)}) if labels else {}
    if family == "bert":
        return t.BertConfig(vocab_size=n_vocab, max_position_embeddings=128, **ENCODER_TINY, **heads)
    if family == "distilbert":
        return t.DistilBertConfig(vocab_size=n_vocab, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                  max_position_embeddings=128, pad_token_id=0,
                                  initializer_range=ENCODER_TINY["initializer_range"], **heads)
    if family in ("roberta", "xlm-roberta"):
        config = t.RobertaConfig if family == "roberta" else t.XLMRobertaConfig
        # positions start after the padding index (1), as in the released checkpoints (514 = 512 + 2)
        return config(vocab_size=n_vocab, max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                      type_vocab_size=1, **ENCODER_TINY, **heads)
    if family == "deberta-v2":
        # DeBERTa-v3-xsmall's layout in small: relative attention with log buckets, no absolute positions, no type ids
        return t.DebertaV2Config(vocab_size=n_vocab, max_position_embeddings=128, relative_attention=True,
                                 position_buckets=32, norm_rel_ebd="layer_norm", share_att_key=True,
                                 pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
                                 max_relative_positions=-1, pad_token_id=0, pooler_hidden_size=64, pooler_dropout=0,
                                 pooler_hidden_act="gelu", **ENCODER_TINY, **heads)
    raise KeyError(family)


ENCODER_FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta", "deberta-v2")


def build_encoder(family: str, task: str, out: Path, tokenizers: dict | None = None) -> Path:
    """Write a tiny random ``family`` checkpoint with the head of ``task`` (fp32 safetensors + tokenizer) into ``out``.

    ``tokenizers`` ({family: (tokenizer files, vocabulary size)}, filled here) lets several heads of one family share
    one trained tokenizer: training is the same on every run, so copying it equals training it again.
    """
    import torch
    import transformers

    from edgekit.formats import TASKS

    out.mkdir(parents=True, exist_ok=True)
    if tokenizers is not None and family in tokenizers:
        files, n_vocab = tokenizers[family]
        for file in files:
            shutil.copy(file, out / file.name)
    else:
        n_vocab = encoder_tokenizer(family, out)
        if tokenizers is not None:
            tokenizers[family] = (sorted(out.iterdir()), n_vocab)
    labels = ENCODER_LABELS.get(task, [])
    config = _encoder_config(family, n_vocab, labels)
    torch.manual_seed(0)
    model = getattr(transformers, TASKS[task].auto_model).from_config(config)
    model.eval().save_pretrained(out, safe_serialization=True)
    return out
