"""Push and pull bundles through an OCI registry with oras (the OCI distribution client), verified end to end.

oras does the protocol (auth challenges, uploads, manifests); edgekit adds what a board needs on top:
references must name a tag or digest, the manifest is checked before any layer is fetched, every layer
is hashed while it streams and must match its digest and declared size, the bundle's own sha256 manifest
is verified, and the bundle appears under its final name in one rename (edgekit.bundle.publish).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgekit.bundle import bundle_path_inside, publish, remove_stale_staging, staging_dir, verify_bundle
from edgekit.errors import BackendError, BundleError, ConfigError
from edgekit.fleet import artifact as oci
from edgekit.schema.manifest import MANIFEST_NAME

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# registry[:port]/repo[/more]:tag or @sha256:...; the registry part is required (no implicit Docker Hub).
REFERENCE = re.compile(r"^(?P<registry>[^/@]+[.:][^/@]*|localhost)/(?P<repository>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
                       r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127}))?(?:@(?P<digest>[^@]+))?$")
CHUNK = 1 << 20
# requests has no default timeout: a registry that stops answering would hang a board's update forever.
CONNECT_TIMEOUT_S = 15
READ_TIMEOUT_S = 300
ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class Reference:
    """registry/repository with a tag, a digest or both (a digest wins when both are given)."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def repo(self) -> str:
        return f"{self.registry}/{self.repository}"

    def at(self, tag_or_digest: str) -> str:
        """The oras reference of something in the same repository."""
        sep = "@" if tag_or_digest.startswith("sha256:") else ":"
        return f"{self.repo}{sep}{tag_or_digest}"

    def __str__(self) -> str:
        return self.repo + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def parse_reference(text: str) -> Reference:
    """A full reference; a missing tag or digest is an error, never an implicit 'latest'."""
    match = REFERENCE.match(text.strip())
    if not match:
        raise ConfigError(f"{text!r} is not a registry reference", hint="write REGISTRY/REPOSITORY:TAG, e.g. registry.lan:5000/models/minilm:1")
    ref = Reference(**match.groupdict())
    if not ref.tag and not ref.digest:
        raise ConfigError(f"{text!r} names no tag or digest", hint=f"add one: {text}:TAG or {text}@sha256:...")
    if ref.digest and not DIGEST.match(ref.digest):
        raise ConfigError(f"{text!r}: digest {ref.digest!r} is not sha256:<64 hex digits>")
    return ref


def docker_config_path(explicit: Path | None = None) -> Path | None:
    """Docker's credentials file: the given one, else $DOCKER_CONFIG/config.json, else ~/.docker/config.json (if present)."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"{explicit}: registry credentials file not found")
        return explicit
    folder = os.environ.get("DOCKER_CONFIG")
    path = Path(folder) / "config.json" if folder else Path("~/.docker/config.json").expanduser()
    return path if path.is_file() else None


def timeout_adapter():
    """A requests transport adapter that applies edgekit's timeouts to every request oras makes."""
    from requests.adapters import HTTPAdapter

    class TimeoutAdapter(HTTPAdapter):
        def send(self, request, *args, timeout=None, **kwargs):
            return super().send(request, *args, timeout=timeout or (CONNECT_TIMEOUT_S, READ_TIMEOUT_S), **kwargs)

    return TimeoutAdapter()


class RegistryClient:
    """One registry's oras client with credentials from the Docker config file; transport errors become BackendError."""

    def __init__(self, ref: Reference, *, plain_http: bool = False, config: Path | None = None) -> None:
        import oras.provider

        self.ref = ref
        self.config = docker_config_path(config)
        self.oras = oras.provider.Registry(hostname=ref.registry, insecure=plain_http)
        adapter = timeout_adapter()
        for scheme in ("http://", "https://"):
            self.oras.session.mount(scheme, adapter)
            self.oras.auth.session.mount(scheme, adapter)
        self.container = self.oras.get_container(ref.at(ref.digest or ref.tag))
        self.oras.auth.load_configs(self.container, configs=[str(self.config)] if self.config else None)
        self._checked = False

    def _use_basic_auth(self) -> None:
        """htpasswd registries answer Basic challenges, which oras' default token backend cannot; switch to its basic backend."""
        import oras.auth

        self.oras.auth = oras.auth.get_auth_backend("basic", self.oras.session, self.oras.prefix == "http",
                                                     tls_verify=self.oras._tls_verify)
        self.oras.auth.load_configs(self.container, configs=[str(self.config)] if self.config else None)
        basic = getattr(self.oras.auth, "_basic_auth", None)
        if not basic:
            raise ConfigError(f"{self.ref.registry}: access denied (the registry asks for a login and "
                              f"{self.config or 'no Docker config.json'} has none for it)",
                              hint="log in (an auths entry in Docker's config.json, or set DOCKER_CONFIG)")
        self.oras.set_header("Authorization", f"Basic {basic}")

    @contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        import requests

        try:
            yield
        except requests.exceptions.SSLError as exc:
            raise BackendError(f"{self.ref.registry}: TLS failed while {what} ({exc.__class__.__name__})",
                               hint="fix the registry's certificate, or pass --plain-http for a plain-HTTP registry you trust") from exc
        except requests.RequestException as exc:
            raise BackendError(f"{self.ref.registry}: {what} failed: {exc.__class__.__name__}: {exc}") from exc

    def _request(self, url: str, method: str = "GET", **kwargs):
        if not self._checked:
            self.ping()
        # oras' do_request minus its retry decorator, which sleeps for minutes (3 s + 3^n, five times) on a refused connection.
        send = getattr(type(self.oras).do_request, "__wrapped__", type(self.oras).do_request)
        with self._translated(f"{method} {url}"):
            return send(self.oras, url, method, headers={**self.oras.headers, **kwargs.pop("headers", {})}, **kwargs)

    def ping(self) -> None:
        """Check the registry answers the distribution API and pick its auth scheme; fails fast (before oras' retrying uploads)."""
        url = f"{self.oras.prefix}://{self.ref.registry}/v2/"
        with self._translated(f"GET {url}"):
            response = self.oras.session.get(url, headers=self.oras.headers, verify=self.oras._tls_verify)
        self._checked = True
        if response.status_code == 401 and response.headers.get("Www-Authenticate", "").lower().startswith("basic"):
            self._use_basic_auth()
        elif response.status_code not in (200, 401):
            self._fail(response, "checking the registry API (/v2/)")

    def _url(self, kind: str, reference: str) -> str:
        return f"{self.oras.prefix}://{self.ref.registry}/v2/{self.ref.repository}/{kind}/{reference}"

    def _fail(self, response, what: str) -> None:
        if response.status_code in (401, 403):
            raise ConfigError(f"{self.ref.registry}: {what}: access denied ({response.status_code})",
                              hint="log in (credentials in Docker's config.json, or set DOCKER_CONFIG)")
        detail = response.text[:300].strip()
        raise BackendError(f"{self.ref.registry}: {what}: HTTP {response.status_code} {detail}")

    # -- manifests ------------------------------------------------------------------------------

    def get_manifest(self, reference: str) -> tuple[str, bytes] | None:
        """(digest, raw bytes) of a manifest by tag or digest, None when absent; a digest reference must match the bytes."""
        response = self._request(self._url("manifests", reference), headers={"Accept": oci.OCI_MANIFEST}, stream=True)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            self._fail(response, f"reading manifest {reference}")
        raw = response.raw.read(oci.MAX_MANIFEST_BYTES + 1, decode_content=True)
        response.close()
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise BundleError(f"{self.ref.repo}@{reference}: the registry returned a manifest whose digest is {digest}")
        return digest, raw

    def put_manifest(self, reference: str, manifest: dict) -> str:
        """Upload a manifest under a tag; returns its digest."""
        import json

        body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
        response = self._request(self._url("manifests", reference), "PUT", data=body,
                                 headers={"Content-Type": oci.OCI_MANIFEST})
        if response.status_code not in (200, 201, 202):
            self._fail(response, f"uploading manifest {reference}")
        return "sha256:" + hashlib.sha256(body).hexdigest()

    # -- blobs ----------------------------------------------------------------------------------

    def put_blob(self, path: Path, media_type: str) -> dict:
        """Upload one file as a blob (skipped when the registry has it); returns its OCI descriptor."""
        import oras.oci

        descriptor = oras.oci.NewLayer(str(path), media_type=media_type)
        with self._translated(f"uploading {path.name}"):
            response = self.oras.upload_blob(str(path), self.container, descriptor)
        if response.status_code not in (200, 201, 202):
            self._fail(response, f"uploading {path.name}")
        return descriptor

    def download_blob(self, layer: oci.Layer, target: Path) -> None:
        """Stream a blob into ``target``, hashing as it comes; a wrong digest or size is refused."""
        response = self._request(self._url("blobs", layer.digest), stream=True)
        if response.status_code != 200:
            self._fail(response, f"downloading {layer.path} ({layer.digest})")
        digest, size = hashlib.sha256(), 0
        with response, target.open("wb") as handle, self._translated(f"downloading {layer.path}"):
            for chunk in response.iter_content(CHUNK):
                size += len(chunk)
                if size > layer.size:
                    raise BundleError(f"{self.ref.repo}: layer {layer.path} is larger than the {layer.size} bytes its manifest declares")
                digest.update(chunk)
                handle.write(chunk)
        if size != layer.size or "sha256:" + digest.hexdigest() != layer.digest:
            raise BundleError(f"{self.ref.repo}: layer {layer.path} ({size} bytes) does not match its digest {layer.digest}; "
                              "the registry's copy was changed or corrupted")


# -- push ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pushed:
    reference: str
    digest: str
    layers: int
    bytes: int


def push(bundle_dir: Path, client: RegistryClient, progress: ProgressFn = lambda _: None) -> Pushed:
    """Verify a bundle and push it as an edgekit artifact under the client's reference tag."""
    ref = client.ref
    if not ref.tag or ref.digest:
        raise ConfigError(f"{ref}: push needs a tag (REGISTRY/REPO:TAG) and no digest")
    manifest = verify_bundle(Path(bundle_dir))
    client.ping()
    files = [MANIFEST_NAME, *(entry.path for entry in manifest.files)]
    if len(files) > oci.MAX_LAYERS:
        raise BundleError(f"{bundle_dir}: {len(files)} files; an artifact holds at most {oci.MAX_LAYERS}")
    layers = []
    for relative in files:
        progress(f"uploading {relative}")
        descriptor = client.put_blob(bundle_path_inside(Path(bundle_dir), relative), oci.layer_media_type(relative))
        descriptor["annotations"] = {oci.TITLE: relative}
        layers.append(descriptor)
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "config.json"
        empty.write_bytes(oci.EMPTY_CONFIG)
        config = client.put_blob(empty, oci.CONFIG_MEDIA_TYPE)
    document = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "artifactType": oci.ARTIFACT_TYPE,
                "config": config, "layers": layers, "annotations": oci.annotations(manifest)}
    digest = client.put_manifest(ref.tag, document)
    return Pushed(reference=ref.at(digest), digest=digest, layers=len(layers), bytes=sum(layer["size"] for layer in layers))


# -- pull ---------------------------------------------------------------------------------------


def resolve(client: RegistryClient) -> oci.Artifact:
    """Fetch and check the artifact's manifest (nothing else is downloaded)."""
    ref = client.ref
    found = client.get_manifest(ref.digest or ref.tag)
    if found is None:
        raise ConfigError(f"{ref}: no such artifact in the registry")
    digest, raw = found
    return oci.check_artifact(str(ref), digest, raw)


def free_bytes(folder: Path) -> int:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def download(client: RegistryClient, art: oci.Artifact, out_dir: Path, progress: ProgressFn = lambda _: None) -> Path:
    """Download every layer into a staging folder under ``out_dir``, verify, and publish it as ``out_dir/<name>``.

    A kill at any point leaves only a hidden ``.staging-*`` folder, which the next pull removes.
    """
    out_dir = Path(out_dir)
    remove_stale_staging(out_dir)
    if art.total_bytes > free_bytes(out_dir):
        raise BundleError(f"{client.ref}: {art.total_bytes} bytes to download, {free_bytes(out_dir)} free under {out_dir}")
    with staging_dir(out_dir, art.name) as staged:
        for layer in art.layers:
            progress(f"downloading {layer.path} ({layer.size} bytes)")
            target = bundle_path_inside(staged, layer.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_blob(layer, target)
        manifest = verify_bundle(staged)
        oci.check_pulled_manifest(str(client.ref), art, manifest)
        return publish(staged, manifest, out_dir)


def pull(client: RegistryClient, out_dir: Path, progress: ProgressFn = lambda _: None,
         gate: Callable[[oci.Artifact], None] | None = None) -> tuple[oci.Artifact, Path]:
    """resolve -> ``gate`` (signature, fit) on the manifest alone -> download + verify -> atomic publish."""
    art = resolve(client)
    if gate is not None:
        gate(art)
    return art, download(client, art, out_dir, progress)

