"""Benchmark of the encoder export path on all-MiniLM-L6-v2, side by side in one run.

Exports the sample recipe's targets (int8-dynamic: block-wise feed-forward MatMuls with per-tensor
attention projections; int8-static) and three more into a scratch directory (fp32, plain per-tensor
dynamic int8, all-block-wise dynamic int8 as the recipe had it before), then measures, interleaving
the variants round by round so machine noise hits them all alike:
- batch-1 latency on a short and a medium sentence, and the latency and throughput of one batch of
  32 validation sentences of mixed length (padded to the longest): PyTorch fp32 (transformers) vs
  each ONNX bundle, median (p50) and p95 per call;
- bundle size vs the fp32 bundle;
- cosine vs PyTorch fp32 on the recipe's validation sentences (mean and worst), from the manifests.

Prints a table and writes bench-results/encoder.json. Usage:
    python scripts/bench_encoder.py [--rounds 15] [--iters 40] [--batch-iters 4] [--out bench-results/encoder.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "all-minilm-l6-v2.yaml"
SHORT = "Great service."
MEDIUM = "The replacement charger arrived two days late, but support refunded the shipping cost without any fuss."
BATCH = 32

# name -> target definition appended to the sample recipe for this benchmark
VARIANTS = {
    "onnx-fp32": {"format": "onnx", "name": "fp32", "optimization_level": 2},
    "int8-per-tensor": {"format": "onnx", "name": "int8-per-tensor", "optimization_level": 2,
                        "quantization": {"mode": "dynamic", "block_size": None, "per_channel": True}},
    # attention projections per tensor, the rest block-wise: faster at batch, but outputs depend on batch-mates
    "int8-hybrid": {"format": "onnx", "name": "int8-hybrid", "optimization_level": 2,
                    "quantization": {"mode": "dynamic", "block_size": 128,
                                     "per_tensor_matmuls": ["*/attention/*/MatMul"]}},
}


def export_variants(scratch: Path) -> dict[str, Path]:
    from edgekit.export import export
    from edgekit.schema.recipe import load_recipe

    data = yaml.safe_load(RECIPE.read_text())
    data["targets"] = [*data["targets"], *VARIANTS.values()]
    data["validation"]["gates"] = {}  # measure everything; the recipe's gates are checked by `edgekit export`
    data["validation"]["samples_file"] = str(ROOT / "recipes" / data["validation"]["samples_file"])
    for target in data["targets"]:
        calibration = (target.get("quantization") or {}).get("calibration")
        if calibration and calibration.get("samples_file"):
            calibration["samples_file"] = str(ROOT / "recipes" / calibration["samples_file"])
    recipe_path = scratch / "bench-recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data, sort_keys=False))
    published = export(load_recipe(recipe_path), scratch / "bundles", progress=lambda m: print(f"  {m}", file=sys.stderr))
    return {manifest.name.removeprefix(data["name"] + "-"): where for manifest, where in published}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--batch-iters", type=int, default=4, help="batch-32 calls per variant and round")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "encoder.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    import torch
    from transformers import AutoModel

    from edgekit.bench import measure
    from edgekit.bundle import verify_bundle
    from edgekit.export.sources import store_dir
    from edgekit.runtime.encoder import EncoderModel

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        print("exporting variants (this takes a few minutes)...", file=sys.stderr)
        bundles = export_variants(Path(tmp))
        manifests = {name: verify_bundle(path) for name, path in bundles.items()}
        encoders = {name: EncoderModel(path, manifests[name].runtime, threads=args.threads) for name, path in bundles.items()}
        reference = AutoModel.from_pretrained(store_dir("sentence-transformers/all-MiniLM-L6-v2"), dtype=torch.float32).eval()

        validation = (ROOT / "recipes" / "data" / "validation-sentences.txt").read_text(encoding="utf-8").splitlines()
        batch = [line for line in validation if line.strip()][:BATCH]
        batch_tokens = int(next(iter(encoders.values())).feeds(batch)[0]["input_ids"].shape[1])
        results = {}
        for label, texts, iters in (("short", [SHORT], args.iters), ("medium", [MEDIUM], args.iters),
                                    ("batch32", batch, args.batch_iters)):
            any_encoder = next(iter(encoders.values()))
            feeds, _ = any_encoder.feeds(texts)
            torch_feeds = {k: torch.from_numpy(v) for k, v in feeds.items()}

            def run_torch():
                with torch.inference_mode():
                    reference(**torch_feeds)

            runners = {"pytorch-fp32": run_torch}
            for name, encoder in encoders.items():  # the graph as the runtime runs it, on pre-tokenized input like PyTorch's
                runners[name] = lambda e=encoder, batch=encoder.tokenize(texts): e.run(batch)
            samples = measure.interleaved_rounds(runners, args.rounds, iters)
            results[label] = {name: statistics.median(values) * 1000 for name, values in samples.items()}
            results[label + "_p95"] = {name: float(np.percentile(values, 95)) * 1000 for name, values in samples.items()}

    fp32_bytes = manifests["fp32"].total_bytes
    rows = []
    for name in ["pytorch-fp32", *manifests]:
        manifest = manifests.get(name)
        rows.append({
            "variant": name,
            "quantization": manifest.quantization if manifest else "fp32 (PyTorch)",
            "bytes": manifest.total_bytes if manifest else None,
            "size_vs_fp32": manifest.total_bytes / fp32_bytes if manifest else None,
            "cosine_mean": manifest.metrics["cosine_mean"] if manifest else 1.0,
            "cosine_min": manifest.metrics["cosine_min"] if manifest else 1.0,
            "short_ms": results["short"][name],
            "medium_ms": results["medium"][name],
            "speedup_vs_pytorch_short": results["short"]["pytorch-fp32"] / results["short"][name],
            "speedup_vs_ort_fp32_short": results["short"]["fp32"] / results["short"][name],
            "speedup_vs_pytorch_medium": results["medium"]["pytorch-fp32"] / results["medium"][name],
            "short_p95_ms": results["short_p95"][name],
            "batch32_ms": results["batch32"][name],
            "batch32_p95_ms": results["batch32_p95"][name],
            "batch32_texts_per_second": BATCH / (results["batch32"][name] / 1000),
            "speedup_vs_pytorch_batch32": results["batch32"]["pytorch-fp32"] / results["batch32"][name],
        })

    header = (f"{'variant':18} {'quantization':26} {'MB':>6} {'size':>6} {'cos mean':>9} {'cos min':>8} "
              f"{'b1 p50 ms':>9} {'b1 p95':>7} {'x torch':>8} {'x ortfp32':>9} {'medium ms':>10} {'x torch':>8} "
              f"{'b32 p50 ms':>10} {'b32 p95':>8} {'texts/s':>8} {'x torch':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        mb = f"{r['bytes'] / 1e6:6.1f}" if r["bytes"] else "     -"
        size = f"{r['size_vs_fp32']:6.3f}" if r["size_vs_fp32"] else "     -"
        print(f"{r['variant']:18} {r['quantization']:26} {mb} {size} {r['cosine_mean']:9.5f} {r['cosine_min']:8.5f} "
              f"{r['short_ms']:9.2f} {r['short_p95_ms']:7.2f} {r['speedup_vs_pytorch_short']:8.2f} {r['speedup_vs_ort_fp32_short']:9.2f} "
              f"{r['medium_ms']:10.2f} {r['speedup_vs_pytorch_medium']:8.2f} "
              f"{r['batch32_ms']:10.1f} {r['batch32_p95_ms']:8.1f} {r['batch32_texts_per_second']:8.0f} {r['speedup_vs_pytorch_batch32']:8.2f}")
    gate = yaml.safe_load(RECIPE.read_text())["validation"]["gates"]
    fp32_row = next(r for r in rows if r["variant"] == "fp32")
    for r in rows:
        if r["variant"] in ("fp32", "pytorch-fp32"):
            continue
        passes = r["cosine_mean"] >= gate["min_cosine_mean"] and r["cosine_min"] >= gate["min_cosine_each"]
        r["passes_gate"] = passes
        r["at_least_ort_fp32_b1_and_b32"] = r["short_ms"] <= fp32_row["short_ms"] and r["batch32_ms"] <= fp32_row["batch32_ms"]
        print(f"{r['variant']:18} gate {'pass' if passes else 'FAIL'}; vs ORT fp32: b1 {fp32_row['short_ms'] / r['short_ms']:.2f}x, "
              f"b32 {fp32_row['batch32_ms'] / r['batch32_ms']:.2f}x")
    print(f"\nb1 = batch 1 ('{SHORT}'); medium = batch 1 of a {len(MEDIUM.split())}-word sentence; "
          f"b32 = {BATCH} validation sentences padded to {batch_tokens} tokens; {args.threads} threads")
    report = {
        "command": "python scripts/bench_encoder.py " + " ".join(sys.argv[1:]),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
                 "load_average_at_end": os.getloadavg()},
        "sentences": {"short": SHORT, "medium": MEDIUM, "batch32": batch, "batch32_padded_tokens": batch_tokens},
        "validation_sentences": int(manifests["fp32"].metrics["samples"]),
        "rounds": args.rounds, "iters_per_round": args.iters, "batch_iters_per_round": args.batch_iters,
        "rows": rows,
        "p95_ms": {k: v for k, v in results.items() if k.endswith("_p95")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
