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


def _board_device(device_ref: str | None, purpose: str):
    """The board's profile: --device, EDGEKIT_DEVICE, else the installed pack's device."""
    from edgekit.cli.doctor import find_pack, read_pack
    from edgekit.cli.flags import load_board

    ref = device_ref or _settings().device
    if ref is not None:
        return load_board(ref)
    pack_file = find_pack()
    if pack_file is None:
        raise ConfigError(f"no device profile for {purpose}", hint="pass --device ID|PROFILE.yaml or set EDGEKIT_DEVICE")
    return read_pack(pack_file).device


def _fit_gate(device_ref: str | None):
    device = _board_device(device_ref, "the fit gate")

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


@app.command("node-labels")
def node_labels_cmd(
    device: Annotated[str, typer.Option("--device", "-d", help="Device id, or a profile file from `edgekit profile-host --out` "
                                                              "(default EDGEKIT_DEVICE, else the installed pack's).")] = None,
    node: Annotated[str, typer.Option("--node", help="With --apply: the Kubernetes node to label (this board's node name).")] = None,
    apply: Annotated[bool, typer.Option("--apply", help="Run `kubectl label node NODE ... --overwrite` (k3s: `k3s kubectl`).")] = False,
    as_json: JsonFlag = False,
) -> None:
    """The node labels of this board: edgekit.dev/device (what the DaemonSet per board class selects on), its core type
    and instruction-set features; printed as key=value lines, or applied with kubectl."""
    import shutil
    import subprocess

    from edgekit.fleet.labels import kubectl_arguments, node_labels

    labels = node_labels(_board_device(device, "the node labels"))
    if apply:
        if not node:
            raise ConfigError("--apply needs --node NAME", hint="kubectl get nodes lists the node names")
        kubectl = [found] if (found := shutil.which("kubectl")) else (["k3s", "kubectl"] if shutil.which("k3s") else None)
        if kubectl is None:
            raise ConfigError("neither kubectl nor k3s is on PATH", hint="print the labels without --apply and set them elsewhere")
        done = subprocess.run([*kubectl, *kubectl_arguments(node, labels)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            from edgekit.errors import RuntimeBackendError

            raise RuntimeBackendError(f"kubectl label node {node} failed: {done.stderr.strip() or done.stdout.strip()}")
        err.print(done.stdout.strip())
    present = {k: v for k, v in labels.items() if v is not None}
    if as_json:
        emit_json({"node": node, "labels": present, "removed": sorted(k for k, v in labels.items() if v is None),
                   "applied": apply})
    else:
        for key, value in present.items():
            out.print(f"{key}={value}", markup=False, highlight=False)


fleet_app = typer.Typer(help="Kubernetes resources for a fleet of boards.", no_args_is_help=True)
app.add_typer(fleet_app, name="fleet")


def _manifest_for(spec: str, plain_http: bool, registry_config: Path | None):
    """``REF`` (fit facts from the registry's annotations, no layer downloaded) or ``REF=DIR`` (from a local bundle)."""
    ref, _, folder = spec.partition("=")
    if folder:
        from edgekit.runtime.verify import read_manifest_capped

        return ref, read_manifest_capped(Path(folder).expanduser())
    from edgekit.fleet.registry import resolve

    return ref, resolve(_client(ref, plain_http, registry_config)).fit_manifest


@fleet_app.command("manifests")
def manifests_cmd(
    device: Annotated[str, typer.Option("--device", "-d", help="The board class: device id or profile file.")],
    bundle: Annotated[list[str], typer.Option("--bundle", help="REGISTRY/REPO:TAG the boards update to (fit facts from the "
                                                               "registry's annotations), or REF=DIR (from a local bundle). Repeat.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Overlay folder to write (default: print the files).")] = None,
    image: Annotated[str, typer.Option("--image", help="The board image (scripts/build-image.sh).")] = "registry.lan:5000/edgekit/board:0.1",
    trusted_key: TrustedKey = None,
    base: Annotated[str, typer.Option("--base", help="Path of deploy/kustomize/base relative to the overlay folder.")] = "../../base",
    n_ctx: Annotated[int, typer.Option("--n-ctx", help="Context per generation slot the daemon allocates (as `serve --n-ctx`).")] = None,
    slots: Annotated[int, typer.Option("--slots", help="Generation slots per model (as `serve --slots`).")] = None,
    plain_http: PlainHttp = False,
    registry_config: DockerConfig = None,
    as_json: JsonFlag = False,
) -> None:
    """A kustomize overlay for one board class: node selector, bundle references, and the daemon's memory from `edgekit fit`."""
    from edgekit.cli.flags import load_board
    from edgekit.fleet.k8s import render_overlay, size, write_overlay
    from edgekit.serve.settings import ServeSettings

    board_device = load_board(device)
    given = {k: v for k, v in {"n_ctx": n_ctx, "slots": slots}.items() if v is not None}
    settings = ServeSettings(**given)
    pairs = [_manifest_for(spec, plain_http, registry_config) for spec in bundle]
    sizing = size(board_device, [m for _, m in pairs], settings)
    key_path = trusted_key or _settings().trusted_key
    files = render_overlay(board_device, [ref for ref, _ in pairs], sizing, image,
                           key_path.read_text() if key_path else None, base)
    if out_dir is not None:
        for path in write_overlay(out_dir, files):
            err.print(f"wrote {escape(str(path))}")
    if as_json:
        emit_json({"device": board_device.id, "budget_mib": sizing.budget_mib, "memory_mib": sizing.memory_mib,
                   "cpu": sizing.cpu, "footprints": sizing.footprints, "files": files if out_dir is None else None})
    elif out_dir is None:
        for name, text in files.items():
            out.print(f"# --- {name}\n{text}", markup=False, highlight=False)
