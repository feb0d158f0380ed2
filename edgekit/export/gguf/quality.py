"""How good a GGUF is: tokenization identity, perplexity, KL divergence and top-1 agreement.

The text is tokenized once with the reference GGUF's vocabulary and cut into windows of
``window`` tokens (plus BOS where the vocabulary adds one); every window is evaluated from an
empty context by each model, and at every position the next-token distributions are compared:
mean KL(reference || candidate), the share of positions whose most likely token agrees, and
each model's perplexity on the actual next token. This is the measure llama.cpp's
``llama-perplexity --kl-divergence`` reports (tools/perplexity/README.md), here over all positions
of each window rather than its second half, because the shipped text is short.
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from edgekit.errors import ExportError
from edgekit.export.gguf.quantize import default_threads, quiet_llama
from edgekit.runtime.placement import bound_openmp_spin

# Texts that stress tokenizers beyond running prose: whitespace runs, digits, code, scripts, emoji.
PROBE_TEXTS: tuple[str, ...] = (
    "Hello world",
    "   three leading spaces and two trailing  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "def area(r: float) -> float:\n    return 3.14159 * r ** 2  # circle\n",
    "1234567890 3.14159 1e-9 -42 ½ ² ۱۲۳ 1,000,000",
    "emoji 😀👍🏽 ❤️‍🔥 🇫🇷",
    "中文字符 日本語のテキスト 한국어 문장",
    "Ünïcödé ÅÄÖ ß ç Łódź naïve café",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "",
)


class Scorer(Protocol):
    def logits(self, tokens: Sequence[int]) -> np.ndarray: ...


class GgufScorer:
    """Next-token logits of a GGUF model via llama-cpp-python (all positions of a window)."""

    def __init__(self, path: Path, window: int, threads: int | None = None) -> None:
        bound_openmp_spin()
        from llama_cpp import Llama

        self.window = window
        with quiet_llama():
            self._llm = Llama(
                str(path), n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
                n_threads=threads or default_threads(), n_threads_batch=threads or default_threads(), verbose=False,
            )

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        self._llm.reset()
        self._llm.eval(list(tokens))
        return np.array(self._llm.scores[: len(tokens)], dtype=np.float32)

    def close(self) -> None:
        self._llm.close()


class TorchScorer:
    """Next-token logits of the original checkpoint in PyTorch float32 (the truth a conversion is held to)."""

    def __init__(self, source: Path, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads or default_threads())
        self._torch = torch
        # Soft-capped attention (gemma2) is only computed by transformers' eager attention.
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
        attention = "eager" if config.get("attn_logit_softcapping") is not None else None
        self._model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation=attention).eval()

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        with self._torch.inference_mode():
            out = self._model(self._torch.tensor([list(tokens)]), use_cache=False)
        return out.logits[0].float().numpy()

    def close(self) -> None:
        self._model = None


def window_key(tokens: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()[:32]


class SavedScorer:
    """Replays logits that ``compare(..., save=...)`` wrote for the same windows (shared across targets)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        return np.load(self.directory / f"{window_key(tokens)}.npy", mmap_mode="r")

    def close(self) -> None:
        pass


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32, in one new array (a window's logits are ~100 MB at a 49k vocabulary)."""
    out = logits.astype(np.float32)  # a copy: the caller's logits may be a read-only memory map
    out -= out.max(axis=-1, keepdims=True)
    out -= np.log(np.exp(out).sum(axis=-1, keepdims=True))
    return out


@dataclass
class Agreement:
    """Running sums of candidate-vs-reference comparisons over token positions."""

    positions: int = 0
    reference_nll: float = 0.0
    candidate_nll: float = 0.0
    same_top1: int = 0
    kld: list[np.ndarray] = field(default_factory=list)

    def add(self, reference: np.ndarray, candidate: np.ndarray, tokens: Sequence[int]) -> None:
        """Compare next-token predictions at every position but the last (which has no next token)."""
        ref = log_softmax(reference[:-1])
        cand = log_softmax(candidate[:-1])
        targets = np.asarray(tokens[1:])
        rows = np.arange(len(targets))
        self.reference_nll -= float(ref[rows, targets].astype(np.float64).sum())
        self.candidate_nll -= float(cand[rows, targets].astype(np.float64).sum())
        self.same_top1 += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        cand -= ref  # in place from here on: KL(p || q) = -sum p (log q - log p)
        cand *= np.exp(ref)
        self.kld.append(-cand.sum(axis=-1, dtype=np.float64))
        self.positions += len(targets)

    def metrics(self) -> dict[str, float]:
        kld = np.concatenate(self.kld) if self.kld else np.zeros(1)
        ppl_ref = math.exp(self.reference_nll / self.positions)
        ppl = math.exp(self.candidate_nll / self.positions)
        return {
            "ppl_reference": ppl_ref,
            "ppl": ppl,
            "ppl_increase": ppl / ppl_ref - 1.0,
            "kld_mean": float(max(kld.mean(), 0.0)),
            "kld_p99": float(np.percentile(kld, 99)),
            "top1_agreement": self.same_top1 / self.positions,
            "eval_tokens": float(self.positions),
        }


class GgufVocab:
    """llama.cpp's tokenizer for a GGUF, loaded vocabulary-only (no weights, no context)."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        self._llama = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        with quiet_llama():
            self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise ExportError(f"llama.cpp could not load the vocabulary of {path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)

    @property
    def adds_bos(self) -> bool:
        return bool(self._llama.llama_vocab_get_add_bos(self._vocab))

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids; ``add_special`` adds BOS/EOS as the vocabulary says, ``parse_special`` matches control tokens in text."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (self._llama.llama_token * capacity)()
        count = self._llama.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, parse_special)
        if count < 0:  # a negative count is the size that was needed
            capacity = -count
            buffer = (self._llama.llama_token * capacity)()
            count = self._llama.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, parse_special)
        return list(buffer[:count])

    def close(self) -> None:
        if self._model:
            self._llama.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> GgufVocab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def text_windows(
    gguf_path: Path, text: str, window: int, max_tokens: int | None = None, normalization: str | None = None
) -> list[list[int]]:
    """Tokenize ``text`` with the GGUF's vocabulary and cut it into evaluation windows (each led by BOS if the vocab adds one)."""
    if normalization:
        text = unicodedata.normalize(normalization, text)
    with GgufVocab(gguf_path) as vocab:
        lead = vocab.tokenize("", add_special=True, parse_special=False)  # [bos] when the vocab adds one, else []
        tokens = vocab.tokenize(text, add_special=False, parse_special=False)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    step = window - len(lead)
    windows = [lead + tokens[start : start + step] for start in range(0, len(tokens), step)]
    return [w for w in windows if len(w) >= 2]


def compare(
    scorers: dict[str, Scorer],
    pairs: Sequence[tuple[str, str]],
    windows: list[list[int]],
    progress=lambda message: None,
    save: dict[str, Path] | None = None,
) -> dict[tuple[str, str], dict[str, float]]:
    """Metrics of each (reference, candidate) pair of named scorers over the windows; each scorer runs once per window.

    ``save`` maps scorer names to directories where their logits are kept for ``SavedScorer``.
    """
    tallies = {pair: Agreement() for pair in pairs}
    for directory in (save or {}).values():
        directory.mkdir(parents=True, exist_ok=True)
    for index, tokens in enumerate(windows, 1):
        logits = {name: scorer.logits(tokens) for name, scorer in scorers.items()}
        for name, directory in (save or {}).items():
            np.save(directory / f"{window_key(tokens)}.npy", logits[name])
        for reference, candidate in pairs:
            tallies[(reference, candidate)].add(logits[reference], logits[candidate], tokens)
        progress(f"measuring quality: window {index}/{len(windows)}")
    return {pair: tally.metrics() for pair, tally in tallies.items()}


@dataclass(frozen=True)
class Mismatch:
    """A text the two tokenizers split differently."""

    text: str
    expected: list[int]
    got: list[int]


def gguf_tokenize(gguf_path: Path, texts: Sequence[str], normalization: str | None = None) -> list[list[int]]:
    """Token ids llama.cpp gives each text with this GGUF's vocabulary (BOS/EOS as the vocab says, special tokens parsed).

    ``normalization`` (e.g. "NFC") is applied first, as the runtime does for such bundles.
    """
    with GgufVocab(gguf_path) as vocab:
        return [vocab.tokenize(unicodedata.normalize(normalization, t) if normalization else t) for t in texts]


def tokenization_mismatches(
    hf_dir: Path, gguf_path: Path, texts: Sequence[str], normalization: str | None = None
) -> list[Mismatch]:
    """Texts where llama.cpp on the GGUF (after ``normalization``) and the Hugging Face tokenizer disagree on a single id."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    got = gguf_tokenize(gguf_path, texts, normalization)
    mismatches = []
    for text, ids in zip(texts, got):
        expected = tokenizer(text)["input_ids"]
        if expected != ids:
            mismatches.append(Mismatch(text, expected, ids))
    return mismatches
