"""Fleet commands: push, pull, sign, keygen and update bundles through an OCI registry.

Exit codes: 0 ok, 1 a check failed (digest, signature, fit, golden checks), 2 usage or configuration
(a reference without tag or digest, no device for the fit gate), 3 the registry or the network failed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from edgekit.cli import JsonFlag, app, emit_json, err, out, status
from edgekit.errors import ConfigError, GateFailed

PlainHttp = Annotated[bool, typer.Option("--plain-http", help="Talk plain HTTP to the registry (default HTTPS with "
                                                             "certificate checks; env EDGEKIT_PLAIN_HTTP).")]
DockerConfig = Annotated[Path, typer.Option("--registry-config", help="Docker credentials file (default $DOCKER_CONFIG/"
                                                                       "config.json, else ~/.docker/config.json).")]
BundlesDir = Annotated[Path, typer.Option("--bundles", help="The bundles folder (default $EDGEKIT_HOME/bundles).")]
TrustedKey = Annotated[Path, typer.Option("--trusted-key", help="Ed25519 public key (PEM): refuse artifacts it did not sign "
                                                                "(env EDGEKIT_TRUSTED_KEY).")]


def _settings():
    from edgekit.fleet.settings import FleetSettings

    return FleetSettings()


def _client(reference: str, plain_http: bool, config: Path | None):
    from edgekit.fleet.registry import RegistryClient, parse_reference

    settings = _settings()
    return RegistryClient(parse_reference(reference), plain_http=plain_http or settings.plain_http,
                          config=config or settings.docker_config)


def _bundles(folder: Path | None) -> Path:
    from edgekit.paths import kit_paths

    return Path(folder) if folder is not None else kit_paths().bundles


def _signature_gate(client, trusted_key: Path | None):
    """Refuse an unsigned or wrongly signed artifact when a trusted key is configured."""
    key_path = trusted_key or _settings().trusted_key
    if key_path is None:
        return lambda art: None
    from edgekit.fleet.signing import load_public_key, verify_signature

    public_key = load_public_key(key_path)

    def gate(art) -> None:
        kid = verify_signature(client, art, public_key)
        err.print(f"signature: ok, key {kid}")

    return gate


@app.command("push")
def push_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder (holds manifest.json).")],
    reference: Annotated[str, typer.Argument(help="REGISTRY/REPOSITORY:TAG")],
    plain_http: PlainHttp = False,
    registry_config: DockerConfig = None,
    as_json: JsonFlag = False,
) -> None:
    """Verify a bundle and push it as an OCI artifact (one layer per file, fit facts in the annotations)."""
    from edgekit.fleet.registry import push

    client = _client(reference, plain_http, registry_config)
    started = time.perf_counter()
    with status(f"push {bundle.name}") as step:
        pushed = push(bundle, client, step)
    data = {**asdict(pushed), "seconds": round(time.perf_counter() - started, 3)}
    if as_json:
        emit_json(data)
    else:
        out.print(f"{escape(pushed.reference)}  {pushed.layers} layers, {pushed.bytes:,} bytes")


@app.command("pull")
def pull_cmd(
    reference: Annotated[str, typer.Argument(help="REGISTRY/REPOSITORY:TAG or @sha256:DIGEST")],
    bundles: BundlesDir = None,
    trusted_key: TrustedKey = None,
    plain_http: PlainHttp = False,
    registry_config: DockerConfig = None,
    as_json: JsonFlag = False,
) -> None:
    """Download a bundle artifact, verify every digest and the bundle's manifest, publish it atomically into the bundles folder."""
    from edgekit.fleet.registry import pull

    client = _client(reference, plain_http, registry_config)
    started = time.perf_counter()
    with status(f"pull {reference}") as step:
        art, path = pull(client, _bundles(bundles), step, gate=_signature_gate(client, trusted_key))
    data = {"reference": str(client.ref), "digest": art.digest, "name": art.name, "path": str(path), "bytes": art.total_bytes,
            "layers": len(art.layers), "seconds": round(time.perf_counter() - started, 3)}
    if as_json:
        emit_json(data)
    else:
        out.print(f"{escape(str(path))}  {art.digest}  {art.total_bytes:,} bytes")


@app.command("sign")
def sign_cmd(
    reference: Annotated[str, typer.Argument(help="REGISTRY/REPOSITORY:TAG or @sha256:DIGEST of a pushed bundle")],
    key: Annotated[Path, typer.Option("--key", help="Ed25519 private key (PEM, from `edgekit keygen`).")],
    plain_http: PlainHttp = False,
    registry_config: DockerConfig = None,
    as_json: JsonFlag = False,
) -> None:
    """Sign a pushed bundle's manifest digest; the signature goes to the registry as `sha256-<digest>.sig`."""
    from edgekit.fleet.registry import resolve
    from edgekit.fleet.signing import load_private_key, sign

    private_key = load_private_key(key)
    client = _client(reference, plain_http, registry_config)
    signed = sign(client, resolve(client), private_key)
    if as_json:
        emit_json(asdict(signed))
    else:
        out.print(f"{escape(signed.signature_ref)}  signs {signed.digest} with key {signed.key_id}")


@app.command("keygen")
def keygen_cmd(
    prefix: Annotated[Path, typer.Argument(help="Writes PREFIX.key (private, mode 600) and PREFIX.pub.")],
) -> None:
    """Make an Ed25519 key pair for `edgekit sign` (private) and `--trusted-key` on the boards (public)."""
    from edgekit.fleet.signing import generate_key_pair

    private, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    kid = generate_key_pair(private, public)
    out.print(f"{escape(str(private))}  {escape(str(public))}  key {kid}")


def _fit_gate(device_ref: str | None):
    """The board's profile: --device, EDGEKIT_DEVICE, else the installed pack's device."""
    from edgekit.cli.doctor import find_pack, read_pack
    from edgekit.cli.flags import load_board

    ref = device_ref or _settings().device
    if ref is not None:
        device = load_board(ref)
    else:
        pack_file = find_pack()
        if pack_file is None:
            raise ConfigError("no device profile for the fit gate", hint="pass --device ID|PROFILE.yaml or set EDGEKIT_DEVICE")
        device = read_pack(pack_file).device

    def gate(art) -> None:
        from edgekit.fit import fit
        from edgekit.schema.device import load_catalog

        report = fit(art.fit_manifest, device, catalog=load_catalog().values())
        failing = [c for c in report.checks if c.verdict == "fail"]
        if failing:
            raise GateFailed(f"{art.name} does not fit {device.id}: " + "; ".join(f"{c.name}: {c.message}" for c in failing))
        err.print(f"fit on {device.id}: {report.verdict} (RAM {report.memory['required'] / 2**20:,.0f} MiB of "
                  f"{report.usable_ram_bytes / 2**20:,.0f} MiB usable)")

    return gate


def _golden(path: Path):
    from edgekit.cli.doctor import check_in_subprocess
    from edgekit.fleet.board import GoldenOutcome
    from edgekit.runtime import cpu

    result = check_in_subprocess(path, cpu.detect(), None)
    if result.error:
        return GoldenOutcome(False, result.error)
    golden = result.golden or {}
    if not golden.get("recorded"):
        return GoldenOutcome(True, "no golden record in the manifest")
    return GoldenOutcome(bool(golden.get("passed")), golden.get("reason") or "all golden checks passed")


@app.command("update")
def update_cmd(
    reference: Annotated[str, typer.Argument(help="REGISTRY/REPOSITORY:TAG or @sha256:DIGEST")] = None,
    rollback: Annotated[bool, typer.Option("--rollback", help="Serve the previous kept version again instead.")] = False,
    model: Annotated[str, typer.Option("--model", help="With --rollback: the model to roll back (default: the only managed one).")] = None,
    bundles: BundlesDir = None,
    device: Annotated[str, typer.Option("--device", "-d", help="This board's device id or profile file for the fit gate "
                                                              "(default EDGEKIT_DEVICE, else the installed pack's).")] = None,
    keep: Annotated[int, typer.Option("--keep", min=2, help="Versions to keep per model (default 3; EDGEKIT_KEEP_VERSIONS).")] = None,
    trusted_key: TrustedKey = None,
    plain_http: PlainHttp = False,
    registry_config: DockerConfig = None,
    daemon: Annotated[str, typer.Option("--daemon", help="URL of the running daemon (env EDGEKIT_DAEMON_URL): it reloads the "
                                                         "new version and runs its golden checks; switched back unless it serves "
                                                         "it through --probation-s.")] = None,
    probation_s: Annotated[float, typer.Option("--probation-s", min=0, help="With --daemon: seconds the new version must "
                                                                           "keep serving (default 30; EDGEKIT_PROBATION_S).")] = None,
    confirm_timeout_s: Annotated[float, typer.Option("--confirm-timeout-s", min=0.1, help="With --daemon: most seconds to "
                                                     "wait for the daemon to serve or refuse it (default 600).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """On the board: resolve, fit-gate from the annotations, pull, verify, golden checks, switch the served version atomically.

    Exit 1 names the failing check (signature, fit, digest, golden); the served version is then unchanged. With
    --daemon, a version the daemon refuses or fails within the probation window is switched back (exit 1).
    """
    from edgekit.fleet import board

    folder = _bundles(bundles)
    if rollback:
        if reference is not None:
            raise ConfigError("--rollback takes no reference", hint="edgekit update --rollback [--model NAME]")
        result = board.rollback(folder, model)
    else:
        if reference is None:
            raise ConfigError("no reference to update to", hint="edgekit update REGISTRY/REPO:TAG, or --rollback")
        client = _client(reference, plain_http, registry_config)
        signature, fits = _signature_gate(client, trusted_key), _fit_gate(device)

        def gate(art) -> None:
            signature(art)
            fits(art)

        settings = _settings()
        url = daemon or settings.daemon_url
        confirm = restored = None
        if url is not None:
            from functools import partial

            from edgekit.fleet.daemon_check import confirm_with_daemon, wait_until_served

            timeout = confirm_timeout_s or settings.confirm_timeout_s
            probation = settings.probation_s if probation_s is None else probation_s
            confirm = partial(confirm_with_daemon, url, timeout_s=timeout, probation_s=probation, progress=err.print)
            restored = partial(wait_until_served, url, timeout_s=timeout)
        with status(f"update {reference}") as step:
            result = board.update(client, folder, gate=gate, golden=None if url else _golden,
                                  keep=keep or settings.keep_versions, progress=step, confirm=confirm, restored=restored)
    if as_json:
        emit_json(asdict(result))
        return
    verb = "rolled back to" if rollback else ("now serves" if result.changed else "already serves")
    out.print(f"{escape(result.name)} {verb} {result.version} ({escape(result.reference)}); kept: {', '.join(result.kept)}")
    if result.seconds:
        out.print(json.dumps(result.seconds))
