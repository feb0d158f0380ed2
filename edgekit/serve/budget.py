"""Memory budget of the daemon and the footprint of one loaded model.

SEAM: ``footprint_bytes`` is a stand-in until ``edgekit.fit`` (the device-fit estimator) lands;
then it should call that estimator with the same inputs (manifest, n_ctx, slots) and this module
keeps only the budget side. The daemon only ever calls ``footprint_bytes`` and ``memory_budget``.
"""

from __future__ import annotations

from edgekit.errors import DeviceError
from edgekit.schema.manifest import Manifest
from edgekit.serve.settings import ServeSettings

MIB = 1024 * 1024
# Resident memory of a worker process before the model: Python + llama-cpp-python (+ numpy), or
# Python + onnxruntime + tokenizers + numpy. Measured on this project's x86-64 host (RSS right after
# the imports): 38 MiB and 62 MiB.
WORKER_BASELINE = {"gguf": 40 * MIB, "onnx": 64 * MIB}
# llama.cpp compute buffer per context: logits of one micro-batch (n_ubatch x n_vocab float32) plus
# activations; PREFILL_CHUNK is the n_ubatch the runtime uses.
KV_BYTES_PER_ELEMENT = 2  # f16 K and V cache (llama.cpp default type_k/type_v)
# Share of the host's available RAM the daemon lets models use when no device or budget is given.
HOST_SHARE = 0.85


def kv_cache_bytes(manifest: Manifest, n_ctx: int) -> int:
    """2 (K and V) * n_ctx * n_layer * n_head_kv * head_dim * bytes per element (DEVICE_FACTS memory model)."""
    facts = manifest.gguf
    if facts is None:
        return 0
    head_k = facts.key_length or facts.n_embd // facts.n_head
    head_v = facts.value_length or facts.n_embd // facts.n_head
    return n_ctx * facts.n_layer * facts.n_head_kv * (head_k + head_v) * KV_BYTES_PER_ELEMENT


def effective_n_ctx(manifest: Manifest, settings: ServeSettings) -> int:
    """Context the worker allocates: the setting, capped at the model's training context."""
    trained = manifest.runtime.context_length or (manifest.gguf.context_length if manifest.gguf else None)
    return min(settings.n_ctx, trained) if trained else settings.n_ctx


def footprint_bytes(manifest: Manifest, settings: ServeSettings) -> int:
    """Peak resident bytes of a worker serving ``manifest`` with these settings (weights + caches + runtime)."""
    from edgekit.runtime.llm import PREFILL_CHUNK

    weights = manifest.total_bytes
    if manifest.format == "gguf":
        n_ctx = effective_n_ctx(manifest, settings)
        n_vocab = manifest.gguf.n_vocab if manifest.gguf else 32000
        n_embd = manifest.gguf.n_embd if manifest.gguf else 2048
        compute = PREFILL_CHUNK * (n_vocab + 16 * n_embd) * 4
        return WORKER_BASELINE["gguf"] + weights + settings.slots * (kv_cache_bytes(manifest, n_ctx) + compute)
    # ONNX: onnxruntime keeps the initializers in RAM (plus pre-packed copies of MatMul weights) and the
    # activations of one micro-batch: batch x max_length x hidden x ~16 live float32 tensors.
    hidden = (manifest.onnx.hidden_size if manifest.onnx and manifest.onnx.hidden_size else 768)
    activations = settings.batch_max * manifest.runtime.max_length * hidden * 4 * 16
    return WORKER_BASELINE["onnx"] + 2 * weights + activations


def memory_budget(settings: ServeSettings) -> tuple[int, str]:
    """Bytes models may use, and where the figure came from."""
    if settings.memory_budget_mb is not None:
        return settings.memory_budget_mb * MIB, "--memory-budget-mb"
    if settings.device is not None:
        return device_budget(settings.device)
    import psutil

    available = psutil.virtual_memory().available
    return int(available * HOST_SHARE), f"{HOST_SHARE:.0%} of this host's available RAM"


def device_budget(device_id: str) -> tuple[int, str]:
    """Usable RAM of a catalogued device (total minus what its OS keeps)."""
    try:
        from edgekit.schema import device as device_schema
    except ImportError as exc:  # the device catalog is not part of this installation
        raise DeviceError(f"--device {device_id}: no device catalog available", hint="use --memory-budget-mb") from exc
    profile = device_schema.load_device(device_id)
    return int(profile.usable_ram_bytes), f"usable RAM of device profile {device_id}"
