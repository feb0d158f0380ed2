"""Push, pull and update times of bundles through a real OCI registry on loopback.

Starts Debian's docker-registry (the CNCF distribution registry) on 127.0.0.1 with a throw-away storage
folder, then for each bundle: `push` (cold: every blob uploaded), `pull` into an empty bundles folder
(every layer downloaded, hashed, the bundle verified, published with one rename), and `update` on a
board folder, split into resolve + gates (signature, fit from the annotations), pull + verify, golden
checks (the subprocess `edgekit doctor` runs) and the switch of the served symlink from version 1 to
version 2 (the same files with a new manifest timestamp); then a rollback.
Medians of --rounds. Loopback measures edgekit's and oras' own cost, not a network.

    python scripts/bench_fleet.py [--bundle DIR ...] [--rounds 3] [--device rpi-5-8gb]

Prints a table and writes bench-results/fleet.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datetime import UTC

from edgekit.bundle import read_manifest
from edgekit.fleet.local_registry import registry_config
from edgekit.paths import kit_paths

SAMPLES = ("all-minilm-l6-v2-int8-dynamic", "smollm2-135m-instruct-q4-k-m")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_registry(work: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("docker-registry")
    if binary is None:
        sys.exit("docker-registry is not installed: apt-get install -y docker-registry")
    port = free_port()
    (work / "config.yml").write_text(registry_config(work / "data", port))
    proc = subprocess.Popen([binary, "serve", str(work / "config.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):  # bounded: 30 s
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                return proc, f"127.0.0.1:{port}"
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    sys.exit("docker-registry did not answer within 30 s")


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def second_version(bundle: Path, work: Path) -> Path:
    """The same files with a new manifest timestamp: another artifact digest, so an update has something to switch to."""
    from datetime import datetime

    from edgekit.bundle import publish, staging_dir

    manifest = read_manifest(bundle)
    out = work / "v2"
    with staging_dir(out, manifest.name) as staged:
        shutil.copytree(bundle, staged, dirs_exist_ok=True)
        return publish(staged, manifest.model_copy(update={"created": datetime.now(UTC).replace(microsecond=0)}), out)


def bench_bundle(bundle: Path, host: str, work: Path, rounds: int, device_ref: str) -> dict:
    from edgekit.cli.fleet import _fit_gate, _golden
    from edgekit.fleet import board
    from edgekit.fleet.registry import RegistryClient, parse_reference, pull, push

    manifest = read_manifest(bundle)
    repo = f"{host}/bench/{manifest.name}"
    push_s, pull_s, update_parts, rollback_s = [], [], [], []
    digest = None
    for round_ in range(rounds):
        tag = f"r{round_}"
        started = time.perf_counter()
        pushed = push(bundle, RegistryClient(parse_reference(f"{repo}:{tag}"), plain_http=True))
        push_s.append(time.perf_counter() - started)  # round 0 uploads every blob; later rounds find them (HEAD)
        digest = pushed.digest
        target = work / f"pull-{round_}"
        started = time.perf_counter()
        pull(RegistryClient(parse_reference(f"{repo}:{tag}"), plain_http=True), target)
        pull_s.append(time.perf_counter() - started)
        shutil.rmtree(target)

    gate = _fit_gate(device_ref)
    push(second_version(bundle, work), RegistryClient(parse_reference(f"{repo}:v2"), plain_http=True))
    for round_ in range(rounds):
        folder = work / f"board-{round_}"
        board.update(RegistryClient(parse_reference(f"{repo}:r0"), plain_http=True), folder, gate=gate, golden=_golden)
        result = board.update(RegistryClient(parse_reference(f"{repo}:v2"), plain_http=True), folder, gate=gate, golden=_golden)
        update_parts.append(result.seconds)
        started = time.perf_counter()
        board.rollback(folder, manifest.name)
        rollback_s.append(time.perf_counter() - started)
        shutil.rmtree(folder)
    parts = {key: median([p[key] for p in update_parts]) for key in update_parts[0]}
    return {"bundle": manifest.name, "format": manifest.format, "bytes": manifest.total_bytes + len((bundle / "manifest.json").read_bytes()),
            "layers": len(manifest.files) + 1, "digest": digest, "push_cold_s": round(push_s[0], 4),
            "push_warm_s": median(push_s[1:]) if len(push_s) > 1 else None, "pull_s": median(pull_s),
            "pull_mb_s": round((manifest.total_bytes / 1e6) / statistics.median(pull_s), 1),
            "update_s": parts, "rollback_s": median(rollback_s), "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, action="append", help="Bundle folder (default: the sample bundles in $EDGEKIT_HOME/bundles).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="rpi-5-8gb", help="Board profile for update's fit gate.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "fleet.json")
    args = parser.parse_args()
    bundles = args.bundle or [kit_paths().bundles / name for name in SAMPLES if (kit_paths().bundles / name).is_dir()]
    if not bundles:
        sys.exit("no bundles: export the samples (scripts/quickstart.sh --no-serve) or pass --bundle")
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-fleet-") as tmp:
        work = Path(tmp)
        proc, host = start_registry(work)
        try:
            rows = []
            for bundle in bundles:
                log(f"{bundle.name}: push, pull, update x {args.rounds}")
                rows.append(bench_bundle(bundle, host, work, args.rounds, args.device))
        finally:
            proc.kill()
            proc.wait()
    header = f"{'bundle':34} {'MB':>7} {'layers':>6} {'push cold s':>11} {'pull s':>7} {'pull MB/s':>9} {'gate s':>7} " \
             f"{'pull+verify s':>13} {'golden s':>8} {'switch ms':>9} {'rollback ms':>11}"
    print(header)
    for r in rows:
        u = r["update_s"]
        print(f"{r['bundle']:34} {r['bytes'] / 1e6:7.1f} {r['layers']:6d} {r['push_cold_s']:11.3f} {r['pull_s']:7.3f} "
              f"{r['pull_mb_s']:9.1f} {u['resolve_and_gate']:7.3f} {u['pull_and_verify']:13.3f} {u['golden']:8.2f} "
              f"{u['switch'] * 1000:9.2f} {r['rollback_s'] * 1000:11.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": len(__import__("os").sched_getaffinity(0))},
               "registry": "docker-registry (Debian) on 127.0.0.1, plain HTTP", "results": rows}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
