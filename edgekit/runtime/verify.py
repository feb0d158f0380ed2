"""Check a bundle completely before any backend opens it: manifest hashes, then the format's own header checks.

``verify_for_runtime(bundle_dir)`` is what the daemon runs (in a subprocess) for every bundle it
finds and again, inside the worker, right before loading. A new format is one row in
``FORMAT_CHECKS``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgekit.bundle import bundle_path_inside, verify_bundle
from edgekit.errors import BundleError
from edgekit.schema.manifest import Manifest

# Tasks the runtime can serve, by bundle format.
SERVABLE_TASKS: dict[str, tuple[str, ...]] = {
    "gguf": ("text-generation",),
    "onnx": ("feature-extraction", "text-classification", "token-classification"),
}


def model_file(bundle_dir: Path, manifest: Manifest) -> Path:
    """The bundle's model file (the one ``.gguf`` or ``.onnx`` file of the manifest), inside the bundle."""
    try:
        entry = manifest.file(f".{manifest.format}")
    except KeyError as exc:
        raise BundleError(f"{bundle_dir}: {exc.args[0]}", hint="a bundle holds exactly one model file") from exc
    return bundle_path_inside(bundle_dir, entry.path)


def _check_gguf(bundle_dir: Path, manifest: Manifest) -> None:
    from edgekit.runtime.gguf_file import read_gguf_header

    read_gguf_header(model_file(bundle_dir, manifest))


def _check_onnx(bundle_dir: Path, manifest: Manifest) -> None:
    from edgekit.runtime.checks import check_onnx_external_data

    check_onnx_external_data(model_file(bundle_dir, manifest), Path(bundle_dir))
    if not any(f.path == "tokenizer.json" for f in manifest.files):
        raise BundleError(f"{bundle_dir}: no tokenizer.json listed in the manifest")


# Bundle format -> checks of the model file that run before the backend sees it.
FORMAT_CHECKS: dict[str, Callable[[Path, Manifest], None]] = {
    "gguf": _check_gguf,  # header counts, string lengths and tensor extents vs file size (docs/reliability.md case 1)
    "onnx": _check_onnx,  # external-data locations stay in the bundle (docs/reliability.md case 3)
}


def verify_for_runtime(bundle_dir: Path) -> Manifest:
    """Manifest sha256 + containment, servable task, format header checks. Returns the manifest."""
    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir)
    if not manifest.passed:
        raise BundleError(f"{bundle_dir}: its quality gates failed at export; it is not served")
    if manifest.task not in SERVABLE_TASKS.get(manifest.format, ()):
        raise BundleError(f"{bundle_dir}: task {manifest.task!r} is not servable from a {manifest.format} bundle")
    FORMAT_CHECKS[manifest.format](bundle_dir, manifest)
    return manifest
