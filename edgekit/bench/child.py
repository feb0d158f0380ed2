"""Measurements that need a fresh process: ``python -m edgekit.bench.child COMMAND ARGS...``.

A fresh process makes load time and peak RSS mean what they say: nothing else was loaded before.
Each command prints one JSON object on stdout (``reference-chat`` answers one JSON line per request
line instead). Parents start them with ``command``/``run`` below, so the child imports the same
edgekit as its parent (a script run from a checkout included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import edgekit
from edgekit.bench import measure

if TYPE_CHECKING:
    import subprocess

PACKAGE_ROOT = Path(edgekit.__file__).resolve().parent.parent


def command(*args: str) -> list[str]:
    """The command line of a child measurement."""
    return [sys.executable, "-m", "edgekit.bench.child", *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment with this edgekit first on the path (and ``extra`` variables)."""
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def run(*args: str) -> subprocess.CompletedProcess:
    """Run a child measurement to the end; its JSON is the last line of stdout (see ``result``)."""
    import subprocess  # parent side only: a child's peak RSS should not count it

    from edgekit.runtime.placement import WORKER_OMP_SPIN_COUNT, omp_env

    # the OpenMP settings the daemon gives its workers by default: a measurement times what the daemon would run
    return subprocess.run(command(*args), capture_output=True, text=True, env=child_env(omp_env(WORKER_OMP_SPIN_COUNT)))


def result(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- edgekit bench: one bundle -------------------------------------------------------------------

def bench_bundle(bundle: Path, config: dict) -> dict:
    from edgekit.bundle import read_manifest  # here only: the schemas add ~15 MiB that gguf-rss must not count
    from edgekit.formats import FORMATS

    manifest = read_manifest(bundle)  # the parent ran verify_for_runtime before starting this process
    measured = FORMATS[manifest.format].hook("bench")(bundle, manifest, config)
    return {**measured, "peak_rss_bytes": measure.peak_rss_bytes()}


# -- the in-process reference of scripts/bench_serve.py ------------------------------------------

def reference_chat(model_path: str, threads: int, n_ctx: int) -> None:
    """llama-cpp-python's own streamed chat completion with the daemon's settings, one request per stdin line
    (``{"messages": [...], "max_tokens": N}``); answers the timestamps of the chunks that carry text."""
    import llama_cpp

    from edgekit.runtime.llama_params import PREFILL_CHUNK

    llm = llama_cpp.Llama(model_path=model_path, n_ctx=n_ctx, n_batch=PREFILL_CHUNK, n_ubatch=PREFILL_CHUNK,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    for line in sys.stdin:
        request = json.loads(line)
        times = []
        started = time.perf_counter()
        stream = llm.create_chat_completion(request["messages"], max_tokens=request["max_tokens"], temperature=0, stream=True)
        for chunk in stream:
            if chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
        print(json.dumps({"started": started, "times": times}), flush=True)


def embed_load(bundle: Path, threads: int, texts: list[str]) -> None:
    """Background load until killed: embedding batches of ``texts``, back to back with 5 ms pauses."""
    model = measure.load_encoder(bundle, threads)
    while True:
        model.embed(texts)
        time.sleep(0.005)


# -- entry point ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edgekit.bench.child", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("bundle", help="edgekit bench: load time, speed and peak RSS of one verified bundle")
    p.add_argument("bundle", type=Path)
    p.add_argument("config", type=json.loads, help="BenchConfig as JSON")
    p = commands.add_parser("gguf-rss", help="peak RSS after filling a GGUF model's context")
    p.add_argument("model", type=Path)
    p.add_argument("n_ctx", type=int)
    p.add_argument("threads", type=int)
    p.add_argument("n_gen", type=int)
    p.add_argument("slots", type=int)
    p = commands.add_parser("encoder-rss", help="peak RSS after encoder batches of maximum length")
    p.add_argument("bundle", type=Path)
    p.add_argument("batch", type=int)
    p.add_argument("threads", type=int)
    p = commands.add_parser("decode-interleaved", help="decode tokens/s of several configurations, interleaved")
    p.add_argument("configs", type=json.loads, help='{"name": [model path, n_ctx, prompt tokens], ...}')
    p.add_argument("threads", type=int)
    p.add_argument("n_gen", type=int)
    p.add_argument("rounds", type=int)
    p = commands.add_parser("reference-chat", help="llama-cpp-python's streamed chat completion, requests on stdin")
    p.add_argument("model", type=Path)
    p.add_argument("threads", type=int)
    p.add_argument("n_ctx", type=int)
    p = commands.add_parser("embed-load", help="embedding batches back to back until killed")
    p.add_argument("bundle", type=Path)
    p.add_argument("threads", type=int)
    p.add_argument("texts", type=json.loads, help="JSON list of the texts of one batch")
    args = parser.parse_args(argv)

    if args.command == "reference-chat":
        reference_chat(str(args.model), args.threads, args.n_ctx)
        return
    if args.command == "embed-load":
        embed_load(args.bundle, args.threads, args.texts)
        return
    if args.command == "bundle":
        out = bench_bundle(args.bundle, args.config)
    elif args.command == "gguf-rss":
        out = measure.gguf_peak_rss(args.model, args.n_ctx, args.threads, args.n_gen, args.slots)
    elif args.command == "encoder-rss":
        out = measure.encoder_peak_rss(args.bundle, args.batch, args.threads)
    else:
        out = measure.interleaved_decode(args.configs, args.threads, args.n_gen, args.rounds)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
