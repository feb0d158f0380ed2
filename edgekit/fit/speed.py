"""Speed from a model of the kernels, calibrated by measured points.

Decode reads every streamed weight once per token and runs ggml-cpu's matrix-vector kernels over
them: its time is bytes / memory bandwidth plus the cycles those kernels spend per weight (a table
per instruction set and weight type, counted from the kernels), plus attention over the context so
far (its KV cache bytes and kernels), plus a per-token overhead. Memory and kernel time are added,
not overlapped: in these loops a core that unpacks and multiplies a block is not streaming the next
one fast enough to hide it (measured: Q4_K_M at 0.73x the bytes of Q8_0 decodes only ~1.1x faster;
docs/device-facts.md). Prompt processing is matrix-matrix work: per token, the operations of every weight
at the share of the core's peak its kernel family reaches for that weight type (catalog data,
devices/kernels/prompt.yaml), plus attention over the prompt so far; per batch of n_ubatch tokens, one
pass of the weights through the cores at a decode step's cost. A short prompt therefore runs at a
lower rate than pp512 (the weights are streamed for few tokens), a long one too (attention grows). ONNX
Runtime encoders pay a pass over the weights per call plus work per token, at costs that depend on
how the model was quantized.

The model gives the shape; a board's calibration points give the scale: predicted times are divided
by the geometric mean of model / measured time over the points that apply (the board's own, else
boards with the same core, else all boards of the catalog). A board's decode points measured deep
into a context scale the attention term on their own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from edgekit.fit.facts import ModelFacts
from edgekit.fit.quant import FALLBACK, FILE_TYPES, GGML_TYPES, PUBLISHED_BPW
from edgekit.formats import FORMATS
from edgekit.schema.device import CalibrationPoint, Device, load_kernel_families


# Peak multiply-accumulate throughput per core and cycle, counted as 2 operations per MAC:
# int8 dot products (the path ggml's quantized matmuls and ORT's int8 kernels take) and fp32 FMA.
# Derived from each core's SIMD width and issue rate (Arm Software Optimization Guides; Intel
# optimization manual for Gracemont), so they are estimates; calibration absorbs the rest.
#
# ``kernel_ops_per_cycle``: instructions per cycle a core sustains in ggml's dot-product loops (SIMD,
# loads and the scalar scale arithmetic together), from the same guides' issue widths and pipes.
@dataclass(frozen=True)
class CoreType:
    int8_ops_per_cycle: float
    f32_ops_per_cycle: float
    kernel_ops_per_cycle: float
    note: str


CORE_TYPES: dict[str, CoreType] = {
    # A53: 128-bit NEON ops take two cycles on its 64-bit datapath and are ~60 % of the kernels'
    # instructions; loads and scalar work pair with them: 1 / (2 x 0.6) = ~0.8 instructions per cycle.
    "cortex-a53": CoreType(16, 4, 0.8, "in-order dual issue, 64-bit NEON datapath (128-bit ops every other cycle); no SDOT"),
    "cortex-a72": CoreType(32, 8, 2.0, "3-wide decode, two 64-bit NEON pipes (128-bit ops every other cycle), "
                                       "integer multiplies on one of them; no SDOT"),
    "cortex-a76": CoreType(64, 16, 3.0, "4-wide decode, two 128-bit NEON pipes plus two load pipes; "
                                        "SDOT = 16 int8 MACs per instruction"),
    "cortex-a78ae": CoreType(64, 16, 3.0, "same NEON back end as Cortex-A76/A78"),
    # Gracemont: a 256-bit AVX2 op runs as two 128-bit halves on three vector pipes (1.5 per cycle)
    # while loads use two load ports beside them; ~30 % of the kernels' instructions are loads: ~2 per cycle.
    "gracemont": CoreType(64, 16, 2.0, "two 128-bit vector FMA/dot units (AVX2 256-bit ops split in halves), AVX-VNNI"),
    # x86-64-v3: Zen 2/3 dispatch 6 instructions per cycle to 4 vector pipes, 3 load ports and the
    # integer ALUs (scalar scale look-ups); Skylake renames 4 (5 with fusion): ~5 sustained.
    "x86-64-v3": CoreType(128, 32, 5.0, "two 256-bit FMA ports, AVX2 int8 via vpmaddubsw (Skylake/Zen 2 class and newer)"),
}

# Instructions ggml-cpu's matrix-vector kernels execute per 32 weights, by kernel family (picked from
# the ISA flags, as ggml does) and weight type: the block loads, the unpacking of sub-byte weights and
# their high bits, the int8 dot products and the float scale arithmetic, per-super-block work amortized.
# Counted from ggml/src/ggml-cpu/arch/x86/quants.c and arch/arm/quants.c (ggml_vec_dot_*_q8_*) and
# repack.cpp (the interleaved gemv kernels of the types memory.repack_rows names); rounded estimates.
# Without SDOT (Cortex-A53/A72) ggml emulates each vdotq_s32 with 2 SMULL + 2 SADDLP + 2 ADD: +5 per
# emulated dot, two per 32 weights. Q5_0/Q5_1 on NEON spread the high bits through a 256-entry table,
# eight scalar look-ups per block. F16 without Arm FP16 arithmetic converts both sides to f32 first.
KERNEL_OPS: dict[str, dict[str, float]] = {
    "avx2": {  # Q4_0, IQ4_NL, Q4_K: 8x8 interleaved gemv after repacking
        "Q8_0": 16, "Q4_0": 14, "Q4_1": 22, "Q5_0": 27, "Q5_1": 28, "IQ4_NL": 14,
        "Q2_K": 14, "Q3_K": 18, "Q4_K": 10, "Q5_K": 14, "Q6_K": 15, "F16": 16, "BF16": 16, "F32": 12,
    },
    "neon-dotprod": {  # Q4_0, IQ4_NL, Q4_K: interleaved gemv after repacking
        "Q8_0": 12, "Q4_0": 8, "Q4_1": 14, "Q5_0": 32, "Q5_1": 33, "IQ4_NL": 9,
        "Q2_K": 13, "Q3_K": 18, "Q4_K": 9, "Q5_K": 14, "Q6_K": 18, "F16": 12, "BF16": 24, "F32": 16,
    },
    "neon": {  # no repacking without SDOT
        "Q8_0": 22, "Q4_0": 22, "Q4_1": 24, "Q5_0": 42, "Q5_1": 43, "IQ4_NL": 22,
        "Q2_K": 23, "Q3_K": 28, "Q4_K": 21, "Q5_K": 24, "Q6_K": 28, "F16": 32, "BF16": 32, "F32": 16,
    },
}
# The AVX2 kernels of these types accumulate every block into one register with a fused multiply-add:
# a block cannot finish faster than the FMA latency, 4 cycles on Skylake/Zen 3 (Agner Fog, instruction
# tables). The NEON kernels use two accumulators and the repacked/K-quant kernels integer adds.
SERIAL_FMA_TYPES = {"Q8_0", "Q4_1", "Q5_0", "Q5_1"}
FMA_LATENCY_CYCLES = 4.0
# Attention without flash attention, per layer, head and cached token: a head_dim-long f16 dot product
# for the score (one kernel call per cached token: reducing four accumulators and the call cost about
# VEC_DOT_CALL_OPS instructions on top of the dot), head_dim multiply-adds of the softmaxed score with V
# (long f16 dots over the context), and the softmax itself (scale, mask, max, exp via ggml_v_expf at
# ~3 instructions per element, sum, normalize, conversion to f16: ~SOFTMAX_OPS). ggml-cpu ops.cpp.
VEC_DOT_CALL_OPS = 20.0
SOFTMAX_OPS = 4.0


def kernel_family(device: Device) -> str:
    """Which of ggml-cpu's kernel sets runs on this CPU."""
    isa = device.cpu.isa
    if isa.avx2:
        return "avx2"
    return "neon-dotprod" if isa.dotprod else "neon"


def prompt_efficiency(device: Device, ggml_type: str) -> float:
    """Share of the core's peak ggml-cpu's matrix-matrix kernels reach on ``ggml_type`` (devices/kernels/prompt.yaml)."""
    return load_kernel_families()[kernel_family(device)].efficiency(ggml_type)


FLOAT_TYPES = {"F32", "F16", "BF16"}

# Decode reads weights at about the STREAM copy rate (a copy also pays write-allocate traffic that a
# read stream does not): Raspberry Pi 5 decodes TinyLlama Q8_0 at 9 tok/s x 1.17 GB = 10.5 GB/s
# (justine.lol/matmul; docs/device-facts.md) against the 10.2 GB/s copy rate its profile assumes
# (devices/rpi-5-8gb.yaml: an estimate, 60 % of the LPDDR4X peak). Kernel time is modelled separately.
DECODE_BANDWIDTH_EFFICIENCY = 1.0
# Per-token work outside the matrix kernels: thread barriers per graph node (~10 nodes per layer)
# and the Python generate loop; in microseconds at 1 GHz, scaled by the clock.
OVERHEAD_US_GHZ_PER_LAYER = 20.0
OVERHEAD_US_GHZ_PER_TOKEN = 600.0
# onnxruntime session.run fixed cost (input binding, thread pool wake-up), microseconds at 1 GHz.
ENCODER_OVERHEAD_US_GHZ = 600.0


@dataclass(frozen=True)
class OnnxScheme:
    """ONNX Runtime's matrix kernels for one quantization scheme of an encoder.

    A call costs ``call_cycles_per_weight`` (quantizing or packing activations against every weight,
    dispatching the scheme's graph nodes) plus, per token, 2 operations per weight at
    ``efficiency`` x the core's peak for the path the kernels take (int8 dot products or fp32 FMA).
    """

    int8: bool
    call_cycles_per_weight: float
    efficiency: float
    note: str


# Measured on x86-64 AVX2 (no VNNI) with scripts/bench_encoder.py (docs/device-facts.md): batch-1
# latency of a 5- and a 23-token sentence, 2 threads. The slope between
# the two gives the per-token cost, the intercept less ENCODER_OVERHEAD_US_GHZ the per-call cost,
# both in cycles summed over the threads for all-MiniLM-L6-v2's 10.6 M matrix weights. Other cores
# keep the efficiencies (their own peaks differ), an estimate their calibration points correct.
ONNX_SCHEMES: dict[str, OnnxScheme] = {
    "fp32": OnnxScheme(False, 0.92, 0.71, "MatMul: MLAS SGEMM"),
    "int8-dynamic": OnnxScheme(True, 0.42, 0.24, "DynamicQuantizeLinear + MatMulInteger (per-tensor or per-channel "
                                                "weights): MLAS u8s8 GEMM, 32 graph nodes per layer"),
    "int8-dynamic-block": OnnxScheme(True, 0.44, 0.13, "MatMulNBits, 8-bit blocks, int8 compute (accuracy level 4): "
                                                      "activations quantized per block"),
    "int8-static": OnnxScheme(False, 3.06, 0.54, "QDQ: DequantizeLinear of every weight per call, then fp32 MatMul"),
}


def onnx_scheme(quant: str) -> OnnxScheme:
    """The kernels of an ONNX quantization label (``int8-dynamic-block128``, ``int8-static-per-channel``, ``fp32``)."""
    if quant.startswith("int8-dynamic-block"):
        return ONNX_SCHEMES["int8-dynamic-block"]
    if quant.startswith("int8-static"):
        return ONNX_SCHEMES["int8-static"]
    if quant.startswith("int8"):  # "int8", "int8-dynamic", "int8-dynamic-per-channel": quantize_dynamic's MatMulInteger
        return ONNX_SCHEMES["int8-dynamic"]
    return ONNX_SCHEMES["fp32"]

Kind = Literal["decode", "prompt", "encoder"]


@dataclass(frozen=True)
class Workload:
    """What one token (or one encoder call) costs: bytes streamed, operations, kernels used."""

    streamed_bytes: float  # weights read per decoded token
    matrix_weights: float  # weights multiplied per token
    float_path: bool  # F16/F32 weights: float kernels instead of int8 dot products
    n_layer: int
    weights_by_type: tuple[tuple[str, float], ...] = ()  # (ggml type, weights) multiplied per decoded token
    kv_bytes_per_token: float = 0.0
    attention_heads: int = 0  # layers x query heads: score dot products per token of context
    head_dim: int = 0
    onnx_quant: str = ""  # ONNX encoders: the quantization label (selects ONNX_SCHEMES)

    @property
    def attention_ops_per_ctx_token(self) -> float:
        """Multiply-add operations (2 per MAC) of attention per token of context, for prompt processing."""
        return 4.0 * self.attention_heads * self.head_dim


def _is_float(quant: str) -> bool:
    base = FILE_TYPES.get(quant, quant)
    return base in FLOAT_TYPES or base not in GGML_TYPES


def _main_type(quant: str, row: int | None = None) -> str:
    """The ggml type most matrices of a file type get; with a known row width, after llama.cpp's block fallback."""
    base = FILE_TYPES.get(quant, quant)
    if base not in GGML_TYPES:
        return "F16"
    if row and row % GGML_TYPES[base][0]:
        base = FALLBACK.get(base, base)
    return base


def workload_of(facts: ModelFacts) -> Workload:
    """The per-token work of a model from its facts, as its format costs it."""
    return FORMATS[facts.format].hook("workload")(facts)


def onnx_workload(facts: ModelFacts) -> Workload:
    """ONNX encoders: the matrix work, with kernels chosen by the quantization label (ONNX_SCHEMES)."""
    return replace(gguf_workload(facts), onnx_quant=facts.quant)


def gguf_workload(facts: ModelFacts) -> Workload:
    """The per-token work of a model from its facts (per-tensor types when known)."""
    if facts.tensors:
        streamed = [t for t in facts.tensors if facts.tied_embeddings or t.name != "token_embd.weight"]
        weights = sum(t.n_elements for t in streamed)
        float_path = all(t.ggml_type in FLOAT_TYPES for t in streamed)
        by_type: dict[str, float] = {}
        for t in streamed:
            by_type[t.ggml_type] = by_type.get(t.ggml_type, 0) + t.n_elements
    else:
        float_path = _is_float(facts.quant)  # GGUF; ONNX encoders are costed by onnx_quant
        weights = facts.matrix_parameters
        by_type = {_main_type(facts.quant, facts.n_embd): weights}
    return Workload(
        streamed_bytes=facts.streamed_bytes_per_token, matrix_weights=weights, float_path=float_path,
        n_layer=facts.n_layer, weights_by_type=tuple(sorted(by_type.items())),
        kv_bytes_per_token=facts.kv_bytes_per_token(), attention_heads=facts.n_layer * facts.n_head,
        head_dim=facts.head_dim_k,
    )


def bits_per_weight_of(quant: str) -> float:
    """Whole-file bits per weight of a file type: published where known, else its main block type."""
    if quant in PUBLISHED_BPW:
        return PUBLISHED_BPW[quant]
    base = FILE_TYPES.get(quant, quant)
    if base in GGML_TYPES:
        block, size = GGML_TYPES[base]
        return 8 * size / block
    return {"int8": 8.25, "fp32": 32.0}.get(quant.split("-")[0], 16.0)


def workload_of_point(point: CalibrationPoint) -> Workload:
    """The work of a published measurement, from what the source reports (size, parameters, quant)."""
    return FORMATS[point.format].hook("point_workload")(point)


def gguf_point_workload(point: CalibrationPoint) -> Workload:
    """A GGUF point: its hidden size tells which matrices fall back from K-quant blocks (a 960-wide
    SmolLM-360M row does not divide into 256: Q4_K_M is mostly Q5_0 there)."""
    weights_bytes = point.weights_bytes or point.parameters * bits_per_weight_of(point.quant) / 8
    return _point_workload(point, weights_bytes, point.parameters, _main_type(point.quant, point.hidden_size))


def onnx_point_workload(point: CalibrationPoint) -> Workload:
    """An ONNX encoder point: BERT-style, embeddings are lookups; kernels from the quantization label."""
    weights_bytes = point.weights_bytes or point.parameters * bits_per_weight_of(point.quant) / 8
    matrix_weights = point.parameters
    if point.n_layer and point.hidden_size:
        matrix_weights = 12 * point.n_layer * point.hidden_size**2
        weights_bytes = weights_bytes * matrix_weights / point.parameters  # the matrices' share, as for bundles
    work = _point_workload(point, weights_bytes, matrix_weights, _main_type(point.quant))
    return replace(work, onnx_quant=point.quant)


def _point_workload(point: CalibrationPoint, weights_bytes: float, matrix_weights: float, main: str) -> Workload:
    float_path = _is_float(point.quant)  # GGUF; ONNX encoders are costed by onnx_quant
    # Layer count when the source does not give it: ~4.5 per doubling of size above 10M (SmolLM2-135M: 30,
    # TinyLlama-1.1B: 22, Llama-3.2-3B: 28 are given; this is only the per-token overhead term).
    n_layer = point.n_layer or max(int(round(4.5 * math.log2(point.parameters / 1e7))), 4)
    attention = {}
    if point.context_tokens:  # the schema requires the attention shape then; K and V cached as f16
        attention = dict(kv_bytes_per_token=n_layer * point.n_head_kv * 2 * point.head_dim * 2.0,
                         attention_heads=n_layer * point.n_head, head_dim=point.head_dim)
    return Workload(streamed_bytes=weights_bytes, matrix_weights=matrix_weights, float_path=float_path,
                    n_layer=n_layer, weights_by_type=((main, matrix_weights),), **attention)


@dataclass(frozen=True)
class DecodeTerms:
    """Seconds per generated token (they add up): streaming the weights, the weight kernels' cycles,
    attention over the context so far (reading its KV cache and the attention kernels), fixed work."""

    memory_s: float
    compute_s: float
    attention_s: float
    overhead_s: float


def block_cycles(ggml_type: str, device: Device) -> float:
    """Cycles one core spends on 32 weights of ``ggml_type`` in ggml-cpu's matrix-vector kernel."""
    family = kernel_family(device)
    ops = KERNEL_OPS[family].get(ggml_type, KERNEL_OPS[family]["F16"])
    cycles = ops / CORE_TYPES[device.cpu.core_type].kernel_ops_per_cycle
    if family == "avx2" and ggml_type in SERIAL_FMA_TYPES:
        cycles = max(cycles, FMA_LATENCY_CYCLES)
    return cycles


def decode_terms(work: Workload, device: Device, threads: int | None = None, n_past: int = 0) -> DecodeTerms:
    """The model's terms of generating one token at context position ``n_past``."""
    bandwidth = device.memory_bandwidth.gb_s * 1e9 * DECODE_BANDWIDTH_EFFICIENCY
    by_type = work.weights_by_type or (("F16" if work.float_path else "Q8_0", work.matrix_weights),)
    matrix_cycles = sum(n / 32 * block_cycles(t, device) for t, n in by_type)
    f16_ops = KERNEL_OPS[kernel_family(device)]["F16"]
    per_head_ops = 2 * f16_ops * work.head_dim / 32 + VEC_DOT_CALL_OPS + SOFTMAX_OPS
    attention_cycles = work.attention_heads * n_past * per_head_ops / CORE_TYPES[device.cpu.core_type].kernel_ops_per_cycle
    hz = min(threads or device.cpu.cores, device.cpu.cores) * device.cpu.clock_ghz * 1e9
    overhead_s = (OVERHEAD_US_GHZ_PER_LAYER * work.n_layer + OVERHEAD_US_GHZ_PER_TOKEN) * 1e-6 / device.cpu.clock_ghz
    return DecodeTerms(memory_s=work.streamed_bytes / bandwidth, compute_s=matrix_cycles / hz,
                       attention_s=work.kv_bytes_per_token * n_past / bandwidth + attention_cycles / hz, overhead_s=overhead_s)


def roofline_decode_tok_s(work: Workload, device: Device, threads: int | None = None, n_past: int = 0,
                          calibration: Calibration | None = None) -> float:
    """Tokens/s generating one token at context position ``n_past``.

    Memory and kernel time add; a calibration divides both by the board's measured factor (its
    bandwidth and its kernels' speed are not told apart by a measured rate) and the attention time by
    its attention factor. The fixed per-token overhead is not scaled.
    """
    t = decode_terms(work, device, threads, n_past)
    k, k_attention = (calibration.factor, calibration.attention_scale) if calibration else (1.0, 1.0)
    return 1.0 / ((t.memory_s + t.compute_s) / k + t.attention_s / k_attention + t.overhead_s)


@dataclass(frozen=True)
class PrefillTerms:
    """Seconds to process a prompt (they add up): the weight kernels' batched work per token, attention over the
    prompt so far, and per batch of n_ubatch tokens one pass of the weights through the cores as a decode step
    makes it (streamed from memory, the activations quantized and the kernels set up for the batch; on edgekit's
    build machine a batch's fixed cost and a decode step both took 10.4 ms, docs/device-facts.md) and its fixed work."""

    compute_s: float
    attention_s: float
    weight_pass_s: float
    overhead_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.attention_s + self.weight_pass_s + self.overhead_s


def prefill_terms(work: Workload, device: Device, threads: int | None = None, n_tokens: int = 512,
                  n_ubatch: int = 512, n_past: int = 0) -> PrefillTerms:
    """The model's terms of processing an ``n_tokens`` prompt in batches of ``n_ubatch`` after ``n_past`` cached tokens."""
    core = CORE_TYPES[device.cpu.core_type]
    hz = min(threads or device.cpu.cores, device.cpu.cores) * device.cpu.clock_ghz * 1e9
    by_type = work.weights_by_type or (("F16" if work.float_path else "Q8_0", work.matrix_weights),)
    cycles_per_token = sum(
        2 * n / ((core.f32_ops_per_cycle if t in FLOAT_TYPES else core.int8_ops_per_cycle) * prompt_efficiency(device, t))
        for t, n in by_type)
    # Scores and the weighted sum of V: f16 K/V against f32 queries, costed like F16 weights; each token of the
    # prompt attends on average to n_past plus half the prompt.
    attention_ops = work.attention_ops_per_ctx_token * n_tokens * (n_past + n_tokens / 2)
    attention_cycles = attention_ops / (core.f32_ops_per_cycle * prompt_efficiency(device, "F16"))
    passes = -(-n_tokens // n_ubatch)
    decode = decode_terms(work, device, threads)
    return PrefillTerms(compute_s=n_tokens * cycles_per_token / hz, attention_s=attention_cycles / hz,
                        weight_pass_s=passes * (decode.memory_s + decode.compute_s), overhead_s=passes * decode.overhead_s)


def prefill_seconds(work: Workload, device: Device, threads: int | None = None, n_tokens: int = 512,
                    n_ubatch: int = 512, calibration: Calibration | None = None,
                    decode_calibration: Calibration | None = None) -> float:
    """Seconds to process an ``n_tokens`` prompt. The prompt calibration divides the batched kernel and attention
    time by its factor; the decode calibration the weight passes (they cost what a decode step's weights cost)."""
    t = prefill_terms(work, device, threads, n_tokens, n_ubatch)
    k = calibration.factor if calibration else 1.0
    k_pass = decode_calibration.factor if decode_calibration else 1.0
    return (t.compute_s + t.attention_s) / k + t.weight_pass_s / k_pass + t.overhead_s


def roofline_encoder_ms(work: Workload, device: Device, seq_len: int, batch: int = 1, threads: int | None = None) -> float:
    """Uncalibrated milliseconds of one ONNX Runtime encoder call on ``batch`` inputs of ``seq_len`` tokens."""
    scheme = onnx_scheme(work.onnx_quant)
    tokens = batch * seq_len
    ops = tokens * (2 * work.matrix_weights + work.attention_ops_per_ctx_token * seq_len)
    core = CORE_TYPES[device.cpu.core_type]
    cores = min(threads or device.cpu.cores, device.cpu.cores)
    peak_per_cycle = core.int8_ops_per_cycle if scheme.int8 else core.f32_ops_per_cycle
    cycles = work.matrix_weights * scheme.call_cycles_per_weight + ops / (peak_per_cycle * scheme.efficiency)
    compute_s = cycles / (cores * device.cpu.clock_ghz * 1e9)
    memory_s = work.streamed_bytes / (device.memory_bandwidth.gb_s * 1e9 * DECODE_BANDWIDTH_EFFICIENCY)
    overhead_s = ENCODER_OVERHEAD_US_GHZ * 1e-6 / device.cpu.clock_ghz
    return 1e3 * (max(compute_s, memory_s) + overhead_s)


# -- calibration -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """Scale applied to the model of one kind of speed on one board, and what it rests on.

    ``factor`` is measured / modelled speed: decode's memory and kernel time, prompt processing's and
    encoders' compute, are divided by it. Decode's attention time is divided by ``attention_factor``:
    fitted on the board's own points measured deep into a context when it has some (how fast a board
    attends over a long KV cache depends on its caches more than on its weight kernels), else ``factor``.
    """

    kind: Kind
    factor: float
    scope: Literal["device", "core", "catalog", "none"]
    points: tuple[str, ...]
    attention_factor: float | None = None  # None: the same as ``factor``
    attention_points: tuple[str, ...] = ()

    @property
    def attention_scale(self) -> float:
        return self.factor if self.attention_factor is None else self.attention_factor


# A deep point prices attention only when attention is at least this share of its measured time:
# below it, timing noise in the weights' part would land several times over in the attention factor.
MIN_ATTENTION_SHARE = 0.15


def point_kinds(point: CalibrationPoint) -> list[Kind]:
    kinds: list[Kind] = []
    if point.decode_tok_s is not None:
        kinds.append("decode")
    if point.prompt_tok_s is not None:
        kinds.append("prompt")
    if point.latency_ms is not None:
        kinds.append("encoder")
    return kinds


def attention_ratio(point: CalibrationPoint, device: Device, factor: float) -> float | None:
    """Measured / modelled attention speed of a deep decode point, once ``factor`` has priced its weights'
    part; None when attention is under MIN_ATTENTION_SHARE of the measured time (too little to price)."""
    t = decode_terms(workload_of_point(point), device, point.threads, point.context_tokens)
    measured = 1.0 / point.decode_tok_s
    available = measured - t.overhead_s - (t.memory_s + t.compute_s) / factor
    if available < MIN_ATTENTION_SHARE * measured:
        return None
    return t.attention_s / available


def point_ratio(point: CalibrationPoint, device: Device, kind: Kind) -> float:
    """Measured / modelled speed of a point (for decode: of its memory, kernel and attention time, overhead aside)."""
    work = workload_of_point(point)
    if kind == "decode":
        t = decode_terms(work, device, point.threads, point.context_tokens)
        available = max(1.0 / point.decode_tok_s - t.overhead_s, 1e-9)
        return (t.memory_s + t.compute_s + t.attention_s) / available
    if kind == "prompt":
        t = prefill_terms(work, device, point.threads, point.prompt_tokens, max(point.prompt_tokens, 512))
        available = max(point.prompt_tokens / point.prompt_tok_s - t.weight_pass_s - t.overhead_s, 1e-9)
        return (t.compute_s + t.attention_s) / available
    return roofline_encoder_ms(work, device, point.seq_len, 1, point.threads) / point.latency_ms


def point_prediction(point: CalibrationPoint, device: Device, kind: Kind, calibration: Calibration | None = None) -> float:
    """A point's speed as the (calibrated) model predicts it: tok/s, or ms for encoders."""
    work = workload_of_point(point)
    factor = calibration.factor if calibration else 1.0
    if kind == "decode":
        return roofline_decode_tok_s(work, device, point.threads, point.context_tokens, calibration)
    if kind == "prompt":
        return point.prompt_tokens / prefill_seconds(work, device, point.threads, point.prompt_tokens,
                                                     max(point.prompt_tokens, 512), calibration)
    return roofline_encoder_ms(work, device, point.seq_len, 1, point.threads) / factor


def current_kernels(point: CalibrationPoint, device: Device) -> bool:
    """Whether a prompt point was measured with the matrix kernels the model describes (not an older llama.cpp).

    Points without a build date (this host's own measurements) count as current."""
    since = load_kernel_families()[kernel_family(device)].kernels_since
    return point.build_date is None or point.build_date >= since


def point_label(device: Device, point: CalibrationPoint) -> str:
    depth = f" at {point.context_tokens} tokens of context" if point.context_tokens else ""
    return f"{device.id}: {point.model} {point.quant}{depth}"


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def calibrate(device: Device, kind: Kind, catalog: Iterable[Device] = (), exclude: CalibrationPoint | None = None) -> Calibration:
    """Geometric mean of measured / modelled speed over the points that apply to ``device``.

    Own points first; else points of boards with the same core type; else all boards; else 1.
    Decode points measured deep into a context set the attention factor, from the board's own only;
    a board with no short-context decode point uses them for its single factor instead.
    ``exclude`` leaves one point out (used to test the model on the points themselves).
    """
    def ratios(devices: Iterable[Device]) -> tuple[list[float], list[str]]:
        values, labels = [], []
        for d in devices:
            for p in d.calibration:
                if p is exclude or kind not in point_kinds(p):
                    continue
                if kind == "decode" and p.context_tokens and _short_decode_points(d, exclude):
                    continue
                if kind == "prompt" and not current_kernels(p, d):
                    continue
                values.append(point_ratio(p, d, kind))
                labels.append(point_label(d, p))
        return values, labels

    others = [d for d in catalog if d.id != device.id]
    for scope, devices in (
        ("device", [device]),
        ("core", [d for d in others if d.cpu.core_type == device.cpu.core_type]),
        ("catalog", others),
    ):
        values, labels = ratios(devices)
        if values:
            calibration = Calibration(kind=kind, factor=_geomean(values), scope=scope, points=tuple(labels))
            return _with_attention(calibration, device, exclude)
    return _with_attention(Calibration(kind=kind, factor=1.0, scope="none", points=()), device, exclude)


def _short_decode_points(device: Device, exclude: CalibrationPoint | None) -> list[CalibrationPoint]:
    return [p for p in device.calibration if p.decode_tok_s is not None and not p.context_tokens and p is not exclude]


def _with_attention(calibration: Calibration, device: Device, exclude: CalibrationPoint | None) -> Calibration:
    """The board's deep decode points price attention, when its short ones priced the weights."""
    if calibration.kind != "decode" or not _short_decode_points(device, exclude):
        return calibration
    deep = [p for p in device.calibration if p.context_tokens and p is not exclude]
    priced = [(p, r) for p in deep if (r := attention_ratio(p, device, calibration.factor)) is not None]
    if not priced:
        return calibration
    return replace(calibration, attention_factor=_geomean([r for _, r in priced]),
                   attention_points=tuple(point_label(device, p) for p, _ in priced))


def same_soc(a: Device, b: Device) -> bool:
    """Whether two boards are the same chip as far as the speed model can tell: core type, cores, clock and
    memory bandwidth (e.g. the 4, 8 and 16 GB Raspberry Pi 5)."""
    return (a.cpu.core_type, a.cpu.cores, a.cpu.clock_ghz, a.memory_bandwidth.gb_s) == \
        (b.cpu.core_type, b.cpu.cores, b.cpu.clock_ghz, b.memory_bandwidth.gb_s)


def soc_calibrations(device: Device, kind: Kind, catalog: Iterable[Device]) -> dict[str, Calibration]:
    """The calibration each board with ``device``'s SoC (``device`` included) gets from its own points.

    Their published measurements differ (other engines, versions, cooling), so one chip gets several
    factors; `fit` reports the spread of its prediction over them as a band instead of hiding it.
    """
    catalog = list(catalog)
    boards = [device] + [d for d in catalog if d.id != device.id and same_soc(d, device)]
    return {board.id: calibrate(board, kind, catalog) for board in boards}
