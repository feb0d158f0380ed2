"""Calibration points from measurements on this host, built in one place for `edgekit bench --calibrate`,
`edgekit profile-host` and scripts/bench_fit.py; and writing them into a device profile for `edgekit fit`."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from edgekit.bench.run import BenchResult
from edgekit.bundle import read_manifest
from edgekit.formats import FORMATS
from edgekit.schema.device import CalibrationPoint, Device, load_device_file
from edgekit.schema.manifest import Manifest

SOURCE_PREFIX = "edgekit bench"


def engine(fmt: str) -> str:
    """The engine (with its version) that runs a bundle of this format here."""
    label, distribution = FORMATS[fmt].engine
    return label.format(version=metadata.version(distribution))


def gguf_point(manifest: Manifest, *, decode_tok_s: float, threads: int, measured_on: str, source: str,
               prompt_tok_s: float | None = None, prompt_tokens: int = 512, context_tokens: int = 0,
               note: str = "") -> CalibrationPoint:
    """A GGUF bundle's decode (and prompt) speed; measured ``context_tokens`` deep, with the attention shape it prices."""
    g = manifest.gguf
    attention = {}
    if context_tokens:
        attention = dict(context_tokens=context_tokens, n_head=g.n_head, n_head_kv=g.n_head_kv,
                         head_dim=g.key_length or g.n_embd // g.n_head)
    return CalibrationPoint(
        model=manifest.name, format=manifest.format, quant=manifest.quantization, parameters=manifest.parameters,
        weights_bytes=manifest.file(FORMATS[manifest.format].model_suffix).bytes, n_layer=g.n_layer if g else None,
        hidden_size=g.n_embd if g else None, threads=threads, prompt_tok_s=prompt_tok_s, prompt_tokens=prompt_tokens,
        decode_tok_s=decode_tok_s, engine=engine(manifest.format), measured_on=measured_on, source=source, note=note,
        **attention,
    )


def encoder_point(manifest: Manifest, *, latency_ms: float, seq_len: int, threads: int, measured_on: str, source: str,
                  note: str = "") -> CalibrationPoint:
    """An ONNX encoder bundle's batch-1 latency on an input of ``seq_len`` tokens."""
    o = manifest.onnx
    return CalibrationPoint(
        model=manifest.name, format=manifest.format, quant=manifest.quantization, parameters=manifest.parameters,
        weights_bytes=manifest.file(FORMATS[manifest.format].model_suffix).bytes, n_layer=o.n_layer if o else None,
        hidden_size=o.hidden_size if o else None, latency_ms=latency_ms, seq_len=seq_len, threads=threads,
        engine=engine(manifest.format), measured_on=measured_on, source=source, note=note,
    )


def calibration_point(result: BenchResult, device: Device, threads: int) -> CalibrationPoint:
    """The point of one `edgekit bench` result: medians of its counted runs."""
    manifest = read_manifest(Path(result.path))
    common = dict(threads=threads, measured_on=device.name,
                  source=f"{SOURCE_PREFIX} on {platform.node() or 'this host'}, {datetime.now(timezone.utc):%Y-%m-%d}")
    return FORMATS[manifest.format].hook("calibration_point")(manifest, result, common)


def gguf_bench_point(manifest: Manifest, result: BenchResult, common: dict) -> CalibrationPoint:
    """GGUF: median prompt and decode speed."""
    return gguf_point(manifest, prompt_tok_s=result.summary["prompt_tok_s"]["median"],
                      decode_tok_s=result.summary["decode_tok_s"]["median"], **common)


def onnx_bench_point(manifest: Manifest, result: BenchResult, common: dict) -> CalibrationPoint:
    """ONNX: median batch-1 latency at the benchmark's input length."""
    return encoder_point(manifest, latency_ms=result.summary["batch1_p50_ms"]["median"], seq_len=result.seq_len, **common)


def write_calibration(profile: Path, results: list[BenchResult], threads: int) -> Device:
    """Replace this tool's earlier points for the same bundles, keep every other point; the file stays valid."""
    device = load_device_file(profile)
    fresh = [calibration_point(r, device, threads) for r in results]
    replaced = {(p.model, p.quant) for p in fresh}
    kept = [p for p in device.calibration if not (p.source.startswith(SOURCE_PREFIX) and (p.model, p.quant) in replaced)]
    updated = device.model_copy(update={"calibration": [*kept, *fresh]})
    Device.model_validate(updated.model_dump())  # the result must load again
    text = profile.read_text(encoding="utf-8")
    leading = []  # the file's opening comment lines survive; the rest is regenerated from the schema
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        leading.append(line)
    body = yaml.safe_dump(updated.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True, width=110)
    staged = profile.with_suffix(profile.suffix + ".tmp")
    staged.write_text("\n".join(leading) + ("\n" if leading else "") + body, encoding="utf-8")
    staged.replace(profile)
    return updated
