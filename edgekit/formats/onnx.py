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
    facts_from_manifest="edgekit.fit.facts:onnx_from_manifest",
    facts_from_recipe="edgekit.fit.facts:onnx_from_recipe",
    matrix_parameters="edgekit.fit.facts:encoder_matrix_parameters",
    fit_n_ctx="edgekit.fit.estimate:encoder_n_ctx",
    memory="edgekit.fit.memory:ort_memory",
    workload="edgekit.fit.speed:onnx_workload",
    point_workload="edgekit.fit.speed:onnx_point_workload",
    speed="edgekit.fit.estimate:encoder_speed",
    load_model="edgekit.runtime.golden:load_onnx",
    golden_record="edgekit.export.golden:record_onnx",
    runtime_module="onnxruntime",
    runtime_probe="edgekit.runtime.probe:start_onnxruntime",
    worker_bytes="edgekit.fit.memory:ort_worker_bytes",
    plan_candidates="edgekit.fit.plan:recipe_targets",
    bench="edgekit.bench.measure:bench_onnx",
    calibration_point="edgekit.bench.calibrate:onnx_bench_point",
    profile_points="edgekit.bench.profile:onnx_profile_points",
    build_tools=("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime"),
    engine=("onnxruntime {version}", "onnxruntime"),
    speed_metrics=("batch1_p50_ms", "batch1_p95_ms", "batch32_p50_ms", "batch32_p95_ms", "batch32_texts_per_s"),
    quality_metric=("cosine_mean", "cosine"),
)
