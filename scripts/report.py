"""The comparison report: every benchmark side by side on this machine, as Markdown with PNG plots.

Runs, one after the other on the same machine and inputs:
  1. scripts/bench_encoder.py  — PyTorch fp32 vs ORT fp32 vs edgekit int8 (dynamic block-wise, static, per-tensor)
  2. scripts/bench_gguf.py     — every quant type of SmolLM2-135M: size, PPL, KLD, top-1, prompt and decode tok/s
  3. scripts/bench_serve.py    — the daemon vs in-process llama-cpp-python vs `python -m llama_cpp.server`
  4. scripts/bench_fit.py      — fit truth: predicted vs measured RSS and tok/s
  5. edgekit profile-host      — this host's memory bandwidth, for the decode roofline
and writes docs/report.md and docs/report/*.png. Each section shows the command that produced it
and the table that command printed; the JSON behind each is in bench-results/.

    python scripts/report.py [--skip serve] [--quick] [--reuse]

Each benchmark's printed table is kept next to its JSON (bench-results/NAME.txt, first line the
command); --reuse takes a section from there instead of running it again.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results"
DOCS = ROOT / "docs"
FIGURES = DOCS / "report"

# name -> (title, command, extra args for --quick)
SECTIONS: dict[str, tuple[str, list[str], list[str]]] = {
    "encoder": ("Encoder: all-MiniLM-L6-v2, PyTorch fp32 vs ONNX fp32 vs int8",
                [sys.executable, "scripts/bench_encoder.py"], ["--rounds", "5", "--iters", "20"]),
    "gguf": ("Generator: SmolLM2-135M-Instruct, every quant type",
             [sys.executable, "scripts/bench_gguf.py"], ["--conversion-runs", "1", "--max-eval-tokens", "1024"]),
    "serve": ("Serving: the daemon vs in-process vs llama_cpp.server",
              [sys.executable, "scripts/bench_serve.py"], ["--rounds", "2", "--soak-seconds", "30"]),
    "fit": ("Fit truth: predicted vs measured", [sys.executable, "scripts/bench_fit.py", "--export-missing"], []),
}


def shown(command: list[str]) -> str:
    return shlex.join(["python", *command[1:]] if command[0] == sys.executable else command)


def run(name: str, command: list[str], reuse: bool) -> tuple[str, str]:
    """A benchmark's printed table and the command that printed it: run now, or reused from bench-results/NAME.txt."""
    kept = RESULTS / f"{name}.txt"
    if reuse and kept.is_file():
        first, _, table = kept.read_text(encoding="utf-8").partition("\n")
        return table, first.removeprefix("$ ")
    print(f"\n$ {shown(command)}", file=sys.stderr, flush=True)
    start = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    sys.stderr.write(done.stdout)
    if done.returncode != 0:
        raise SystemExit(f"{shown(command)} failed with exit {done.returncode}")
    note = f"{shown(command)}  # {(time.monotonic() - start) / 60:.1f} min, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    RESULTS.mkdir(exist_ok=True)
    kept.write_text(f"$ {note}\n{done.stdout}", encoding="utf-8")
    return done.stdout, note


def host_bandwidth_gb_s() -> float:
    done = subprocess.run([sys.executable, "-m", "edgekit", "profile-host", "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
    profile = json.loads(done.stdout)
    return float(profile["memory_bandwidth"]["gb_s"])


def encoder_reading(data: dict) -> str:
    """Which variant to pick for which job, read off the table: only variants `edgekit export` would publish."""
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / "all-minilm-l6-v2.yaml").read_text(encoding="utf-8"))
    gate = recipe["validation"]["gates"]["min_cosine_each"]
    if "batch32_texts_per_second" not in data["rows"][0]:
        raise SystemExit("bench-results/encoder.json predates the batch-32 columns: run without --reuse")
    passing = [r for r in data["rows"] if r["cosine_min"] >= gate and r["variant"] != "pytorch-fp32"]
    latency = min(passing, key=lambda r: r["short_ms"])
    throughput = max(passing, key=lambda r: r["batch32_texts_per_second"])
    failing = ", ".join(f"{r['variant']} (worst {r['cosine_min']:.3f})" for r in data["rows"] if r["cosine_min"] < gate)
    return (f"Reading: among variants whose worst sentence keeps cosine ≥ {gate}, the lowest batch-1 latency is "
            f"**{latency['variant']}** ({latency['short_ms']:.2f} ms, {latency['speedup_vs_pytorch_short']:.2f}× PyTorch) and the "
            f"highest batch-32 throughput is **{throughput['variant']}** ({throughput['batch32_texts_per_second']:.0f} texts/s, "
            f"{throughput['speedup_vs_pytorch_batch32']:.2f}× PyTorch)" + (f"; below the gate: {failing}." if failing else "."))


def plot_encoder(data: dict) -> Path:
    import matplotlib.pyplot as plt

    rows = data["rows"]
    names = [r["variant"] for r in rows]
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 4))
    left.bar(names, [r["short_ms"] for r in rows], color="tab:blue")
    left.set_ylabel("batch-1 latency, short sentence (ms, p50)")
    middle.bar(names, [r["batch32_texts_per_second"] for r in rows], color="tab:purple")
    middle.set_ylabel("batch-32 throughput (texts/s, p50)")
    right.bar(names, [r["cosine_min"] for r in rows], color="tab:green")
    right.set_ylim(min(r["cosine_min"] for r in rows) - 0.01, 1.0)
    right.set_ylabel(f"worst cosine vs PyTorch ({data['validation_sentences']} sentences)")
    for axis in (left, middle, right):
        axis.tick_params(axis="x", rotation=25)
    figure.suptitle("all-MiniLM-L6-v2 on this host")
    figure.tight_layout()
    return save(figure, "encoder.png")


def plot_gguf(data: dict, bandwidth_gb_s: float | None) -> Path:
    import matplotlib.pyplot as plt

    rows = [r for r in data["quants"] if r.get("kld_mean")]  # f16 (KLD 0) is the reference
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["bits_per_weight"] for r in rows], [r["kld_mean"] for r in rows], "o-")
    for r in rows:
        left.annotate(r["quant"], (r["bits_per_weight"], r["kld_mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    left.set_xlabel("bits per weight")
    left.set_ylabel("mean KL divergence vs f16")
    left.set_yscale("log")
    speeds = [r for r in data["quants"] if r.get("decode_tokens_per_second")]
    right.bar([r["quant"] for r in speeds], [r["decode_tokens_per_second"] for r in speeds], color="tab:orange", label="measured")
    if bandwidth_gb_s:
        right.plot([r["quant"] for r in speeds], [bandwidth_gb_s * 1e9 / r["bytes"] for r in speeds], "k_", markersize=20,
                   label="memory-bandwidth roofline")
    right.set_ylabel("decode tokens/s")
    right.legend()
    figure.suptitle("SmolLM2-135M-Instruct: quality and speed per quant type")
    figure.tight_layout()
    return save(figure, "gguf.png")


def save(figure, name: str) -> Path:
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / name
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip", action="append", default=[], choices=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="Fewer rounds: minutes instead of most of an hour.")
    parser.add_argument("--reuse", action="store_true", help="Reuse tables kept in bench-results/ from earlier runs.")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")

    bandwidth = host_bandwidth_gb_s()
    parts = [
        "# edgekit comparison report",
        "",
        f"Generated {{generated}} UTC by `python scripts/report.py {' '.join(sys.argv[1:])}` "
        f"on {platform.machine()}, {platform.processor() or 'cpu'}, memory bandwidth {bandwidth:.1f} GB/s "
        "(`edgekit profile-host` at report time: copy rate of all cores, wall clock; the fit section profiles the "
        "host again with one thread in CPU time). Every section names the command that produced it; its JSON is in bench-results/.",
    ]
    for name, (title, command, quick_args) in SECTIONS.items():
        if name in args.skip:
            continue
        table, note = run(name, command + (quick_args if args.quick else []), args.reuse)
        parts += ["", f"## {title}", "", f"Command: `{note}`", "", "```", table.rstrip(), "```"]
        data_file = RESULTS / f"{name}.json"
        if name == "encoder":
            data = json.loads(data_file.read_text())
            parts += ["", encoder_reading(data), "", f"![encoder latency and quality](report/{plot_encoder(data).name})"]
        if name == "gguf":
            data = json.loads(data_file.read_text())
            if "prompt_tokens_per_second" not in data["quants"][0]:
                raise SystemExit("bench-results/gguf.json predates the prompt-speed column: run without --reuse")
            parts += ["", f"![quality and speed per quant type](report/{plot_gguf(data, bandwidth).name})", "",
                      f"Decode speed ({data['threads']} thread(s), as printed above) as a share of this host's memory-bandwidth "
                      "roofline (copy bandwidth of all cores / model bytes per token):", "",
                      "| quant | MB | prompt tok/s | decode tok/s | roofline tok/s | decode share of roofline |", "|---|---|---|---|---|---|"]
            for row in data["quants"]:
                if row.get("decode_tokens_per_second"):
                    roof = bandwidth * 1e9 / row["bytes"]
                    parts.append(f"| {row['quant']} | {row['bytes'] / 1e6:.1f} | {row['prompt_tokens_per_second']:.0f} | {row['decode_tokens_per_second']:.1f} | {roof:.0f} | {row['decode_tokens_per_second'] / roof:.0%} |")
    DOCS.mkdir(exist_ok=True)
    generated = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}"  # when the last section finished
    (DOCS / "report.md").write_text("\n".join(parts).replace("{generated}", generated, 1) + "\n", encoding="utf-8")
    print(f"wrote {DOCS / 'report.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
