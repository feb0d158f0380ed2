"""How the converter applies an architecture definition (``edgekit.architectures``) to a checkpoint.

The definition says what the model is; this module holds the numpy and gguf side of it: the GGUF
hyper-parameter keys, the tensor transforms (q/k regrouping for llama.cpp's adjacent-pair rope,
gemma's norm offset) and the computed extra tensors (Llama 3 ``rope_freqs``, Phi-3 long/short rope
factors). Tensor *names* come from gguf's ``TensorNameMap`` for the architecture; their set and
shapes must equal what the definition lists.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter, RopeScalingType

from edgekit.architectures import Architecture, ModelShape
from edgekit.architectures import architecture_for as definition_for

Config = dict
GGUF_ARCHS = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}
# Checkpoint tensors with no GGUF counterpart (buffers recomputed by llama.cpp).
SKIPPED = (r"\.rotary_emb\.inv_freq$",)


def write_hparams(writer: GGUFWriter, arch: Architecture, shape: ModelShape, config: Config) -> None:
    """Hyper-parameters (keys as in gguf.Keys.LLM / Attention / Rope), as llama.cpp's converter writes them per family."""
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.n_vocab)
    writer.add_rope_dimension_count(shape.rope_dims)
    if shape.head_dim != shape.n_embd // shape.n_head:
        # llama.cpp assumes n_embd / n_head unless told otherwise.
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    scaling = shape.rope_scaling
    if shape.rope_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif shape.rope_type == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif shape.rope_type in ("longrope", "su"):
        # Phi3MiniModel.generate_extra_tensors: the attention factor of LongRoPE, from the context extension.
        original = int(shape.original_context_length)
        scale = shape.context_length / original
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
    if arch.gguf_arch == "phi3":
        if shape.original_context_length:
            writer.add_rope_scaling_orig_ctx_len(int(shape.original_context_length))
        # 0 marks "no sliding window" (Phi-4); llama.cpp disables Phi's SWA either way.
        writer.add_sliding_window(int(config.get("sliding_window") or 0))
    if arch.swa_period:
        writer.add_sliding_window(int(shape.sliding_window or shape.context_length))
    if arch.gguf_arch == "gemma3":
        # Local layers' rope base, as llama.cpp's converter records it (the runtime defaults to the same 10000).
        writer.add_rope_freq_base_swa(float(config.get("rope_local_base_freq") or 10000.0))
    if arch.gguf_arch == "gemma2":
        writer.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping") or 50.0))
        writer.add_final_logit_softcapping(float(config.get("final_logit_softcapping") or 30.0))


def unpermute_rotary_halves(name: str, tensor: np.ndarray, shape: ModelShape) -> np.ndarray:
    """HF llama q/k rows are laid out for rotate-half RoPE; llama.cpp's 'llama' rope rotates adjacent pairs.

    Per head, HF keeps the first halves of all rotary pairs, then the second halves;
    llama.cpp wants them interleaved (pair i at rows 2i, 2i+1). The same regrouping applies to
    biases. K uses the key/value head count (GQA).
    """
    if ".attn_q." in name:
        heads = shape.n_head
    elif ".attn_k." in name:
        heads = shape.n_head_kv
    else:
        return tensor
    rows = tensor.shape[0]
    return tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


def llama3_rope_factors(shape: ModelShape) -> np.ndarray:
    """Llama 3.1+/3.2 frequency-dependent RoPE scaling as llama.cpp's ``rope_freqs`` tensor (one divisor per pair).

    Formula of Meta's reference code (``apply_scaling`` in llama-models) and transformers'
    ``_compute_llama3_parameters``: wavelengths shorter than original_ctx/high_freq_factor are
    kept, longer than original_ctx/low_freq_factor are divided by ``factor``, smooth in between.
    """
    scaling = shape.rope_scaling
    dim = shape.rope_dims
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / shape.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    factors = np.where(
        wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth))
    )
    return factors.astype(np.float32)


def extra_tensors(shape: ModelShape) -> dict[str, np.ndarray]:
    """Tensors llama.cpp wants that the checkpoint computes at run time (rope factors)."""
    if shape.rope_type == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(shape)}
    if shape.rope_type in ("longrope", "su"):
        return {"rope_factors_long.weight": np.asarray(shape.rope_scaling["long_factor"], dtype=np.float32),
                "rope_factors_short.weight": np.asarray(shape.rope_scaling["short_factor"], dtype=np.float32)}
    return {}


@dataclass(frozen=True)
class ConverterArchitecture:
    """A definition bound to one checkpoint's config: what the converter needs to write it."""

    definition: Architecture
    shape: ModelShape
    config: Config

    @property
    def arch(self) -> MODEL_ARCH:
        return GGUF_ARCHS[self.definition.gguf_arch]

    @property
    def gguf_name(self) -> str:
        return self.definition.gguf_arch

    def skipped(self, hf_name: str) -> bool:
        return any(re.search(pattern, hf_name) for pattern in SKIPPED)

    def hparams(self, writer: GGUFWriter) -> None:
        write_hparams(writer, self.definition, self.shape, self.config)

    def transform(self, gguf_name: str, tensor: np.ndarray) -> np.ndarray:
        if self.definition.rope_layout == "norm":
            tensor = unpermute_rotary_halves(gguf_name, tensor, self.shape)
        if self.definition.norm_offset and gguf_name.endswith("norm.weight"):
            tensor = tensor + np.float32(self.definition.norm_offset)
        return tensor

    def extra_tensors(self) -> dict[str, np.ndarray]:
        return extra_tensors(self.shape)


def architecture_for(config: Config) -> ConverterArchitecture:
    """The registered definition for a checkpoint's config.json, bound to it (ConfigError when unregistered)."""
    definition = definition_for(config)
    return ConverterArchitecture(definition, definition.shape(config), config)
