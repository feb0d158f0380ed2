"""Run the bench child for each bundle and summarize its counted runs (median and spread)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.bench import child
from edgekit.errors import RuntimeBackendError
from edgekit.runtime.verify import verify_for_runtime
from edgekit.schema.manifest import Manifest

# Metrics summarized per format; the first is the headline speed used in tables and plots.
SPEED_METRICS: dict[str, tuple[str, ...]] = {
    "gguf": ("decode_tok_s", "prompt_tok_s", "ttft_ms"),
    "onnx": ("batch1_p50_ms", "batch1_p95_ms", "batch32_p50_ms", "batch32_p95_ms", "batch32_texts_per_s"),
}
# Quality figure from the manifest shown next to speed: (metric, label).
QUALITY_METRICS: dict[str, tuple[str, str]] = {"gguf": ("kld_mean", "KLD"), "onnx": ("cosine_mean", "cosine")}


@dataclass(frozen=True)
class BenchConfig:
    threads: int
    ctx: int = 2048
    runs: int = 5
    warmup: int = 1
    iters: int = 40
    decode_tokens: int = 64
    prompt: str = ""
    texts: tuple[str, ...] = ()


@dataclass
class BenchResult:
    bundle: str
    path: str
    format: str
    quantization: str
    bytes: int
    quality_metric: str | None
    quality: float | None
    load_seconds: float
    peak_rss_bytes: int
    summary: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> median, min, max, stdev
    runs: list[dict[str, float]] = field(default_factory=list)
    seq_len: int | None = None  # ONNX: tokens of the batch-1 input

    @property
    def headline(self) -> tuple[str, float]:
        metric = SPEED_METRICS[self.format][0]
        return metric, self.summary[metric]["median"]


def summarize(runs: list[dict[str, float]], metrics: tuple[str, ...]) -> dict[str, dict[str, float]]:
    summary = {}
    for metric in metrics:
        values = [run[metric] for run in runs]
        summary[metric] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    return summary


def bench_bundle(bundle: Path, config: BenchConfig) -> BenchResult:
    """Verify one bundle, then measure it in a fresh subprocess."""
    manifest: Manifest = verify_for_runtime(bundle)
    payload = json.dumps({**config.__dict__, "texts": list(config.texts)})
    done = child.run("bundle", str(bundle), payload)
    if done.returncode != 0:
        raise RuntimeBackendError(f"{bundle}: bench process failed (exit {done.returncode}):\n{done.stderr.strip()[-1500:]}")
    measured = child.result(done)
    quality_metric, _ = QUALITY_METRICS[manifest.format]
    return BenchResult(
        bundle=manifest.name,
        path=str(bundle),
        format=manifest.format,
        quantization=manifest.quantization,
        bytes=manifest.total_bytes,
        quality_metric=quality_metric if quality_metric in manifest.metrics else None,
        quality=manifest.metrics.get(quality_metric),
        load_seconds=measured["load_seconds"],
        peak_rss_bytes=measured["peak_rss_bytes"],
        summary=summarize(measured["runs"], SPEED_METRICS[manifest.format]),
        runs=measured["runs"],
        seq_len=measured.get("seq_len"),
    )
