"""A bundle as an OCI artifact: its media types, its annotations, and the checks a pulled manifest must pass.

One layer per bundle file (``manifest.json`` included), titled with the file's path inside the bundle.
The OCI manifest's annotations carry the fit facts (format, quant, parameters, context, weights bytes)
and the bundle's own manifest without its golden record, so a board runs ``edgekit.fit`` on them before
downloading any layer. The artifact is signed as a whole (its manifest digest covers the annotations).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

from pydantic import ValidationError

from edgekit.errors import BundleError
from edgekit.schema.manifest import MANIFEST_NAME, Manifest

ARTIFACT_TYPE = "application/vnd.edgekit.bundle.v1+json"
# OCI 1.0 registries (distribution 2.8) drop nothing but do not index artifactType: the config's media type says it too.
CONFIG_MEDIA_TYPE = ARTIFACT_TYPE
EMPTY_CONFIG = b"{}"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"
# Layer media type by the bundle file's name; the first suffix that matches wins.
LAYER_MEDIA_TYPES: dict[str, str] = {
    MANIFEST_NAME: "application/vnd.edgekit.bundle.manifest.v1+json",
    ".gguf": "application/vnd.edgekit.bundle.layer.v1.gguf",
    ".onnx": "application/vnd.edgekit.bundle.layer.v1.onnx",
    ".onnx.data": "application/vnd.edgekit.bundle.layer.v1.onnx-data",
    ".json": "application/vnd.edgekit.bundle.layer.v1+json",
}
OTHER_LAYER = "application/vnd.edgekit.bundle.layer.v1.file"
# Annotation keys of the fit facts (values are strings, as OCI requires).
A_NAME = "dev.edgekit.bundle.name"
A_TASK = "dev.edgekit.bundle.task"
A_FORMAT = "dev.edgekit.bundle.format"
A_QUANT = "dev.edgekit.bundle.quant"
A_PARAMETERS = "dev.edgekit.bundle.parameters"
A_CONTEXT = "dev.edgekit.bundle.context"
A_WEIGHTS_BYTES = "dev.edgekit.bundle.weights-bytes"
A_BUNDLE_BYTES = "dev.edgekit.bundle.bytes"
A_FIT_MANIFEST = "dev.edgekit.bundle.fit-manifest"
# Refusals before anything is downloaded: a bundle is a few files, the largest model a board could hold is far below this.
MAX_LAYERS = 64
MAX_LAYER_BYTES = 64 << 30
MAX_MANIFEST_BYTES = 4 << 20  # distribution's own cap on manifests


def layer_media_type(relative: str) -> str:
    name = posixpath.basename(relative)
    if name == MANIFEST_NAME:
        return LAYER_MEDIA_TYPES[MANIFEST_NAME]
    return next((t for suffix, t in LAYER_MEDIA_TYPES.items() if suffix.startswith(".") and name.endswith(suffix)), OTHER_LAYER)


def fit_manifest(manifest: Manifest) -> Manifest:
    """What the annotations carry of the bundle's manifest: all of it but the golden record (outputs, not facts)."""
    return manifest.model_copy(update={"golden": None})


def weights_bytes(manifest: Manifest) -> int:
    """Bytes of the weights the runtime loads, as fit counts them (the format registry knows where they are)."""
    from edgekit.fit import from_manifest

    return from_manifest(manifest).weights_bytes


def context_tokens(manifest: Manifest) -> int:
    return manifest.runtime.context_length or (manifest.gguf.context_length if manifest.gguf else manifest.runtime.max_length)


def annotations(manifest: Manifest) -> dict[str, str]:
    """The OCI manifest annotations of a bundle: headline fit facts plus the bundle manifest they come from."""
    return {
        TITLE: manifest.name,
        CREATED: manifest.created.isoformat(),
        A_NAME: manifest.name,
        A_TASK: manifest.task,
        A_FORMAT: manifest.format,
        A_QUANT: manifest.gguf.quant_type if manifest.gguf else manifest.quantization,
        A_PARAMETERS: str(manifest.parameters),
        A_CONTEXT: str(context_tokens(manifest)),
        A_WEIGHTS_BYTES: str(weights_bytes(manifest)),
        A_BUNDLE_BYTES: str(manifest.total_bytes),
        A_FIT_MANIFEST: fit_manifest(manifest).model_dump_json(exclude_none=True),
    }


@dataclass(frozen=True)
class Layer:
    """One file of a pulled bundle as the OCI manifest describes it."""

    path: str
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Artifact:
    """A checked OCI manifest of an edgekit bundle, before any layer is downloaded."""

    digest: str
    size: int  # bytes of the OCI manifest as the registry serves it
    manifest: dict
    layers: tuple[Layer, ...]
    fit_manifest: Manifest

    @property
    def name(self) -> str:
        return self.fit_manifest.name

    @property
    def total_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.manifest.get("annotations") or {})


def _safe_relative(where: str, path: object) -> str:
    """A layer title must be a plain relative path inside the bundle folder."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise BundleError(f"{where}: layer path {path!r} is not a relative path inside the bundle")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise BundleError(f"{where}: layer path {path!r} leaves the bundle folder")
    return path


def check_artifact(where: str, digest: str, raw: bytes) -> Artifact:
    """Parse and check an OCI manifest: our artifact type, sane layers, annotations that agree with the bundle manifest."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{where}: manifest of {len(raw)} bytes is larger than {MAX_MANIFEST_BYTES}")
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{where}: the manifest is not JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("mediaType", OCI_MANIFEST) != OCI_MANIFEST:
        kind = manifest.get("mediaType") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{where}: {kind} is not an OCI image manifest (an index or a Docker image?)")
    kind = manifest.get("artifactType") or (manifest.get("config") or {}).get("mediaType")
    if kind != ARTIFACT_TYPE:
        raise BundleError(f"{where}: artifact type {kind!r} is not an edgekit bundle ({ARTIFACT_TYPE})",
                          hint="push bundles with `edgekit push`")
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise BundleError(f"{where}: the manifest lists no layers")
    if len(raw_layers) > MAX_LAYERS:
        raise BundleError(f"{where}: {len(raw_layers)} layers; a bundle has at most {MAX_LAYERS} files")
    layers: list[Layer] = []
    for index, entry in enumerate(raw_layers):
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: layer {index} is not an object")
        path = _safe_relative(where, (entry.get("annotations") or {}).get(TITLE))
        size, layer_digest = entry.get("size"), entry.get("digest")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_LAYER_BYTES:
            raise BundleError(f"{where}: layer {path} declares {size!r} bytes (allowed 0..{MAX_LAYER_BYTES})")
        if not isinstance(layer_digest, str) or not layer_digest.startswith("sha256:") or len(layer_digest) != 71:
            raise BundleError(f"{where}: layer {path} has digest {layer_digest!r}; only sha256 digests are accepted")
        layers.append(Layer(path=path, digest=layer_digest, size=size, media_type=str(entry.get("mediaType"))))
    paths = [layer.path for layer in layers]
    if len(set(paths)) != len(paths) or any(p.startswith(q + "/") for p in paths for q in paths):
        raise BundleError(f"{where}: layer paths collide ({', '.join(sorted(paths))})")
    if MANIFEST_NAME not in paths:
        raise BundleError(f"{where}: no {MANIFEST_NAME} layer; not an edgekit bundle")
    notes = manifest.get("annotations") or {}
    try:
        facts = Manifest.model_validate_json(notes.get(A_FIT_MANIFEST) or "")
    except ValidationError as exc:
        raise BundleError(f"{where}: annotation {A_FIT_MANIFEST} is not a bundle manifest ({exc.error_count()} errors)") from exc
    expected = annotations(facts)
    disagree = [k for k, v in expected.items() if k not in (A_FIT_MANIFEST, CREATED) and notes.get(k) != v]
    if disagree:
        raise BundleError(f"{where}: annotations {', '.join(disagree)} disagree with the bundle manifest they come with")
    listed = {f.path for f in facts.files} | {MANIFEST_NAME}
    if listed != set(paths):
        raise BundleError(f"{where}: layers ({', '.join(sorted(paths))}) differ from the bundle's files ({', '.join(sorted(listed))})")
    return Artifact(digest=digest, size=len(raw), manifest=manifest, layers=tuple(layers), fit_manifest=facts)


def check_pulled_manifest(where: str, artifact: Artifact, manifest: Manifest) -> None:
    """The downloaded manifest.json must be the one the annotations (and so the fit gate and the signature) described."""
    if fit_manifest(manifest) != artifact.fit_manifest:
        raise BundleError(f"{where}: {MANIFEST_NAME} differs from the manifest in the annotations the fit gate read")
