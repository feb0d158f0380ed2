"""How edgekit times a model: the runtime's own classes, loaded and driven the way the daemon drives them.

`edgekit bench`, `edgekit profile-host` and the benchmarks in scripts/ all time models through these
functions. GGUF: ``GgufModel`` (the worker's loader and settings), prompts evaluated in its prefill
chunks, tokens from its native decode loop (``GgufModel.steps``) at temperature 0 (end-of-text
tokens do not stop a measurement). ONNX: ``EncoderModel`` and its ``embed``/``classify`` calls. Board
side: no torch. Anything that needs a fresh process runs ``python -m edgekit.bench.child``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.formats import TASKS
from edgekit.runtime.llama_params import PREFILL_CHUNK

if TYPE_CHECKING:
    from edgekit.runtime.encoder import EncoderModel
    from edgekit.runtime.llm import GgufModel

# The prompt `edgekit bench` times when none is given: a typical short support request.
DEFAULT_PROMPT = (
    "The support team received a message from a customer whose order arrived damaged. "
    "Write a short, friendly reply that apologises and explains how the replacement will be sent."
)
SHORT_TEXT = "Great service."
# The sentence profile-host times an encoder on (batch 1).
PROFILE_TEXT = "A short sentence about running models on small boards."
# profile-host's GGUF prompt-processing measurement: one full prefill chunk, the batch llama-bench's pp512 times too.
PROFILE_PROMPT_TOKENS = PREFILL_CHUNK
# Synthetic prompts stay this far from both ends of the vocabulary, where special tokens live.
SYNTHETIC_MARGIN = 500


# -- GGUF ----------------------------------------------------------------------------------------

def synthetic_prompt(n_vocab: int, n_tokens: int) -> list[int]:
    """``n_tokens`` ordinary token ids spread over the vocabulary (a prime stride): a context of any length, no text needed."""
    span = n_vocab - 2 * SYNTHETIC_MARGIN
    return [(i * 7919) % span + SYNTHETIC_MARGIN for i in range(n_tokens)]


def load_gguf(model_path: Path, *, n_ctx: int, threads: int | None) -> GgufModel:
    """A GGUF file loaded as the daemon's worker loads it."""
    from edgekit.runtime.llm import GgufModel

    return GgufModel(Path(model_path), n_ctx=n_ctx, threads=threads)


def greedy_steps(model: GgufModel, context: list[int]) -> Iterator[int]:
    """The daemon's decode loop at temperature 0: evaluates what of ``context`` is not cached, then one token per step."""
    from edgekit.runtime.llm import Sampling

    model.prefill(context)
    yield from model.steps(Sampling(temperature=0.0))


def prompt_seconds(model: GgufModel, tokens: list[int]) -> float:
    """Seconds to evaluate ``tokens`` from an empty cache (in the runtime's prefill chunks)."""
    llm = model.llm
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    return time.perf_counter() - start


@dataclass(frozen=True)
class GenerationTiming:
    """One timed generation: the first token (prompt evaluation + one sample), then ``decoded`` more."""

    prompt_tokens: int
    decoded: int
    first_token_s: float
    decode_s: float

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.first_token_s

    @property
    def decode_tok_s(self) -> float:
        return self.decoded / self.decode_s


def time_generation(model: GgufModel, context: list[int], n_decode: int, *, fresh: bool = True) -> GenerationTiming:
    """Time to the first token of ``context``, then the rate of ``n_decode`` more tokens.

    ``fresh`` empties the cache first (a new conversation); without it a cached prefix of ``context``
    is reused, as the daemon reuses it, so the same deep context can be decoded again without refilling.
    """
    if fresh:
        model.llm.reset()
    start = time.perf_counter()
    first, decoded = None, 0
    steps = greedy_steps(model, context)
    try:
        for _ in steps:
            if first is None:
                first = time.perf_counter()
            else:
                decoded += 1
            if decoded >= n_decode:
                break
    finally:
        steps.close()
    end = time.perf_counter()
    return GenerationTiming(len(context), decoded, first - start, end - first)


def profile_gguf(model_path: Path, threads: int, *, n_tokens: int = 64, repeats: int = 3, depth: int = 0) -> dict[str, float]:
    """profile-host's GGUF speeds, each the median of ``repeats``: prompt tokens/s of one prefill chunk,
    decode tokens/s after an 8-token prompt, and (``depth`` > 0) decode tokens/s ``depth`` tokens into a context."""
    import statistics  # imported where used: the peak-RSS children stay as lean as the runtime

    model = load_gguf(model_path, n_ctx=max(1024, depth + n_tokens + 16), threads=threads)
    prompt = synthetic_prompt(model.llm.n_vocab(), max(PROFILE_PROMPT_TOKENS, depth))
    chunk = prompt[:PROFILE_PROMPT_TOKENS]
    prompt_rates, decode_rates = [], []
    for _ in range(repeats):
        prompt_rates.append(len(chunk) / prompt_seconds(model, chunk))
        decode_rates.append(time_generation(model, prompt[:8], n_tokens).decode_tok_s)
    result = {"prompt_tok_s": statistics.median(prompt_rates), "decode_tok_s": statistics.median(decode_rates)}
    if depth:
        # The first repeat fills the context; the others keep it and decode again from its end.
        deep = [time_generation(model, prompt[:depth], n_tokens, fresh=i == 0).decode_tok_s for i in range(repeats)]
        result.update(deep_decode_tok_s=statistics.median(deep), context_tokens=depth + n_tokens // 2)
    return result


def interleaved_decode(configs: Mapping[str, tuple[str, int, int]], threads: int, n_gen: int, rounds: int) -> dict:
    """Decode tokens/s of several (model file, n_ctx, prompt tokens) configurations, interleaved token by token.

    Each model is loaded and its context filled once; each round then decodes ``n_gen`` tokens in every
    configuration, one token in each in turn (the order reversed every step), so load from other
    processes hits all of them alike. Rates are in process CPU time (which leaves out time other
    processes hold the core) and wall clock. A new round starts again from the filled prompt.
    """
    runs = {}
    for name, (path, n_ctx, n_prompt) in configs.items():
        model = load_gguf(Path(path), n_ctx=n_ctx, threads=threads)
        prompt = synthetic_prompt(model.llm.n_vocab(), n_prompt)
        next(greedy_steps(model, prompt))  # fills the context
        runs[name] = (model, prompt)
    result = {name: {"prompt_tokens": len(prompt), "rounds": []} for name, (_, prompt) in runs.items()}
    for _ in range(rounds):
        steps = {name: greedy_steps(model, prompt) for name, (model, prompt) in runs.items()}
        for step in steps.values():
            next(step)  # re-evaluates the prompt's last token only
        cpu, wall = dict.fromkeys(steps, 0.0), dict.fromkeys(steps, 0.0)
        for i in range(n_gen):
            for name in (list(steps) if i % 2 == 0 else list(reversed(steps))):
                c, w = time.process_time(), time.perf_counter()
                next(steps[name])
                cpu[name] += time.process_time() - c
                wall[name] += time.perf_counter() - w
        for name, step in steps.items():
            step.close()
            result[name]["rounds"].append({"decode_tok_s": n_gen / cpu[name], "decode_tok_s_wall": n_gen / wall[name]})
    return result


def gguf_peak_rss(model_path: Path, n_ctx: int, threads: int, n_gen: int, slots: int) -> dict[str, int]:
    """Peak RSS of this process after loading the model into edgekit serve's engine with ``slots`` slots (no saved
    prompts), filling its context with one request and generating up to ``n_gen`` tokens."""
    from edgekit.runtime.llm import GgufModel, Sampling
    from edgekit.runtime.llm_batch import BatchedGguf

    engine = BatchedGguf(GgufModel(Path(model_path), n_ctx=n_ctx, threads=threads, prompt_cache_contexts=0), slots)
    try:
        prompt = synthetic_prompt(engine.model.llm.n_vocab(), n_ctx - n_gen - 8)
        for _ in engine.generate(prompt, Sampling(max_tokens=n_gen, temperature=0.0)):
            pass
    finally:
        engine.close()
    return {"peak_rss": peak_rss_bytes(), "prompt_tokens": len(prompt), "slots": slots}


def tokens_per_second(timestamps: list[float]) -> float:
    """Rate between the first and the last of a stream's token timestamps (the first token's wait excluded)."""
    return (len(timestamps) - 1) / (timestamps[-1] - timestamps[0]) if len(timestamps) > 2 else 0.0


def first_token_seconds(started: float, timestamps: list[float]) -> float:
    """Time to first token: from sending the request to the first chunk that carries text."""
    return timestamps[0] - started if timestamps else float("nan")


def aggregate_tokens_per_second(streams: list[list[float]]) -> float:
    """Tokens/s of concurrent streams together: every token after each stream's first, over the span from the
    earliest first token to the latest last one (each stream's prompt wait excluded, as in ``tokens_per_second``)."""
    streams = [s for s in streams if len(s) > 1]
    if not streams:
        return 0.0
    span = max(s[-1] for s in streams) - min(s[0] for s in streams)
    return sum(len(s) - 1 for s in streams) / span if span > 0 else 0.0


# -- ONNX encoders -------------------------------------------------------------------------------

def load_encoder(bundle: Path, threads: int | None) -> EncoderModel:
    """An encoder bundle loaded as the daemon's worker loads it (the caller has verified the bundle)."""
    from edgekit.bundle import read_manifest
    from edgekit.runtime.encoder import EncoderModel

    return EncoderModel(Path(bundle), read_manifest(Path(bundle)).runtime, threads=threads)


def encoder_call(model: EncoderModel, task: str) -> Callable[[list[str]], object]:
    """The call the daemon makes for a bundle's task: embeddings, or class probabilities."""
    return getattr(model, TASKS[task].op)


def call_seconds(call: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def encoder_latency_ms(model: EncoderModel, task: str, text: str = PROFILE_TEXT, repeats: int = 50) -> float:
    """Batch-1 latency of one text: median of ``repeats`` calls after one warm-up call."""
    import statistics

    run = encoder_call(model, task)
    run([text])
    return 1e3 * statistics.median(call_seconds(lambda: run([text]), repeats))


def interleaved_rounds(runners: Mapping[str, Callable[[], object]], rounds: int, iters: int,
                       warmup: int = 10) -> dict[str, list[float]]:
    """Every round runs each runner ``iters`` times in turn, so machine noise hits them all alike; seconds per call."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            samples[name] += call_seconds(run, iters)
    return samples


def encoder_peak_rss(bundle: Path, batch: int, threads: int) -> dict[str, int]:
    """Peak RSS of this process after three forward passes on ``batch`` inputs of the bundle's maximum length.

    The graph alone, without pooling: fit's memory terms model the session (weights, arena), and the
    pooled copy of the hidden states would add a transient the size of the batch's activations.
    """
    from edgekit.bundle import read_manifest

    manifest = read_manifest(Path(bundle))
    model = load_encoder(bundle, threads)
    text = " ".join(["edge"] * (manifest.runtime.max_length + 16))  # truncated to max_length tokens
    for _ in range(3):
        model.forward([text] * batch)
    return {"peak_rss": peak_rss_bytes(), "tokens": model.count_tokens([text])[0]}


# -- the process ---------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


# -- edgekit bench: one bundle (the `bench` hook of each format spec) ------------------------------

def bench_onnx(bundle: Path, manifest, config: dict) -> dict:
    """`edgekit bench` of an ONNX bundle: load time, batch-1 and batch-32 latency per run."""
    start = time.perf_counter()
    model = load_encoder(bundle, config["threads"])
    load_seconds = time.perf_counter() - start
    texts = [line for line in config["texts"] if line.strip()] or [SHORT_TEXT]
    one = [SHORT_TEXT]
    batch = (texts * 32)[:32]
    call = encoder_call(model, manifest.task)
    for _ in range(config["warmup"]):
        call(one)
        call(batch)
    runs = []
    for _ in range(config["runs"]):
        single = sorted(call_seconds(lambda: call(one), config["iters"]))
        many = sorted(call_seconds(lambda: call(batch), max(3, config["iters"] // 8)))
        runs.append({
            "batch1_p50_ms": single[len(single) // 2] * 1000,
            "batch1_p95_ms": single[int(len(single) * 0.95) - 1] * 1000,
            "batch32_p50_ms": many[len(many) // 2] * 1000,
            "batch32_p95_ms": many[int(len(many) * 0.95) - 1] * 1000,
            "batch32_texts_per_s": 32 / many[len(many) // 2],
        })
    return {"load_seconds": load_seconds, "runs": runs, "seq_len": model.count_tokens(one)[0]}


def bench_gguf(bundle: Path, manifest, config: dict) -> dict:
    """`edgekit bench` of a GGUF bundle: load time, prompt and decode speed per run."""
    start = time.perf_counter()
    model = load_gguf(bundle / manifest.file(".gguf").path, n_ctx=config["ctx"], threads=config["threads"])
    load_seconds = time.perf_counter() - start
    prompt = model.tokenize(config["prompt"])[: config["ctx"] // 2]
    n_decode = min(config["decode_tokens"], config["ctx"] - len(prompt) - 1)

    def one_run() -> dict:
        t = time_generation(model, prompt, n_decode)
        return {"prompt_tokens": t.prompt_tokens, "decode_tokens": t.decoded, "ttft_ms": t.first_token_s * 1000,
                "prompt_tok_s": t.prompt_tok_s, "decode_tok_s": t.decode_tok_s}

    for _ in range(config["warmup"]):
        one_run()
    return {"load_seconds": load_seconds, "runs": [one_run() for _ in range(config["runs"])]}
