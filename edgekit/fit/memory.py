"""Peak resident memory of serving one model: weights as mapped, KV cache, compute buffers, runtime baseline.

Each term is a formula over ``ModelFacts`` and the run settings; constants that are measurements
say where they were measured. scripts/bench_fit.py compares the sum with the peak RSS of a real
process (loading, a context-filling prompt, generation; or encoder batches), and
scripts/bench_worker_rss.py the charge of a real `edgekit serve` worker with its resident set.

One truth for `fit`, `plan` and `edgekit serve`'s admission budget: ``RunSettings`` describes a model
run the way edgekit's runtime runs it (generation slots are sequences of one llama.cpp context; an encoder
runs micro-batches bounded in padded tokens), ``daemon=True`` runs it in a serve worker next to the
daemon's own process, and the daemon charges a worker exactly ``required - daemon`` of that estimate
(the ``worker_bytes`` hooks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from edgekit.fit.facts import ModelFacts
from edgekit.formats import FORMATS
from edgekit.runtime.llama_params import FLASH_ATTENTION, PREFILL_CHUNK, sequences_for
from edgekit.schema.device import IsaFeatures

MIB = 1 << 20

# Resident set of a fresh process after importing the runtime stack, plus what the runtime allocates
# outside the terms below (llama.cpp context bookkeeping; ONNX Runtime's library pages touched at
# session creation). Measured on x86-64: docs/device-facts.md, "Constants edgekit measured itself".
LLAMA_RUNTIME_BASE = 44 * MIB
ORT_RUNTIME_BASE = 69 * MIB
# edgekit serve's own process (web stack, no runtime; each model runs in a worker process of its own):
# idle RSS measured by scripts/bench_serve.py, rounded up (docs/device-facts.md).
DAEMON_RSS = 80 * MIB
# llama.cpp's vocabulary in RAM (token strings, lookup maps, BPE merge ranks): 17 MiB for SmolLM2's
# 49,152 tokens, measured with Llama(vocab_only=True).
LLAMA_VOCAB_BYTES_PER_TOKEN = 363
# K/V cache element sizes by cache type (llama.cpp --cache-type-k/v; q8_0 = 34 bytes per 32).
KV_TYPE_BYTES = {"f16": 2.0, "bf16": 2.0, "f32": 4.0, "q8_0": 34 / 32}
# llama.cpp rounds the context (KV cells) up to a multiple of 256 (n_ctx 1000 -> 1024, measured).
KV_PAD = 256
# ONNX Runtime keeps the initializers plus a pre-packed copy of the MatMul weights (MLAS layouts):
# all-MiniLM-L6-v2 int8 (23.5 MB file, 22.4 MiB) adds 47.0 MiB of anonymous memory (RssAnon) at session start.
ORT_WEIGHT_COPIES = 2.0
ORT_SESSION_EXTRA = 2 * MIB
# ONNX Runtime's arena after a few runs grows by ~52 KB per token of batch x sequence on
# all-MiniLM-L6-v2 (hidden 384, feed-forward 1536), linear in tokens from 512 to 8,192 tokens:
# modelled as 6 float32 activations of (2 x hidden + feed-forward) per token.
ORT_FLOATS_PER_TOKEN_UNIT = 6.0
# An encoder worker of edgekit serve tokenizes a whole job (one request, or requests merged up to --batch-max texts)
# padded to its longest text before it runs its micro-batches, and holds it until the job ends: tokenizers' Encoding
# objects and the int64 ids, mask and type ids. Measured with all-MiniLM-L6-v2's tokenizer on the worst request the
# daemon accepts, 2,047 short texts and one of 256 tokens: 132 B per padded position (2,048 x 256 -> 66 MiB).
ENCODER_JOB_BYTES_PER_TOKEN = 132
# The encoder worker's own process beyond the bare runtime: the loaded tokenizer, edgekit's worker and protocol
# modules, what the golden checks leave. scripts/bench_worker_rss.py: all-MiniLM-L6-v2 worker at batch 1, 150 MiB RSS.
ENCODER_WORKER_EXTRA = 22 * MIB


# Which weight types ggml's CPU backend repacks into an interleaved copy at load (CPU_REPACK buffer),
# by ISA, and the row multiple it needs. Source: ggml/src/ggml-cpu/repack.cpp,
# ggml_repack_get_optimal_repack_type; Q8_0 on Arm i8mm was added in 2025 llama.cpp versions.
# The mapped file pages stay resident next to the copy, so repacked bytes count twice in RSS
# (measured: SmolLM2 Q4_K_M on AVX2 maps 100.6 MiB and adds a 7.59 MiB CPU_REPACK buffer).
def repack_rows(ggml_type: str, isa: IsaFeatures) -> int | None:
    """Row multiple a repacked tensor of ``ggml_type`` needs on this ISA, or None when it is not repacked."""
    if ggml_type == "Q4_0":
        return 8 if isa.avx2 else 4 if isa.neon and (isa.i8mm or isa.dotprod) else None
    if ggml_type == "Q4_K":
        return 8 if isa.avx2 or (isa.neon and (isa.i8mm or isa.dotprod)) else None
    if ggml_type == "IQ4_NL":
        return 8 if isa.avx2 else 4 if isa.neon and isa.dotprod else None
    if ggml_type == "Q2_K":
        return 8 if isa.avx512_vnni else None
    if ggml_type == "Q8_0":
        return 4 if isa.neon and isa.i8mm else None
    return None


def serve_default(name: str):
    """The declared default of an `edgekit serve` setting (declared once, in ServeSettings)."""
    from edgekit.serve.settings import ServeSettings

    return ServeSettings.model_fields[name].default


@dataclass(frozen=True)
class RunSettings:
    """How the runtime will run the model (the inputs of the memory terms)."""

    n_ctx: int  # context per sequence (GGUF) or tokens per input (ONNX)
    # GGUF: generation slots, sequences of one llama.cpp context sharing one KV pool of n_ctx (edgekit serve's --slots).
    # ONNX: texts of the largest batch (serve's --batch-max). None: edgekit serve's default.
    parallel: int | None = None
    n_ubatch: int = PREFILL_CHUNK  # prompt tokens per compute step
    flash_attn: bool = FLASH_ATTENTION  # what edgekit's runtime runs with
    kv_type: str = "f16"
    daemon: bool = True  # add edgekit serve's own process (the model runs in a worker next to it)
    # ONNX: the worker splits a batch into micro-batches of at most this many padded tokens (serve's
    # --batch-max-tokens); None: no split.
    batch_max_tokens: int | None = None
    # ONNX: texts of the largest job the worker tokenizes at once (serve's --max-embedding-inputs); None: one batch.
    job_texts: int | None = None
    # GGUF: RAM for saved prompts in contexts' worth of KV cache (serve's --prompt-cache-contexts). None: serve's default.
    prompt_cache_contexts: float | None = None


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each term of the peak resident set, and their sum."""

    weights: int  # the model file as mapped (GGUF) or loaded with its pre-packed copy (ONNX)
    repacked: int  # interleaved copies ggml makes at load; their file pages are never read again
    kv_cache: int
    prompt_cache: int  # saved prompts' KV cells in RAM, at the cache's capacity (GGUF)
    compute: int
    runtime: int
    daemon: int  # edgekit serve's own process, next to the model's worker (0 without the daemon)
    total: int  # peak resident set on a machine without memory pressure (what `ps` shows)
    required: int  # what must stay resident: total minus the clean, evictable file pages of repacked tensors
    compute_reserved: int  # what llama.cpp reserves (it logs this); pages are touched only as used

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def kv_cells(n_ctx: int, parallel: int) -> int:
    """KV cache cells llama.cpp allocates: the whole context of every sequence, padded to 256."""
    total = n_ctx * parallel
    return -(-total // KV_PAD) * KV_PAD


def kv_cache_bytes(facts: ModelFacts, n_ctx: int, parallel: int = 1, kv_type: str = "f16") -> int:
    """2 (K and V) x cells x n_layer x n_head_kv x head_dim x bytes per element (docs/device-facts.md, Memory)."""
    return int(kv_cells(n_ctx, parallel) * facts.kv_bytes_per_token(KV_TYPE_BYTES[kv_type]))


def compute_buffer_bytes(facts: ModelFacts, settings: RunSettings, n_outputs: int | None = None) -> int:
    """llama.cpp's compute buffer for a full micro-batch against a full KV cache.

    ggml's graph allocator reuses memory, so the buffer is the largest set of tensors alive at once: in the
    feed-forward block (gate, up, their product and four hidden-state-sized tensors, next to the n_kv x n_tokens
    attention mask every layer reads: f16 with flash attention, f32 without), in attention without flash attention
    (the n_kv x n_tokens x n_head score matrix, softmaxed in place, the mask and ~6 hidden-state-sized tensors), or at
    the output (logits of every requested output row; the mask is dead by then). ``n_outputs`` defaults to one row
    per sequence (generation); what llama.cpp reserves, and logs, is for its n_outputs_max rows.

    With flash attention this gives llama.cpp's logged buffer to 0.01 MiB for five llama shapes (the widths of
    SmolLM2-135M and -360M, Qwen2-0.5B, TinyLlama-1.1B and Llama-3.2-1B) at n_ctx 512 / 2048 / 8192; without it,
    0.2-5.5 % above (docs/device-facts.md, "Constants edgekit measured itself").
    """
    tokens = min(settings.n_ubatch, settings.n_ctx * (settings.parallel or 1))
    n_kv = kv_cells(settings.n_ctx, settings.parallel or 1)
    hidden = tokens * facts.n_embd * 4
    mask = tokens * n_kv * (2 if settings.flash_attn else 4)
    n_ff = facts.n_ff or 4 * facts.n_embd
    feed_forward = tokens * 3 * n_ff * 4 + 4 * hidden + mask
    attention = 0 if settings.flash_attn else tokens * n_kv * facts.n_head * 4 + mask + 6 * hidden
    rows = (settings.parallel or 1) if n_outputs is None else n_outputs
    output = rows * facts.n_vocab * 4 + 2 * hidden
    return max(attention, feed_forward, output)


def work_buffer_bytes(facts: ModelFacts, settings: RunSettings) -> int:
    """ggml-cpu's work buffer (separate from the compute buffer, kept at its largest size).

    Without flash attention the softmaxed n_kv x n_tokens x n_head scores (f32) are converted to f16
    to be multiplied with the f16 V cache (ggml_graph_plan: MUL_MAT converts src1 to the weight's
    vec_dot_type). Measured: peak RSS exceeds the other terms by 3 / 8 / 36 MiB at n_ctx 512 / 2048 /
    8192 on SmolLM2-135M at n_ubatch 256; this term gives 2.3 / 9 / 36 MiB.
    """
    if settings.flash_attn:
        return 0
    tokens = min(settings.n_ubatch, settings.n_ctx * (settings.parallel or 1))
    return tokens * kv_cells(settings.n_ctx, settings.parallel or 1) * facts.n_head * 2


def repacked_bytes(facts: ModelFacts, isa: IsaFeatures | None) -> int:
    """Bytes of weights ggml copies into repacked layouts on this ISA (token embeddings never are)."""
    if isa is None:
        return 0
    total = 0
    for tensor in facts.tensors:
        multiple = repack_rows(tensor.ggml_type, isa)
        if multiple and tensor.name != "token_embd.weight" and tensor.rows % multiple == 0:
            total += tensor.nbytes
    return total


def llama_memory(facts: ModelFacts, settings: RunSettings, isa: IsaFeatures | None) -> tuple[int, int, int, int, int, int, int]:
    """llama.cpp's terms: (weights, repacked, kv_cache, prompt_cache, compute, compute_reserved, runtime without the
    daemon).

    Slots are sequences of one llama.cpp context sharing one unified KV pool of n_ctx cells
    (edgekit.runtime.llm_batch.BatchedGguf): one KV cache, one compute buffer (a decode step has one output row per
    slot), one vocabulary, whatever the number of slots.
    """
    slots = settings.parallel or serve_default("slots")
    one = replace(settings, parallel=1)
    repacked = repacked_bytes(facts, isa)
    kv = kv_cache_bytes(facts, one.n_ctx, 1, one.kv_type)
    contexts = settings.prompt_cache_contexts
    if contexts is None:
        contexts = serve_default("prompt_cache_contexts") if settings.daemon else 0.0  # a feature of serve's workers
    prompt_cache = int(contexts * kv)  # edgekit.runtime.llm.GgufModel sizes its LlamaRAMCache the same way
    compute = compute_buffer_bytes(facts, one, n_outputs=slots) + work_buffer_bytes(facts, one)
    # llama.cpp reserves output rows for its n_outputs_max: the batched engine's sequences; a lone context (one slot)
    # keeps llama.cpp's default of every row of a micro-batch.
    rows = sequences_for(slots) if slots > 1 else one.n_ubatch
    reserved = compute_buffer_bytes(facts, one, n_outputs=min(one.n_ubatch, one.n_ctx, rows))
    runtime = LLAMA_RUNTIME_BASE + LLAMA_VOCAB_BYTES_PER_TOKEN * facts.n_vocab
    return facts.weights_bytes, repacked, kv, prompt_cache, compute, reserved, runtime


def encoder_batch(facts: ModelFacts, settings: RunSettings) -> tuple[int, int]:
    """(texts, tokens per text) of the largest batch an encoder runs: at most ``parallel`` texts, split so that
    texts x tokens stays within ``batch_max_tokens`` (edgekit.serve.runners.EncoderRunner.chunks)."""
    seq = min(settings.n_ctx, facts.max_length or settings.n_ctx)
    texts = settings.parallel or serve_default("batch_max")
    if settings.batch_max_tokens is not None:
        texts = max(1, min(texts, settings.batch_max_tokens // seq))
    return texts, seq


def ort_memory(facts: ModelFacts, settings: RunSettings, isa: IsaFeatures | None) -> tuple[int, int, int, int, int, int, int]:
    """ONNX Runtime's terms (no KV cache, no saved prompts, nothing repacked out of a mapping), in the order of
    ``llama_memory``."""
    n_ff = facts.n_ff or 4 * facts.n_embd
    texts, seq = encoder_batch(facts, settings)
    compute = int(texts * seq * ORT_FLOATS_PER_TOKEN_UNIT * (2 * facts.n_embd + n_ff) * 4)
    compute += max(texts, settings.job_texts or 0) * seq * ENCODER_JOB_BYTES_PER_TOKEN
    weights = int(facts.weights_bytes * ORT_WEIGHT_COPIES)
    worker = ENCODER_WORKER_EXTRA if settings.daemon else 0
    return weights, 0, 0, 0, compute, compute, ORT_RUNTIME_BASE + ORT_SESSION_EXTRA + worker


def estimate_memory(facts: ModelFacts, settings: RunSettings, isa: IsaFeatures | None = None) -> MemoryEstimate:
    """Peak resident bytes of one runtime process serving ``facts`` with ``settings`` on a CPU with ``isa``."""
    daemon = DAEMON_RSS if settings.daemon else 0
    weights, repacked, kv, prompt_cache, compute, reserved, runtime = FORMATS[facts.format].hook("memory")(facts, settings, isa)
    total = weights + repacked + kv + prompt_cache + compute + runtime + daemon
    # Repacked tensors are copied out of the mapping at load; the kernel can drop those clean file
    # pages under memory pressure without any cost, so they do not count against the board's RAM.
    required = total - repacked
    return MemoryEstimate(weights=weights, repacked=repacked, kv_cache=kv, prompt_cache=prompt_cache, compute=compute, runtime=runtime,
                          daemon=daemon, total=total, required=required, compute_reserved=reserved)


def llama_worker_bytes(facts: ModelFacts, n_ctx: int, n_ubatch: int, slots: int, batch_max: int,
                       batch_max_tokens: int, job_texts: int | None = None, prompt_cache_contexts: float | None = None) -> int:
    """What edgekit serve charges its budget for a GGUF worker: one context serving ``slots`` sequences and its saved
    prompts, without the daemon process."""
    served = estimate_memory(facts, RunSettings(n_ctx=n_ctx, parallel=slots, n_ubatch=n_ubatch, daemon=True,
                                                prompt_cache_contexts=prompt_cache_contexts))
    return served.required - served.daemon


def ort_worker_bytes(facts: ModelFacts, n_ctx: int, n_ubatch: int, slots: int, batch_max: int,
                     batch_max_tokens: int, job_texts: int | None = None, prompt_cache_contexts: float | None = None) -> int:
    """What edgekit serve charges its budget for an ONNX worker: its largest micro-batch (``batch_max`` texts of the
    bundle's max_length, split to stay within ``batch_max_tokens``) and its largest job (``job_texts``, default
    serve's --max-embedding-inputs, tokenized at once), without the daemon process."""
    run = RunSettings(n_ctx=facts.max_length or facts.context_length, parallel=batch_max, daemon=True,
                      batch_max_tokens=batch_max_tokens, job_texts=job_texts or serve_default("max_embedding_inputs"))
    served = estimate_memory(facts, run)
    return served.required - served.daemon
