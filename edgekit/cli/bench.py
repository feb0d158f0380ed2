"""`edgekit bench`: size, quality and speed of bundles on this host, side by side."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgekit.cli import JsonFlag, app, emit_json, err, out
from edgekit.cli.flags import output_file
from edgekit.library import resolve_bundle


@app.command("bench")
def bench_cmd(
    bundles: Annotated[list[str], typer.Argument(help="Bundle folders (or names under $EDGEKIT_HOME/bundles).")],
    prompt_file: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Prompt text (GGUF) or one text per line (ONNX).")] = None,
    ctx: Annotated[int, typer.Option(min=1, help="Context window for GGUF bundles.")] = 2048,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads. Default: the physical cores this process may use, as `edgekit serve` picks them.")] = None,
    runs: Annotated[int, typer.Option(min=1, help="Counted runs per bundle (after one warm-up run).")] = 5,
    decode_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per GGUF run.")] = 64,
    plot: Annotated[Path, typer.Option(help="Write a PNG of quality vs size vs speed.")] = None,
    calibrate: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Write the results as calibration points into this device profile (YAML).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Measure bundles, each in a fresh subprocess: load time, peak RSS, tok/s or latency; median of the runs.

    With --calibrate, the medians become calibration points of a device profile, which `edgekit fit` uses.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgekit.bench.measure import DEFAULT_PROMPT
    from edgekit.bench.run import BenchConfig, bench_bundle

    bundles = [resolve_bundle(ref) for ref in bundles]
    output_file(plot, "--plot")
    if calibrate:
        from edgekit.schema.device import load_device_file

        load_device_file(calibrate)  # an invalid profile is reported before minutes of benchmarking, not after
    text = prompt_file.read_text(encoding="utf-8") if prompt_file else ""
    if threads is None:
        from edgekit.runtime.placement import plan_threads

        threads = plan_threads().threads
    config = BenchConfig(threads=threads, ctx=ctx, runs=runs, decode_tokens=decode_tokens,
                         prompt=text or DEFAULT_PROMPT, texts=tuple(text.splitlines()))
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err) as bar:
        task = bar.add_task("benchmarking", total=len(bundles))
        for bundle in bundles:
            bar.update(task, description=f"benchmarking {bundle.name}")
            results.append(bench_bundle(bundle, config))
            bar.advance(task)
    if calibrate:
        from edgekit.bench.calibrate import write_calibration

        device = write_calibration(calibrate, results, threads)
        err.print(f"wrote {len(results)} calibration point(s) into {calibrate} ({len(device.calibration)} in all)")
    if plot:
        from edgekit.bench.plot import plot_results

        plot_results(results, plot)
        err.print(f"wrote {plot}")
    if as_json:
        emit_json({"config": dataclasses.asdict(config) | {"texts": len(config.texts)}, "results": [dataclasses.asdict(r) for r in results]})
        return
    table = Table("bundle", "quantization", "MiB", "quality", "load s", "peak RSS MiB", "speed (median [min–max])", title=f"bench on this host, {threads} threads")
    for r in results:
        speeds = []
        for metric, stats in r.summary.items():
            speeds.append(f"{metric} {stats['median']:.4g} [{stats['min']:.4g}–{stats['max']:.4g}]")
        quality = f"{r.quality_metric} {r.quality:.4g}" if r.quality is not None else "-"
        table.add_row(r.bundle, r.quantization, f"{r.bytes / 2**20:.1f}", quality, f"{r.load_seconds:.2f}",
                      f"{r.peak_rss_bytes / 2**20:.0f}", "\n".join(speeds))
    out.print(table)
