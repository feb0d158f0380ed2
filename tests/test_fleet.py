"""Fleets: bundles pushed to and pulled from a real OCI registry (Debian's docker-registry, the CNCF distribution
registry, on 127.0.0.1), signed, fit-gated and switched on a board with rollback.

Most CLI calls run edgekit's entry point in this process (helpers.run_cli: exit codes, stdout and stderr as a
subprocess gives them); push, pull, sign and update also run as `python -m edgekit` in a subprocess. Bundles are the
fake tiny GGUF (milliseconds) except for the golden-check cases, which use the MiniLM ONNX bundle shared by
the session.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import run_cli
from serve_fixtures import Daemon, free_port, publish_gguf, wait_until

from edgekit.bundle import sha256_file
from edgekit.errors import BundleError, ConfigError
from edgekit.fleet.local_registry import registry_config
from edgekit.schema.manifest import MANIFEST_NAME


def _registry_binary() -> str:
    """Debian's docker-registry; installed here when missing (CI runs as root on a fresh machine)."""
    found = shutil.which("docker-registry")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("docker-registry is not installed and installing it needs root (apt-get install -y docker-registry)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "docker-registry"], check=False, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not shutil.which("docker-registry"):
        subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "docker-registry"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    return shutil.which("docker-registry")


class Registry:
    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.host = f"127.0.0.1:{port}"

    def blob_path(self, digest: str) -> Path:
        hexdigest = digest.removeprefix("sha256:")
        return self.root / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"

    def manifest(self, repo: str, reference: str) -> tuple[str, dict]:
        response = httpx.get(f"http://{self.host}/v2/{repo}/manifests/{reference}",
                             headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        assert response.status_code == 200
        return "sha256:" + hashlib.sha256(response.content).hexdigest(), response.json()

    def put_manifest(self, repo: str, tag: str, document: dict) -> None:
        response = httpx.put(f"http://{self.host}/v2/{repo}/manifests/{tag}", content=json.dumps(document).encode(),
                             headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        assert response.status_code == 201, response.text


@contextmanager
def running_registry(base: Path, auth: str = ""):
    """The distribution registry on loopback with a minimal config (plus ``auth``); killed on exit."""
    binary = _registry_binary()
    port = free_port()
    config = base / "config.yml"
    config.write_text(registry_config(base / "data", port, auth))
    log = (base / "registry.log").open("wb")
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def ready() -> bool:
        assert proc.poll() is None, (base / "registry.log").read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=2).status_code in (200, 401)
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, "docker-registry answering /v2/", 30)
        yield Registry(base / "data", port)
    finally:
        proc.kill()
        proc.wait()
        log.close()


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    with running_registry(tmp_path_factory.mktemp("registry")) as running:
        yield running


def edgekit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in this process (helpers.run_cli); stderr with rich's line wrapping undone, so messages can be matched whole."""
    done = run_cli(*args, env={"DOCKER_CONFIG": "/nonexistent", **(env or {})})
    done.stderr = " ".join(done.stderr.split())
    return done


def edgekit_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, as a board runs it: the real exit codes of `python -m edgekit` (a few tests of each command)."""
    done = subprocess.run([sys.executable, "-m", "edgekit", *args], capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "DOCKER_CONFIG": "/nonexistent", "COLUMNS": "400", **(env or {})})
    done.stderr = " ".join(done.stderr.split())
    return done


def pushed(registry: Registry, bundle: Path, ref: str) -> str:
    done = edgekit("push", str(bundle), f"{registry.host}/{ref}", "--plain-http", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["digest"]


def files_of(bundle: Path) -> dict[str, str]:
    return {p.relative_to(bundle).as_posix(): sha256_file(p) for p in sorted(bundle.rglob("*")) if p.is_file()}


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


@pytest.fixture
def bundle(tmp_path: Path, fake_gguf: Path) -> Path:
    return publish_gguf(fake_gguf, tmp_path / "src", "fake-a")


@pytest.fixture
def bundle_v2(tmp_path: Path, fake_gguf: Path) -> Path:
    """Same model name, another version (different manifest, so a different digest)."""
    return publish_gguf(fake_gguf, tmp_path / "src2", "fake-a", chat_template="{{ messages[0].content }}")


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    for name in ("trusted", "other"):
        assert edgekit("keygen", str(tmp_path / name)).returncode == 0
    return {"trusted": tmp_path / "trusted", "other": tmp_path / "other"}


@pytest.fixture
def tiny_board(tmp_path: Path) -> Path:
    """A board profile with 4 MiB for models: nothing fits."""
    import yaml

    from edgekit.schema.device import default_device_dir

    data = yaml.safe_load((default_device_dir() / "rpi-zero-2w.yaml").read_text())
    data["id"] = "tiny-board"
    data["memory"].update(total_mib=64, os_reserved_mib=60)
    path = tmp_path / "tiny-board.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- references and manifests, no registry -------------------------------------------------------


@pytest.mark.parametrize("text", ["127.0.0.1:5000/models/a", "models/a:1", "127.0.0.1:5000/models/a@sha256:abc", "no spaces here"])
def test_reference_without_tag_digest_or_registry_is_refused(text):
    from edgekit.fleet.registry import parse_reference

    with pytest.raises(ConfigError):
        parse_reference(text)


def test_reference_parts():
    from edgekit.fleet.registry import parse_reference

    ref = parse_reference("reg.lan:5000/team/minilm:2@sha256:" + "a" * 64)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == ("reg.lan:5000", "team/minilm", "2", "sha256:" + "a" * 64)


def test_cli_reference_without_tag_exits_2(tmp_path):
    done = edgekit_process("pull", "127.0.0.1:9/models/a", "--plain-http", "--bundles", str(tmp_path / "b"))
    assert done.returncode == 2 and "names no tag or digest" in done.stderr
    assert not (tmp_path / "b").exists()


def test_unreachable_registry_is_a_backend_error(tmp_path):
    done = edgekit_process("pull", f"127.0.0.1:{free_port()}/models/a:1", "--plain-http", "--bundles", str(tmp_path / "b"))
    assert done.returncode == 3 and "Connection refused" in done.stderr
    assert not (tmp_path / "b").exists()


def test_registry_login_from_docker_config(tmp_path, bundle):
    """An htpasswd registry: refused without credentials (exit 2), pushed and pulled with Docker's config.json."""
    crypt = pytest.importorskip("crypt", reason="bcrypt hashing for htpasswd (crypt module, Python < 3.13)")
    # bcrypt's lowest cost (2^4 rounds): the registry checks the password on every request of the push and the pull
    (tmp_path / "htpasswd").write_text("bob:" + crypt.crypt("s3cret", crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)) + "\n")
    auth = f"auth:\n  htpasswd:\n    realm: edgekit-test\n    path: {tmp_path / 'htpasswd'}\n"
    (tmp_path / "reg").mkdir()
    with running_registry(tmp_path / "reg", auth) as locked:
        ref = f"{locked.host}/models/private:1"
        denied = edgekit("push", str(bundle), ref, "--plain-http")
        assert denied.returncode == 2 and "access denied" in denied.stderr
        docker = tmp_path / "docker"
        docker.mkdir()
        token = base64.b64encode(b"bob:s3cret").decode()
        (docker / "config.json").write_text(json.dumps({"auths": {locked.host: {"auth": token}}}))
        env = {"DOCKER_CONFIG": str(docker)}
        assert edgekit("push", str(bundle), ref, "--plain-http", env=env).returncode == 0
        done = edgekit("pull", ref, "--plain-http", "--bundles", str(tmp_path / "b"), env=env)
        assert done.returncode == 0, done.stderr
        assert files_of(tmp_path / "b" / "fake-a") == files_of(bundle)
        assert edgekit("pull", ref, "--plain-http", "--bundles", str(tmp_path / "c")).returncode == 2


def test_tls_is_the_default(registry, tmp_path):
    """The loopback registry speaks plain HTTP: without --plain-http the TLS handshake fails, exit 3, nothing written."""
    done = edgekit("pull", f"{registry.host}/models/a:1", "--bundles", str(tmp_path / "b"))
    assert done.returncode == 3 and "TLS failed" in done.stderr and "--plain-http" in done.stderr
    assert not (tmp_path / "b").exists()


def _artifact_manifest(bundle: Path) -> dict:
    from edgekit.bundle import read_manifest
    from edgekit.fleet import artifact as oci

    manifest = read_manifest(bundle)
    layers = [{"mediaType": oci.layer_media_type(p), "digest": "sha256:" + sha256_file(bundle / p), "size": (bundle / p).stat().st_size,
               "annotations": {oci.TITLE: p}} for p in [MANIFEST_NAME, *(f.path for f in manifest.files)]]
    return {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "artifactType": oci.ARTIFACT_TYPE,
            "config": {"mediaType": oci.CONFIG_MEDIA_TYPE, "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest(), "size": 2},
            "layers": layers, "annotations": oci.annotations(manifest)}


def _absurd(kind: str, document: dict) -> dict:
    layers = document["layers"]
    if kind == "escape":
        layers[1]["annotations"]["org.opencontainers.image.title"] = "../../escaped.gguf"
    elif kind == "absolute":
        layers[1]["annotations"]["org.opencontainers.image.title"] = "/etc/passwd"
    elif kind == "too-many-layers":
        document["layers"] = layers + [dict(layers[1], annotations={"org.opencontainers.image.title": f"f{i}"}) for i in range(100)]
    elif kind == "huge-layer":
        layers[1]["size"] = 2**62
    elif kind == "negative-size":
        layers[1]["size"] = -1
    elif kind == "duplicate-path":
        layers.append(dict(layers[1]))
    elif kind == "other-type":
        document["artifactType"] = "application/vnd.example.thing.v1"
        document["config"]["mediaType"] = "application/vnd.example.thing.v1"
    elif kind == "lying-annotation":
        document["annotations"]["dev.edgekit.bundle.weights-bytes"] = "10"
    elif kind == "md5-digest":
        layers[1]["digest"] = "md5:" + "0" * 32
    return document


ABSURD = ["escape", "absolute", "too-many-layers", "huge-layer", "negative-size", "duplicate-path", "other-type",
          "lying-annotation", "md5-digest"]


@pytest.mark.parametrize("kind", ABSURD)
def test_check_artifact_refuses(kind, bundle):
    from edgekit.fleet.artifact import check_artifact

    raw = json.dumps(_absurd(kind, _artifact_manifest(bundle))).encode()
    with pytest.raises(BundleError):
        check_artifact("test", "sha256:" + hashlib.sha256(raw).hexdigest(), raw)


def test_check_artifact_accepts_what_push_writes(bundle):
    from edgekit.fleet.artifact import check_artifact

    raw = json.dumps(_artifact_manifest(bundle)).encode()
    art = check_artifact("test", "sha256:" + hashlib.sha256(raw).hexdigest(), raw)
    assert [layer.path for layer in art.layers] == [MANIFEST_NAME, "model.gguf"]
    assert art.fit_manifest.name == "fake-a" and art.total_bytes == sum((bundle / p).stat().st_size for p in (MANIFEST_NAME, "model.gguf"))


# -- push and pull against the registry -----------------------------------------------------------


def test_push_pull_roundtrip(registry, bundle, tmp_path):
    push = edgekit_process("push", str(bundle), f"{registry.host}/models/roundtrip:1", "--plain-http", "--json")
    assert push.returncode == 0, push.stderr
    digest = json.loads(push.stdout)["digest"]
    served_digest, document = registry.manifest("models/roundtrip", "1")
    assert served_digest == digest
    assert document["artifactType"] == "application/vnd.edgekit.bundle.v1+json"
    assert [(layer["annotations"]["org.opencontainers.image.title"], layer["mediaType"]) for layer in document["layers"]] == [
        ("manifest.json", "application/vnd.edgekit.bundle.manifest.v1+json"), ("model.gguf", "application/vnd.edgekit.bundle.layer.v1.gguf")]
    notes = document["annotations"]
    gguf_bytes = (bundle / "model.gguf").stat().st_size
    assert (notes["dev.edgekit.bundle.format"], notes["dev.edgekit.bundle.quant"], notes["dev.edgekit.bundle.parameters"],
            notes["dev.edgekit.bundle.context"], notes["dev.edgekit.bundle.weights-bytes"]) == ("gguf", "F32", "128", "64", str(gguf_bytes))
    for layer in document["layers"]:
        assert layer["digest"] == "sha256:" + sha256_file(bundle / layer["annotations"]["org.opencontainers.image.title"])

    out = tmp_path / "bundles"
    done = edgekit_process("pull", f"{registry.host}/models/roundtrip:1", "--plain-http", "--bundles", str(out), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["digest"] == digest and report["layers"] == 2
    assert files_of(out / "fake-a") == files_of(bundle)
    assert visible(out) == ["fake-a"] and not list(out.glob(".staging-*"))
    # by digest too
    done = edgekit("pull", f"{registry.host}/models/roundtrip@{digest}", "--plain-http", "--bundles", str(tmp_path / "b2"), "--json")
    assert done.returncode == 0 and files_of(tmp_path / "b2" / "fake-a") == files_of(bundle)


def test_pull_refuses_tampered_layer(registry, bundle, tmp_path):
    pushed(registry, bundle, "models/tampered:1")
    _, document = registry.manifest("models/tampered", "1")
    blob = registry.blob_path(document["layers"][1]["digest"])
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))
    out = tmp_path / "bundles"
    done = edgekit("pull", f"{registry.host}/models/tampered:1", "--plain-http", "--bundles", str(out))
    assert done.returncode == 1 and "does not match its digest" in done.stderr
    assert visible(out) == [] and not list(out.glob(".staging-*"))


def test_pull_refuses_bundle_whose_files_differ_from_its_manifest(registry, bundle, tmp_path):
    """Digests all match what the registry holds, but a file was changed after export: the bundle's own sha256 catches it."""
    from edgekit.fleet.registry import RegistryClient, parse_reference, push

    (bundle / "model.gguf").write_bytes((bundle / "model.gguf").read_bytes()[:-1] + b"\x01")
    client = RegistryClient(parse_reference(f"{registry.host}/models/changed:1"), plain_http=True)
    with pytest.raises(BundleError):  # push verifies first
        push(bundle, client)
    document = _artifact_manifest(bundle)
    for layer in document["layers"]:
        client.put_blob(bundle / layer["annotations"]["org.opencontainers.image.title"], layer["mediaType"])
    (tmp_path / "config.json").write_bytes(b"{}")
    client.put_blob(tmp_path / "config.json", document["config"]["mediaType"])
    registry.put_manifest("models/changed", "1", document)
    out = tmp_path / "bundles"
    done = edgekit("pull", f"{registry.host}/models/changed:1", "--plain-http", "--bundles", str(out))
    assert done.returncode == 1 and "sha256 differs from the manifest" in done.stderr
    assert visible(out) == []


@pytest.mark.parametrize("kind", ["escape", "other-type", "too-many-layers", "huge-layer"])
def test_pull_refuses_bad_manifest_from_registry_and_writes_nothing(registry, bundle, tmp_path, kind):
    digest = pushed(registry, bundle, f"models/bad-{kind}:good")
    registry.put_manifest(f"models/bad-{kind}", "1", _absurd(kind, _artifact_manifest(bundle)))
    out = tmp_path / "deep" / "bundles"
    done = edgekit("pull", f"{registry.host}/models/bad-{kind}:1", "--plain-http", "--bundles", str(out))
    assert done.returncode == 1, done.stderr
    assert not out.exists() and not (tmp_path / "deep" / "escaped.gguf").exists() and not (tmp_path / "escaped.gguf").exists()
    assert digest.startswith("sha256:")


# -- signatures ------------------------------------------------------------------------------------


def test_signatures(registry, bundle, tmp_path, keys):
    ref = f"{registry.host}/models/signed:1"
    digest = pushed(registry, bundle, "models/signed:1")
    trusted = ["--trusted-key", str(keys["trusted"]) + ".pub"]

    unsigned = edgekit("pull", ref, "--plain-http", "--bundles", str(tmp_path / "a"), *trusted)
    assert unsigned.returncode == 1 and "not signed" in unsigned.stderr and visible(tmp_path / "a") == []

    assert edgekit_process("sign", ref, "--plain-http", "--key", str(keys["other"]) + ".key").returncode == 0
    wrong_key = edgekit_process("pull", ref, "--plain-http", "--bundles", str(tmp_path / "b"), *trusted)
    assert wrong_key.returncode == 1 and "no valid signature by the trusted key" in wrong_key.stderr

    done = edgekit("sign", ref, "--plain-http", "--key", str(keys["trusted"]) + ".key", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["digest"] == digest
    ok = edgekit("pull", ref, "--plain-http", "--bundles", str(tmp_path / "c"), *trusted, "--json")
    assert ok.returncode == 0, ok.stderr
    assert files_of(tmp_path / "c" / "fake-a") == files_of(bundle)
    # the signature manifest holds both keys' signatures and points at the signed manifest
    _, sig = registry.manifest("models/signed", digest.replace(":", "-") + ".sig")
    assert sig["subject"]["digest"] == digest and len(sig["layers"]) == 2
    # the trusted key from the setting works the same
    env = {"EDGEKIT_TRUSTED_KEY": str(keys["trusted"]) + ".pub"}
    assert edgekit("pull", ref, "--plain-http", "--bundles", str(tmp_path / "d"), env=env).returncode == 0


def test_forged_signature_is_refused(registry, bundle, tmp_path, keys):
    """The trusted key's id on a signature made by another key (or over another payload) does not pass."""
    ref = f"{registry.host}/models/forged:1"
    digest = pushed(registry, bundle, "models/forged:1")
    assert edgekit("sign", ref, "--plain-http", "--key", str(keys["other"]) + ".key").returncode == 0
    tag = digest.replace(":", "-") + ".sig"
    _, sig = registry.manifest("models/forged", tag)
    from edgekit.fleet.signing import key_id, load_public_key

    sig["layers"][0]["annotations"]["dev.edgekit.signature.key-id"] = key_id(load_public_key(Path(str(keys["trusted"]) + ".pub")))
    registry.put_manifest("models/forged", tag, sig)
    done = edgekit("pull", ref, "--plain-http", "--bundles", str(tmp_path / "a"), "--trusted-key", str(keys["trusted"]) + ".pub")
    assert done.returncode == 1 and "does not verify with the trusted key" in done.stderr
    sig["layers"][0]["annotations"]["dev.edgekit.signature.ed25519"] = base64.b64encode(b"\0" * 64).decode()
    registry.put_manifest("models/forged", tag, sig)
    done = edgekit("pull", ref, "--plain-http", "--bundles", str(tmp_path / "a"), "--trusted-key", str(keys["trusted"]) + ".pub")
    assert done.returncode == 1 and visible(tmp_path / "a") == []


# -- a kill during pull ---------------------------------------------------------------------------


class StallingProxy:
    """Forwards to the registry, but sends only half of one blob and then holds the connection until closed."""

    def __init__(self, upstream: str, stall_digest: str, reached: Path) -> None:
        release = self.release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._forward("HEAD")

            def do_GET(self) -> None:
                self._forward("GET")

            def _forward(self, method: str) -> None:
                conn = http.client.HTTPConnection(upstream, timeout=30)
                conn.request(method, self.path, headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                response = conn.getresponse()
                body = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if method == "GET" and self.path.endswith(stall_digest):
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    reached.touch()
                    release.wait(120)
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("command", ["pull", "update"])
def test_kill_during_pull_leaves_nothing_visible(registry, bundle, bundle_v2, tmp_path, command):
    repo = f"models/killed-{command}"
    pushed(registry, bundle, f"{repo}:1")
    pushed(registry, bundle_v2, f"{repo}:2")
    _, document = registry.manifest(repo, "2")
    out = tmp_path / "bundles"
    board = ["--device", "rpi-zero-2w"] if command == "update" else []
    if command == "update":  # version 1 is served when the update to 2 is killed
        assert edgekit("update", f"{registry.host}/{repo}:1", "--plain-http", "--bundles", str(out), *board).returncode == 0
    before = files_of(out / "fake-a") if command == "update" else None
    reached = tmp_path / "reached"
    proxy = StallingProxy(registry.host, document["layers"][1]["digest"], reached)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "edgekit", command, f"{proxy.host}/{repo}:2", "--plain-http",
                                 "--bundles", str(out), *board], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: reached.exists() or proc.poll() is not None, "the pull reached the stalled layer")
        assert proc.poll() is None
        proc.kill()
        proc.wait()
    finally:
        proxy.close()
    if command == "pull":
        assert visible(out) == []
    else:
        assert visible(out) == ["fake-a"] and files_of(out / "fake-a") == before
    # the next run cleans the leftovers and completes
    done = edgekit(command, f"{registry.host}/{repo}:2", "--plain-http", "--bundles", str(out), *board)
    assert done.returncode == 0, done.stderr
    assert files_of(out / "fake-a") == files_of(bundle_v2)
    assert not list(out.glob(".staging-*")) and not list(out.glob(".fleet/*/.incoming/.staging-*"))


# -- update on the board ----------------------------------------------------------------------------


def test_update_switch_keep_and_rollback(registry, bundle, bundle_v2, tmp_path, fake_gguf):
    bundle_v3 = publish_gguf(fake_gguf, tmp_path / "src3", "fake-a", chat_template="v3")
    d1 = pushed(registry, bundle, "models/board:1")
    d2 = pushed(registry, bundle_v2, "models/board:2")
    d3 = pushed(registry, bundle_v3, "models/board:3")
    out = tmp_path / "bundles"
    common = ["--plain-http", "--bundles", str(out), "--device", "rpi-zero-2w", "--keep", "2", "--json"]

    first = edgekit_process("update", f"{registry.host}/models/board:1", *common)
    assert first.returncode == 0, first.stderr
    r1 = json.loads(first.stdout)
    assert (r1["digest"], r1["previous"], r1["changed"]) == (d1, None, True)
    assert (out / "fake-a").is_symlink() and files_of(out / "fake-a") == files_of(bundle)
    assert visible(out) == ["fake-a"]

    again = json.loads(edgekit("update", f"{registry.host}/models/board:1", *common).stdout)
    assert again["changed"] is False

    r2 = json.loads(edgekit("update", f"{registry.host}/models/board:2", *common).stdout)
    assert (r2["digest"], r2["previous"]) == (d2, r1["version"]) and files_of(out / "fake-a") == files_of(bundle_v2)
    r3 = json.loads(edgekit("update", f"{registry.host}/models/board:3", *common).stdout)
    assert r3["digest"] == d3 and r3["kept"] == [r2["version"], r3["version"]]  # --keep 2: version 1 is gone
    assert sorted(p.name for p in (out / ".fleet/fake-a").iterdir() if not p.name.startswith(".") and p.is_dir()) == sorted(r3["kept"])

    back = edgekit("update", "--rollback", "--bundles", str(out), "--json")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["version"] == r2["version"] and files_of(out / "fake-a") == files_of(bundle_v2)
    nothing = edgekit_process("update", "--rollback", "--bundles", str(out))
    assert nothing.returncode == 2 and "no earlier version" in nothing.stderr
    assert files_of(out / "fake-a") == files_of(bundle_v2)


def test_update_adopts_a_pulled_bundle_then_rolls_back_to_it(registry, bundle, bundle_v2, tmp_path):
    pushed(registry, bundle, "models/adopt:1")
    pushed(registry, bundle_v2, "models/adopt:2")
    out = tmp_path / "bundles"
    assert edgekit("pull", f"{registry.host}/models/adopt:1", "--plain-http", "--bundles", str(out)).returncode == 0
    assert not (out / "fake-a").is_symlink()
    done = edgekit("update", f"{registry.host}/models/adopt:2", "--plain-http", "--bundles", str(out), "--device", "rpi-zero-2w")
    assert done.returncode == 0, done.stderr
    assert files_of(out / "fake-a") == files_of(bundle_v2)
    assert edgekit("update", "--rollback", "--model", "fake-a", "--bundles", str(out)).returncode == 0
    assert files_of(out / "fake-a") == files_of(bundle)


def test_update_refuses_a_bundle_that_does_not_fit_before_downloading(registry, bundle, tmp_path, tiny_board):
    pushed(registry, bundle, "models/nofit:1")
    _, document = registry.manifest("models/nofit", "1")
    registry.blob_path(document["layers"][1]["digest"]).unlink()  # any download would now fail differently
    out = tmp_path / "bundles"
    done = edgekit("update", f"{registry.host}/models/nofit:1", "--plain-http", "--bundles", str(out), "--device", str(tiny_board))
    assert done.returncode == 1
    assert "does not fit tiny-board" in done.stderr and "ram:" in done.stderr
    assert visible(out) == []


def test_update_without_device_is_a_usage_error(registry, bundle, tmp_path):
    pushed(registry, bundle, "models/nodevice:1")
    done = edgekit("update", f"{registry.host}/models/nodevice:1", "--plain-http", "--bundles", str(tmp_path / "b"))
    assert done.returncode == 2 and "no device profile" in done.stderr


def test_update_checks_signature_before_anything(registry, bundle, tmp_path, keys):
    pushed(registry, bundle, "models/update-signed:1")
    out = tmp_path / "bundles"
    done = edgekit("update", f"{registry.host}/models/update-signed:1", "--plain-http", "--bundles", str(out),
                   "--device", "rpi-zero-2w", "--trusted-key", str(keys["trusted"]) + ".pub")
    assert done.returncode == 1 and "not signed" in done.stderr and visible(out) == []


def _break_golden(source: Path, target: Path) -> Path:
    """A copy of an ONNX bundle whose recorded golden embeddings are negated: its golden check must fail (cosine -1)."""
    from edgekit.runtime.golden import pack_f16, unpack_f16

    shutil.copytree(source, target)
    data = json.loads((target / MANIFEST_NAME).read_text())
    for text in data["golden"]["texts"]:
        text["output"] = pack_f16(-unpack_f16(text["output"], text["shape"]).astype(np.float32))
    (target / MANIFEST_NAME).write_text(json.dumps(data))
    return target


@pytest.mark.slow
def test_update_refuses_new_version_whose_golden_checks_fail(registry, minilm_bundle, tmp_path):
    broken = _break_golden(minilm_bundle, tmp_path / "broken" / minilm_bundle.name)
    d1 = pushed(registry, minilm_bundle, "models/minilm:1")
    pushed(registry, broken, "models/minilm:2")
    out = tmp_path / "bundles"
    args = ["--plain-http", "--bundles", str(out), "--device", "rpi-5-8gb"]
    first = edgekit("update", f"{registry.host}/models/minilm:1", *args, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["digest"] == d1
    before = files_of(out / minilm_bundle.name)
    done = edgekit_process("update", f"{registry.host}/models/minilm:2", *args)
    assert done.returncode == 1 and "failed its golden checks" in done.stderr and "stays served" in done.stderr
    assert files_of(out / minilm_bundle.name) == before == files_of(minilm_bundle)
    state = json.loads((out / ".fleet" / minilm_bundle.name / "state.json").read_text())
    assert [v["digest"] for v in state["versions"]] == [d1]


def _with_unloadable_golden(bundle: Path) -> Path:
    """Give the fake GGUF bundle a golden record: llama.cpp cannot load the one-tensor file, so its golden checks fail."""
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    data["golden"] = {"kind": "greedy-tokens", "recorded_on": "test", "min_top1_agreement": 1.0, "max_kld": 0.0,
                      "prompts": [{"prompt": "w1 w2", "prompt_ids": [1, 2], "ids": [3], "top_logprobs": [{"3": -0.1}]}]}
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))
    return bundle


def test_daemon_keeps_serving_while_a_failing_update_is_refused(registry, bundle, bundle_v2, tmp_path):
    """An update to a version that fails its golden checks runs while a request is in flight on the served version
    (held by the fake model): the update is refused (exit 1), the request completes with all its tokens, the daemon
    answers before, during and after, and the served bundle is byte for byte the old one."""
    from serve_fixtures import FAKE_PLUGIN, Gates

    from edgekit.serve.discovery import bundle_dirs

    pushed(registry, bundle, "models/served:1")
    pushed(registry, _with_unloadable_golden(bundle_v2), "models/served:2")
    out = tmp_path / "bundles"
    args = ["--plain-http", "--bundles", str(out), "--device", "rpi-zero-2w"]
    assert edgekit("update", f"{registry.host}/models/served:1", *args).returncode == 0
    assert bundle_dirs(out) == [out / "fake-a"]  # the symlink is served; .fleet is not
    served = files_of(out / "fake-a")
    gates = Gates(tmp_path / "gates")
    gates.root.mkdir()
    daemon = Daemon(out, "--worker-plugins", FAKE_PLUGIN, "--preload", "fake-a", env=gates.env())
    try:
        daemon.wait_ready()
        chat = {"model": "fake-a", "messages": [{"role": "user", "content": "hold:inflight@1"}], "max_tokens": 3}
        held: dict = {}
        thread = threading.Thread(target=lambda: held.update(r=httpx.post(f"{daemon.url}/v1/chat/completions", json=chat, timeout=120)))
        thread.start()
        wait_until(lambda: gates.reached("inflight"), "the request is in flight")
        done = edgekit("update", f"{registry.host}/models/served:2", *args)
        assert done.returncode == 1 and "failed its golden checks" in done.stderr and "stays served" in done.stderr
        during = httpx.get(f"{daemon.url}/v1/models", timeout=60)  # the one generation slot is held; the daemon still answers
        gates.open("inflight")
        thread.join(120)
        assert held["r"].status_code == 200 and held["r"].json()["usage"]["completion_tokens"] == 3
        assert during.status_code == 200 and [m["id"] for m in during.json()["data"]] == ["fake-a"]
        after = httpx.post(f"{daemon.url}/v1/chat/completions", json={**chat, "messages": [{"role": "user", "content": "x"}]},
                           timeout=60)
        assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == " t1 t2 t3"
        assert files_of(out / "fake-a") == served
    finally:
        gates.open("inflight")
        assert daemon.stop() == 0, daemon.log.read_text()[-3000:]


# -- update with the running daemon as the judge: switched back when the daemon refuses or fails the new version ----


class Poller:
    """A client that keeps asking the daemon while an update runs; every answer is kept (status, what it computed)."""

    def __init__(self, send) -> None:
        self.send, self.answers, self.stop = send, [], threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stop.is_set() and len(self.answers) < 100_000:
            self.answers.append(self.send())

    def __enter__(self) -> Poller:
        self.thread.start()
        wait_until(lambda: len(self.answers) >= 3, "the poller got its first answers")
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(300)


def test_update_with_daemon_switches_back_when_the_daemon_refuses_the_new_version(registry, bundle, bundle_v2, tmp_path):
    """The daemon loads version 2 on the switch; its golden record cannot be reproduced (the fake GGUF), so the worker
    refuses it; `update --daemon` sees the refusal in /health and switches the link back. A client polling the
    daemon throughout gets only 200s computed by version 1 (docs/reliability.md case 36)."""
    from serve_fixtures import FAKE_PLUGIN, Gates

    pushed(registry, bundle, "models/judged:1")
    pushed(registry, _with_unloadable_golden(bundle_v2), "models/judged:2")
    out = tmp_path / "bundles"
    args = ["--plain-http", "--bundles", str(out), "--device", "rpi-zero-2w"]
    first = edgekit("update", f"{registry.host}/models/judged:1", *args, "--json")
    assert first.returncode == 0, first.stderr
    v1 = json.loads(first.stdout)["version"]
    served = files_of(out / "fake-a")
    gates = Gates(tmp_path / "gates")
    gates.root.mkdir()
    daemon = Daemon(out, "--worker-plugins", FAKE_PLUGIN, "--preload", "fake-a", "--slots", "2", "--version-poll-s", "0.05",
                    env=gates.env())
    chat = {"model": "fake-a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
    try:
        daemon.wait_ready()
        with Poller(lambda: httpx.post(f"{daemon.url}/v1/chat/completions", json=chat, timeout=120)) as poller:
            done = edgekit("update", f"{registry.host}/models/judged:2", *args, "--daemon", daemon.url, "--probation-s", "0")
        assert done.returncode == 1, done.stderr
        assert "the daemon refused version" in done.stderr and f"switched back to {v1}" in done.stderr
        assert "the daemon serves it" in done.stderr
        assert {r.status_code for r in poller.answers} == {200}
        assert {r.json()["choices"][0]["message"]["content"] for r in poller.answers} == {" t1 t2 t3"}
        assert files_of(out / "fake-a") == served and os.readlink(out / "fake-a").endswith(v1)
        state = json.loads((out / ".fleet/fake-a/state.json").read_text())
        assert [v["version"] for v in state["versions"]] == [v1]
        assert visible(out / ".fleet/fake-a") == [v1, "state.json"]
        wait_until(lambda: httpx.get(f"{daemon.url}/health", timeout=30).json()["versions"]["fake-a"]
                   == {"serving": v1, "refused": None, "error": None}, "the daemon forgets the refused version")
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()[-3000:]


def test_update_with_daemon_keeps_a_version_the_daemon_serves(registry, bundle, bundle_v2, tmp_path):
    """The daemon serves a plain folder (from `edgekit pull`); `update --daemon` adopts it as version 1, switches to
    version 2, the daemon reloads it and says so: the switch stays."""
    from serve_fixtures import FAKE_PLUGIN, Gates

    pushed(registry, bundle, "models/judged-ok:1")
    d2 = pushed(registry, bundle_v2, "models/judged-ok:2")
    out = tmp_path / "bundles"
    args = ["--plain-http", "--bundles", str(out), "--device", "rpi-zero-2w"]
    assert edgekit("pull", f"{registry.host}/models/judged-ok:1", "--plain-http", "--bundles", str(out)).returncode == 0
    assert not (out / "fake-a").is_symlink()
    gates = Gates(tmp_path / "gates")
    gates.root.mkdir()
    daemon = Daemon(out, "--worker-plugins", FAKE_PLUGIN, "--preload", "fake-a", "--version-poll-s", "0.05", env=gates.env())
    try:
        daemon.wait_ready()
        done = edgekit("update", f"{registry.host}/models/judged-ok:2", *args, "--daemon", daemon.url, "--probation-s", "0",
                       "--json")
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["digest"] == d2 and "confirm" in result["seconds"] and "golden" in result["seconds"]
        assert httpx.get(f"{daemon.url}/health", timeout=30).json()["versions"]["fake-a"]["serving"] == result["version"]
        assert files_of(out / "fake-a") == files_of(bundle_v2)
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()[-3000:]


@pytest.mark.slow
def test_update_with_daemon_rolls_back_a_version_whose_golden_checks_fail(registry, minilm_bundle, tmp_path):
    """Issue #15 item 5 with a real model: MiniLM version 2 has a golden record its outputs contradict (negated embeddings).
    `update --daemon` switches to it; the daemon's new worker fails the golden checks at load, so version 2 is never
    served; update switches back. A client embedding a sentence throughout gets only 200s with version 1's vector
    (docs/reliability.md case 36)."""
    broken = _break_golden(minilm_bundle, tmp_path / "broken" / minilm_bundle.name)
    pushed(registry, minilm_bundle, "models/minilm-judged:1")
    pushed(registry, broken, "models/minilm-judged:2")
    out = tmp_path / "bundles"
    args = ["--plain-http", "--bundles", str(out), "--device", "rpi-5-8gb"]
    first = edgekit("update", f"{registry.host}/models/minilm-judged:1", *args, "--json")
    assert first.returncode == 0, first.stderr
    v1 = json.loads(first.stdout)["version"]
    name = minilm_bundle.name
    daemon = Daemon(out, "--preload", name, "--version-poll-s", "0.1")
    body = {"model": name, "input": "The board keeps serving."}
    try:
        daemon.wait_ready()
        reference = np.array(httpx.post(f"{daemon.url}/v1/embeddings", json=body, timeout=120).json()["data"][0]["embedding"])
        with Poller(lambda: httpx.post(f"{daemon.url}/v1/embeddings", json=body, timeout=120)) as poller:
            done = edgekit("update", f"{registry.host}/models/minilm-judged:2", *args, "--daemon", daemon.url,
                           "--probation-s", "0")
        assert done.returncode == 1 and "golden check failed" in done.stderr and f"switched back to {v1}" in done.stderr
        assert {r.status_code for r in poller.answers} == {200}
        cosines = [float(np.dot(reference, e) / np.linalg.norm(reference) / np.linalg.norm(e))
                   for e in (np.array(r.json()["data"][0]["embedding"]) for r in poller.answers)]
        assert min(cosines) > 0.9999
        assert os.readlink(out / name).endswith(v1) and files_of(out / name) == files_of(minilm_bundle)
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()[-3000:]
