"""Memory budget of the daemon and the footprint of one loaded model (estimated by ``edgekit.fit``).

A worker's footprint is ``edgekit.fit``'s peak-RSS estimate for one runtime process without the
web stack (the worker does not import it). Generation slots are separate llama.cpp contexts over
one mmapped file, so each slot past the first adds its KV cache, compute buffers and vocabulary.
"""

from __future__ import annotations

from edgekit.errors import ConfigError, DeviceError
from edgekit.schema.manifest import Manifest
from edgekit.serve.settings import ServeSettings

MIB = 1024 * 1024
# Share of the host's available RAM the daemon lets models use when no device or budget is given.
HOST_SHARE = 0.85
# The daemon process itself with no model loaded (web stack, no runtime): idle RSS measured by
# scripts/bench_serve.py, rounded up (docs/device-facts.md).
DAEMON_RSS = 80 * MIB
# Bundles whose manifest lacks the facts the estimator needs (older exports): twice the files plus a runtime.
FALLBACK_RUNTIME = 128 * MIB


def effective_n_ctx(manifest: Manifest, settings: ServeSettings) -> int:
    """Context the worker allocates: the setting, capped at the model's training context."""
    trained = manifest.runtime.context_length or (manifest.gguf.context_length if manifest.gguf else None)
    return min(settings.n_ctx, trained) if trained else settings.n_ctx


def footprint_bytes(manifest: Manifest, settings: ServeSettings) -> int:
    """Peak resident bytes of a worker serving ``manifest`` with these settings (weights + caches + runtime)."""
    from edgekit.fit import RunSettings, estimate_memory, from_manifest
    from edgekit.fit.memory import LLAMA_VOCAB_BYTES_PER_TOKEN
    from edgekit.runtime.llm import PREFILL_CHUNK

    try:
        facts = from_manifest(manifest)
    except ConfigError:
        return 2 * manifest.total_bytes + FALLBACK_RUNTIME
    if manifest.format == "gguf":
        one = estimate_memory(facts, RunSettings(n_ctx=effective_n_ctx(manifest, settings), parallel=1,
                                                 n_ubatch=PREFILL_CHUNK, daemon=False))
        per_extra_slot = one.kv_cache + one.compute + LLAMA_VOCAB_BYTES_PER_TOKEN * facts.n_vocab
        return one.total + (settings.slots - 1) * per_extra_slot
    # Encoders: the worst run is batch_max_tokens tokens (the worker splits micro-batches to stay within it).
    max_length = manifest.runtime.max_length
    texts = max(1, min(settings.batch_max, settings.batch_max_tokens // max_length))
    return estimate_memory(facts, RunSettings(n_ctx=max_length, parallel=texts, daemon=False)).total


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
    """Usable RAM of a catalogued device (installed minus what its OS keeps) minus the daemon's own memory."""
    from edgekit.schema.device import load_device

    device = load_device(device_id)  # DeviceError (exit 2) names the known devices
    budget = device.usable_ram_bytes - DAEMON_RSS
    if budget <= 0:
        raise DeviceError(f"device {device.id} has {device.usable_ram_bytes // MIB} MiB usable RAM, "
                          f"less than the daemon itself needs ({DAEMON_RSS // MIB} MiB)")
    return budget, f"usable RAM of device {device.id} minus the daemon"
