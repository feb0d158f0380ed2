"""Speed from a roofline, calibrated by measured points.

Decode reads every streamed weight (and the KV cache so far) once per token: its time is the larger
of bytes / memory bandwidth and operations / compute, plus a per-token overhead. Prompt processing
and encoders are matrix-matrix work and bound by compute. The roofline gives the shape; a board's
calibration points give the scale: predictions are multiplied by the geometric mean of
measured / roofline over the points that apply (the board's own, else boards with the same core,
else all boards of the catalog).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from edgekit.fit.facts import ModelFacts
from edgekit.fit.quant import FILE_TYPES, GGML_TYPES, PUBLISHED_BPW
from edgekit.schema.device import CalibrationPoint, Device

# Peak multiply-accumulate throughput per core and cycle, counted as 2 operations per MAC:
# int8 dot products (the path ggml's quantized matmuls and ORT's int8 kernels take) and fp32 FMA.
# Derived from each core's SIMD width and issue rate (Arm Software Optimization Guides; Intel
# optimization manual for Gracemont), so they are estimates; calibration absorbs the rest.
@dataclass(frozen=True)
class CoreType:
    int8_ops_per_cycle: float
    f32_ops_per_cycle: float
    note: str


CORE_TYPES: dict[str, CoreType] = {
    "cortex-a53": CoreType(16, 4, "in-order, one 64-bit-wide NEON issue per cycle for MAC; no SDOT"),
    "cortex-a72": CoreType(32, 8, "two 64-bit NEON pipes (128-bit ops every other cycle); no SDOT"),
    "cortex-a76": CoreType(64, 16, "two 128-bit NEON pipes, SDOT = 16 int8 MACs per instruction"),
    "cortex-a78ae": CoreType(64, 16, "same NEON back end as Cortex-A76/A78"),
    "gracemont": CoreType(64, 16, "two 128-bit vector FMA/dot units (AVX2 256-bit ops split in halves), AVX-VNNI"),
    "x86-64-v3": CoreType(128, 32, "two 256-bit FMA ports, AVX2 int8 via vpmaddubsw (Skylake/Zen 2 class and newer)"),
}

# Operations per weight relative to Q8_0 when a core multiplies quantized blocks: unpacking
# sub-byte weights and K-quant scales costs instructions (ggml-cpu quants.c vec_dot kernels).
# Estimates; they matter only where decode is compute-bound (Cortex-A53/A72).
DEQUANT_COST: dict[str, float] = {
    "Q8_0": 1.0, "Q4_0": 1.3, "Q4_1": 1.35, "Q5_0": 1.6, "Q5_1": 1.65, "IQ4_NL": 1.4,
    "Q2_K": 1.8, "Q3_K": 1.9, "Q4_K": 1.5, "Q5_K": 1.7, "Q6_K": 1.8,
}
FLOAT_TYPES = {"F32", "F16", "BF16"}

# Roofline efficiencies (share of the peak a real engine reaches). Chosen once against the catalog's
# published points (scripts/bench_fit.py prints each point's error with and without them) and kept fixed.
DECODE_BANDWIDTH_EFFICIENCY = 0.7  # decode streams weights at ~70 % of STREAM copy bandwidth
DECODE_COMPUTE_EFFICIENCY = 0.12  # matrix-vector kernels reach a small share of peak MAC rate
PROMPT_COMPUTE_EFFICIENCY = 0.15  # matrix-matrix kernels (prompt, encoders)
# Decode attention without flash attention is float work in short pieces: one 64-to-128-long f16 dot
# product per cached token and head for the scores, then the f16 product with V. It reaches ~13 % of
# the fp32 peak: fitted to SmolLM2-135M Q8_0 decoding at 8,168 tokens of context on this project's
# x86-64 host (scripts/bench_fit.py, one thread, process CPU time: 11.9 and 15.2 tok/s in two runs,
# i.e. 0.11 and 0.16). The benchmark's 2,024-token rows are the out-of-sample check.
ATTENTION_DECODE_EFFICIENCY = 0.13
# Per-token work outside the matrix kernels: thread barriers per graph node (~10 nodes per layer)
# and the Python generate loop; in microseconds at 1 GHz, scaled by the clock.
OVERHEAD_US_GHZ_PER_LAYER = 20.0
OVERHEAD_US_GHZ_PER_TOKEN = 600.0
# onnxruntime session.run fixed cost (input binding, thread pool wake-up), microseconds at 1 GHz.
ENCODER_OVERHEAD_US_GHZ = 600.0

Kind = Literal["decode", "prompt", "encoder"]


@dataclass(frozen=True)
class Workload:
    """What one token (or one encoder call) costs: bytes streamed, operations, kernels used."""

    streamed_bytes: float  # weights read per decoded token
    matrix_weights: float  # weights multiplied per token
    float_path: bool  # F16/F32 weights: float kernels instead of int8 dot products
    dequant_cost: float  # ops per weight relative to Q8_0
    n_layer: int
    kv_bytes_per_token: float = 0.0
    attention_ops_per_ctx_token: float = 0.0  # ops per token of context attended to


def _file_type_cost(quant: str) -> tuple[bool, float]:
    base = FILE_TYPES.get(quant, quant)
    if base in FLOAT_TYPES or base not in GGML_TYPES:
        return True, 1.0
    return False, DEQUANT_COST.get(base, 1.5)


def workload_of(facts: ModelFacts) -> Workload:
    """The per-token work of a model from its facts (per-tensor types when known)."""
    if facts.tensors:
        streamed = [t for t in facts.tensors if facts.tied_embeddings or t.name != "token_embd.weight"]
        weights = sum(t.n_elements for t in streamed)
        float_path = all(t.ggml_type in FLOAT_TYPES for t in streamed)
        cost = sum(t.n_elements * DEQUANT_COST.get(t.ggml_type, 1.0) for t in streamed) / max(weights, 1)
    else:
        float_path, cost = _file_type_cost(facts.quant)
        weights = facts.matrix_parameters
        if facts.format == "onnx":
            float_path, cost = (facts.quant == "fp32"), 1.0
    return Workload(
        streamed_bytes=facts.streamed_bytes_per_token, matrix_weights=weights, float_path=float_path,
        dequant_cost=cost, n_layer=facts.n_layer, kv_bytes_per_token=facts.kv_bytes_per_token(),
        attention_ops_per_ctx_token=4.0 * facts.n_layer * facts.n_head * facts.head_dim_k,
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
    weights_bytes = point.weights_bytes or point.parameters * bits_per_weight_of(point.quant) / 8
    if point.format == "onnx":
        float_path, cost = point.quant.startswith("fp32"), 1.0
    else:
        float_path, cost = _file_type_cost(point.quant)
    # Layer count when the source does not give it: ~4.5 per doubling of size above 10M (SmolLM2-135M: 30,
    # TinyLlama-1.1B: 22, Llama-3.2-3B: 28 are given; this is only the per-token overhead term).
    n_layer = point.n_layer or max(int(round(4.5 * math.log2(point.parameters / 1e7))), 4)
    matrix_weights = point.parameters
    if point.format == "onnx" and point.n_layer and point.hidden_size:
        matrix_weights = 12 * point.n_layer * point.hidden_size**2  # BERT-style: embeddings are lookups
    return Workload(streamed_bytes=weights_bytes, matrix_weights=matrix_weights, float_path=float_path,
                    dequant_cost=cost, n_layer=n_layer)


def _peak_ops(device: Device, threads: int | None, float_path: bool) -> float:
    core = CORE_TYPES[device.cpu.core_type]
    cores = min(threads or device.cpu.cores, device.cpu.cores)
    per_cycle = core.f32_ops_per_cycle if float_path else core.int8_ops_per_cycle
    return cores * device.cpu.clock_ghz * 1e9 * per_cycle


@dataclass(frozen=True)
class DecodeTerms:
    """Seconds per generated token: streaming bytes, computing, and fixed per-token work."""

    memory_s: float
    compute_s: float
    overhead_s: float

    @property
    def binding(self) -> Literal["memory", "compute"]:
        return "memory" if self.memory_s >= self.compute_s else "compute"


def decode_terms(work: Workload, device: Device, threads: int | None = None, n_past: int = 0) -> DecodeTerms:
    """The roofline terms of generating one token at context position ``n_past``."""
    bytes_per_token = work.streamed_bytes + work.kv_bytes_per_token * n_past
    memory_s = bytes_per_token / (device.memory_bandwidth.gb_s * 1e9 * DECODE_BANDWIDTH_EFFICIENCY)
    matrix_s = 2 * work.matrix_weights * work.dequant_cost / (_peak_ops(device, threads, work.float_path) * DECODE_COMPUTE_EFFICIENCY)
    attention_s = work.attention_ops_per_ctx_token * n_past / (_peak_ops(device, threads, True) * ATTENTION_DECODE_EFFICIENCY)
    overhead_s = (OVERHEAD_US_GHZ_PER_LAYER * work.n_layer + OVERHEAD_US_GHZ_PER_TOKEN) * 1e-6 / device.cpu.clock_ghz
    return DecodeTerms(memory_s=memory_s, compute_s=matrix_s + attention_s, overhead_s=overhead_s)


def roofline_decode_tok_s(work: Workload, device: Device, threads: int | None = None, n_past: int = 0,
                          calibration: Calibration | None = None) -> float:
    """Tokens/s generating one token at context position ``n_past``.

    A calibration scales the throughput of the resource that bound its points (memory bandwidth
    for nearly all published decode measurements), not the whole rate: a board measured at short
    context says nothing about the float work of attention over a long one.
    """
    t = decode_terms(work, device, threads, n_past)
    k_memory = calibration.factor if calibration else 1.0
    k_compute = calibration.compute_factor if calibration else 1.0
    return 1.0 / (max(t.memory_s / k_memory, t.compute_s / k_compute) + t.overhead_s)


def roofline_prompt_tok_s(work: Workload, device: Device, threads: int | None = None, n_ctx_avg: int = 0) -> float:
    """Uncalibrated prompt-processing tokens/s (compute-bound matrix-matrix work)."""
    ops = 2 * work.matrix_weights * work.dequant_cost + work.attention_ops_per_ctx_token * n_ctx_avg
    return _peak_ops(device, threads, work.float_path) * PROMPT_COMPUTE_EFFICIENCY / ops


def roofline_encoder_ms(work: Workload, device: Device, seq_len: int, batch: int = 1, threads: int | None = None) -> float:
    """Uncalibrated milliseconds of one encoder call on ``batch`` inputs of ``seq_len`` tokens."""
    tokens = batch * seq_len
    ops = tokens * (2 * work.matrix_weights * work.dequant_cost + work.attention_ops_per_ctx_token * seq_len)
    compute_s = ops / (_peak_ops(device, threads, work.float_path) * PROMPT_COMPUTE_EFFICIENCY)
    memory_s = work.streamed_bytes / (device.memory_bandwidth.gb_s * 1e9 * DECODE_BANDWIDTH_EFFICIENCY)
    overhead_s = ENCODER_OVERHEAD_US_GHZ * 1e-6 / device.cpu.clock_ghz
    return 1e3 * (max(compute_s, memory_s) + overhead_s)


# -- calibration -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """Scale applied to the roofline of one kind of speed on one board, and what it rests on.

    ``factor`` multiplies the throughput of the binding resource: memory bandwidth for decode,
    compute for prompt processing and encoders; ``compute_factor`` is decode's compute-side scale,
    set only by points whose decode the roofline finds compute-bound.
    """

    kind: Kind
    factor: float
    scope: Literal["device", "core", "catalog", "none"]
    points: tuple[str, ...]
    compute_factor: float = 1.0


def point_kinds(point: CalibrationPoint) -> list[Kind]:
    kinds: list[Kind] = []
    if point.decode_tok_s is not None:
        kinds.append("decode")
    if point.prompt_tok_s is not None:
        kinds.append("prompt")
    if point.latency_ms is not None:
        kinds.append("encoder")
    return kinds


def point_ratio(point: CalibrationPoint, device: Device, kind: Kind) -> tuple[str, float]:
    """Which resource bound a measured point in the roofline, and measured / roofline throughput of it."""
    work = workload_of_point(point)
    if kind == "decode":
        t = decode_terms(work, device, point.threads)
        available = max(1.0 / point.decode_tok_s - t.overhead_s, 1e-9)
        binding = t.binding
        return binding, (t.memory_s if binding == "memory" else t.compute_s) / available
    if kind == "prompt":
        return "compute", point.prompt_tok_s / roofline_prompt_tok_s(work, device, point.threads)
    return "compute", roofline_encoder_ms(work, device, point.seq_len, 1, point.threads) / point.latency_ms


def point_prediction(point: CalibrationPoint, device: Device, kind: Kind, calibration: Calibration | None = None) -> float:
    """A point's speed as the (calibrated) model predicts it: tok/s, or ms for encoders."""
    work = workload_of_point(point)
    factor = calibration.factor if calibration else 1.0
    if kind == "decode":
        return roofline_decode_tok_s(work, device, point.threads, 0, calibration)
    if kind == "prompt":
        return roofline_prompt_tok_s(work, device, point.threads) * factor
    return roofline_encoder_ms(work, device, point.seq_len, 1, point.threads) / factor


def point_label(device: Device, point: CalibrationPoint) -> str:
    return f"{device.id}: {point.model} {point.quant}"


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def calibrate(device: Device, kind: Kind, catalog: Iterable[Device] = (), exclude: CalibrationPoint | None = None) -> Calibration:
    """Geometric means of measured / roofline throughput over the points that apply to ``device``.

    Own points first; else points of boards with the same core type; else all boards; else 1.
    ``exclude`` leaves one point out (used to test the model on the points themselves).
    """
    def ratios(devices: Iterable[Device]) -> tuple[list[tuple[str, float]], list[str]]:
        values, labels = [], []
        for d in devices:
            for p in d.calibration:
                if p is exclude or kind not in point_kinds(p):
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
        if not values:
            continue
        if kind != "decode":
            return Calibration(kind=kind, factor=_geomean([v for _, v in values]), scope=scope, points=tuple(labels))
        memory = [v for binding, v in values if binding == "memory"]
        compute = [v for binding, v in values if binding == "compute"]
        return Calibration(kind=kind, factor=_geomean(memory) if memory else 1.0, scope=scope, points=tuple(labels),
                           compute_factor=_geomean(compute) if compute else 1.0)
    return Calibration(kind=kind, factor=1.0, scope="none", points=())
