"""Benchmark `edgekit serve` side by side with in-process runtimes and llama-cpp-python's own server.

Same bundle files, threads, context and prompts for every system, measured in alternating rounds in
one run (the machine may be shared: alternating spreads any background load over all systems):

- peers (the main table), each at its defaults with the threads `edgekit serve` picks on this host: llama.cpp's own
  `llama-server -np 4 -kvu` (built once from the llama.cpp that the installed llama-cpp-python vendors, cached in
  $EDGEKIT_HOME/llama-server/<version>/: about 5 minutes on 2 cores, `--build-llama-server` builds only),
  `edgekit serve`, in-process llama-cpp-python and `python -m llama_cpp.server`: single-stream decode and 4-stream
  aggregate decode (each round's median of --decode-repeats runs, the order rotating every run), time to first token
  of a 1,000-token prompt cold and with a repeated 1,000-token system prompt (each round's median of --ttft-repeats
  requests, the systems taking turns request by request).
  Targets for the daemon / llama-server: decode >= 0.95 (4 streams >= 1.0), TTFT <= 1.1; for the daemon itself:
  4 streams >= 1.7x one stream and >= 1.7x llama_cpp.server's 4 streams, cached TTFT <= 0.3x cold, one stream
  >= 0.95x in-process;
- embeddings requests/s with 16 concurrent clients vs in-process onnxruntime in batches of 16 (>= 0.7);
- idle RSS of the daemon with no model (<= 120 MB) and time from start to /health 200 with the GGUF preloaded;
- cancellation: time from a client disconnect to the generation being stopped (docs/reliability.md case 17: <= 1 s);
- with ``--with decode``: streamed decode tok/s of the daemon vs in-process llama-cpp-python and
  `python -m llama_cpp.server`, each with libgomp's default OpenMP settings and the daemon's (``omp_env``);
- with ``--with soak``: 8 clients, mixed chat/embeddings(/classify), --soak-seconds: errors, RSS growth (< 5 %), p95.

The peers take about 1.5 minutes a round on an idle 2-core host, 14 minutes for --rounds 9 (run it under the
machine's heavy-job lock).

Bundles: --gguf / --encoder / --classifier, or the defaults in $EDGEKIT_HOME/bundles
(smollm2-135m-instruct-q4-k-m, all-minilm-l6-v2-int8-dynamic). llama_cpp.server needs the
`llama-cpp-python[server]` extras: pip install "sse-starlette>=1.6.1" "starlette-context>=0.3.6,<0.4".

Prints a table and writes bench-results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekit.bench import child, measure  # noqa: E402
from edgekit.bench.daemon import ServerProcess, free_port, serve_command  # noqa: E402
from edgekit.paths import kit_paths  # noqa: E402
from edgekit.runtime.llama_params import PREFILL_CHUNK  # noqa: E402
from edgekit.runtime.placement import omp_env  # noqa: E402
from edgekit.serve.settings import ServeSettings  # noqa: E402

# Between two systems' measurements: what one does after its request (the daemon copies finished conversations to its
# RAM cache once idle) ends before the next one is timed.
SETTLE_S = 0.25
MESSAGES = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."}]
TARGETS = {"decode_vs_inprocess": 0.90, "decode_vs_llama_cpp_server": 1.2, "embeddings_vs_inprocess": 0.7,
           "idle_rss_mb": 120, "cancel_seconds": 1.0, "soak_rss_growth": 0.05}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def Server(name: str, command: list[str], port: int, log_dir: Path, env: dict[str, str] | None = None) -> ServerProcess:
    """A server subprocess on 127.0.0.1 (the daemon, llama-server or llama_cpp.server), its log in ``log_dir``."""
    return ServerProcess(name, command, port, log_dir / f"{name}.log", env)


def daemon(models: Path, log_dir: Path, threads: int, n_ctx: int, *extra: str, name: str = "edgekit") -> ServerProcess:
    port = free_port()
    return Server(name, serve_command(models, port, "--threads", str(threads), "--n-ctx", str(n_ctx), *extra), port, log_dir)


def models_dir(root: Path, *bundles: Path) -> Path:
    """A models directory holding ``bundles`` as hard links (symlinks would leave the bundle; copies cost disk)."""
    target = root / "models"
    target.mkdir(parents=True, exist_ok=True)
    for bundle in bundles:
        if not (target / bundle.name).exists():
            shutil.copytree(bundle, target / bundle.name, copy_function=_link_or_copy)
    return target


def _link_or_copy(source: str, dest: str) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


# ---- llama-server, built from the llama.cpp that llama-cpp-python vendors -------------------------


def llama_server_binary(progress=log) -> Path:
    """llama.cpp's own llama-server, built once from the installed llama-cpp-python version's sdist.

    Cached in $EDGEKIT_HOME/llama-server/<version>/ (about 5 minutes on 2 cores the first time); built for
    this CPU with llama.cpp's defaults (GGML_NATIVE, OpenMP), as the installed llama-cpp-python was.
    """
    import tarfile

    import llama_cpp

    from edgekit.pack.llama_build import download_sdist

    version = llama_cpp.__version__
    home = kit_paths().home / "llama-server" / version
    binary = home / "llama-server"
    if binary.is_file():
        return binary
    sdist = download_sdist(version, kit_paths().downloads / "sdist")
    with tempfile.TemporaryDirectory(prefix="llama-server-", dir=kit_paths().home) as tmp:
        progress(f"building llama-server from {sdist.name} (about 5 minutes on 2 cores)")
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        build = Path(tmp) / "build"
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", f"-j{os.cpu_count() or 1}"],
                       check=True, stdout=subprocess.DEVNULL)
        home.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", home / "llama-server.tmp")
        os.replace(home / "llama-server.tmp", binary)  # a half-copied binary is never taken for a build
    return binary


# ---- decode ------------------------------------------------------------------------------------


def stream_http(url: str, model: str, max_tokens: int) -> list[float]:
    times = []
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    times.append(time.perf_counter())
    return times


class InProcess:
    """llama-cpp-python in a plain child process with the daemon's settings, driven over stdin/stdout."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(child.command("reference-chat", str(gguf), str(threads), str(n_ctx)),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child.child_env(env))

    def stream(self, max_tokens: int, messages: list[dict] = MESSAGES) -> list[float]:
        return self.timed(max_tokens, messages)[1]

    def timed(self, max_tokens: int, messages: list[dict]) -> tuple[float, list[float]]:
        """(when the child started the request, timestamps of the chunks with text), on this machine's monotonic clock."""
        self.proc.stdin.write(json.dumps({"messages": messages, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        return answer["started"], answer["times"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


SERVE_N_CTX = ServeSettings.model_fields["n_ctx"].default  # the peers get the context `edgekit serve` allocates
SAME = omp_env(ServeSettings.model_fields["omp_spin_count"].default)  # what `edgekit serve` gives its workers
DEFAULT = {}  # libgomp's default spin count (300,000)


def measure_rounds(systems: dict, rounds: int, what: str) -> dict:
    """Alternating rounds over ``systems``; median decode tok/s of each."""
    rates: dict[str, list[float]] = {key: [] for key in systems}
    tokens: dict[str, list[int]] = {key: [] for key in systems}
    for round_index in range(rounds):
        order = list(systems) if round_index % 2 == 0 else list(reversed(systems))
        for key in order:
            times = systems[key]()
            rates[key].append(measure.tokens_per_second(times))
            tokens[key].append(len(times))
        log(f"{what} round {round_index + 1}/{rounds}: " + ", ".join(f"{k} {rates[k][-1]:.1f}" for k in systems))
    return {key: {"tok_s_median": statistics.median(v), "tok_s": v, "tokens": tokens[key]} for key, v in rates.items()}


def bench_decode(args, gguf_bundle: Path, work: Path) -> dict:
    gguf = gguf_bundle / "model.gguf"
    name = gguf_bundle.name
    models = models_dir(work / "decode", gguf_bundle)
    ours = daemon(models, work, args.threads, args.n_ctx, "--preload", name)
    systems: dict[str, object] = {}
    closers = [ours.stop]
    try:
        ours.wait_ready()
        systems["edgekit serve"] = lambda: stream_http(ours.url, name, args.tokens)
        for label, env in (("in-process llama-cpp-python, same spin count", SAME), ("in-process llama-cpp-python, default", DEFAULT)):
            reference = InProcess(gguf, args.threads, args.n_ctx, env)
            closers.append(reference.close)
            systems[label] = (lambda c: lambda: c.stream(args.tokens))(reference)
        try:
            import llama_cpp.server  # noqa: F401
            import sse_starlette  # noqa: F401
            import starlette_context  # noqa: F401
        except ImportError as exc:
            log(f"llama_cpp.server unavailable ({exc}); install its extras: "
                'pip install "sse-starlette>=1.6.1" "starlette-context>=0.3.6,<0.4"')
        else:
            for label, env in (("python -m llama_cpp.server, default", DEFAULT), ("python -m llama_cpp.server, same spin count", SAME)):
                port = free_port()
                command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", name,
                           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(args.n_ctx), "--n_threads",
                           str(args.threads), "--n_threads_batch", str(args.threads), "--n_batch", str(PREFILL_CHUNK),
                           "--n_ubatch", str(PREFILL_CHUNK)]
                server = Server(label.replace(" ", "_").replace(",", ""), command, port, work, env=env)
                closers.append(server.stop)
                server.wait_ready("/v1/models")
                systems[label] = (lambda url: lambda: stream_http(url, name, args.tokens))(server.url)
        for run in systems.values():  # warm-up: load pages, fill prompt caches
            run()
        results = {"idle machine": measure_rounds(systems, args.rounds, "decode")}
        if args.encoder_for_load is not None:
            # The board case the daemon is built for: an embeddings model busy on the same cores meanwhile.
            # Another model's traffic: embedding batches of 16 texts, back to back with 5 ms pauses.
            load = subprocess.Popen(child.command("embed-load", str(args.encoder_for_load), str(args.threads),
                                                  json.dumps(texts_for_embeddings(16))),
                                    stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=child.child_env())
            try:
                time.sleep(3)
                results["with a concurrent embeddings load"] = measure_rounds(systems, args.rounds, "decode under load")
            finally:
                load.terminate()
                load.wait(30)
        return results
    finally:
        for close in reversed(closers):
            close()


# ---- peers: llama-server, edgekit serve, in-process llama-cpp-python and llama_cpp.server, each at its defaults ----

# edgekit serve (defaults) / llama-server -np 4: decode at least (TTFT: at most) these.
PEER_TARGETS = {"decode_1": 0.95, "decode_4": 1.0, "ttft_cold": 1.1, "ttft_cached": 1.1}
# issue 13 item 4, the daemon against itself and the other peers.
SELF_TARGETS = {"decode_4 / decode_1": (">=", 1.7), "decode_4 / llama_cpp.server decode_4": (">=", 1.7),
                "ttft_cached / ttft_cold": ("<=", 0.3), "decode_1 / in-process decode_1": (">=", 0.95)}
PROMPT_TOKENS = 1000  # the long prompt of the time-to-first-token measurements
LLAMA_SERVER, EDGEKIT, IN_PROCESS, LLAMA_CPP_SERVER = ("llama-server", "edgekit serve", "in-process llama-cpp-python",
                                                       "python -m llama_cpp.server")


def stream_timed(url: str, model: str, messages: list[dict], max_tokens: int) -> tuple[float, list[float]]:
    """(request sent, timestamps of the chunks with text) of one streamed chat completion."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    times = []
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    times.append(time.perf_counter())
    return started, times


def long_text(gguf: Path, tokens: int, marker: str) -> str:
    """Story text of about ``tokens`` tokens in a chat turn (the sample model's tokenizer), after ``marker``."""
    from edgekit.runtime.llm import GgufModel

    model = GgufModel(gguf, n_ctx=256, threads=1, prompt_cache_contexts=0)  # tokenizer only: nothing is decoded
    words = (ROOT / "recipes/data/eval-text.txt").read_text().split()
    low, high = 1, len(words)
    while low < high:  # the most words whose rendered system turn stays within ``tokens``
        mid = (low + high + 1) // 2
        text = marker + " ".join(words[:mid])
        if len(model.tokenize(model.render_chat([{"role": "system", "content": text}]), chat=True)) <= tokens:
            low = mid
        else:
            high = mid - 1
    return marker + " ".join(words[:low])


class Peer:
    """One system under test: how to stream one chat (``timed``) and whether it takes concurrent streams."""

    def __init__(self, name: str, timed, concurrent: bool) -> None:
        self.name, self.timed, self.concurrent = name, timed, concurrent


def decode_round(peer: Peer, args) -> dict:
    """One round of the two decode measurements on ``peer``."""
    out = {}
    started, times = peer.timed(MESSAGES, args.tokens)
    out["decode_1"] = measure.tokens_per_second(times)
    out["tokens_1"] = len(times)
    if peer.concurrent:
        streams: list[list[float]] = [[] for _ in range(4)]

        def one(i: int) -> None:
            streams[i] = peer.timed([{"role": "user", "content": f"Story {i}. " + MESSAGES[0]["content"]}], args.tokens)[1]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        out["decode_4"] = measure.aggregate_tokens_per_second(streams)
        out["tokens_4"] = sum(len(s) for s in streams)
    return out


def ttft_round(peers: list[Peer], story: str, system_prompt: str, round_index: int, repeats: int) -> dict[str, dict]:
    """Times to first token of one round, cold and cached, ``repeats`` of each per peer; the peers take turns request
    by request (the order reversed every repeat), so a pair of requests is seconds apart. Per peer, every sample."""
    samples: dict[str, dict[str, list[float]]] = {p.name: {"ttft_cold": [], "ttft_cached": []} for p in peers}
    for repeat in range(repeats):
        for peer in (peers if repeat % 2 == 0 else list(reversed(peers))):
            time.sleep(SETTLE_S)
            # Cold: a marker at the start of the system turn that no earlier request had, so no cache holds any of it.
            cold = [{"role": "system", "content": f"[{peer.name} {round_index}.{repeat} {time.time_ns()}] " + story},
                    {"role": "user", "content": "Summarise the story in one sentence."}]
            samples[peer.name]["ttft_cold"].append(measure.first_token_seconds(*peer.timed(cold, 4)))
            # Cached: the warm-up's long system prompt (other requests came in between), a new question.
            cached = [{"role": "system", "content": system_prompt},
                      {"role": "user", "content": f"Question {round_index}.{repeat}: who wrote the letter?"}]
            samples[peer.name]["ttft_cached"].append(measure.first_token_seconds(*peer.timed(cached, 4)))
    return samples


def bench_peers(args, gguf_bundle: Path, work: Path) -> dict:
    """Single-stream and 4-stream decode, TTFT of a 1,000-token prompt cold and with a repeated system prompt, for
    llama-server, edgekit serve, in-process llama-cpp-python and python -m llama_cpp.server, in alternating rounds."""
    from edgekit.runtime.placement import plan_threads

    gguf = gguf_bundle / "model.gguf"
    name = gguf_bundle.name
    threads = plan_threads().threads  # what `edgekit serve` picks at its defaults on this host
    story = long_text(gguf, PROMPT_TOKENS - 40, "")  # room for the cold marker and the user turn
    system_prompt = long_text(gguf, PROMPT_TOKENS - 20, "You answer questions about this story. ")
    peers: list[Peer] = []
    closers = []
    health: dict = {}
    try:
        binary = llama_server_binary()
        port = free_port()
        # Four slots sharing one unified KV pool of n_ctx cells: the memory `edgekit serve` gives its 4 slots.
        env = SAME if args.same_spin else DEFAULT
        server = Server("llama-server", [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t",
                                         str(threads), "-np", "4", "-c", str(args.n_ctx), "-kvu", "-a", name], port, work, env)
        closers.append(server.stop)
        server.wait_ready()
        peers.append(Peer(LLAMA_SERVER, lambda m, n, url=server.url: stream_timed(url, name, m, n), True))
        ours = daemon_at_defaults(models_dir(work / "decode", gguf_bundle), work, args.n_ctx)
        closers.append(ours.stop)
        ours.wait_ready()
        health = httpx.get(ours.url + "/health").json()
        peers.append(Peer(EDGEKIT, lambda m, n, url=ours.url: stream_timed(url, name, m, n), True))
        reference = InProcess(gguf, threads, args.n_ctx, env)
        closers.append(reference.close)
        peers.append(Peer(IN_PROCESS, lambda m, n: reference.timed(n, m), False))
        if llama_cpp_server_available():
            port = free_port()
            command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", name, "--host",
                       "127.0.0.1", "--port", str(port), "--n_ctx", str(args.n_ctx), "--n_threads", str(threads),
                       "--n_threads_batch", str(threads), "--interrupt_requests", "False"]  # else a new request cuts the running one off
            other = Server("llama_cpp.server", command, port, work, env)
            closers.append(other.stop)
            other.wait_ready("/v1/models")
            peers.append(Peer(LLAMA_CPP_SERVER, lambda m, n, url=other.url: stream_timed(url, name, m, n), True))
        for peer in peers:  # warm-up: load pages; the long system prompt enters each cache once
            peer.timed(MESSAGES, 8)
            peer.timed([{"role": "system", "content": system_prompt}, {"role": "user", "content": "Who is Mira?"}], 4)
        rounds: dict[str, list[dict]] = {peer.name: [] for peer in peers}
        ttft_samples: dict[str, list[dict]] = {peer.name: [] for peer in peers}
        decode_samples: dict[str, list[list[dict]]] = {peer.name: [] for peer in peers}
        for round_index in range(args.rounds):
            order = peers if round_index % 2 == 0 else list(reversed(peers))
            repeats: dict[str, list[dict]] = {peer.name: [] for peer in peers}
            for repeat in range(args.decode_repeats):  # the order rotates every repeat: no system runs twice in a row
                shift = repeat % len(order)
                for peer in order[shift:] + order[:shift]:
                    time.sleep(SETTLE_S)
                    repeats[peer.name].append(decode_round(peer, args))
            for system, runs in repeats.items():
                decode_samples[system].append(runs)
                rounds[system].append({key: statistics.median(run[key] for run in runs) for key in runs[0]})
            for system, samples in ttft_round(order, story, system_prompt, round_index, args.ttft_repeats).items():
                ttft_samples[system].append(samples)
                rounds[system][-1].update({key: statistics.median(values) for key, values in samples.items()})
            log(f"peers round {round_index + 1}/{args.rounds}: " + "; ".join(
                f"{p.name}: {rounds[p.name][-1]['decode_1']:.1f} tok/s" for p in peers))
    finally:
        for close in reversed(closers):
            close()
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()}
    result = {"threads": threads, "omp_spin": f"{SAME} for every system" if args.same_spin else "as shipped",
              "daemon_threads": health.get("threads"), "n_ctx": args.n_ctx, "tokens": args.tokens,
              "prompt_tokens": PROMPT_TOKENS, "load_avg_end": os.getloadavg(), "systems": list(rounds), "median": medians,
              "rounds": rounds, "decode_repeats": args.decode_repeats, "decode_samples": decode_samples,
              "ttft_repeats": args.ttft_repeats, "ttft_samples": ttft_samples}
    result["ratios"] = peer_ratios(result)
    return result


def llama_cpp_server_available() -> bool:
    try:
        import llama_cpp.server  # noqa: F401
        import sse_starlette  # noqa: F401
        import starlette_context  # noqa: F401
    except ImportError as exc:
        log(f"python -m llama_cpp.server unavailable ({exc}); install its extras: "
            'pip install "sse-starlette>=1.6.1" "starlette-context>=0.3.6,<0.4"')
        return False
    return True


def daemon_at_defaults(models: Path, log_dir: Path, n_ctx: int, *extra: str) -> ServerProcess:
    """`edgekit serve` with nothing set that changes speed but ``extra`` (threads, slots, spin count at their defaults)."""
    port = free_port()
    context = ["--n-ctx", str(n_ctx)] if n_ctx != SERVE_N_CTX else []
    command = serve_command(models, port, *context, "--preload", next(models.iterdir()).name, *extra)
    return Server(f"edgekit{'-'.join(('', *extra))}", command, port, log_dir)


def peer_ratios(peers: dict) -> dict:
    """edgekit serve / llama-server per measurement (TTFT: lower is better), and issue 13's ratios."""
    median = peers["median"]
    ours = median[EDGEKIT]

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    out: dict = {"vs llama-server": {key: ratio(ours.get(key), median.get(LLAMA_SERVER, {}).get(key)) for key in PEER_TARGETS}}
    # Each round measures every system back to back, so a round's own ratio cancels what the machine did between
    # rounds (a shared host's speed drifts by 10 % and more); the verdict is on the median of those.
    pairs = list(zip(peers["rounds"][EDGEKIT], peers["rounds"].get(LLAMA_SERVER, [])))
    out["vs llama-server, paired"] = {
        key: statistics.median(a[key] / b[key] for a, b in pairs) if pairs and all(b.get(key) for _, b in pairs) else None
        for key in PEER_TARGETS}
    out["edgekit serve"] = {
        "decode_4 / decode_1": ratio(ours.get("decode_4"), ours.get("decode_1")),
        "decode_4 / llama_cpp.server decode_4": ratio(ours.get("decode_4"), median.get(LLAMA_CPP_SERVER, {}).get("decode_4")),
        "ttft_cached / ttft_cold": ratio(ours.get("ttft_cached"), ours.get("ttft_cold")),
        "decode_1 / in-process decode_1": ratio(ours.get("decode_1"), median.get(IN_PROCESS, {}).get("decode_1")),
    }
    return out


PEER_ROWS = (("single-stream decode, tok/s", "decode_1", "{:.1f}"), ("4 streams, aggregate decode, tok/s", "decode_4", "{:.1f}"),
             ("TTFT, 1,000-token prompt, cold, s", "ttft_cold", "{:.3f}"),
             ("TTFT, repeated 1,000-token system prompt, s", "ttft_cached", "{:.3f}"))


def verdict_of(value: float | None, op: str, target: float) -> str:
    if value is None:
        return "-"
    return "pass" if (value >= target if op == ">=" else value <= target) else "MISS"


def print_peers(peers: dict) -> None:
    systems, median, ratios = peers["systems"], peers["median"], peers["ratios"]
    rounds = len(next(iter(peers["rounds"].values())))
    threads = (peers.get("daemon_threads") or {}).get("threads", "?")
    print(f"SmolLM2-135M Q4_K_M, streamed chat, {peers['tokens']} tokens, temperature 0. llama-server -t {peers['threads']} -np 4 "
          f"-c {peers['n_ctx']} -kvu; edgekit serve at its defaults ({threads} threads, 4 slots, one KV pool); in-process: "
          f"llama-cpp-python create_chat_completion (one stream); python -m llama_cpp.server (requests one at a time). "
          f"OpenMP spin count: {peers['omp_spin']}. Medians of {rounds} alternating rounds ({peers.get('decode_repeats', 1)} decode "
          f"runs and {peers['ttft_repeats']} first-token requests of each kind per system a round); load average {peers['load_avg_end'][0]:.1f} at the end.")
    width = max(len(r[0]) for r in PEER_ROWS)
    cols = [max(len(s), 8) for s in systems]
    print(f"{'':<{width}}  " + "  ".join(f"{s:>{c}}" for s, c in zip(systems, cols))
          + "  serve/llama-server  per round (median)  target")
    for label, key, fmt in PEER_ROWS:
        cells = [fmt.format(median[s][key]) if key in median[s] else "-" for s in systems]
        value, paired = ratios["vs llama-server"][key], ratios["vs llama-server, paired"][key]
        op = ">=" if key.startswith("decode") else "<="
        print(f"{label:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, cols))
              + f"  {('-' if value is None else f'{value:.2f}'):>18}  {('-' if paired is None else f'{paired:.2f}'):>19}"
              f"  {op} {PEER_TARGETS[key]} {verdict_of(paired, op, PEER_TARGETS[key])}")
    print()
    for key, (op, target) in SELF_TARGETS.items():
        value = ratios["edgekit serve"][key]
        print(f"edgekit serve: {key:<40} {('-' if value is None else f'{value:.2f}'):>6}  {op} {target} "
              f"{verdict_of(value, op, target)}")


# ---- embeddings ----------------------------------------------------------------------------------


def texts_for_embeddings(count: int) -> list[str]:
    lines = [line.strip() for line in (ROOT / "recipes/data/validation-sentences.txt").read_text().splitlines() if line.strip()]
    return [lines[i % len(lines)] for i in range(count)]


def bench_embeddings(args, encoder_bundle: Path, work: Path) -> dict:
    texts = texts_for_embeddings(args.embed_requests)
    model = measure.load_encoder(encoder_bundle, args.threads)
    model.embed(texts[:16])

    def in_process() -> float:
        started = time.perf_counter()
        for start in range(0, len(texts), 16):
            model.embed(texts[start : start + 16])
        return len(texts) / (time.perf_counter() - started)

    models = models_dir(work / "embed", encoder_bundle)
    ours = daemon(models, work, args.threads, args.n_ctx, "--preload", encoder_bundle.name, "--batch-max", "16")

    async def through_daemon() -> float:
        queue = list(texts)
        async with httpx.AsyncClient(base_url=ours.url, timeout=120,
                                     limits=httpx.Limits(max_connections=16, max_keepalive_connections=16)) as client:
            async def worker() -> None:
                while queue:
                    text = queue.pop()
                    response = await client.post("/v1/embeddings", json={"model": encoder_bundle.name, "input": text})
                    response.raise_for_status()

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(16)))
            return len(texts) / (time.perf_counter() - started)

    try:
        ours.wait_ready()
        asyncio.run(through_daemon())  # warm-up
        ours_rates, ref_rates = [], []
        for round_index in range(args.rounds):
            for key in (("ref", "ours") if round_index % 2 == 0 else ("ours", "ref")):
                (ref_rates if key == "ref" else ours_rates).append(in_process() if key == "ref" else asyncio.run(through_daemon()))
            log(f"embeddings round {round_index + 1}/{args.rounds}: daemon {ours_rates[-1]:.0f} req/s, in-process {ref_rates[-1]:.0f} texts/s")
        return {"edgekit serve (16 clients, 1 text each)": {"req_s_median": statistics.median(ours_rates), "req_s": ours_rates},
                "in-process onnxruntime (batches of 16)": {"req_s_median": statistics.median(ref_rates), "req_s": ref_rates}}
    finally:
        ours.stop()


# ---- footprint, start-up, cancellation ---------------------------------------------------------


def bench_idle_and_startup(args, gguf_bundle: Path, work: Path) -> dict:
    empty = work / "empty-models"
    empty.mkdir(exist_ok=True)
    idle = daemon(empty, work, args.threads, args.n_ctx, name="edgekit-idle")
    try:
        idle.wait_ready()
        time.sleep(2.0)
        idle_rss = idle.rss(children=False)
    finally:
        idle.stop()
    models = models_dir(work / "decode", gguf_bundle)
    starts = []
    for _ in range(args.rounds):
        server = daemon(models, work, args.threads, args.n_ctx, "--preload", gguf_bundle.name, name="edgekit-start")
        try:
            starts.append(server.wait_ready())
        finally:
            server.stop()
    return {"idle_rss_mb": idle_rss / 1e6, "time_to_health_200_s": statistics.median(starts), "time_to_health_200_all_s": starts}


def bench_cancel(args, gguf_bundle: Path, work: Path) -> dict:
    models = models_dir(work / "decode", gguf_bundle)
    server = daemon(models, work, args.threads, args.n_ctx, "--preload", gguf_bundle.name, name="edgekit-cancel")

    def cancelled() -> float:
        for line in httpx.get(server.url + "/metrics").text.splitlines():
            if line.startswith("edgekit_generations_total{") and 'finish_reason="cancelled"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    delays = []
    try:
        server.wait_ready()
        for _ in range(args.rounds):
            before = cancelled()
            received = 0
            with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                              json={"model": gguf_bundle.name, "messages": MESSAGES, "max_tokens": 500, "stream": True}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        received += 1
                        if received == 5:
                            break
            closed = time.perf_counter()
            while cancelled() < before + 1 and time.perf_counter() - closed < 30:
                time.sleep(0.01)
            delays.append(time.perf_counter() - closed)
    finally:
        server.stop()
    return {"disconnect_to_stopped_s_median": statistics.median(delays), "all_s": delays}


# ---- soak --------------------------------------------------------------------------------------------


def bench_soak(args, gguf_bundle: Path, encoder_bundle: Path, classifier: Path | None, work: Path) -> dict:
    bundles = [gguf_bundle, encoder_bundle] + ([classifier] if classifier else [])
    models = models_dir(work / "soak", *bundles)
    preload = [arg for b in bundles for arg in ("--preload", b.name)]
    server = daemon(models, work, args.threads, args.n_ctx, *preload, name="edgekit-soak")
    requests = [
        ("/v1/chat/completions", {"model": gguf_bundle.name, "messages": MESSAGES, "max_tokens": 16}),
        ("/v1/embeddings", {"model": encoder_bundle.name, "input": texts_for_embeddings(4)}),
        ("/v1/embeddings", {"model": encoder_bundle.name, "input": "one sentence to embed"}),
    ]
    if classifier:
        requests.append(("/v1/classify", {"model": classifier.name, "input": ["great", "awful"]}))
    errors: list[str] = []
    samples: list[tuple[float, float, str]] = []  # (finished at, seconds, path)
    rss: list[tuple[float, int]] = []
    try:
        server.wait_ready()
        started = time.perf_counter()
        stop_at = started + args.soak_seconds

        def client(index: int) -> None:
            with httpx.Client(base_url=server.url, timeout=300) as http:
                turn = index
                while time.perf_counter() < stop_at:
                    path, body = requests[turn % len(requests)]
                    turn += 1
                    t0 = time.perf_counter()
                    try:
                        response = http.post(path, json=body)
                        if response.status_code != 200:
                            errors.append(f"{path} {response.status_code} {response.text[:120]}")
                    except httpx.HTTPError as exc:
                        errors.append(f"{path} {type(exc).__name__}")
                    samples.append((time.perf_counter() - started, time.perf_counter() - t0, path))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            rss.append((time.perf_counter() - started, server.rss()))
            time.sleep(5)
        for thread in threads:
            thread.join()
    finally:
        server.stop()
    warm = [value for at, value in rss if at >= min(30.0, args.soak_seconds / 4)]
    windows = []
    width = max(args.soak_seconds / 6, 10)
    for start in range(0, int(args.soak_seconds), int(width)):
        values = sorted(s for at, s, _ in samples if start <= at < start + width)
        if values:
            windows.append(round(values[int(0.95 * (len(values) - 1))], 3))
    return {"seconds": args.soak_seconds, "clients": 8, "requests": len(samples), "errors": len(errors),
            "error_examples": errors[:5], "rss_start_mb": warm[0] / 1e6 if warm else None,
            "rss_end_mb": warm[-1] / 1e6 if warm else None,
            "rss_growth": (warm[-1] - warm[0]) / warm[0] if len(warm) > 1 else None,
            "p95_s_per_window": windows, "mix": sorted({p for p, _ in requests})}


# ---- main -------------------------------------------------------------------------------------


def find_bundle(explicit: Path | None, name: str) -> Path:
    path = explicit or kit_paths().bundles / name
    if not (path / "manifest.json").is_file():
        raise SystemExit(f"no bundle at {path}: export it (`edgekit export recipes/...`) or pass its path")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help="GGUF bundle (default: $EDGEKIT_HOME/bundles/smollm2-135m-instruct-q4-k-m)")
    parser.add_argument("--encoder", type=Path, help="embeddings bundle (default: $EDGEKIT_HOME/bundles/all-minilm-l6-v2-int8-dynamic)")
    parser.add_argument("--classifier", type=Path, help="optional classification bundle for the soak mix")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-ctx", type=int, default=SERVE_N_CTX, help="context of every system (default: edgekit serve's)")
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of each decode run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ttft-repeats", type=int, default=3,
                        help="cold and cached first-token requests per system in each round (their median is the round's)")
    parser.add_argument("--decode-repeats", type=int, default=3,
                        help="single- and 4-stream decode runs per system in each round, the systems' order rotating "
                             "every run (their median is the round's): one pair of runs seconds apart swings by 10 %% "
                             "on a shared host")
    parser.add_argument("--embed-requests", type=int, default=512)
    parser.add_argument("--soak-seconds", type=float, default=180.0)
    parser.add_argument("--load-rounds", action="store_true",
                        help="also measure decode while a separate onnxruntime process embeds back to back (a noisy "
                             "neighbour on the same cores)")
    parser.add_argument("--skip", action="append", default=[], choices=["peers", "embeddings", "idle", "cancel"])
    parser.add_argument("--same-spin", action="store_true",
                        help="run the peers with the daemon's OpenMP settings (OMP_WAIT_POLICY=ACTIVE with its "
                             "--omp-spin-count) instead of libgomp's defaults (which spin as long, without the policy)")
    parser.add_argument("--with", dest="extra", action="append", default=[], choices=["decode", "soak"],
                        help="also run: decode (the daemon vs in-process and llama_cpp.server with both OpenMP spin counts), "
                             "soak (8 mixed clients for --soak-seconds)")
    parser.add_argument("--build-llama-server", action="store_true",
                        help="only build (or find) llama-server and print its path (run it under the machine's heavy-job lock)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "serve.json")
    args = parser.parse_args()
    if min(args.ttft_repeats, args.decode_repeats, args.rounds) < 1:
        parser.error("--rounds, --decode-repeats and --ttft-repeats take at least 1")
    if args.build_llama_server:
        print(llama_server_binary())
        return 0
    gguf = find_bundle(args.gguf, "smollm2-135m-instruct-q4-k-m")
    encoder = find_bundle(args.encoder, "all-minilm-l6-v2-int8-dynamic")
    args.encoder_for_load = encoder if args.load_rounds else None
    results: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_avg_start": os.getloadavg()},
                     "settings": {"threads": args.threads, "n_ctx": args.n_ctx, "tokens": args.tokens, "rounds": args.rounds,
                                  "gguf": str(gguf), "encoder": str(encoder)}, "targets": TARGETS}
    kit_paths().home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-serve-", dir=kit_paths().home) as tmp:
        work = Path(tmp)
        if "peers" not in args.skip:
            results["peers"] = bench_peers(args, gguf, work)
        if "idle" not in args.skip:
            results["footprint"] = bench_idle_and_startup(args, gguf, work)
        if "decode" in args.extra:
            results["decode"] = bench_decode(args, gguf, work)
        if "embeddings" not in args.skip:
            results["embeddings"] = bench_embeddings(args, encoder, work)
        if "cancel" not in args.skip:
            results["cancel"] = bench_cancel(args, gguf, work)
        if "soak" in args.extra:
            results["soak"] = bench_soak(args, gguf, encoder, args.classifier, work)
    results["machine"]["load_avg_end"] = os.getloadavg()
    results["ratios"] = ratios(results)
    if "peers" in results:
        print_peers(results["peers"])
        print()
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


def ratios(results: dict) -> dict:
    """Targets: the daemon vs in-process with the same settings (OpenMP spin count included), and vs llama_cpp.server as shipped."""
    out = {}
    for scenario, suffix in (("idle machine", ""), ("with a concurrent embeddings load", "_under_load")):
        decode = {k: v["tok_s_median"] for k, v in results.get("decode", {}).get(scenario, {}).items()}
        ours = decode.get("edgekit serve")
        if not ours:
            continue
        for key, label in (("decode_vs_inprocess", "in-process llama-cpp-python, same spin count"),
                           ("decode_vs_inprocess_default_spin", "in-process llama-cpp-python, default"),
                           ("decode_vs_llama_cpp_server", "python -m llama_cpp.server, default"),
                           ("decode_vs_llama_cpp_server_same_spin", "python -m llama_cpp.server, same spin count")):
            out[key + suffix] = ours / decode[label] if decode.get(label) else None
    embed = results.get("embeddings", {})
    if embed:
        values = [v["req_s_median"] for v in embed.values()]
        out["embeddings_vs_inprocess"] = values[0] / values[1]
    return out


def print_table(results: dict) -> None:
    rows = []
    r = results.get("ratios", {})

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("pass" if ok else "MISS")

    labels = {"decode_vs_inprocess": "daemon / in-process (same spin count)",
              "decode_vs_inprocess_default_spin": "daemon / in-process (default spin)",
              "decode_vs_llama_cpp_server": "daemon / llama_cpp.server (as shipped)",
              "decode_vs_llama_cpp_server_same_spin": "daemon / llama_cpp.server (same spin)"}
    for suffix, scenario in (("", "idle"), ("_under_load", "embeddings load")):
        for key, label in labels.items():
            value = r.get(key + suffix)
            if value is None:
                continue
            target = TARGETS.get(key)
            rows.append((f"decode tok/s, {scenario}: {label}", f"{value:.2f}", f">= {target}" if target else "",
                         verdict(value >= target) if target else ""))
    value = r.get("embeddings_vs_inprocess")
    rows.append(("embeddings req/s (16 clients) / in-process batched", f"{value:.2f}" if value else "-",
                 f">= {TARGETS['embeddings_vs_inprocess']}", verdict(value >= TARGETS["embeddings_vs_inprocess"] if value else None)))
    for scenario, systems in results.get("decode", {}).items():
        for key, values in systems.items():
            rows.append((f"  {scenario}: {key}", f"{values['tok_s_median']:.1f} tok/s", "", ""))
    for key, values in results.get("embeddings", {}).items():
        rows.append((f"  {key}", f"{values['req_s_median']:.0f} req/s", "", ""))
    footprint = results.get("footprint")
    if footprint:
        rows.append(("daemon idle RSS, no model", f"{footprint['idle_rss_mb']:.0f} MB", "<= 120 MB",
                     verdict(footprint["idle_rss_mb"] <= TARGETS["idle_rss_mb"])))
        rows.append(("start -> /health 200, GGUF preloaded", f"{footprint['time_to_health_200_s']:.2f} s", "", ""))
    cancel = results.get("cancel")
    if cancel:
        rows.append(("disconnect -> generation stopped", f"{cancel['disconnect_to_stopped_s_median']:.2f} s", "<= 1 s",
                     verdict(cancel["disconnect_to_stopped_s_median"] <= TARGETS["cancel_seconds"])))
    soak = results.get("soak")
    if soak:
        rows.append((f"soak {soak['seconds']:.0f} s, 8 clients: errors", str(soak["errors"]), "0", verdict(soak["errors"] == 0)))
        growth = soak["rss_growth"]
        rows.append(("soak RSS growth (daemon + workers)", f"{growth:+.1%}" if growth is not None else "-", "< 5 %",
                     verdict(growth < TARGETS["soak_rss_growth"] if growth is not None else None)))
        rows.append(("soak p95 latency per window (s)", " ".join(f"{v:.2f}" for v in soak["p95_s_per_window"]), "stable", ""))
    width = max(len(row[0]) for row in rows)
    print(f"{'measure':<{width}}  {'value':>16}  {'target':>10}  verdict")
    for label, value, target, ok in rows:
        print(f"{label:<{width}}  {value:>16}  {target:>10}  {ok}")


if __name__ == "__main__":
    sys.exit(main())
