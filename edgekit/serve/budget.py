"""Memory budget of the daemon and the footprint of one loaded model (estimated by ``edgekit.fit``).

One truth with `edgekit fit` and `plan`: a worker's footprint is ``edgekit.fit.memory``'s required
bytes for one runtime process run as the worker runs it (generation slots are sequences of one llama.cpp
context sharing one KV pool; an encoder's largest micro-batch), and a device's budget is its usable RAM minus the
daemon's own process (``DAEMON_RSS``), which `fit` adds to the model's need instead. So `fit`
passes (or warns) exactly when this daemon admits the model on that device.
"""

from __future__ import annotations

from edgekit.errors import ConfigError, DeviceError
from edgekit.fit.memory import DAEMON_RSS, MIB
from edgekit.schema.manifest import Manifest
from edgekit.serve.settings import ServeSettings

__all__ = ["DAEMON_RSS", "MIB", "device_budget", "effective_n_ctx", "footprint_bytes", "memory_budget"]

# Share of the host's available RAM the daemon lets models use when no device or budget is given.
HOST_SHARE = 0.85
# Bundles whose manifest lacks the facts the estimator needs (older exports): twice the files plus a runtime.
FALLBACK_RUNTIME = 128 * MIB


def effective_n_ctx(manifest: Manifest, settings: ServeSettings) -> int:
    """Context the worker allocates: the setting, capped at the model's training context."""
    trained = manifest.runtime.context_length or (manifest.gguf.context_length if manifest.gguf else None)
    return min(settings.n_ctx, trained) if trained else settings.n_ctx


def footprint_bytes(manifest: Manifest, settings: ServeSettings) -> int:
    """Peak resident bytes of a worker serving ``manifest`` with these settings (weights + caches + runtime)."""
    from edgekit.fit import from_manifest
    from edgekit.formats import FORMATS
    from edgekit.runtime.llama_params import PREFILL_CHUNK

    try:
        facts = from_manifest(manifest)
    except ConfigError:
        return 2 * manifest.total_bytes + FALLBACK_RUNTIME
    worker_bytes = FORMATS[manifest.format].hook("worker_bytes")
    return worker_bytes(facts, effective_n_ctx(manifest, settings), PREFILL_CHUNK, settings.slots,
                        settings.batch_max, settings.batch_max_tokens, job_texts=settings.max_embedding_inputs,
                        prompt_cache_contexts=settings.prompt_cache_contexts)


def footprint_terms(manifest: Manifest, settings: ServeSettings) -> str:
    """What a worker's footprint covers, in words for messages (an encoder has no KV cache)."""
    from edgekit.formats import TASKS

    if TASKS[manifest.task].batched:
        max_length = manifest.runtime.max_length
        texts = max(1, min(settings.batch_max, settings.batch_max_tokens // max_length))
        return (f"weights + activations of {texts} x {max_length}-token micro-batches of a request of up to "
                f"{max(texts, settings.max_embedding_inputs)} texts")
    saved = f" + {settings.prompt_cache_contexts:g} context(s) of saved prompts" if settings.prompt_cache_contexts else ""
    return f"weights + one KV cache of n_ctx {effective_n_ctx(manifest, settings)} shared by {settings.slots} slot(s){saved}"


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
