"""ONNX bundles: encoders exported with optimum, quantized and run by onnxruntime."""

from __future__ import annotations

from edgekit.formats.spec import FormatSpec

NAME = "onnx"

SPEC = FormatSpec(
    name=NAME,
    model_suffix=".onnx",
    target="edgekit.schema.recipe:OnnxTarget",
    facts="edgekit.schema.manifest:OnnxFacts",
    build="edgekit.export.onnx",
    runtime_check="edgekit.runtime.verify:check_onnx_bundle",
    runner="edgekit.serve.runners:EncoderRunner",
    bench="edgekit.bench.measure:bench_onnx",
    engine=("onnxruntime {version}", "onnxruntime"),
    speed_metrics=("batch1_p50_ms", "batch1_p95_ms", "batch32_p50_ms", "batch32_p95_ms", "batch32_texts_per_s"),
    quality_metric=("cosine_mean", "cosine"),
)
