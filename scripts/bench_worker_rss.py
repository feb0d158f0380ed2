"""Resident memory of a real `edgekit serve` model worker next to what the memory budget charges for it.

Starts the daemon on 127.0.0.1 with one bundle preloaded, then sends rounds of requests and reads the
worker process's resident set (VmRSS) and its peak (VmHWM) from /proc after each:

- encoders: batch 1 (a short text, then a max-length one), the largest micro-batch the worker runs
  (--batch-max-tokens / max_length texts of max_length tokens), and the largest requests the daemon
  accepts, repeated until RSS levels off: as many max-length texts as --max-input-chars allows, and
  --max-embedding-inputs texts of which one is max-length (the worker pads the whole request to it);
- GGUF: one chat completion, then one whose prompt fills most of the context.

The charge is ``edgekit.serve.budget.footprint_bytes`` (the same figure `edgekit fit` checks). Prints a
table and writes bench-results/worker-rss.json. Linux only (/proc).

    python scripts/bench_worker_rss.py --bundle ~/.cache/edgekit/bundles/all-minilm-l6-v2-int8-dynamic
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekit.bench.daemon import running_daemon  # noqa: E402
from edgekit.bundle import read_manifest  # noqa: E402
from edgekit.serve.budget import DAEMON_RSS, MIB, footprint_bytes  # noqa: E402
from edgekit.serve.settings import ServeSettings  # noqa: E402

WORD = "lighthouse "  # one WordPiece token in MiniLM's vocabulary; many tokens in any BPE vocabulary


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and Pss of a process, bytes. Pss counts a file page mapped twice (generation slots each
    map the GGUF) once, as the kernel and a cgroup's memory limit do; RSS counts it per mapping."""
    values = {}
    for name in ("status", "smaps_rollup"):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Pss"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def worker_pid(daemon_pid: int) -> int:
    children = Path(f"/proc/{daemon_pid}/task/{daemon_pid}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"expected one worker process under the daemon, found {children}")
    return int(children[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=4, help="Repetitions of the largest request (RSS levels off).")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                        help="An `edgekit serve` setting for the daemon and the charge, e.g. --set slots=2 --set n_ctx=2048.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "worker-rss.json")
    args = parser.parse_args()

    manifest = read_manifest(args.bundle)
    extra = dict(item.split("=", 1) for item in args.set)
    settings = ServeSettings(models=args.bundle.parent, threads=args.threads, **extra)
    charged = footprint_bytes(manifest, settings)
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        # Hard links: a symlinked bundle would point outside the models folder, which verification refuses.
        shutil.copytree(args.bundle, models / manifest.name, copy_function=os.link)
        flags = ["--threads", str(args.threads), "--preload", manifest.name,
                 *(arg for key, value in extra.items() for arg in (f"--{key.replace('_', '-')}", value))]
        rows = []
        with running_daemon(models, *flags) as daemon:
            url = daemon.url
            pid = worker_pid(daemon.pid)
            rows.append({"step": "loaded (golden checks run)", **proc_status(pid), "daemon_rss": proc_status(daemon.pid)["VmRSS"]})
            client = httpx.Client(base_url=url, timeout=600)
            if manifest.format == "onnx":
                max_length = manifest.runtime.max_length
                long_text = WORD * (max_length + 16)  # truncated to max_length tokens
                micro = max(1, min(settings.batch_max, settings.batch_max_tokens // max_length))
                steps = [("batch 1, short text", ["Nice."]), (f"batch 1, {max_length} tokens", [long_text]),
                         (f"largest micro-batch: {micro} x {max_length} tokens", [long_text] * micro)]
                # The worker tokenizes a whole job at once, padded to its longest text: one max-length text among
                # --max-embedding-inputs short ones (well inside --max-input-chars) holds them all at max_length.
                padded = ["Nice."] * (settings.max_embedding_inputs - 1) + [long_text]
                # max-length texts the character cap allows
                most = max(1, min(settings.max_embedding_inputs, settings.max_input_chars // len(long_text)))
                for i in range(args.rounds):
                    steps += [(f"request of {most} x {max_length} tokens (round {i + 1})", [long_text] * most),
                              (f"request of {len(padded)} texts padded to {max_length} (round {i + 1})", padded)]
                for step, texts in steps:
                    client.post("/v1/embeddings", json={"model": manifest.name, "input": texts}).raise_for_status()
                    rows.append({"step": step, **proc_status(pid), "daemon_rss": proc_status(daemon.pid)["VmRSS"]})
                    log(f"{step}: RSS {rows[-1]['VmRSS'] / MIB:.0f} MiB, peak {rows[-1]['VmHWM'] / MIB:.0f} MiB")
            else:
                chat = [{"role": "user", "content": "Say hello."}]
                long_chat = [{"role": "user", "content": "Summarize: " + WORD * (settings.n_ctx // 3)}]
                steps = [("chat, short prompt", chat, 1), (f"chat, prompt near n_ctx {settings.n_ctx}", long_chat, 1)]
                if settings.slots > 1:  # every slot holding a long context at once
                    steps.append((f"{settings.slots} chats at once, prompts near n_ctx", long_chat, settings.slots))
                for step, messages, clients in steps:
                    with ThreadPoolExecutor(clients) as pool:
                        for response in pool.map(lambda _: client.post("/v1/chat/completions", json={
                                "model": manifest.name, "messages": messages, "max_tokens": 16}), range(clients)):
                            response.raise_for_status()
                    rows.append({"step": step, **proc_status(pid), "daemon_rss": proc_status(daemon.pid)["VmRSS"]})
                    log(f"{step}: RSS {rows[-1]['VmRSS'] / MIB:.0f} MiB, peak {rows[-1]['VmHWM'] / MIB:.0f} MiB")

    peak = max(r["VmHWM"] for r in rows)
    pss = max(r["Pss"] for r in rows)
    print(f"{manifest.name} worker on {platform.machine()}, {args.threads} threads, {extra or 'default settings'}; "
          f"charged {charged / MIB:.1f} MiB")
    print(f"{'step':<58} {'RSS MiB':>8} {'peak MiB':>9} {'Pss MiB':>8} {'charge/peak':>12} {'daemon MiB':>11}")
    for r in rows:
        print(f"{r['step']:<58} {r['VmRSS'] / MIB:>8.1f} {r['VmHWM'] / MIB:>9.1f} {r['Pss'] / MIB:>8.1f} "
              f"{charged / r['VmHWM'] - 1:>+12.1%} {r['daemon_rss'] / MIB:>11.1f}")
    print(f"daemon process: {max(r['daemon_rss'] for r in rows) / MIB:.1f} MiB RSS at most; `fit` adds "
          f"{DAEMON_RSS / MIB:.0f} MiB for it")
    print(f"charged {charged / MIB:.1f} MiB vs peak RSS {peak / MIB:.1f} MiB: {charged / peak - 1:+.1%}; "
          f"vs largest Pss {pss / MIB:.1f} MiB: {charged / pss - 1:+.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bundle": manifest.name, "machine": platform.machine(), "threads": args.threads,
                                    "settings": extra,
                                    "charged_bytes": charged, "peak_bytes": peak, "pss_bytes": pss, "steps": rows}, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
