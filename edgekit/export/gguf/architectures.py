"""Architectures the GGUF converter knows, as data: one row per Hugging Face ``model_type``.

A row names the llama.cpp architecture (``gguf.MODEL_ARCH``), how config.json becomes GGUF
hyper-parameters, which checkpoint tensors are dropped, how a tensor's layout changes on the
way, and extra tensors llama.cpp wants. Tensor *names* come from gguf's own
``TensorNameMap`` for that architecture, so a row never lists them. Adding an architecture is
one more row (plus, if needed, one small function).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter, RopeScalingType

from edgekit.errors import ExportError

Config = dict
Transform = Callable[[str, np.ndarray, Config], np.ndarray]


def head_dim(config: Config) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def n_head_kv(config: Config) -> int:
    return int(config.get("num_key_value_heads") or config["num_attention_heads"])


def _rope_scaling(config: Config) -> dict | None:
    scaling = config.get("rope_scaling") or None
    if scaling is None:
        return None
    return {**scaling, "rope_type": scaling.get("rope_type") or scaling.get("type")}


def write_decoder_hparams(writer: GGUFWriter, config: Config) -> None:
    """Hyper-parameters shared by llama-style decoders (keys as in gguf.Keys.LLM / Attention / Rope)."""
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(n_head_kv(config))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config["hidden_size"] // config["num_attention_heads"]:
        # llama.cpp assumes n_embd / n_head unless told otherwise.
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    scaling = _rope_scaling(config)
    if scaling is None or scaling["rope_type"] in ("default", "llama3"):
        return  # llama3 scaling travels as the rope_freqs tensor (see llama3_rope_factors)
    if scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling["rope_type"] == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    else:
        raise ExportError(
            f"rope_scaling type {scaling['rope_type']!r} is not supported by this converter",
            hint="supported: linear, yarn, llama3 (or none)",
        )


def unpermute_rotary_halves(name: str, tensor: np.ndarray, config: Config) -> np.ndarray:
    """HF llama q/k rows are laid out for rotate-half RoPE; llama.cpp's 'llama' rope rotates adjacent pairs.

    Per head, HF keeps the first halves of all rotary pairs, then the second halves;
    llama.cpp wants them interleaved (pair i at rows 2i, 2i+1). The same regrouping applies to
    biases. K uses the key/value head count (GQA).
    """
    if ".attn_q." in name:
        heads = int(config["num_attention_heads"])
    elif ".attn_k." in name:
        heads = n_head_kv(config)
    else:
        return tensor
    rows = tensor.shape[0]
    return tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


def llama3_rope_factors(config: Config) -> dict[str, np.ndarray]:
    """Llama 3.1+/3.2 frequency-dependent RoPE scaling as llama.cpp's ``rope_freqs`` tensor (one divisor per pair).

    Formula of Meta's reference code (``apply_scaling`` in llama-models) and transformers'
    ``_compute_llama3_parameters``: wavelengths shorter than original_ctx/high_freq_factor are
    kept, longer than original_ctx/low_freq_factor are divided by ``factor``, smooth in between.
    """
    scaling = _rope_scaling(config)
    if scaling is None or scaling["rope_type"] != "llama3":
        return {}
    dim = head_dim(config)
    base = float(config.get("rope_theta", 10000.0))
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    factors = np.where(
        wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth))
    )
    return {"rope_freqs.weight": factors.astype(np.float32)}


def _no_extra(config: Config) -> dict[str, np.ndarray]:
    return {}


def _identity(name: str, tensor: np.ndarray, config: Config) -> np.ndarray:
    return tensor


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face ``model_type`` becomes one llama.cpp architecture."""

    model_type: str
    arch: MODEL_ARCH
    examples: str  # models known to use the row
    hparams: Callable[[GGUFWriter, Config], None] = write_decoder_hparams
    transform: Transform = _identity
    extra_tensors: Callable[[Config], dict[str, np.ndarray]] = _no_extra
    # Checkpoint tensors with no GGUF counterpart (buffers recomputed by llama.cpp).
    skip: tuple[str, ...] = field(default=(r"\.rotary_emb\.inv_freq$",))

    @property
    def gguf_name(self) -> str:
        return MODEL_ARCH_NAMES[self.arch]

    def skipped(self, hf_name: str) -> bool:
        return any(re.search(pattern, hf_name) for pattern in self.skip)


# config.json model_type -> architecture. Sources: llama.cpp src/llama-arch.cpp and
# src/llama-model.cpp (what the runtime loads), gguf-py constants (key and tensor names).
ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        # llama.cpp's LLM_ARCH_LLAMA uses LLAMA_ROPE_TYPE_NORM (adjacent pairs), hence the q/k regrouping.
        Architecture(
            "llama", MODEL_ARCH.LLAMA, "SmolLM2, TinyLlama, Llama-3.2",
            transform=unpermute_rotary_halves, extra_tensors=llama3_rope_factors,
        ),
        # LLM_ARCH_QWEN2 uses LLAMA_ROPE_TYPE_NEOX (rotate-half, the HF layout): tensors pass as they are,
        # including the q/k/v biases.
        Architecture("qwen2", MODEL_ARCH.QWEN2, "Qwen2, Qwen2.5"),
    )
}


def architecture_for(config: Config) -> Architecture:
    """The row for a checkpoint's config.json; unknown model types name the supported ones."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        supported = ", ".join(f"{name} ({row.examples})" for name, row in sorted(ARCHITECTURES.items()))
        raise ExportError(
            f"model_type {model_type!r} is not supported by the GGUF converter",
            hint=f"supported model types: {supported}",
        )
    return ARCHITECTURES[model_type]
