"""Push, pull and update times of bundles through a real OCI registry on loopback.

Starts Debian's docker-registry (the CNCF distribution registry) on 127.0.0.1 with a throw-away storage
folder, then for each bundle: `push` (cold: every blob uploaded), `pull` into an empty bundles folder
(every layer downloaded, hashed, the bundle verified, published with one rename), and `update` on a
board folder, split into resolve + gates (signature, fit from the annotations), pull + verify, golden
checks (the subprocess `edgekit doctor` runs) and the switch of the served symlink from version 1 to
version 2 (the same files with a new manifest timestamp); then a rollback.
Medians of --rounds. Loopback measures edgekit's and oras' own cost, not a network.

Then, with a daemon serving version 1 and --clients threads sending requests without pause: `update --daemon`
to version 2 (the daemon reloads it in place: time from the switch until /health says it serves version 2, and
requests that failed meanwhile), and `update --daemon` to a version 3 whose golden record is contradicted (the
daemon refuses it, update switches back: time from the switch until the link is back and the daemon confirms
the old version, and failed requests).

    python scripts/bench_fleet.py [--bundle DIR ...] [--rounds 3] [--device rpi-5-8gb] [--clients 4]

Prints a table and writes bench-results/fleet.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
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

from edgekit.bench.daemon import free_port, start_daemon
from edgekit.bundle import read_manifest
from edgekit.fleet.local_registry import registry_config
from edgekit.paths import kit_paths

SAMPLES = ("all-minilm-l6-v2-int8-dynamic", "smollm2-135m-instruct-q4-k-m")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


def broken_version(bundle: Path, work: Path) -> Path | None:
    """A version whose golden record the model contradicts: greedy ids shifted by one, or encoder outputs negated
    (None for a bundle exported without a golden record)."""
    import numpy as np

    from edgekit.runtime.golden import pack_f16, unpack_f16

    out = work / "v3" / bundle.name
    shutil.copytree(bundle, out)
    data = json.loads((out / "manifest.json").read_text())
    golden = data.get("golden")
    if golden is None:
        return None
    if "prompts" in golden:
        for prompt in golden["prompts"]:
            prompt["ids"] = [i + 1 for i in prompt["ids"]]
    else:
        for text in golden["texts"]:
            text["output"] = pack_f16(-unpack_f16(text["output"], text["shape"]).astype(np.float32))
    (out / "manifest.json").write_text(json.dumps(data))
    return out


class Clients:
    """Threads sending requests back to back; every status code is counted."""

    def __init__(self, url: str, manifest, count: int) -> None:
        import threading

        if manifest.task == "text-generation":
            self.path, self.body = "/v1/chat/completions", {"model": manifest.name, "max_tokens": 4,
                                                           "messages": [{"role": "user", "content": "Say hi."}]}
        else:
            self.path, self.body = "/v1/embeddings", {"model": manifest.name, "input": "The board keeps serving."}
        self.url, self.codes, self.stop = url, [], threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(count)]

    def _run(self) -> None:
        with httpx.Client(timeout=300) as client:
            while not self.stop.is_set():
                try:
                    self.codes.append(client.post(self.url + self.path, json=self.body).status_code)
                except httpx.TransportError:
                    self.codes.append(0)

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(600)


def bench_reload(bundle: Path, host: str, work: Path, device_ref: str, clients: int) -> dict:
    """Reload in place and automatic switch-back with a daemon serving under load."""
    work.mkdir(parents=True, exist_ok=True)
    from functools import partial

    from edgekit.cli.fleet import _fit_gate
    from edgekit.errors import GateFailed
    from edgekit.fleet import board
    from edgekit.fleet.daemon_check import confirm_with_daemon, wait_until_served
    from edgekit.fleet.registry import RegistryClient, parse_reference, push

    manifest = read_manifest(bundle)
    repo = f"{host}/bench/{manifest.name}"
    broken = broken_version(bundle, work)
    if broken is not None:
        push(broken, RegistryClient(parse_reference(f"{repo}:v3"), plain_http=True))
    folder = work / "served"
    gate = _fit_gate(device_ref)
    board.update(RegistryClient(parse_reference(f"{repo}:r0"), plain_http=True), folder, gate=gate, golden=None)
    daemon = start_daemon(folder, "--preload", manifest.name, "--version-poll-s", "0.1", "--slots", "2",
                          log_path=work / "daemon.log", timeout=300)
    url = daemon.url
    try:
        confirm = partial(confirm_with_daemon, url, timeout_s=600, probation_s=0)
        restored = partial(wait_until_served, url, timeout_s=600)
        with Clients(url, manifest, clients) as load:
            before = len(load.codes)
            result = board.update(RegistryClient(parse_reference(f"{repo}:v2"), plain_http=True), folder, gate=gate,
                                  golden=None, confirm=confirm, restored=restored)
            reload_codes = load.codes[before:]
            mark = len(load.codes)
            started = time.perf_counter()
            refused = None
            if broken is not None:
                try:
                    board.update(RegistryClient(parse_reference(f"{repo}:v3"), plain_http=True), folder, gate=gate,
                                 golden=None, confirm=confirm, restored=restored)
                    refused = False
                except GateFailed:
                    refused = True
            back_s = time.perf_counter() - started if broken is not None else None
            back_codes = load.codes[mark:]
        served = httpx.get(url + "/health", timeout=30).json()["versions"][manifest.name]["serving"]
    finally:
        daemon.stop()
    return {"bundle": manifest.name, "clients": clients,
            "reload_s": round(result.seconds["confirm"], 3), "reload_requests": len(reload_codes),
            "reload_failed": sum(c != 200 for c in reload_codes),
            "rollback_refused": refused, "rollback_s": round(back_s, 3) if back_s is not None else None,
            "rollback_requests": len(back_codes),
            "rollback_failed": sum(c != 200 for c in back_codes), "served_after": served, "v2": result.version}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, action="append", help="Bundle folder (default: the sample bundles in $EDGEKIT_HOME/bundles).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="rpi-5-8gb", help="Board profile for update's fit gate.")
    parser.add_argument("--clients", type=int, default=4, help="Clients sending requests during the in-place reload.")
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
            reloads = []
            for bundle in bundles:
                log(f"{bundle.name}: in-place reload and automatic switch-back under {args.clients} clients")
                reloads.append(bench_reload(bundle, host, work / f"reload-{bundle.name}", args.device, args.clients))
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
    print()
    print(f"{'bundle':34} {'clients':>7} {'reload s':>8} {'requests':>8} {'failed':>6} {'switch-back s':>13} {'requests':>8} "
          f"{'failed':>6}")
    for r in reloads:
        back = f"{r['rollback_s']:13.2f} {r['rollback_requests']:8d} {r['rollback_failed']:6d}" if r["rollback_s"] is not None \
            else f"{'no golden':>13} {'-':>8} {'-':>6}"
        print(f"{r['bundle']:34} {r['clients']:7d} {r['reload_s']:8.2f} {r['reload_requests']:8d} {r['reload_failed']:6d} {back}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": len(__import__("os").sched_getaffinity(0))},
               "registry": "docker-registry (Debian) on 127.0.0.1, plain HTTP", "results": rows, "reload": reloads}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
