"""`edgekit profile-host`: this machine measured into a device profile, with calibration points for given bundles."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.errors import ConfigError

if TYPE_CHECKING:  # the CLI imports this module for its defaults: schemas load only when a profile is made
    from edgekit.schema.device import CalibrationPoint, Device
    from edgekit.schema.manifest import Manifest

# Context depth of the second GGUF decode measurement (llama-bench's -d): deep enough that attention
# over the KV cache is a large share of a token's time, short enough to fill in about a minute on a
# Pi-class board with the sample model.
DECODE_DEPTH = 2048
# Shallower, attention is too small a share of a token's time to be priced (speed.MIN_ATTENTION_SHARE).
MIN_DEPTH = 512
DECODE_TOKENS = 64
REPEATS = 3  # each GGUF speed is the median of this many measurements
ENCODER_REPEATS = 50


def check_depth(manifest: Manifest, depth: int) -> None:
    """``depth`` must leave room in the model's context for the decoded tokens, and be deep enough to price attention."""
    g = manifest.gguf
    if not depth or g is None:
        return
    deepest = g.context_length - 96  # room for the decoded tokens
    if not MIN_DEPTH <= depth <= deepest:
        raise ConfigError(f"--depth {depth}: use {MIN_DEPTH}..{deepest} for {manifest.name} "
                          f"(its context is {g.context_length} tokens), or 0 to skip")


def bundle_points(folder: Path, manifest: Manifest, threads: int, depth: int, measured_on: str,
                  source: str) -> list[CalibrationPoint]:
    """A bundle's speed on this host as calibration points: GGUF prompt and decode (and decode ``depth`` deep), ONNX latency."""
    from edgekit.formats import FORMATS

    common = dict(threads=threads, measured_on=measured_on, source=source)
    return FORMATS[manifest.format].hook("profile_points")(folder, manifest, depth, common)


def gguf_profile_points(folder: Path, manifest: Manifest, depth: int, common: dict) -> list[CalibrationPoint]:
    """GGUF: prompt and decode speed, and decode ``depth`` deep when the manifest gives the attention shape."""
    from edgekit.bench import measure
    from edgekit.bench.calibrate import gguf_point

    threads = common["threads"]
    m = measure.profile_gguf(folder / manifest.file(".gguf").path, threads, n_tokens=DECODE_TOKENS, repeats=REPEATS,
                             depth=depth if manifest.gguf is not None else 0)
    points = [gguf_point(manifest, prompt_tok_s=round(m["prompt_tok_s"], 3), prompt_tokens=measure.PROFILE_PROMPT_TOKENS,
                         decode_tok_s=round(m["decode_tok_s"], 3),
                         note=f"{measure.PROFILE_PROMPT_TOKENS}-token prompt; {DECODE_TOKENS} tokens decoded from an "
                              f"8-token prompt; median of {REPEATS}", **common)]
    if "deep_decode_tok_s" in m:  # attention cost: the same decode deep into a context
        points.append(gguf_point(manifest, decode_tok_s=round(m["deep_decode_tok_s"], 3), context_tokens=m["context_tokens"],
                                 note=f"{DECODE_TOKENS} tokens decoded after a {depth}-token prompt; median of {REPEATS}",
                                 **common))
    return points


def onnx_profile_points(folder: Path, manifest: Manifest, depth: int, common: dict) -> list[CalibrationPoint]:
    """ONNX: batch-1 latency of one short sentence."""
    from edgekit.bench import measure
    from edgekit.bench.calibrate import encoder_point

    threads = common["threads"]
    model = measure.load_encoder(folder, threads)
    latency = measure.encoder_latency_ms(model, manifest.task, repeats=ENCODER_REPEATS)
    return [encoder_point(manifest, latency_ms=round(latency, 4), seq_len=model.count_tokens([measure.PROFILE_TEXT])[0],
                          note=f"batch 1, one short sentence; median of {ENCODER_REPEATS}", **common)]


def profile_host(device_id: str, bundles: Sequence[tuple[Path, Manifest]] = (), *, threads: int | None = None,
                 bandwidth_mib: int = 256, depth: int = DECODE_DEPTH,
                 progress: Callable[[str], None] = lambda _: None) -> Device:
    """This host as a device profile: CPU, RAM, memory bandwidth, storage, and each bundle's calibration points."""
    from edgekit.bench import host
    from edgekit.schema.device import Device

    for _, manifest in bundles:
        check_depth(manifest, depth)
    progress("CPU and RAM")
    cpu = host.cpu_spec()
    memory = host.memory_spec()
    progress("memory bandwidth (STREAM-like copy)")
    bandwidth = host.bandwidth_spec(cpu.cores, bandwidth_mib)
    progress("storage read speed")
    storage = host.storage_spec(bundles[0][0] if bundles else None)
    today = datetime.date.today().isoformat()
    points = []
    for folder, manifest in bundles:
        n = threads or cpu.cores
        progress(f"speed of {manifest.name} ({n} threads)")
        points += bundle_points(Path(folder), manifest, n, depth, host.host_label(), f"edgekit profile-host, {today}")
    return Device(id=device_id, name=f"This host ({host.cpu_model_name()})",
                  description=f"Measured by edgekit profile-host on {today}.", cpu=cpu, memory=memory,
                  memory_bandwidth=bandwidth, storage=storage, calibration=points)
