"""Record a bundle's golden checks at export: the board-side runtime runs the staged bundle, the manifest keeps the outputs.

What is recorded, and why:

- GGUF: ``GREEDY_PROMPTS``, each as a one-turn chat (through the bundle's chat template when it has one,
  as the daemon serves it, so the board's template rendering is checked too), decoded greedily for ``GREEDY_STEPS`` tokens
  (fewer if the model ends its answer). A fixed list rather than the
  recipe's validation text: that text is running prose for perplexity, not prompts, and fixed prompts let
  every bundle of a model be compared on the same inputs. Per step the most likely tokens are kept
  (at most ``TOP_K``, each at least ``MIN_PROB``) so the board can bound its divergence when its
  kernels round differently.
- ONNX: three of the recipe's validation samples (in-domain texts the recipe's author chose): the first,
  the shortest (int8 loses most on the shortest sentences) and the longest (most positions).

The bounds are module constants, written into each record so a board applies the ones its bundle was
exported with; docs/golden-checks.md explains the numbers.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

import numpy as np

from edgekit.errors import ExportError, RuntimeBackendError
from edgekit.formats import FORMATS
from edgekit.formats.gguf import SPEC as GGUF
from edgekit.runtime.golden import CHECK_N_CTX, encoder_output, greedy_logprobs, output_labels, pack_f16, prompt_tokens
from edgekit.runtime.verify import SERVABLE_TASKS
from edgekit.schema.manifest import EncoderGolden, EncoderText, GreedyGolden, GreedyPrompt, RuntimeConfig

# Open-ended requests: their answers run past GREEDY_STEPS tokens, so every step is checked.
GREEDY_PROMPTS: tuple[str, ...] = (
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works.",
    "Give three tips for learning a new language.",
)
GREEDY_STEPS = 16
TOP_K = 4
MIN_PROB = 0.01  # rarer tokens share the rest bin; 4 tokens of >= 1 % keep a 16-step prompt's record under 2 KB
ENCODER_TEXTS = 3

# Bounds a board must meet where its kernels round differently from the recording machine's (docs/golden-checks.md).
MAX_KLD = 0.02  # per GGUF prompt; an emulated Cortex-A76 measured up to 0.0051 against x86
MIN_TOP1_AGREEMENT = 0.5  # a floor against garbage: near-tie flips are the KLD's to judge (the A76 flipped 3 of 16)
MIN_COSINE = 0.99  # per text; the A76's int8 kernels gave 0.9968 on a two-letter text
MAX_PROBABILITY_DIFF = 0.02


def _recorded_on(package: str) -> str:
    return f"{platform.machine()}, {package} {metadata.version(package)}"


def top_tokens(logprobs: np.ndarray) -> dict[int, float]:
    """The step's most likely tokens (at most TOP_K, each with probability >= MIN_PROB, always the first) -> log-prob."""
    order = np.argsort(logprobs)[::-1][:TOP_K]
    kept = [i for n, i in enumerate(order) if n == 0 or logprobs[i] >= np.log(MIN_PROB)]
    return {int(i): round(float(logprobs[i]), 3) for i in kept}


def record_greedy(model_path: Path, runtime: RuntimeConfig, prompts: tuple[str, ...] = GREEDY_PROMPTS) -> GreedyGolden:
    """Greedy tokens and top log-probs of ``prompts`` on a GGUF model, as the board-side runtime computes them."""
    from edgekit.runtime.llm import GgufModel

    model = GgufModel(model_path, n_ctx=CHECK_N_CTX, threads=None, chat_template=runtime.chat_template)
    try:
        recorded = []
        for index, question in enumerate(prompts):
            prompt_ids = prompt_tokens(model, question, runtime)
            steps = greedy_logprobs(model, prompt_ids, GREEDY_STEPS, reuse=index > 0)
            recorded.append(GreedyPrompt(prompt=question, prompt_ids=prompt_ids, ids=[int(lp.argmax()) for lp in steps],
                                         top_logprobs=[top_tokens(lp) for lp in steps]))
    finally:
        model.llm.close()
    return GreedyGolden(recorded_on=_recorded_on("llama_cpp_python"), prompts=recorded,
                        min_top1_agreement=MIN_TOP1_AGREEMENT, max_kld=MAX_KLD)


def choose_texts(samples: list[str]) -> list[str]:
    """The first, the shortest and the longest distinct sample (fewer when there are fewer)."""
    distinct = list(dict.fromkeys(s for s in samples if s.strip()))
    if not distinct:
        return []
    picks = [distinct[0], min(distinct, key=len), max(distinct, key=len), *distinct]
    return list(dict.fromkeys(picks))[:ENCODER_TEXTS]


def record_encoder(bundle_dir: Path, runtime: RuntimeConfig, task: str, samples: list[str]) -> EncoderGolden | None:
    """Outputs of an ONNX bundle for a few of ``samples`` (batch one), as the board-side runtime computes them."""
    from edgekit.runtime.encoder import EncoderModel

    texts = choose_texts(samples)
    if not texts:
        return None
    model = EncoderModel(bundle_dir, runtime)
    recorded = []
    for text in texts:
        output = encoder_output(model, task, text)
        labels = [] if task == "feature-extraction" else output_labels(output, list(runtime.labels))
        recorded.append(EncoderText(text=text, labels=labels, output=pack_f16(output), shape=list(output.shape)))
    embeddings = task == "feature-extraction"
    return EncoderGolden(recorded_on=_recorded_on("onnxruntime"), texts=recorded,
                         min_cosine=MIN_COSINE if embeddings else None,
                         max_probability_diff=None if embeddings else MAX_PROBABILITY_DIFF)


def validation_samples(loaded) -> list[str]:
    """The recipe's validation samples: inline ones, then the lines of samples_file."""
    validation = loaded.recipe.validation
    samples = list(validation.samples)
    if validation.samples_file is not None:
        samples += loaded.resolve(validation.samples_file).read_text(encoding="utf-8").splitlines()
    return samples


def record_golden(loaded, fmt: str, task: str, runtime: RuntimeConfig, staged: Path):
    """The golden record of a staged bundle, or None for a task the board runtime does not serve."""
    if task not in SERVABLE_TASKS.get(fmt, ()):
        return None
    try:
        record = FORMATS[fmt].hook("golden_record")
        return record(staged, runtime, task, validation_samples(loaded))
    except RuntimeBackendError as exc:
        raise ExportError(f"the board-side runtime could not run the bundle it was given: {exc.message}",
                          hint="the exported files do not load in edgekit's runtime; report it with the recipe") from exc


def record_gguf(staged: Path, runtime: RuntimeConfig, task: str, samples: list[str]) -> GreedyGolden:
    """Greedy record of a staged GGUF bundle (fixed chat prompts: the recipe's samples are running text)."""
    [model_path] = staged.glob("*" + GGUF.model_suffix)
    return record_greedy(model_path, runtime)


def record_onnx(staged: Path, runtime: RuntimeConfig, task: str, samples: list[str]) -> EncoderGolden | None:
    return record_encoder(staged, runtime, task, samples)
