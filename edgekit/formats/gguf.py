"""GGUF bundles: decoders converted with the gguf package, quantized and run by llama.cpp.

Also the one table of llama.cpp weight types: file types (recipe ``quant:``) and the ggml block
types they are made of. tests/test_formats.py pins both to the gguf package's own tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.formats.spec import FormatSpec

NAME = "gguf"


@dataclass(frozen=True)
class FileType:
    """A llama.cpp file type (recipe ``quant:``) and what edgekit relies on about it."""

    ftype: str  # llama.h enum llama_ftype (llama_cpp.LLAMA_FTYPE_*; gguf.LlamaFileType without the prefix)
    main_type: str  # default ggml type of the matrices; source: llama.cpp src/llama-quant.cpp (switch on ftype)
    kld_rank: int | None = None  # rank by mean KL divergence vs FP16, Llama-3-8B (llama.cpp tools/perplexity/README.md)
    published_bpw: float | None = None  # whole-file bits per weight, Llama-3.1-8B (llama.cpp tools/quantize/README.md)
    in_plan_ladder: bool = False  # `edgekit plan` tries it on a GGUF recipe
    lossless_enough: bool = False  # precise enough to start a quantization from without opting in
    converter_output: bool = False  # written directly by the checkpoint converter (gguf writer), no quantizer


# Recipe quant name -> file type, in the order recipes list them. The K-quant mixes (_M/_S) are
# llama.cpp's per-tensor recipes: e.g. Q4_K_M keeps half of attn_v/ffn_down in Q6_K.
# Ranks and published bits per weight: also docs/device-facts.md.
FILE_TYPES: dict[str, FileType] = {
    "F32": FileType("LLAMA_FTYPE_ALL_F32", "F32", lossless_enough=True, converter_output=True),
    "F16": FileType("LLAMA_FTYPE_MOSTLY_F16", "F16", kld_rank=0, lossless_enough=True, converter_output=True),
    "BF16": FileType("LLAMA_FTYPE_MOSTLY_BF16", "BF16", kld_rank=1, lossless_enough=True, converter_output=True),
    "Q8_0": FileType("LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0", kld_rank=2, published_bpw=8.50, in_plan_ladder=True,
                     lossless_enough=True),
    "Q6_K": FileType("LLAMA_FTYPE_MOSTLY_Q6_K", "Q6_K", kld_rank=3, published_bpw=6.56, in_plan_ladder=True),
    "Q5_K_M": FileType("LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q5_K", kld_rank=4, published_bpw=5.70, in_plan_ladder=True),
    "Q5_0": FileType("LLAMA_FTYPE_MOSTLY_Q5_0", "Q5_0"),
    "Q4_K_M": FileType("LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K", kld_rank=5, published_bpw=4.89, in_plan_ladder=True),
    "Q4_K_S": FileType("LLAMA_FTYPE_MOSTLY_Q4_K_S", "Q4_K", kld_rank=6),
    "Q4_0": FileType("LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_0", kld_rank=8, in_plan_ladder=True),
    "Q4_1": FileType("LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_1", kld_rank=7),
    "Q3_K_M": FileType("LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q3_K", kld_rank=9, in_plan_ladder=True),
    "Q2_K": FileType("LLAMA_FTYPE_MOSTLY_Q2_K", "Q2_K", kld_rank=10, in_plan_ladder=True),
}

# ggml type -> (weights per block, bytes per block). Source: ggml/src/ggml-common.h block structs
# (block_q4_0 = f16 scale + 16 bytes, block_q4_K = 2 f16 + 12 scale bytes + 128 quant bytes, ...).
GGML_TYPES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "IQ4_NL": (32, 18),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}

SPEC = FormatSpec(
    name=NAME,
    model_suffix=".gguf",
    target="edgekit.schema.recipe:GgufTarget",
    facts="edgekit.schema.manifest:GgufFacts",
    build="edgekit.export.gguf",
    runtime_check="edgekit.runtime.verify:check_gguf_bundle",
    runner="edgekit.serve.runners:GenerationRunner",
    facts_from_manifest="edgekit.fit.facts:gguf_from_manifest",
    facts_from_recipe="edgekit.fit.facts:gguf_from_recipe",
    matrix_parameters="edgekit.fit.facts:decoder_matrix_parameters",
    fit_n_ctx="edgekit.fit.estimate:decoder_n_ctx",
    memory="edgekit.fit.memory:llama_memory",
    workload="edgekit.fit.speed:gguf_workload",
    point_workload="edgekit.fit.speed:gguf_point_workload",
    speed="edgekit.fit.estimate:decoder_speed",
    load_model="edgekit.runtime.golden:load_gguf",
    golden_record="edgekit.export.golden:record_gguf",
    runtime_module="llama_cpp",
    runtime_probe="edgekit.runtime.probe:start_llama_cpp",
    worker_bytes="edgekit.fit.memory:llama_worker_bytes",
    plan_candidates="edgekit.fit.plan:quant_ladder",
    bench="edgekit.bench.measure:bench_gguf",
    calibration_point="edgekit.bench.calibrate:gguf_bench_point",
    profile_points="edgekit.bench.profile:gguf_profile_points",
    build_tools=("gguf", "llama_cpp_python", "numpy", "torch", "transformers"),
    engine=("llama.cpp (llama-cpp-python {version})", "llama-cpp-python"),
    speed_metrics=("decode_tok_s", "prompt_tok_s", "ttft_ms"),
    quality_metric=("kld_mean", "KLD"),
)
