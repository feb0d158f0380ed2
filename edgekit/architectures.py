"""Decoder architectures as data: one registered definition per Hugging Face ``architectures`` name.

A definition says how a checkpoint's config.json reads (hyper-parameters, with the fields it cannot
express refused by name), which GGUF tensors the model has and their shapes (fused q/k/v, per-layer
norms, q/k biases and norms, tied embeddings, rope-factor tensors), how the converter lays them out
for llama.cpp, and how its KV cache is laid out (sliding-window layers). The GGUF converter
(``edgekit.export.gguf``) and the fit estimator (``edgekit.fit``) both read these definitions, so
a size the estimator predicts is the size the converter writes. Pure Python: the estimator runs
on boards and CI runners without numpy, gguf or torch.

Sources: llama.cpp's ``convert_hf_to_gguf.py`` (one ``@ModelBase.register`` class per family) and
``src/llama-model.cpp`` (what the runtime loads), gguf-py ``constants.py`` (tensor names per arch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from edgekit.errors import ConfigError

Config = dict
# GGUF aligns every tensor's data to this many bytes (gguf-py GGUF_DEFAULT_ALIGNMENT, general.alignment).
GGUF_ALIGNMENT = 32


@dataclass(frozen=True)
class ModelShape:
    """config.json as one architecture reads it, with every default applied (a NormalizedConfig)."""

    architecture: str  # the registered Hugging Face architectures name
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    context_length: int
    tied_embeddings: bool
    rope_dims: int  # rotated dimensions per head (partial rotary: fewer than head_dim)
    rope_theta: float
    rms_eps: float
    rope_type: str  # "default" when the config has no rope_scaling
    rope_scaling: dict = field(default_factory=dict, hash=False, compare=False)
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()  # layers whose KV cache holds only the last sliding_window tokens
    original_context_length: int | None = None

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor: its name and numpy-order shape ((rows, row width) for a matrix)."""

    name: str
    shape: tuple[int, ...]

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2

    @property
    def row(self) -> int:
        return self.shape[-1]


def _get(config: Config, key: str, default=None):
    value = config.get(key)
    return default if value is None else value


def _need(config: Config, key: str):
    if config.get(key) is None:
        raise ConfigError(f"config.json has no '{key}'", hint="the checkpoint's config.json is incomplete")
    return config[key]


def rope_scaling_of(config: Config) -> dict:
    scaling = config.get("rope_scaling") or {}
    return {**scaling, "rope_type": scaling.get("rope_type") or scaling.get("type") or "default"}


@dataclass(frozen=True)
class Architecture:
    """One decoder family: how its config reads, which tensors it has, how llama.cpp wants them."""

    hf_names: tuple[str, ...]  # config.json `architectures` values
    model_types: tuple[str, ...]  # config.json `model_type` values (checkpoints saved without `architectures`)
    gguf_arch: str  # llama.cpp architecture (gguf MODEL_ARCH_NAMES, general.architecture)
    examples: str
    source: str
    # "norm": llama.cpp rotates adjacent pairs, so HF's rotate-half q/k rows are regrouped; "neox": HF layout.
    rope_layout: Literal["norm", "neox"] = "neox"
    rope_types: tuple[str, ...] = ("default",)  # rope_scaling types the runtime implements for this arch
    qkv_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k (qwen3, gemma3)
    fused_qkv: bool = False  # one attn_qkv matrix (phi3)
    fused_gate_up: bool = False  # ffn_up holds gate and up stacked (phi3)
    post_norms: bool = False  # sandwich norms after attention and feed-forward (gemma2, gemma3)
    norm_offset: float = 0.0  # HF stores RMSNorm weights as w - 1 (gemma): llama.cpp wants w
    always_tied: bool = False  # the output head is the embedding whatever the config says (gemma)
    # tie_word_embeddings when config.json omits it: the transformers config class's default
    # (save_pretrained leaves out values equal to it).
    tied_default: bool = False
    # Every swa_period-th layer attends globally, the others over a sliding window (0: no sliding window).
    swa_period: int = 0
    check: Callable[[Config], None] = lambda config: None  # config fields this definition cannot express

    @property
    def name(self) -> str:
        return self.hf_names[0]

    def shape(self, config: Config) -> ModelShape:
        """Read config.json; fields the definition cannot express are a ConfigError naming the field."""
        n_embd, n_head = int(_need(config, "hidden_size")), int(_need(config, "num_attention_heads"))
        scaling = rope_scaling_of(config)
        self.check_rope_type(scaling["rope_type"], "config.json rope_scaling.rope_type")
        self.check(config)
        shape = self.make_shape(
            n_layer=int(_need(config, "num_hidden_layers")), n_embd=n_embd, n_ff=int(_need(config, "intermediate_size")),
            n_head=n_head, n_head_kv=int(_get(config, "num_key_value_heads", n_head)),
            head_dim=int(_get(config, "head_dim", n_embd // n_head)), n_vocab=int(_need(config, "vocab_size")),
            context_length=int(_get(config, "max_position_embeddings", 2048)),
            tied_embeddings=bool(_get(config, "tie_word_embeddings", self.tied_default)),
            partial_rotary_factor=float(_get(config, "partial_rotary_factor", 1.0)),
            rope_theta=float(_get(config, "rope_theta", 10000.0)), rms_eps=float(_get(config, "rms_norm_eps", 1e-6)),
            rope_scaling=scaling, sliding_window=config.get("sliding_window"),
            original_context_length=config.get("original_max_position_embeddings"),
        )
        layer_types = config.get("layer_types")
        if shape.sliding_layers and layer_types is not None:
            expected = ["sliding_attention" if i in shape.sliding_layers else "full_attention" for i in range(shape.n_layer)]
            if list(layer_types) != expected:
                raise ConfigError(
                    f"config.json layer_types does not follow {self.name}'s pattern (every {self.swa_period}th layer global)",
                    hint="llama.cpp fixes the sliding-window pattern per architecture; this checkpoint differs",
                )
        return shape

    def check_rope_type(self, rope_type: str, field_name: str) -> None:
        if rope_type not in self.rope_types:
            raise ConfigError(
                f"{field_name} {rope_type!r} is not supported for {self.name}",
                hint=f"supported rope types for {self.gguf_arch}: {', '.join(self.rope_types)}",
            )

    def make_shape(self, *, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int, head_dim: int, n_vocab: int,
                   context_length: int, tied_embeddings: bool, partial_rotary_factor: float = 1.0,
                   rope_theta: float = 10000.0, rms_eps: float = 1e-6, rope_scaling: dict | None = None,
                   sliding_window: int | None = None, original_context_length: int | None = None) -> ModelShape:
        """A shape from already-read facts (config.json, or a recipe's architecture block)."""
        scaling = rope_scaling or {"rope_type": "default"}
        window = int(sliding_window) if self.swa_period and sliding_window else None
        sliding = tuple(i for i in range(n_layer) if (i + 1) % self.swa_period) if window else ()
        return ModelShape(
            architecture=self.name, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
            head_dim=head_dim, n_vocab=n_vocab, context_length=context_length,
            tied_embeddings=self.always_tied or tied_embeddings, rope_dims=int(partial_rotary_factor * head_dim),
            rope_theta=rope_theta, rms_eps=rms_eps, rope_type=scaling["rope_type"], rope_scaling=scaling,
            sliding_window=window, sliding_layers=sliding, original_context_length=original_context_length,
        )

    def tensors(self, shape: ModelShape) -> list[TensorSpec]:
        """Every tensor of the GGUF file, numpy-order shapes (llama.cpp's ne reversed)."""
        e, ff = shape.n_embd, shape.n_ff
        out = [TensorSpec("token_embd.weight", (shape.n_vocab, e)), TensorSpec("output_norm.weight", (e,))]
        if not shape.tied_embeddings:
            out.append(TensorSpec("output.weight", (shape.n_vocab, e)))
        if shape.rope_type == "llama3":
            out.append(TensorSpec("rope_freqs.weight", (shape.rope_dims // 2,)))
        if shape.rope_type in ("longrope", "su"):
            out += [TensorSpec("rope_factors_long.weight", (shape.rope_dims // 2,)),
                    TensorSpec("rope_factors_short.weight", (shape.rope_dims // 2,))]
        for i in range(shape.n_layer):
            b = f"blk.{i}."
            out.append(TensorSpec(b + "attn_norm.weight", (e,)))
            if self.fused_qkv:
                out.append(TensorSpec(b + "attn_qkv.weight", (shape.q_dim + 2 * shape.kv_dim, e)))
            else:
                out += [TensorSpec(b + "attn_q.weight", (shape.q_dim, e)), TensorSpec(b + "attn_k.weight", (shape.kv_dim, e)),
                        TensorSpec(b + "attn_v.weight", (shape.kv_dim, e))]
            if self.qkv_bias:
                out += [TensorSpec(b + "attn_q.bias", (shape.q_dim,)), TensorSpec(b + "attn_k.bias", (shape.kv_dim,)),
                        TensorSpec(b + "attn_v.bias", (shape.kv_dim,))]
            if self.qk_norm:
                out += [TensorSpec(b + "attn_q_norm.weight", (shape.head_dim,)),
                        TensorSpec(b + "attn_k_norm.weight", (shape.head_dim,))]
            out.append(TensorSpec(b + "attn_output.weight", (e, shape.q_dim)))
            if self.post_norms:
                out.append(TensorSpec(b + "post_attention_norm.weight", (e,)))
            out.append(TensorSpec(b + "ffn_norm.weight", (e,)))
            if self.fused_gate_up:
                out.append(TensorSpec(b + "ffn_up.weight", (2 * ff, e)))
            else:
                out += [TensorSpec(b + "ffn_gate.weight", (ff, e)), TensorSpec(b + "ffn_up.weight", (ff, e))]
            out.append(TensorSpec(b + "ffn_down.weight", (e, ff)))
            if self.post_norms:
                out.append(TensorSpec(b + "post_ffw_norm.weight", (e,)))
        return out

    def parameters(self, shape: ModelShape) -> int:
        """Parameter count as the converter reports it (rope factor tensors are not parameters)."""
        return sum(t.n_elements for t in self.tensors(shape) if not t.name.startswith("rope_"))

    def kv_cells(self, shape: ModelShape, n_ctx: int, n_ubatch: int = 512) -> list[int]:
        """KV cache cells per layer for a context of n_ctx: sliding layers keep window + one batch (llama-kv-cache-iswa)."""
        sliding = set(shape.sliding_layers)
        window = min(n_ctx, (shape.sliding_window or n_ctx) + n_ubatch)
        return [window if i in sliding else n_ctx for i in range(shape.n_layer)]


def gguf_data_bytes(tensors: list[TensorSpec], type_bytes: Callable[[TensorSpec], int]) -> int:
    """Bytes of a GGUF file's tensor data: each tensor's bytes padded to the file's alignment."""
    return sum(-(-type_bytes(t) // GGUF_ALIGNMENT) * GGUF_ALIGNMENT for t in tensors)


def _gemma2_check(config: Config) -> None:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    # llama.cpp scales queries by 1/sqrt(head_dim) except for the 27B's 46 layers (n_embd / n_head).
    expected = config["hidden_size"] // config["num_attention_heads"] if config.get("num_hidden_layers") == 46 else head_dim
    if config.get("query_pre_attn_scalar", expected) != expected:
        raise ConfigError(f"config.json query_pre_attn_scalar {config['query_pre_attn_scalar']} is not supported",
                          hint=f"llama.cpp scales queries by 1/sqrt({expected}) for this shape")


def _gemma3_check(config: Config) -> None:
    _gemma2_check(config)
    # llama.cpp hard-codes the local layers' rope base (hparams.rope_freq_base_train_swa = 10000).
    if float(config.get("rope_local_base_freq", 10000.0)) != 10000.0:
        raise ConfigError(f"config.json rope_local_base_freq {config['rope_local_base_freq']} is not supported",
                          hint="llama.cpp's gemma3 uses 10000 on sliding-window layers")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key) is not None:
            raise ConfigError(f"config.json {key} is set; llama.cpp's gemma3 has no soft-capping")


def _smollm3_check(config: Config) -> None:
    # llama.cpp skips rope on every 4th layer (hparams.n_no_rope_layer_step = 4 for LLM_ARCH_SMOLLM3).
    n_layer = int(config["num_hidden_layers"])
    interval = int(config.get("no_rope_layer_interval") or 4)
    expected = [int((i + 1) % interval != 0) for i in range(n_layer)]
    if interval != 4 or list(config.get("no_rope_layers") or expected) != expected:
        raise ConfigError("config.json no_rope_layers does not follow SmolLM3's pattern (no rope on every 4th layer)",
                          hint="llama.cpp fixes that pattern for smollm3")


def _phi3_check(config: Config) -> None:
    scaling = rope_scaling_of(config)
    if scaling["rope_type"] in ("longrope", "su"):
        rope_dims = int(float(config.get("partial_rotary_factor") or 1.0)
                        * (config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]))
        for key in ("long_factor", "short_factor"):
            if len(scaling.get(key) or ()) != rope_dims // 2:
                raise ConfigError(f"config.json rope_scaling.{key} must hold {rope_dims // 2} factors (rotary dims / 2)")
        if not config.get("original_max_position_embeddings"):
            raise ConfigError("config.json has no original_max_position_embeddings (needed by longrope)")


def _registry(*rows: Architecture) -> dict[str, Architecture]:
    return {name: row for row in rows for name in row.hf_names}


ARCHITECTURES: dict[str, Architecture] = _registry(
    # llama.cpp LLM_ARCH_LLAMA: LLAMA_ROPE_TYPE_NORM; Llama 3.x frequency scaling travels as rope_freqs.
    Architecture(("LlamaForCausalLM",), ("llama",), "llama", "SmolLM2, TinyLlama, Llama-3.2",
                 "convert_hf_to_gguf.py LlamaModel", rope_layout="norm", rope_types=("default", "linear", "yarn", "llama3")),
    Architecture(("Qwen2ForCausalLM",), ("qwen2",), "qwen2", "Qwen2, Qwen2.5",
                 "convert_hf_to_gguf.py Qwen2Model", rope_types=("default", "linear", "yarn"), qkv_bias=True),
    Architecture(("Qwen3ForCausalLM",), ("qwen3",), "qwen3", "Qwen3",
                 "convert_hf_to_gguf.py Qwen3Model", rope_types=("default", "linear", "yarn"), qk_norm=True),
    # SmolLM3ForCausalLM: a llama layout (q/k regrouped as LlamaModel does) with rope skipped on every 4th layer.
    Architecture(("SmolLM3ForCausalLM",), ("smollm3",), "smollm3", "SmolLM3",
                 "convert_hf_to_gguf.py SmolLM3Model", rope_layout="norm", rope_types=("default",), tied_default=True,
                 check=_smollm3_check),
    Architecture(("Gemma2ForCausalLM",), ("gemma2",), "gemma2", "Gemma 2",
                 "convert_hf_to_gguf.py Gemma2Model", post_norms=True, norm_offset=1.0, always_tied=True, swa_period=2,
                 check=_gemma2_check),
    Architecture(("Gemma3ForCausalLM",), ("gemma3_text",), "gemma3", "Gemma 3 (text)",
                 "convert_hf_to_gguf.py Gemma3Model", rope_types=("default", "linear"), qk_norm=True, post_norms=True,
                 norm_offset=1.0, always_tied=True, swa_period=6, check=_gemma3_check),
    Architecture(("Phi3ForCausalLM",), ("phi3",), "phi3", "Phi-3.5-mini, Phi-4-mini",
                 "convert_hf_to_gguf.py Phi3MiniModel", rope_types=("default", "longrope", "su"), fused_qkv=True,
                 fused_gate_up=True, check=_phi3_check),
)


def by_gguf_name(gguf_arch: str) -> Architecture | None:
    """The definition writing a GGUF architecture (general.architecture), if one is registered."""
    return next((row for row in ARCHITECTURES.values() if row.gguf_arch == gguf_arch), None)


def registered() -> str:
    return ", ".join(f"{name} ({row.examples})" for name, row in sorted(ARCHITECTURES.items()))


def architecture_named(name: str) -> Architecture:
    """The definition registered under a Hugging Face architectures name; unknown names list the registered ones."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"architecture {name!r} is not registered", hint=f"registered: {registered()}")
    return ARCHITECTURES[name]


def architecture_for(config: Config) -> Architecture:
    """The definition for a checkpoint's config.json: by `architectures`, else by `model_type`."""
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if not names:
        for row in ARCHITECTURES.values():
            if config.get("model_type") in row.model_types:
                return row
    label = ", ".join(names) or f"model_type {config.get('model_type')!r}"
    raise ConfigError(f"config.json architecture {label} is not registered", hint=f"registered: {registered()}")
