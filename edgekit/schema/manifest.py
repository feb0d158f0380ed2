"""Manifest: what a bundle holds, how it was made, how good it measured. One schema for every format."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

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

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def file(self, suffix: str) -> FileEntry:
        """The single file whose name ends with ``suffix`` (e.g. '.onnx', '.gguf')."""
        hits = [f for f in self.files if f.path.endswith(suffix)]
        if len(hits) != 1:
            raise KeyError(f"bundle {self.name} has {len(hits)} files ending in {suffix}")
        return hits[0]
