"""Measure one bundle inside a fresh process; prints one JSON object on stdout.

Run as ``python -m edgekit.bench.child BUNDLE CONFIG_JSON``. A fresh process per bundle makes load
time and peak RSS mean what they say: nothing else was loaded before.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from edgekit.bundle import read_manifest

DEFAULT_PROMPT = (
    "The support team received a message from a customer whose order arrived damaged. "
    "Write a short, friendly reply that apologises and explains how the replacement will be sent."
)
SHORT_TEXT = "Great service."


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure_onnx(bundle: Path, manifest, config: dict) -> dict:
    from edgekit.runtime.encoder import EncoderModel

    start = time.perf_counter()
    encoder = EncoderModel(bundle, manifest.runtime, threads=config["threads"])
    load_seconds = time.perf_counter() - start
    texts = [line for line in config["texts"] if line.strip()] or [SHORT_TEXT]
    one = [SHORT_TEXT]
    batch = (texts * 32)[:32]
    run = encoder.embed if manifest.task == "feature-extraction" else encoder.classify
    for _ in range(config["warmup"]):
        run(one)
        run(batch)
    runs = []
    for _ in range(config["runs"]):
        single = sorted(timed(lambda: run(one)) for _ in range(config["iters"]))
        many = sorted(timed(lambda: run(batch)) for _ in range(max(3, config["iters"] // 8)))
        runs.append({
            "batch1_p50_ms": single[len(single) // 2] * 1000,
            "batch1_p95_ms": single[int(len(single) * 0.95) - 1] * 1000,
            "batch32_p50_ms": many[len(many) // 2] * 1000,
            "batch32_p95_ms": many[int(len(many) * 0.95) - 1] * 1000,
            "batch32_texts_per_s": 32 / many[len(many) // 2],
        })
    return {"load_seconds": load_seconds, "runs": runs, "seq_len": encoder.count_tokens(one)[0]}


def measure_gguf(bundle: Path, manifest, config: dict) -> dict:
    from llama_cpp import Llama

    model_path = bundle / manifest.file(".gguf").path
    start = time.perf_counter()
    llm = Llama(str(model_path), n_ctx=config["ctx"], n_threads=config["threads"], n_batch=512, verbose=False)
    load_seconds = time.perf_counter() - start
    prompt = llm.tokenize(config["prompt"].encode("utf-8"), add_bos=True, special=True)[: config["ctx"] // 2]
    n_decode = min(config["decode_tokens"], config["ctx"] - len(prompt) - 1)

    def one_run() -> dict:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        token = llm.sample(temp=0.0)
        first = time.perf_counter()
        decoded = 0
        while decoded < n_decode:
            llm.eval([token])
            token = llm.sample(temp=0.0)
            decoded += 1
        end = time.perf_counter()
        return {
            "prompt_tokens": len(prompt),
            "decode_tokens": decoded,
            "ttft_ms": (first - start) * 1000,
            "prompt_tok_s": len(prompt) / (first - start),
            "decode_tok_s": decoded / (end - first),
        }

    for _ in range(config["warmup"]):
        one_run()
    return {"load_seconds": load_seconds, "runs": [one_run() for _ in range(config["runs"])]}


MEASURES = {"onnx": measure_onnx, "gguf": measure_gguf}


def main() -> None:
    bundle, config = Path(sys.argv[1]), json.loads(sys.argv[2])
    manifest = read_manifest(bundle)  # the parent ran verify_for_runtime before starting this process
    result = MEASURES[manifest.format](bundle, manifest, config)
    result["peak_rss_bytes"] = peak_rss_bytes()
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
