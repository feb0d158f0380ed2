"""Write bench results into a device profile as calibration points, closing the loop with `edgekit fit`."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from edgekit.bench.run import BenchResult
from edgekit.bundle import read_manifest
from edgekit.schema.device import CalibrationPoint, Device, load_device_file

SOURCE_PREFIX = "edgekit bench"


def calibration_point(result: BenchResult, device: Device, threads: int) -> CalibrationPoint:
    manifest = read_manifest(Path(result.path))
    model_file = manifest.file(f".{manifest.format}")
    common = dict(
        model=manifest.name, format=manifest.format, parameters=manifest.parameters, weights_bytes=model_file.bytes,
        threads=threads, measured_on=device.name,
        source=f"{SOURCE_PREFIX} on {platform.node() or 'this host'}, {datetime.now(timezone.utc):%Y-%m-%d}",
    )
    if manifest.format == "gguf":
        return CalibrationPoint(
            **common, quant=manifest.gguf.quant_type, n_layer=manifest.gguf.n_layer,
            prompt_tok_s=result.summary["prompt_tok_s"]["median"], decode_tok_s=result.summary["decode_tok_s"]["median"],
            engine=f"llama.cpp (llama-cpp-python {metadata.version('llama-cpp-python')})",
        )
    return CalibrationPoint(
        **common, quant=manifest.quantization, n_layer=manifest.onnx.n_layer, hidden_size=manifest.onnx.hidden_size,
        latency_ms=result.summary["batch1_p50_ms"]["median"], seq_len=result.seq_len,
        engine=f"onnxruntime {metadata.version('onnxruntime')}",
    )


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
