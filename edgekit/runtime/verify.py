"""Check a bundle completely before any backend opens it: manifest hashes, then the format's own header checks.

``verify_for_runtime(bundle_dir)`` is what the daemon runs (in a subprocess) for every bundle it
finds and again, inside the worker, right before loading. Each format's check is the
``runtime_check`` hook of its spec in ``edgekit.formats``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from edgekit.bundle import bundle_path_inside, verify_bundle
from edgekit.errors import BundleError
from edgekit.formats import FORMATS
from edgekit.schema.loading import describe_validation_error
from edgekit.schema.manifest import MANIFEST_NAME, Manifest

# Largest manifest.json read: an exported bundle's is a few KiB; a huge one would be held in memory whole.
MAX_MANIFEST_BYTES = 1024 * 1024

# Tasks the runtime can serve, by bundle format (from the task table).
SERVABLE_TASKS: dict[str, tuple[str, ...]] = {name: spec.tasks for name, spec in FORMATS.items()}


def model_file(bundle_dir: Path, manifest: Manifest) -> Path:
    """The bundle's model file (the one ``.gguf`` or ``.onnx`` file of the manifest), inside the bundle."""
    try:
        entry = manifest.file(FORMATS[manifest.format].model_suffix)
    except KeyError as exc:
        raise BundleError(f"{bundle_dir}: {exc.args[0]}", hint="a bundle holds exactly one model file") from exc
    return bundle_path_inside(bundle_dir, entry.path)


def check_gguf_bundle(bundle_dir: Path, manifest: Manifest) -> None:
    """Header counts, string lengths and tensor extents vs file size (docs/reliability.md case 1)."""
    from edgekit.runtime.gguf_file import read_gguf_header

    read_gguf_header(model_file(bundle_dir, manifest))


def check_onnx_bundle(bundle_dir: Path, manifest: Manifest) -> None:
    """External-data locations stay in the bundle (docs/reliability.md case 3); the tokenizer is listed."""
    from edgekit.runtime.checks import check_onnx_external_data

    check_onnx_external_data(model_file(bundle_dir, manifest), Path(bundle_dir))
    if not any(f.path == "tokenizer.json" for f in manifest.files):
        raise BundleError(f"{bundle_dir}: no tokenizer.json listed in the manifest")




def check_manifest_size(bundle_dir: Path) -> None:
    """Refuse a manifest.json over ``MAX_MANIFEST_BYTES`` before anything parses it."""
    try:
        size = (Path(bundle_dir) / MANIFEST_NAME).stat().st_size
    except OSError as exc:
        raise BundleError(f"{bundle_dir}: cannot read {MANIFEST_NAME}: {exc.strerror}") from exc
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{bundle_dir}: {MANIFEST_NAME} has {size} bytes; at most {MAX_MANIFEST_BYTES} are read")


def read_manifest_capped(bundle_dir: Path) -> Manifest:
    """``read_manifest`` reading at most ``MAX_MANIFEST_BYTES`` (what the daemon reads in its own process)."""
    check_manifest_size(bundle_dir)
    path = Path(bundle_dir) / MANIFEST_NAME
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)  # bounded even if the file grows or is not what stat said
    except OSError as exc:
        raise BundleError(f"{bundle_dir}: cannot read {MANIFEST_NAME}: {exc.strerror}") from exc
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{bundle_dir}: {MANIFEST_NAME} has more than {MAX_MANIFEST_BYTES} bytes; it is not read")
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise BundleError(describe_validation_error(path, exc)) from exc


def verify_for_runtime(bundle_dir: Path) -> Manifest:
    """Manifest sha256 + containment, servable task, format header checks. Returns the manifest.

    A path the OS refuses (NUL byte, a component over NAME_MAX, a symlink loop) is a bad bundle, not a crash.
    """
    bundle_dir = Path(bundle_dir)
    check_manifest_size(bundle_dir)
    try:
        manifest = verify_bundle(bundle_dir)
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: Path.resolve on a symlink loop (Python 3.11)
        raise BundleError(f"{bundle_dir}: a file listed in the manifest cannot be opened: {type(exc).__name__}: {exc}") from exc
    if not manifest.passed:
        raise BundleError(f"{bundle_dir}: its quality gates failed at export; it is not served")
    if manifest.task not in SERVABLE_TASKS.get(manifest.format, ()):
        raise BundleError(f"{bundle_dir}: task {manifest.task!r} is not servable from a {manifest.format} bundle")
    FORMATS[manifest.format].hook("runtime_check")(bundle_dir, manifest)
    return manifest
