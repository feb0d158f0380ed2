"""Ed25519 signatures of bundle artifacts, stored next to them in the registry by cosign's tag convention.

A signature is an OCI manifest tagged ``sha256-<hex of the signed manifest digest>.sig`` in the same
repository, with a ``subject`` pointing at the signed manifest (registries with the referrers API list it
as a referrer). Its one layer is a small JSON payload naming the signed digest (cosign's "simple signing"
layout); the layer's annotations carry the Ed25519 signature of that payload and the signing key's id.
Signing the manifest digest covers every layer digest and the fit annotations.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import BundleError, ConfigError
from edgekit.fleet import artifact as oci
from edgekit.fleet.registry import RegistryClient

SIGNATURE_ARTIFACT_TYPE = "application/vnd.edgekit.signature.v1+json"
PAYLOAD_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
A_SIGNATURE = "dev.edgekit.signature.ed25519"
A_KEY_ID = "dev.edgekit.signature.key-id"
PAYLOAD_TYPE = "edgekit bundle signature"
MAX_SIGNATURES = 16
MAX_PAYLOAD_BYTES = 64 << 10


def signature_tag(digest: str) -> str:
    return digest.replace(":", "-") + ".sig"


def load_private_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable unencrypted PEM private key ({exc})",
                          hint="make a key pair with `edgekit keygen`") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def key_id(public_key) -> str:
    """sha256 of the raw 32-byte public key: names the key without revealing anything."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return "sha256:" + hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()


def generate_key_pair(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 key pair as PEM (the private key readable by its owner only); returns the key id."""
    import os

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    public_path.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return key_id(key.public_key())


def payload(repository: str, digest: str) -> bytes:
    """What is signed: the artifact's repository and manifest digest (cosign's simple-signing shape)."""
    body = {"critical": {"identity": {"docker-reference": repository}, "image": {"docker-manifest-digest": digest},
                         "type": PAYLOAD_TYPE}, "optional": None}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class Signed:
    digest: str
    signature_ref: str
    key_id: str


def sign(client: RegistryClient, art: oci.Artifact, private_key) -> Signed:
    """Sign ``art``'s manifest digest and store the signature manifest under its cosign-style tag (replacing an older one)."""
    body = payload(client.ref.repo, art.digest)
    signature = base64.b64encode(private_key.sign(body)).decode()
    kid = key_id(private_key.public_key())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "payload.json"
        path.write_bytes(body)
        layer = client.put_blob(path, PAYLOAD_MEDIA_TYPE)
        empty = Path(tmp) / "config.json"
        empty.write_bytes(oci.EMPTY_CONFIG)
        config = client.put_blob(empty, SIGNATURE_ARTIFACT_TYPE)
    layer["annotations"] = {A_SIGNATURE: signature, A_KEY_ID: kid}
    tag = signature_tag(art.digest)
    layers = [layer]
    existing = client.get_manifest(tag)
    if existing is not None:  # other keys' signatures stay; this key's older one is replaced
        try:
            others = json.loads(existing[1]).get("layers") or []
        except (json.JSONDecodeError, AttributeError):
            others = []
        layers += [e for e in others if isinstance(e, dict) and (e.get("annotations") or {}).get(A_KEY_ID) != kid]
    document = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "artifactType": SIGNATURE_ARTIFACT_TYPE,
                "config": config, "layers": layers[:MAX_SIGNATURES],
                "subject": {"mediaType": oci.OCI_MANIFEST, "digest": art.digest, "size": art.size}}
    client.put_manifest(tag, document)
    return Signed(digest=art.digest, signature_ref=client.ref.at(tag), key_id=kid)


def verify_signature(client: RegistryClient, art: oci.Artifact, public_key) -> str:
    """The key id when a signature by ``public_key`` over this exact manifest digest is in the registry; else BundleError."""
    from cryptography.exceptions import InvalidSignature

    where = f"{client.ref.repo}@{art.digest}"
    found = client.get_manifest(signature_tag(art.digest))
    if found is None:
        raise BundleError(f"{where}: not signed (no {signature_tag(art.digest)} in the repository) and a trusted key is configured",
                          hint="sign it with `edgekit sign REF --key KEY`")
    try:
        document = json.loads(found[1])
        layers = list(document.get("layers") or [])[:MAX_SIGNATURES]
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise BundleError(f"{where}: the signature manifest is not valid JSON") from exc
    wanted = key_id(public_key)
    reasons = []
    for entry in layers:
        notes = entry.get("annotations") or {} if isinstance(entry, dict) else {}
        if notes.get(A_KEY_ID) != wanted:
            reasons.append(f"signed by key {notes.get(A_KEY_ID)}, not the trusted {wanted}")
            continue
        size = entry.get("size")
        if not isinstance(size, int) or not 0 < size <= MAX_PAYLOAD_BYTES:
            reasons.append(f"payload of {size!r} bytes")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "payload"
            client.download_blob(oci.Layer(path="payload", digest=str(entry.get("digest")), size=size,
                                           media_type=PAYLOAD_MEDIA_TYPE), target)
            body = target.read_bytes()
        if body != payload(client.ref.repo, art.digest):
            reasons.append("the signed payload names another digest or repository")
            continue
        try:
            public_key.verify(base64.b64decode(notes.get(A_SIGNATURE, ""), validate=True), body)
        except (InvalidSignature, ValueError):
            reasons.append("the signature does not verify with the trusted key")
            continue
        return wanted
    raise BundleError(f"{where}: no valid signature by the trusted key ({'; '.join(reasons) or 'no signatures'})")
