"""Manifest: what a bundle holds, how it was made, how good it measured. One schema for every format."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from edgekit.schema.loading import Strict

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


class FileEntry(Strict):
    """One file of the bundle; the runtime refuses a bundle whose files do not match these."""

    path: str = Field(description="Path relative to the bundle directory (no '..', no absolute paths).")
    bytes: int = Field(ge=0, description="File size.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the file's content.")


class GateResult(Strict):
    """One quality gate as measured at export time."""

    gate: str = Field(description="Gate name as in the recipe (e.g. min_cosine_each).")
    threshold: float = Field(description="The recipe's threshold.")
    measured: float = Field(description="What the bundle measured.")
    passed: bool = Field(description="Whether the measured value is on the right side of the threshold.")


class RuntimeConfig(Strict):
    """What the board-side runtime needs to run the model the way it was validated."""

    max_length: int = Field(ge=1, description="Longest input in tokens; longer inputs are truncated to it.")
    pooling: Literal["mean", "cls", "none"] = Field("none", description="How token states become one embedding (feature-extraction).")
    normalize: bool = Field(False, description="L2-normalize embeddings.")
    labels: list[str] = Field(default_factory=list, description="Class names by output index (classification tasks).")
    input_names: list[str] = Field(default_factory=list, description="ONNX graph inputs the runtime feeds.")
    chat_template: str | None = Field(None, description="Jinja chat template (text-generation), rendered sandboxed.")
    context_length: int | None = Field(None, description="Training context of a generative model.")
    text_normalization: Literal["NFC"] | None = Field(
        None,
        description="Unicode normalization to apply to text before llama.cpp tokenizes it: the original tokenizer "
        "normalizes (e.g. Qwen2's NFC) and llama.cpp does not, so the runtime does it to get the same token ids.",
    )


class GgufFacts(Strict):
    """GGUF-specific facts read from the file's header (used by `edgekit fit`)."""

    architecture: str = Field(description="general.architecture, e.g. 'llama', 'qwen2'.")
    context_length: int = Field(description="Training context in tokens (<arch>.context_length).")
    n_layer: int = Field(description="Transformer blocks (<arch>.block_count).")
    n_head: int = Field(description="Attention heads (<arch>.attention.head_count).")
    n_head_kv: int = Field(description="Key/value heads (<arch>.attention.head_count_kv).")
    n_embd: int = Field(description="Embedding width (<arch>.embedding_length).")
    n_vocab: int = Field(description="Vocabulary size (tokens in tokenizer.ggml.tokens).")
    quant_type: str = Field(description="llama.cpp file type of the weights, e.g. 'Q4_K_M', 'F16'.")
    bits_per_weight: float = Field(description="Bits of all tensor data divided by the number of weights.")
    key_length: int | None = Field(None, description="Per-head key width (<arch>.attention.key_length); default n_embd / n_head.")
    value_length: int | None = Field(None, description="Per-head value width (<arch>.attention.value_length); default n_embd / n_head.")
    requantized_from: str | None = Field(
        None, description="File type of the GGUF source when the weights were requantized instead of converted from a checkpoint."
    )


class OnnxFacts(Strict):
    """ONNX-specific facts of the model file."""

    opset: int
    optimization_level: int
    initializer_bytes: int = Field(description="Bytes of all weights (initializers), as loaded in RAM.")
    n_layer: int | None = None
    hidden_size: int | None = None


class GreedyPrompt(Strict):
    """One prompt of a GGUF bundle's golden check and what the bundle generated from it at export."""

    prompt: str = Field(description="A user message: rendered as a one-turn chat through the bundle's chat template when it "
                                    "has one (as the daemon serves it), else tokenized as is.")
    prompt_ids: list[int] = Field(description="Token ids of the rendered prompt; the board must get exactly these.")
    ids: list[int] = Field(description="Greedy continuation at export: at each step the most likely next token, fed back.")
    top_logprobs: list[dict[int, float]] = Field(
        description="Per step of ids, the most likely tokens at export -> natural-log probability (3 decimals); the "
        "tokens not listed share the remaining probability.")


class GreedyGolden(Strict):
    """Golden check of a GGUF bundle: greedy tokens of a few prompts, with the bounds that apply when kernels differ."""

    kind: Literal["greedy-tokens"] = "greedy-tokens"
    recorded_on: str = Field(description="Machine and runtime that recorded it, e.g. 'x86_64, llama-cpp-python 0.3.16'.")
    prompts: list[GreedyPrompt] = Field(min_length=1)
    min_top1_agreement: float = Field(
        ge=0, le=1, description="When a prompt's ids differ on the board: share of its steps where the board's most likely "
        "token, fed the recorded ids (teacher forcing), equals the recorded id; at least this.")
    max_kld: float = Field(
        ge=0, description="When a prompt's ids differ on the board: mean per-step KL divergence (recorded || board) over the "
        "recorded top tokens plus one bin for all other tokens (a lower bound of the full KL divergence); at most this.")


class EncoderText(Strict):
    """One text of an ONNX bundle's golden check and the bundle's output for it at export (batch of one)."""

    text: str
    labels: list[str] = Field(
        default_factory=list, description="Classification: the most likely label (text-classification: one; "
        "token-classification: one per token). Empty for embeddings.")
    output: str = Field(description="The output as base64 of little-endian float16 values: the embedding "
                                    "(feature-extraction) or the class probabilities (classification).")
    shape: list[int] = Field(description="Shape of output: [dim], [labels] or [tokens, labels].")


class EncoderGolden(Strict):
    """Golden check of an ONNX bundle: outputs for a few texts and how close the board must come."""

    kind: Literal["encoder-outputs"] = "encoder-outputs"
    recorded_on: str = Field(description="Machine and runtime that recorded it, e.g. 'x86_64, onnxruntime 1.22.0'.")
    texts: list[EncoderText] = Field(min_length=1)
    min_cosine: float | None = Field(None, ge=-1, le=1, description="Embeddings: cosine similarity with the recorded one, at least this.")
    max_probability_diff: float | None = Field(
        None, ge=0, le=1, description="Classification: largest absolute difference of any class probability, at most this; "
        "labels must be equal except where the recorded top two are within twice this of each other (a near tie).")


Golden = Annotated[GreedyGolden | EncoderGolden, Field(discriminator="kind")]


class Manifest(Strict):
    """manifest.json at the root of every bundle."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(description="Bundle name, '<recipe>-<target>'; the model id the daemon serves.")
    recipe_name: str
    recipe_sha256: str = Field(description="SHA-256 of the recipe file that produced the bundle.")
    source_id: str = Field(description="Hub id or local path of the original checkpoint.")
    source_revision: str | None = Field(None, description="Resolved revision (commit) where known.")
    task: str
    format: Literal["onnx", "gguf"]
    quantization: str = Field(description="e.g. 'int8-dynamic-per-channel', 'fp32', 'Q4_K_M'.")
    parameters: int = Field(ge=0, description="Parameter count of the original model.")
    files: list[FileEntry]
    runtime: RuntimeConfig
    onnx: OnnxFacts | None = None
    gguf: GgufFacts | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description="Validation measurements vs the reference.")
    gates: list[GateResult] = Field(default_factory=list)
    passed: bool = Field(description="All gates passed.")
    tools: dict[str, str] = Field(default_factory=dict, description="Versions of the tools that made the bundle.")
    created: datetime
    golden: Golden | None = Field(
        None, description="Outputs of the board-side runtime on the finished bundle at export; `edgekit doctor` and the "
        "daemon rerun them on the board (edgekit.runtime.golden). Absent in bundles exported before golden checks.")

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def file(self, suffix: str) -> FileEntry:
        """The single file whose name ends with ``suffix`` (e.g. '.onnx', '.gguf')."""
        hits = [f for f in self.files if f.path.endswith(suffix)]
        if len(hits) != 1:
            raise KeyError(f"bundle {self.name} has {len(hits)} files ending in {suffix}")
        return hits[0]
