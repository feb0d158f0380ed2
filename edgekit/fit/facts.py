"""What the estimator knows about a model, from a bundle's manifest or, before any download, from a recipe.

``ModelFacts`` is the one shape both paths produce: the memory and speed models read nothing else.
A manifest gives measured sizes (the GGUF file, the ONNX initializers); a recipe gives config.json
facts from which sizes are predicted with llama.cpp's own quantization rules (``edgekit.fit.quant``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal

from edgekit.architectures import ARCHITECTURES, Architecture, ModelShape, by_gguf_name
from edgekit.errors import ConfigError
from edgekit.fit.quant import (
    FILE_TYPES,
    GGML_TYPES,
    GGUF_HEADER_BYTES_PER_TOKEN,
    Tensor,
    definition_data_bytes,
    definition_tensors,
)
from edgekit.formats import FORMATS, TASKS
from edgekit.schema.manifest import Manifest
from edgekit.schema.recipe import ArchitectureFacts, GgufTarget, OnnxTarget, Recipe

# Layouts tried, closest parameter count wins, when a recipe does not name its architecture.
DEFAULT_LAYOUTS = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# Bytes of tokenizer.json per vocabulary entry in an ONNX bundle (written without pretty-printing):
# all-MiniLM-L6-v2, 30,522 tokens -> 466,267 bytes.
TOKENIZER_JSON_BYTES_PER_TOKEN = 15.3
# ONNX int8: one fp32 scale per block of MatMulNBits weights, per row otherwise
# (onnxruntime quantization: MatMulNBitsQuantizer, quantize_dynamic per_channel).
ONNX_SCALE_BYTES = 4


@dataclass(frozen=True)
class ModelFacts:
    """A model as the estimator sees it; sizes in bytes."""

    name: str
    format: str  # key of edgekit.formats.FORMATS
    task: str
    quant: str
    parameters: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    context_length: int
    weights_bytes: int  # bytes mapped/loaded as weights (GGUF file; ONNX initializers)
    bundle_bytes: int  # bytes on disk
    origin: Literal["bundle", "recipe"]
    n_ff: int | None = None
    tied_embeddings: bool | None = None
    tensors: tuple[Tensor, ...] = ()  # per-tensor types where known (GGUF)
    max_length: int | None = None  # encoders: longest input the runtime accepts
    architecture: str | None = None  # registered definition (edgekit.architectures) the sizes come from
    sliding_window: int | None = None  # tokens a sliding-window layer attends to
    sliding_layers: int = 0  # layers attending over sliding_window only (the rest see the whole context)
    notes: tuple[str, ...] = field(default=())

    @property
    def matrix_parameters(self) -> int:
        """Weights multiplied per token: everything but the token-embedding lookup (unless it is also the output head)."""
        return FORMATS[self.format].hook("matrix_parameters")(self)

    @property
    def streamed_bytes_per_token(self) -> int:
        """Weight bytes read from RAM to produce one token (decode is a pass over these)."""
        if self.tensors:
            return sum(t.nbytes for t in self.tensors if self.tied_embeddings or t.name != "token_embd.weight")
        return int(self.weights_bytes * self.matrix_parameters / max(self.parameters, 1))

    def kv_bytes_per_token(self, bytes_per_element: float = 2.0) -> float:
        """K and V cache bytes one token of context occupies (all layers)."""
        return self.n_layer * self.n_head_kv * (self.head_dim_k + self.head_dim_v) * bytes_per_element

    def kv_cells_by_layer(self, n_ctx: int, *, swa_full: bool = True, n_ubatch: int = 512) -> list[int]:
        """KV cells each layer keeps for n_ctx tokens. llama-cpp-python's default (swa_full) sizes sliding layers
        like the others; without it they keep sliding_window + one micro-batch (llama.cpp llama-kv-cache-iswa)."""
        window = n_ctx if swa_full or not self.sliding_window else min(n_ctx, self.sliding_window + n_ubatch)
        return [window] * self.sliding_layers + [n_ctx] * (self.n_layer - self.sliding_layers)

    def type_bytes(self) -> dict[str, int]:
        """Bytes per ggml type over the 2-D weights (empty when unknown)."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.ggml_type] = out.get(t.ggml_type, 0) + t.nbytes
        return out


def recipe_shape(facts: ArchitectureFacts) -> tuple[Architecture, ModelShape, list[str]]:
    """The registered definition a recipe's architecture block names (else the closest llama-style one), and its shape."""
    names = [facts.hf_architecture] if facts.hf_architecture else list(DEFAULT_LAYOUTS)
    candidates = []
    for name in names:
        definition = ARCHITECTURES[name]
        shape = definition.make_shape(
            n_layer=facts.n_layer, n_embd=facts.hidden_size, n_ff=facts.intermediate_size, n_head=facts.n_head,
            n_head_kv=facts.n_head_kv, head_dim=facts.head_dim or facts.hidden_size // facts.n_head,
            n_vocab=facts.vocab_size, context_length=facts.context_length, tied_embeddings=facts.tie_word_embeddings,
            partial_rotary_factor=facts.partial_rotary_factor or 1.0, rope_scaling={"rope_type": facts.rope_type or "default"},
            sliding_window=facts.sliding_window,
        )
        candidates.append((definition, shape))
    definition, shape = min(candidates, key=lambda c: abs(c[0].parameters(c[1]) - facts.parameters))
    counted = definition.parameters(shape)
    miss = abs(counted - facts.parameters) / facts.parameters
    notes = []
    if miss > 0.02:
        notes.append(
            f"architecture facts add up to {counted:,} parameters as {definition.name}, the recipe says {facts.parameters:,} "
            f"({miss:.1%} apart): set hf_architecture to the model's registered architecture; sizes are approximate"
        )
    return definition, shape, notes


def _manifest_shape(definition: Architecture, parameters: int, g, head_dim: int) -> ModelShape | None:
    """The shape whose parameter count is the manifest's: feed-forward width and tying are the unknowns (linear in n_ff)."""
    for tied in (True, False):
        def shape(n_ff: int, tied=tied) -> ModelShape:
            return definition.make_shape(n_layer=g.n_layer, n_embd=g.n_embd, n_ff=n_ff, n_head=g.n_head, n_head_kv=g.n_head_kv,
                                         head_dim=head_dim, n_vocab=g.n_vocab, context_length=g.context_length,
                                         tied_embeddings=tied)
        base = definition.parameters(shape(0))
        per_ff = definition.parameters(shape(1)) - base
        n_ff, remainder = divmod(parameters - base, per_ff)
        if remainder == 0 and n_ff > 0 and n_ff % 32 == 0:
            return shape(n_ff)
    return None


def infer_n_ff(definition: Architecture, parameters: int, n_layer: int, n_embd: int, n_head: int, n_head_kv: int,
               head_dim: int, n_vocab: int) -> tuple[int, bool] | None:
    """Feed-forward width and embedding tying that give a registered architecture ``parameters`` weights.

    GGUF headers carry no feed-forward width in GgufFacts; the parameter count pins it down exactly (the count is
    linear in n_ff). None when no whole-number width fits (another layout).
    """
    g = SimpleNamespace(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_vocab=n_vocab,
                        context_length=2048)  # the GGUF header facts _manifest_shape reads
    shape = _manifest_shape(definition, parameters, g, head_dim)
    return (shape.n_ff, shape.tied_embeddings) if shape else None


def decoder_matrix_parameters(facts: ModelFacts) -> int:
    """GGUF: every tensor but the token-embedding lookup, unless that is also the output head."""
    if facts.tensors:
        return sum(t.n_elements for t in facts.tensors if facts.tied_embeddings or t.name != "token_embd.weight")
    embedding = facts.n_vocab * facts.n_embd
    return facts.parameters - (0 if facts.tied_embeddings else embedding)


def encoder_matrix_parameters(facts: ModelFacts) -> int:
    """ONNX, BERT-like: embeddings are a lookup; 4 attention + 2 feed-forward matrices per layer."""
    n_ff = facts.n_ff or 4 * facts.n_embd
    return facts.n_layer * (4 * facts.n_embd * facts.n_embd + 2 * facts.n_embd * n_ff)


def from_manifest(manifest: Manifest) -> ModelFacts:
    """Facts of an existing bundle: sizes as measured, shapes from the manifest's format facts."""
    return FORMATS[manifest.format].hook("facts_from_manifest")(manifest)


def gguf_from_manifest(manifest: Manifest) -> ModelFacts:
    """GGUF bundle: shapes from the manifest's gguf facts, per-tensor types from llama.cpp's quantization rules."""
    g = manifest.gguf
    if g is None:
        raise ConfigError(f"bundle {manifest.name}: GGUF manifest without 'gguf' facts; re-export it")
    head_k = g.key_length or g.n_embd // g.n_head
    head_v = g.value_length or g.n_embd // g.n_head
    notes: list[str] = []
    tensors: tuple[Tensor, ...] = ()
    n_ff = tied = None
    definition = by_gguf_name(g.architecture)
    inferred = _manifest_shape(definition, manifest.parameters, g, head_k) if definition and head_k == head_v else None
    if inferred and g.quant_type in FILE_TYPES:
        shape = inferred
        n_ff, tied = shape.n_ff, shape.tied_embeddings
        tensors = tuple(definition_tensors(definition, shape, g.quant_type))
    else:
        notes.append("per-tensor types unknown (unregistered architecture or file type); weight repacking not estimated")
    return ModelFacts(
        name=manifest.name, format=manifest.format, task=manifest.task, quant=g.quant_type, parameters=manifest.parameters,
        n_layer=g.n_layer, n_embd=g.n_embd, n_head=g.n_head, n_head_kv=g.n_head_kv, head_dim_k=head_k, head_dim_v=head_v,
        n_vocab=g.n_vocab, context_length=g.context_length, weights_bytes=manifest.file(".gguf").bytes,
        bundle_bytes=manifest.total_bytes, origin="bundle", n_ff=n_ff, tied_embeddings=tied, tensors=tensors,
        notes=tuple(notes),
    )


def onnx_from_manifest(manifest: Manifest) -> ModelFacts:
    """ONNX bundle: shapes from the manifest's onnx facts, weights as the initializers' bytes."""
    o = manifest.onnx
    if o is None or not o.hidden_size or not o.n_layer:
        raise ConfigError(f"bundle {manifest.name}: ONNX manifest without layer count and hidden size; re-export it")
    n_head = max(o.hidden_size // 64, 1)  # 64-wide heads, as in every BERT-family config in the recipe library
    return ModelFacts(
        name=manifest.name, format=manifest.format, task=manifest.task, quant=manifest.quantization, parameters=manifest.parameters,
        n_layer=o.n_layer, n_embd=o.hidden_size, n_head=n_head, n_head_kv=n_head, head_dim_k=64, head_dim_v=64,
        n_vocab=0, context_length=manifest.runtime.max_length, weights_bytes=o.initializer_bytes,
        bundle_bytes=manifest.total_bytes, origin="bundle", max_length=manifest.runtime.max_length,
        notes=("feed-forward width assumed 4 x hidden (not in the manifest)",),
    )


def from_recipe(recipe: Recipe, target: OnnxTarget | GgufTarget) -> ModelFacts:
    """Predicted facts of a recipe target before export or download, from its ``architecture:`` facts."""
    arch = recipe.architecture
    if arch is None:
        raise ConfigError(
            f"recipe {recipe.name}: no 'architecture:' facts, so sizes cannot be predicted before download",
            hint="add an architecture: block with the source's config.json facts (see recipes/ for examples)",
        )
    return FORMATS[target.format].hook("facts_from_recipe")(recipe, target, arch)


def _common_recipe_facts(recipe: Recipe, target: OnnxTarget | GgufTarget, arch: ArchitectureFacts) -> dict:
    head_dim = arch.head_dim or arch.hidden_size // arch.n_head
    return dict(
        name=recipe.bundle_name(target), format=target.format, task=recipe.task, parameters=arch.parameters,
        n_layer=arch.n_layer, n_embd=arch.hidden_size, n_head=arch.n_head, n_head_kv=arch.n_head_kv,
        head_dim_k=head_dim, head_dim_v=head_dim, n_vocab=arch.vocab_size, n_ff=arch.intermediate_size,
        tied_embeddings=arch.tie_word_embeddings, origin="recipe",
    )


def gguf_from_recipe(recipe: Recipe, target: GgufTarget, arch: ArchitectureFacts) -> ModelFacts:
    """GGUF target: every tensor of the registered architecture, typed by llama.cpp's quantization rules, plus metadata."""
    definition, shape, notes = recipe_shape(arch)
    tensors = tuple(definition_tensors(definition, shape, target.quant))
    tensor_bytes = definition_data_bytes(definition, shape, target.quant)
    # Without a named architecture, sizes scale to the recorded parameter count (layout only approximately known).
    scale = 1.0 if arch.hf_architecture else arch.parameters / definition.parameters(shape)
    weights = int(tensor_bytes * scale + GGUF_HEADER_BYTES_PER_TOKEN * arch.vocab_size)
    return ModelFacts(
        quant=target.quant, context_length=recipe.max_length or arch.context_length,
        weights_bytes=weights, bundle_bytes=weights, tensors=tensors, notes=tuple(notes),
        architecture=definition.name, sliding_window=shape.sliding_window, sliding_layers=len(shape.sliding_layers),
        **_common_recipe_facts(recipe, target, arch),
    )


def onnx_from_recipe(recipe: Recipe, target: OnnxTarget, arch: ArchitectureFacts) -> ModelFacts:
    """ONNX target: initializer bytes of the quantized encoder plus its tokenizer.json."""
    weights = onnx_weight_bytes(arch, target, recipe.task)
    max_length = min(recipe.max_length or arch.context_length, arch.context_length)
    tokenizer = int(TOKENIZER_JSON_BYTES_PER_TOKEN * arch.vocab_size)
    quant = target.quantization.label if target.quantization else "fp32"
    return ModelFacts(
        quant=quant, context_length=max_length, weights_bytes=weights, bundle_bytes=weights + tokenizer,
        max_length=max_length, **_common_recipe_facts(recipe, target, arch),
    )


def onnx_weight_bytes(arch: ArchitectureFacts, target: OnnxTarget, task: str) -> int:
    """Initializer bytes of an exported BERT-family encoder: quantized matrices and embeddings, the rest fp32."""
    h, ff = arch.hidden_size, arch.intermediate_size
    matrices = arch.n_layer * (4 * h * h + 2 * h * ff)
    embeddings = (arch.vocab_size + arch.context_length) * h
    rest = max(arch.parameters - matrices - embeddings, 0)
    if not TASKS[task].reads_pooler and rest >= h * h + h:
        # A BERT pooler (h x h + h) in the checkpoint is unused by these heads and pruned from the graph
        # (all-MiniLM-L6-v2: 147,840 of its 22.7M parameters).
        rest -= h * h + h
    spec = target.quantization
    if spec is None:
        return 4 * arch.parameters
    quantized = 0
    if "MatMul" in spec.operators:
        per_weight = 1 + (ONNX_SCALE_BYTES / spec.block_size if spec.mode == "dynamic" and spec.block_size else 0)
        quantized += int(matrices * per_weight)
    else:
        rest += matrices
    if "Gather" in spec.operators or "EmbedLayerNormalization" in spec.operators:
        quantized += embeddings
    else:
        rest += embeddings
    return quantized + 4 * rest


def bits_per_weight(facts: ModelFacts) -> float:
    """Bits of weight data per parameter (what llama.cpp reports as BPW)."""
    return 8 * facts.weights_bytes / max(facts.parameters, 1)


def ggml_base_type(quant: str) -> str:
    """The ggml type most matrices of a file type use (F16 for unknown names)."""
    return FILE_TYPES.get(quant, quant if quant in GGML_TYPES else "F16")
