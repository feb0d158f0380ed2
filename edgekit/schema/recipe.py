"""Recipe: how one source model becomes one or more verified bundles.

A recipe's ``targets`` are a discriminated union on ``format``; the format value is also the
key of the format registry in ``edgekit.formats``, so a new format is one schema class here
and one spec module there. Task and quant names come from the registry's tables.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from edgekit.architectures import ARCHITECTURES, registered
from edgekit.errors import RecipeError
from edgekit.formats import TASKS, tasks_of
from edgekit.formats.gguf import FILE_TYPES
from edgekit.schema.loading import Strict, load_yaml_model

Task = Literal[tuple(TASKS)]

Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=80)]


class Source(Strict):
    """Where the original checkpoint comes from."""

    id: str | None = Field(None, description="Hugging Face hub id, e.g. 'sentence-transformers/all-MiniLM-L6-v2'.")
    path: Path | None = Field(None, description="Local checkpoint directory; relative paths are relative to the recipe file.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    allow_pickle: bool = Field(
        False,
        description="Allow pickle weights (pytorch_model.bin, *.pt) when no safetensors exist. "
        "Pickle files can execute code when loaded; leave off unless you trust the source.",
    )
    gguf_file: str | None = Field(
        None,
        pattern=r"^[^/\\]+\.gguf$",
        description="GGUF targets only: start from this GGUF file inside the source (hub repository or directory) "
        "instead of converting a checkpoint. f32/f16/bf16/Q8_0 files are requantized as they are; lower-bit files "
        "need the target's allow_requantize.",
    )

    @model_validator(mode="after")
    def _one_of_id_or_path(self) -> Source:
        if (self.id is None) == (self.path is None):
            raise ValueError("give exactly one of 'id' (hub id) or 'path' (local directory)")
        return self

    @property
    def label(self) -> str:
        return self.id if self.id is not None else str(self.path)


class Gates(Strict):
    """Quality gates: the export fails (exit 1) when a measured value crosses one."""

    min_cosine_mean: float | None = Field(None, ge=-1, le=1, description="Mean cosine of embeddings/logits vs the reference.")
    min_cosine_each: float | None = Field(None, ge=-1, le=1, description="Lowest cosine allowed on any single sample.")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="Share of samples (or tokens) whose top class matches the reference.")
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="Largest accuracy loss on the labelled file vs the reference.")
    max_kld: float | None = Field(None, ge=0, description="Largest mean KL divergence of next-token distributions (GGUF).")
    max_ppl_increase: float | None = Field(None, ge=0, description="Largest relative perplexity increase, 0.05 = +5 % (GGUF).")


class Calibration(Strict):
    """Calibration data for static int8 quantization."""

    method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="How activation ranges are computed.")
    percentile: float = Field(99.999, gt=90, le=100, description="Percentile for method 'percentile'.")
    max_samples: int = Field(256, ge=8, le=10000, description="How many calibration texts to use at most.")
    samples_file: Path | None = Field(
        None, description="Text file, one sample a line; default: the validation samples (relative to the recipe)."
    )


class OnnxQuantization(Strict):
    """onnxruntime int8 quantization of the exported graph."""

    mode: Literal["dynamic", "static"] = Field(
        description="dynamic: activations quantized at run time; static: activation ranges calibrated ahead of time."
    )
    block_size: int | None = Field(
        128,
        ge=16,
        le=4096,
        description="dynamic only: 8-bit MatMul weights in blocks of this many input channels, activations quantized "
        "per block at run time (onnxruntime MatMulNBits, int8 compute). null: one activation scale per tensor "
        "(MatMulInteger). On all-MiniLM-L6-v2 blocks of 128 keep the worst sentence at cosine 0.99 where "
        "per-tensor falls to 0.96.",
    )
    per_tensor_matmuls: list[str] = Field(
        default_factory=list,
        description="dynamic with block_size only: glob patterns of MatMul node names quantized with one activation "
        "scale per tensor (MatMulInteger) instead of per block. onnxruntime's MatMulInteger is its fastest int8 GEMM "
        "at batch (MatMulNBits is no faster than fp32 there); attention projections tolerate per-tensor scales, "
        "feed-forward MatMuls do not. The scale spans the whole batch, so a text's output moves slightly with its "
        "batch-mates (all-MiniLM-L6-v2: worst sentence 0.989 alone, 0.985 in batches of 32).",
    )
    per_channel: bool = Field(True, description="One weight scale per output channel where blocks are not used.")
    weight_type: Literal["qint8", "quint8"] = Field("qint8", description="Integer type of per-channel weights.")
    reduce_range: bool = Field(False, description="7-bit weights, for CPUs without VNNI where 8-bit can saturate.")
    operators: list[str] = Field(
        default_factory=lambda: ["MatMul", "Attention", "Gather", "EmbedLayerNormalization"],
        description="Operator types to quantize; others stay fp32. Gather/EmbedLayerNormalization hold the "
        "token embeddings, half of a small encoder's bytes.",
    )
    exclude_nodes: list[str] = Field(default_factory=list, description="Node names kept in fp32.")
    calibration: Calibration | None = Field(None, description="Required for mode 'static'.")

    @model_validator(mode="after")
    def _mode_settings(self) -> OnnxQuantization:
        if self.mode == "static" and self.calibration is None:
            raise ValueError("mode 'static' needs a 'calibration' section (method, max_samples)")
        if self.mode == "static" and self.block_size is not None:
            raise ValueError("block_size is for mode 'dynamic'; set block_size: null with mode 'static'")
        if self.per_tensor_matmuls and self.block_size is None:
            raise ValueError("per_tensor_matmuls picks MatMuls out of block-wise quantization; it needs block_size")
        return self

    @property
    def label(self) -> str:
        if self.block_size is not None:
            return f"int8-{self.mode}-block{self.block_size}" + ("-hybrid" if self.per_tensor_matmuls else "")
        return f"int8-{self.mode}" + ("-per-channel" if self.per_channel else "")


class OnnxTarget(Strict):
    """Export to ONNX (optimum), optionally graph-optimize and int8-quantize (onnxruntime)."""

    format: Literal["onnx"] = Field(description="Registry key of the exporter.")
    name: Slug = Field(description="Target name; the bundle is called '<recipe name>-<target name>'.")
    opset: int | None = Field(None, ge=11, le=23, description="ONNX opset; default: optimum's choice for the architecture.")
    optimization_level: Literal[0, 1, 2, 99] = Field(
        2,
        description="onnxruntime graph optimization baked into the file: 0 none, 1 basic, 2 extended "
        "(attention/LayerNorm/GELU fusion), 99 all (layout transforms tied to this CPU).",
    )
    quantization: OnnxQuantization | None = Field(None, description="Leave out for an fp32 bundle.")
    gates: Gates | None = Field(None, description="Replaces validation.gates for this target.")


GgufQuant = Literal[tuple(FILE_TYPES)]


class GgufTarget(Strict):
    """Convert to GGUF (gguf package) and quantize with llama.cpp's quantizer."""

    format: Literal["gguf"] = Field(description="Registry key of the exporter.")
    name: Slug = Field(description="Target name; the bundle is called '<recipe name>-<target name>'.")
    quant: GgufQuant = Field(description="llama.cpp quantization type of the weights.")
    allow_requantize: bool = Field(
        False, description="Allow starting from an already low-bit GGUF; this compounds quantization error."
    )
    gates: Gates | None = Field(None, description="Replaces validation.gates for this target.")


Target = Annotated[Union[OnnxTarget, GgufTarget], Field(discriminator="format")]


class Validation(Strict):
    """How a bundle is compared with the original model before it is accepted."""

    samples: list[str] = Field(default_factory=list, description="Inline sample texts.")
    samples_file: Path | None = Field(None, description="Text file, one sample per line (relative to the recipe).")
    labelled_file: Path | None = Field(
        None, description="JSON lines {\"text\": ..., \"label\": ...} for accuracy (relative to the recipe)."
    )
    gates: Gates = Field(default_factory=Gates, description="Thresholds that fail the export.")
    text_file: Path | None = Field(
        None,
        description="Running text (GGUF): perplexity, KL divergence and top-1 agreement against the reference are "
        "measured over it (relative to the recipe).",
    )
    context_window: int = Field(
        512, ge=16, le=8192, description="Tokens per evaluation window over text_file (GGUF); each starts from an empty context."
    )
    max_eval_tokens: int | None = Field(
        None, ge=64, description="Measure on at most this many tokens of text_file (GGUF); default: all of it."
    )
    min_conversion_top1: float = Field(
        0.99, ge=0, le=1,
        description="GGUF from a checkpoint: share of positions where the f16 conversion's greedy next token must equal "
        "PyTorch's; below it the export stops with a converter error. Lower it only for untrained (random) models, "
        "whose near-tied logits flip under any rounding.",
    )


class ArchitectureFacts(Strict):
    """Facts from the source's config.json, recorded so `edgekit fit --recipe` works offline, before any download."""

    source: str = Field(description="Where the facts come from (URL of the config.json, or 'measured').")
    parameters: int = Field(ge=1, description="Parameter count.")
    n_layer: int = Field(ge=1, description="Transformer blocks (num_hidden_layers).")
    hidden_size: int = Field(ge=1, description="Embedding width (hidden_size).")
    intermediate_size: int = Field(ge=1, description="Feed-forward width (intermediate_size).")
    n_head: int = Field(ge=1, description="Attention heads (num_attention_heads).")
    n_head_kv: int = Field(ge=1, description="Key/value heads (num_key_value_heads; = n_head without GQA).")
    head_dim: int | None = Field(None, ge=1, description="Per-head width; default hidden_size / n_head.")
    vocab_size: int = Field(ge=1, description="Vocabulary size.")
    context_length: int = Field(ge=1, description="Maximum positions (max_position_embeddings).")
    tie_word_embeddings: bool = Field(False, description="Output head shares the embedding matrix.")
    hf_architecture: str | None = Field(
        None, description="config.json `architectures` name (e.g. Qwen3ForCausalLM): the registered definition "
        "(edgekit.architectures) whose tensor layout sizes the file; default: the llama-style layout closest to `parameters`."
    )
    sliding_window: int | None = Field(None, ge=1, description="config.json sliding_window, for architectures with sliding-window layers.")
    partial_rotary_factor: float | None = Field(None, gt=0, le=1, description="config.json partial_rotary_factor (rotated share of a head).")
    rope_type: str | None = Field(None, description="config.json rope_scaling.rope_type (llama3, longrope, yarn, linear); none: plain RoPE.")

    @model_validator(mode="after")
    def _registered_architecture(self) -> ArchitectureFacts:
        if self.hf_architecture is not None:
            if self.hf_architecture not in ARCHITECTURES:
                raise ValueError(f"hf_architecture {self.hf_architecture!r} is not registered; registered: {registered()}")
            definition = ARCHITECTURES[self.hf_architecture]
            if (self.rope_type or "default") not in definition.rope_types:
                raise ValueError(f"rope_type {self.rope_type!r} is not supported for {self.hf_architecture}; "
                                 f"supported: {', '.join(definition.rope_types)}")
        return self


class Recipe(Strict):
    """How one model is exported for the edge."""

    name: Slug = Field(description="Recipe name; prefix of its bundles' names.")
    description: str = Field("", description="What the model is for, in a sentence.")
    source: Source = Field(description="The original checkpoint.")
    task: Task = Field(description="What the model does; decides the exported head and the runtime.")
    max_length: int | None = Field(None, ge=8, le=131072, description="Longest input in tokens; default: the model's.")
    targets: list[Target] = Field(min_length=1, description="Bundles to produce, one per target.")
    validation: Validation = Field(default_factory=Validation, description="Quality checks against the original.")
    devices: list[str] = Field(default_factory=list, description="Device profile ids this recipe is meant for (see devices/).")
    architecture: ArchitectureFacts | None = Field(
        None, description="Architecture facts of the source for fit-before-download; read from the checkpoint when absent."
    )

    @model_validator(mode="after")
    def _targets_fit_task(self) -> Recipe:
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"target names must be unique, got {names}")
        for target in self.targets:
            served = tasks_of(target.format)
            if self.task not in served:
                raise ValueError(f"target '{target.name}': format {target.format} is for {', '.join(served)}, not {self.task}")
        return self

    def bundle_name(self, target: OnnxTarget | GgufTarget) -> str:
        return f"{self.name}-{target.name}"

    def gates_for(self, target: OnnxTarget | GgufTarget) -> Gates:
        return target.gates if target.gates is not None else self.validation.gates


class LoadedRecipe(Strict):
    """A recipe with the file it came from (relative paths resolve against its folder) and its hash."""

    recipe: Recipe
    path: Path
    sha256: str

    def resolve(self, relative: Path) -> Path:
        return relative if relative.is_absolute() else (self.path.parent / relative).resolve()


def load_recipe(path: Path) -> LoadedRecipe:
    """Load and validate a recipe file; errors name the file, the field and the fix."""
    path = Path(path)
    recipe = load_yaml_model(path, Recipe, RecipeError)
    return LoadedRecipe(recipe=recipe, path=path.resolve(), sha256=hashlib.sha256(path.read_bytes()).hexdigest())
