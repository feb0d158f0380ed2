"""Weight types as tables: bytes per block of each ggml type, and which type llama.cpp's quantizer gives each tensor.

With these, the size of a GGUF file is predicted from config.json facts alone, before anything is
downloaded, including the fallbacks that make small models bigger than their nominal bits per weight
(a 576-wide SmolLM2 matrix cannot hold 256-weight K-quant blocks, so Q4_K becomes Q5_0).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.architectures import Architecture, ModelShape, TensorSpec, gguf_data_bytes
from edgekit.formats.gguf import FILE_TYPES as GGUF_FILE_TYPES
from edgekit.formats.gguf import GGML_TYPES

# llama.cpp file type (recipe `quant:`) -> default ggml type of its matrices.
FILE_TYPES: dict[str, str] = {name: file_type.main_type for name, file_type in GGUF_FILE_TYPES.items()}

# Published bits per weight of whole files (Llama-3.1-8B). Shown next to the per-model prediction;
# small models differ (see module doc).
PUBLISHED_BPW: dict[str, float] = {name: t.published_bpw for name, t in GGUF_FILE_TYPES.items() if t.published_bpw}

# When a tensor's row width is not a multiple of the chosen type's block, llama.cpp falls back.
# Source: llama-quant.cpp, llama_tensor_get_type, `convert_incompatible_tensor`.
FALLBACK: dict[str, str] = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# Quality order for `edgekit plan`: the first that fits wins (mean KL divergence vs FP16 rises down the list).
QUALITY_ORDER = sorted((name for name, t in GGUF_FILE_TYPES.items() if t.kld_rank is not None),
                       key=lambda name: GGUF_FILE_TYPES[name].kld_rank)
PLAN_LADDER = [name for name, t in GGUF_FILE_TYPES.items() if t.in_plan_ladder]


def tensor_bytes(ggml_type: str, n_elements: int, row: int) -> int:
    """Bytes of a tensor of ``n_elements`` weights in rows of ``row`` weights."""
    block, size = GGML_TYPES[ggml_type]
    if row % block:
        raise ValueError(f"rows of {row} do not divide into {ggml_type} blocks of {block}")
    return n_elements // block * size


@dataclass(frozen=True)
class Tensor:
    """One weight tensor of a GGUF file: name, row width (ne[0]), rows (ne[1]) and its ggml type."""

    name: str
    row: int
    rows: int
    ggml_type: str

    @property
    def n_elements(self) -> int:
        return self.row * self.rows

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.ggml_type, self.n_elements, self.row)


def _use_more_bits(i_layer: int, n_layer: int) -> bool:
    # llama-quant.cpp: the first and last eighth of the layers, and every third one between.
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _choose(name: str, row: int, file_type: str, layer: int | None, shape: ModelShape) -> str:
    """The ggml type llama.cpp's quantizer gives one matrix (llama_tensor_get_type, for the file types above)."""
    base = FILE_TYPES[file_type]
    if base in ("F32", "F16", "BF16"):
        return base
    chosen = base
    is_output = name == "output.weight" or (shape.tied_embeddings and name == "token_embd.weight")
    if is_output:
        # The output head gets Q6_K unless the file type is Q8_0, or Q8_0 when rows do not fit the block.
        if row % GGML_TYPES[base][0]:
            return "Q8_0"
        chosen = base if base == "Q8_0" else "Q6_K"
    elif name == "token_embd.weight":
        chosen = base
    elif name.endswith(("attn_v.weight", "attn_qkv.weight")):  # fused q/k/v (phi3) follows attn_v's rules
        if file_type == "Q2_K":
            chosen = "Q4_K" if shape.n_head // shape.n_head_kv >= 4 else "Q3_K"
        elif file_type == "Q3_K_M":
            chosen = "Q5_K" if layer < 2 else "Q4_K"
        elif file_type in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, shape.n_layer):
            chosen = "Q6_K"
        elif file_type == "Q4_K_S" and layer < 4:
            chosen = "Q5_K"
    elif name.endswith("ffn_down.weight"):
        if file_type == "Q2_K":
            chosen = "Q3_K"
        elif file_type == "Q3_K_M":
            chosen = "Q5_K" if layer < shape.n_layer // 16 else "Q4_K" if _use_more_bits(layer, shape.n_layer) else "Q3_K"
        elif file_type == "Q4_K_M" and _use_more_bits(layer, shape.n_layer):
            chosen = "Q6_K"
        elif file_type == "Q5_K_M" and _use_more_bits(layer, shape.n_layer):
            chosen = "Q6_K"
        elif file_type == "Q4_K_S" and layer < shape.n_layer // 8:
            chosen = "Q5_K"
    elif name.endswith("attn_output.weight"):
        if file_type == "Q2_K":
            chosen = "Q3_K"
        elif file_type == "Q3_K_M":
            chosen = "Q4_K"
    if row % GGML_TYPES[chosen][0]:
        chosen = FALLBACK.get(chosen, chosen)
        if row % GGML_TYPES[chosen][0]:
            chosen = "F16"
    return chosen


def definition_tensors(arch: Architecture, shape: ModelShape, file_type: str) -> list[Tensor]:
    """Every 2-D weight of a registered architecture with the type llama.cpp's quantizer would give it."""
    if file_type not in FILE_TYPES:
        raise KeyError(f"unknown GGUF file type {file_type!r}; known: {', '.join(FILE_TYPES)}")
    out = []
    for spec in arch.tensors(shape):
        if not spec.is_matrix or spec.name.endswith("_norm.weight"):
            continue
        layer = int(spec.name.split(".")[1]) if spec.name.startswith("blk.") else None
        out.append(Tensor(spec.name, spec.row, spec.shape[0], _choose(spec.name, spec.row, file_type, layer, shape)))
    return out


def definition_data_bytes(arch: Architecture, shape: ModelShape, file_type: str) -> int:
    """Bytes of a GGUF file's tensor data for a registered architecture: matrices as typed, vectors F32, each aligned."""
    types = {t.name: t for t in definition_tensors(arch, shape, file_type)}

    def nbytes(spec: TensorSpec) -> int:
        return types[spec.name].nbytes if spec.name in types else 4 * spec.n_elements

    return gguf_data_bytes(arch.tensors(shape), nbytes)


# GGUF metadata bytes per vocabulary entry: token string with its u64 length, token type, and
# BPE merges. Measured on SmolLM2-135M (49,152 tokens, 48,900 merges): 1,785,664 header bytes.
GGUF_HEADER_BYTES_PER_TOKEN = 36.3
