"""Commands of the device catalog and the fit checks: devices, fit, plan, profile-host."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from edgekit.bench.profile import DECODE_DEPTH, MIN_DEPTH
from edgekit.cli import JsonFlag, app, emit_json, err, out, status
from edgekit.cli.flags import (
    build_settings,
    complete_bundle,
    complete_device,
    complete_recipe,
    did_you_mean,
    load_board,
    output_file,
)
from edgekit.errors import ConfigError, DeviceError, EdgekitError, GateFailed
from edgekit.fit.memory import MIB
from edgekit.library import resolve_bundle, resolve_recipe

devices_app = typer.Typer(no_args_is_help=True, help="The device catalog: boards, their specs and measured speeds.")
app.add_typer(devices_app, name="devices")

CatalogOpt = Annotated[Path, typer.Option("--catalog", help="Folder of device profiles (default: the shipped devices/).")]
VERDICT_STYLE = {"pass": "[green]pass[/green]", "warn": "[yellow]warn[/yellow]", "fail": "[red]FAIL[/red]"}


def _mib(n: float) -> str:
    return f"{n / MIB:,.0f}"


# -- devices -------------------------------------------------------------------------------------

@devices_app.command("list")
def devices_list(catalog: CatalogOpt = None, as_json: JsonFlag = False) -> None:
    """List the catalog's boards; exit 2 if any profile is invalid (file:field messages)."""
    from edgekit.schema.device import default_device_dir, load_device_file

    directory = catalog or default_device_dir()
    if not directory.is_dir():
        raise DeviceError(f"{directory}: device catalog folder not found", hint="pass --catalog DIR")
    rows = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            d = load_device_file(path)
            rows.append({"file": path.name, "id": d.id, "name": d.name, "cpu": f"{d.cpu.cores}x {d.cpu.core_type} @ {d.cpu.clock_ghz} GHz",
                         "ram_mib": d.memory.total_mib, "usable_ram_bytes": d.usable_ram_bytes,
                         "bandwidth_gb_s": d.memory_bandwidth.gb_s, "storage": f"{d.storage.kind} {d.storage.read_mb_s:g} MB/s",
                         "calibration_points": len(d.calibration), "error": None})
        except EdgekitError as exc:
            rows.append({"file": path.name, "id": None, "error": str(exc)})
    if as_json:
        emit_json(rows)
    else:
        table = Table("id", "name", "cpu", "RAM MiB", "usable MiB", "GB/s", "storage", "points", title=f"devices in {directory}")
        for row in rows:
            if row["error"]:
                table.add_row(row["file"], "[red]invalid[/red]", row["error"], "", "", "", "", "")
            else:
                table.add_row(row["id"], row["name"], row["cpu"], str(row["ram_mib"]), _mib(row["usable_ram_bytes"]),
                              f"{row['bandwidth_gb_s']:g}", row["storage"], str(row["calibration_points"]))
        out.print(table)
    invalid = [row["file"] for row in rows if row["error"]]
    if invalid:
        # An EdgekitError, not typer.Exit: with standalone_mode=False click returns Exit codes instead of exiting.
        raise DeviceError(f"{len(invalid)} invalid device profile(s) in {directory}: {', '.join(invalid)}")


@devices_app.command("show")
def devices_show(device: Annotated[str, typer.Argument(help="Device id or profile file.", autocompletion=complete_device)],
                 catalog: CatalogOpt = None,
                 as_json: JsonFlag = False) -> None:
    """Show one profile with every spec's source and its calibration points."""

    d = load_board(device, catalog)
    data = json.loads(d.model_dump_json())
    data["usable_ram_bytes"] = d.usable_ram_bytes
    if as_json:
        emit_json(data)
        return
    out.print(f"[bold]{d.id}[/bold]  {d.name}\n{d.description}")
    specs = Table("spec", "value", "source / estimate")
    specs.columns[2].overflow = "fold"  # a URL is folded onto the next line, never cut
    for label, block, value in (
        ("cpu", d.cpu, f"{d.cpu.cores}x {d.cpu.core_type} @ {d.cpu.clock_ghz} GHz, {d.cpu.arch}, "
                       + ", ".join(k for k, v in d.cpu.isa.model_dump().items() if v)),
        ("memory", d.memory, f"{d.memory.total_mib} MiB, OS keeps {d.memory.os_reserved_mib} MiB "
                             f"-> {_mib(d.usable_ram_bytes)} MiB usable ({d.memory.kind})"),
        ("bandwidth", d.memory_bandwidth, f"{d.memory_bandwidth.gb_s:g} GB/s"),
        ("storage", d.storage, f"{d.storage.kind}, {d.storage.read_mb_s:g} MB/s"),
    ):
        where = ("estimate: " if block.estimate else "") + (block.source or "") + (f" ({block.note})" if block.note else "")
        specs.add_row(label, value, where)
    out.print(specs)
    if out.width < WIDE_COLUMNS:  # a list: an 8-column table would cut or fold every cell at this width
        out.print("[bold]calibration points[/bold]")
        for p in d.calibration:
            speeds = ", ".join(f"{label} {value:g}{unit}" for label, value, unit in (
                ("prompt", p.prompt_tok_s, " tok/s"), ("decode", p.decode_tok_s, " tok/s"), ("latency", p.latency_ms, " ms"))
                if value is not None)
            depth = f" at {p.context_tokens} tokens of context" if p.context_tokens else ""
            build = f", {p.engine} {p.build}" if p.build else ""
            out.print(f"- {p.model} {p.quant}{depth}: {speeds}; measured on {p.measured_on}{build}", highlight=False)
            out.print(f"  {p.source}", highlight=False, soft_wrap=True)  # a URL is never cut
        return
    points = Table("model", "quant", "context", "prompt tok/s", "decode tok/s", "latency ms", "measured on", "build", "source",
                   title="calibration points")
    points.columns[-1].overflow = "fold"
    for p in d.calibration:
        points.add_row(p.model, p.quant, f"{p.context_tokens or ''}", f"{p.prompt_tok_s or ''}", f"{p.decode_tok_s or ''}",
                       f"{p.latency_ms or ''}", p.measured_on, p.build, p.source)
    out.print(points)


# -- fit -----------------------------------------------------------------------------------------

def _manifest_of(ref: str):
    """The manifest of a bundle given as a folder, its manifest.json, or a bundle name under $EDGEKIT_HOME/bundles."""
    from edgekit.bundle import read_manifest

    return read_manifest(resolve_bundle(ref))


# The FitSettings fields whose flag is not simply --<field-name>.
FIT_FLAGS = {"n_ctx": "--ctx"}


def _settings(ctx: int | None, parallel: int, min_tok_s: float | None, max_latency_ms: float | None, **more):
    """FitSettings from the flags of fit and plan; an out-of-range value exits 2 naming its flag and range."""
    from edgekit.fit import FitSettings

    return build_settings(FitSettings, dict(n_ctx=ctx, parallel=parallel, min_tok_s=min_tok_s,
                                                 max_latency_ms=max_latency_ms, **more), FIT_FLAGS)


# Below this many columns tables take their compact layout (reasons below the table, fewer columns).
WIDE_COLUMNS = 120


def _decode_cell(r) -> str:
    """GGUF: decode tok/s at the start of a conversation / deep into it; ONNX: batch-1 latency."""
    if r.decode_tok_s is None:
        return f"{r.latency_ms:.1f} ms"
    return f"{r.decode_tok_s_short:.1f} / {r.decode_tok_s:.1f}"


def _ttft_cell(r) -> str:
    """GGUF: predicted seconds to the first token of the assumed prompt; encoders have none."""
    return "" if r.ttft_s is None else f"{r.ttft_s:.2f}"


def _console(wide: bool):
    from rich.console import Console

    return Console(width=max(out.width, 240)) if wide else out


def print_fit_table(reports, wide: bool = False, title: str = "edgekit fit") -> None:
    """The fit reports as a table, its assumptions under it; compact below WIDE_COLUMNS unless ``wide``: one row per
    bundle naming it, its boards under it, reasons after the table."""
    from edgekit.fit.report import assumption_lines

    console = _console(wide)
    if console.width < WIDE_COLUMNS:
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("bundle / device", no_wrap=True)
        table.add_column("RAM MiB", justify="right", no_wrap=True)
        table.add_column("tok/s", justify="right", no_wrap=True)
        table.add_column("TTFT s", justify="right", no_wrap=True)
        table.add_column("verdict", no_wrap=True, min_width=7)
        by_subject: dict[str, list] = {}
        for r in reports:
            by_subject.setdefault(r.subject, []).append(r)
        for subject, rows in by_subject.items():
            table.add_row(f"[bold]{subject}[/bold]", "", "", "", "")
            for r in rows:
                table.add_row(f"  {r.device}", _mib(r.memory["required"]), _decode_cell(r), _ttft_cell(r),
                              VERDICT_STYLE[r.verdict])
        console.print(table)
        for r in reports:
            if r.verdict != "pass":
                console.print(f"{r.subject} on {r.device}: {r.reason}", highlight=False)
    else:
        table = Table("bundle", "device", "from", "RAM MiB", "usable MiB", "disk MiB", "tok/s short / deep", "pp512 tok/s",
                      "TTFT s", "verdict", "reason", title=title)
        for r in reports:
            disk = _mib(r.disk_bytes)
            if r.disk_prediction_error is not None:
                disk += f" (pred {r.disk_prediction_error:+.1%})"
            table.add_row(r.subject, r.device, r.origin, _mib(r.memory["required"]), _mib(r.usable_ram_bytes), disk,
                          _decode_cell(r), "" if r.prompt_tok_s is None else f"{r.prompt_tok_s:.1f}", _ttft_cell(r),
                          VERDICT_STYLE[r.verdict], r.reason)
        for column in table.columns[:-1]:
            column.no_wrap = True
        console.print(table)
    for line in assumption_lines(reports):
        console.print(f"[dim]assumes: {line}[/dim]", highlight=False)


def _emit(reports, as_json: bool, junit: Path | None, github: bool, wide: bool = False) -> None:
    from edgekit.fit.report import github_annotations, junit_xml, markdown_summary

    if as_json:
        emit_json([json.loads(r.model_dump_json()) for r in reports])
    elif not github:
        print_fit_table(reports, wide)
    if github:
        # GitHub documents workflow commands on stdout; with --json they go to stderr (which the runner also scans)
        # so stdout stays one JSON document.
        for line in github_annotations(reports):
            print(line, file=sys.stderr if as_json else sys.stdout)
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as handle:
                handle.write(markdown_summary(reports))
        if not as_json:
            print_fit_table(reports, wide)
    if junit is not None:
        junit.write_text(junit_xml(reports), encoding="utf-8")
        err.print(f"wrote {junit}")
    failed = [f"{r.subject} on {r.device}" for r in reports if r.verdict == "fail"]
    if failed:
        raise GateFailed(f"{len(failed)} of {len(reports)} fit checks failed: {', '.join(failed)}")


def recipe_subjects(recipe_path: Path, bundles_dir: Path | None):
    """(measured or predicted facts, prediction) for every target of a recipe; measured when the bundle exists."""
    from edgekit.bundle import read_manifest
    from edgekit.fit import from_manifest, from_recipe
    from edgekit.paths import kit_paths
    from edgekit.schema.recipe import load_recipe

    recipe = load_recipe(recipe_path).recipe
    bundles_dir = bundles_dir or kit_paths().bundles
    subjects = []
    for target in recipe.targets:
        predicted = from_recipe(recipe, target)
        folder = bundles_dir / recipe.bundle_name(target)
        if (folder / "manifest.json").is_file():
            subjects.append((from_manifest(read_manifest(folder)), predicted))
        else:
            subjects.append((predicted, None))
    return recipe, subjects


@app.command("fit")
def fit_cmd(
    bundles: Annotated[list[str], typer.Argument(help="Bundle folders (or names under $EDGEKIT_HOME/bundles).",
                                                 autocompletion=complete_bundle)] = None,
    device: Annotated[list[str], typer.Option("--device", "-d", help="Device id or profile file (repeatable); default: every catalog device, or the recipe's devices.",
                                              autocompletion=complete_device)] = None,
    recipe: Annotated[str, typer.Option("--recipe", help="Check a recipe's targets (a file, or a name of `edgekit recipes list`) on its devices, before export or download.",
                                        autocompletion=complete_recipe)] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Context tokens per sequence (GGUF) or input tokens (ONNX); default: model's, at most 4096.")] = None,
    parallel: Annotated[int, typer.Option("--parallel", help="Sequences served at once (GGUF: serve's --slots) or texts "
                                          "per batch (ONNX: serve's --batch-max); default: serve's.")] = None,
    min_tok_s: Annotated[float, typer.Option("--min-tok-s", help="Fail when predicted decode tokens/s is lower.")] = None,
    max_latency_ms: Annotated[float, typer.Option("--max-latency-ms", help="Encoders: fail when predicted batch-1 latency is higher.")] = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="GGUF: prompt length the time to first token is "
                                               "predicted for (default 128).")] = None,
    max_ttft_s: Annotated[float, typer.Option("--max-ttft-s", help="GGUF: fail when predicted time to first token is higher.")] = None,
    flash_attn: Annotated[bool, typer.Option("--flash-attn/--no-flash-attn", show_default=False, help="Charge llama.cpp's "
                                             "compute buffers with flash attention, as edgekit serve runs (default), or the "
                                             "larger ones of a runtime without it.")] = None,
    batch_max_tokens: Annotated[int, typer.Option("--batch-max-tokens", help="Encoders: most padded tokens of one micro-batch "
                                                  "(serve's --batch-max-tokens).")] = None,
    max_embedding_inputs: Annotated[int, typer.Option("--max-embedding-inputs", help="Encoders: most texts of one request "
                                                      "(serve's --max-embedding-inputs).")] = None,
    prompt_cache_contexts: Annotated[float, typer.Option("--prompt-cache-contexts", help="GGUF: RAM for saved prompts in "
                                                         "contexts' worth of KV cache (serve's --prompt-cache-contexts).")] = None,
    daemon: Annotated[bool, typer.Option("--daemon/--no-daemon", help="Count edgekit serve's own process next to the "
                                         "model's worker.")] = True,
    headroom: Annotated[float, typer.Option("--headroom", help="Warn above (1 - headroom) of usable RAM.")] = 0.15,
    threads: Annotated[int, typer.Option("--threads", help="Inference threads; default: the device's cores.")] = None,
    bundles_dir: Annotated[Path, typer.Option("--bundles-dir", exists=True, file_okay=False, help="Where --recipe looks for exported bundles (default $EDGEKIT_HOME/bundles).")] = None,
    catalog: CatalogOpt = None,
    as_json: JsonFlag = False,
    junit: Annotated[Path, typer.Option("--junit", help="Also write a JUnit XML report here.")] = None,
    github: Annotated[bool, typer.Option("--github", help="Print GitHub Actions ::error/::warning annotations and a step summary.")] = False,
    wide: Annotated[bool, typer.Option("--wide", help="Every column, whatever the terminal's width.")] = False,
) -> None:
    """Will these bundles fit these boards? Peak RAM, disk and speed from metadata; exit 1 if any fails."""
    from edgekit.fit import fit
    from edgekit.schema.device import load_catalog

    if not bundles and recipe is None:
        raise typer.BadParameter("give bundle folders or --recipe RECIPE")
    output_file(junit, "--junit")
    settings = _settings(ctx, parallel, min_tok_s, max_latency_ms, daemon=daemon, headroom=headroom,
                         threads=threads, max_ttft_s=max_ttft_s,
                         **{k: v for k, v in (("batch_max_tokens", batch_max_tokens), ("prompt_tokens", prompt_tokens),
                                              ("flash_attn", flash_attn),
                                              ("max_embedding_inputs", max_embedding_inputs),
                                              ("prompt_cache_contexts", prompt_cache_contexts)) if v is not None})
    everything = load_catalog(catalog)
    subjects = [(_manifest_of(ref), None) for ref in bundles or []]
    device_ids = list(device or [])
    if recipe is not None:
        recipe = resolve_recipe(recipe)
        loaded, recipe_targets = recipe_subjects(recipe, bundles_dir)
        subjects += recipe_targets
        device_ids = device_ids or list(loaded.devices)
        if not device_ids:
            raise DeviceError(f"{recipe}: the recipe lists no devices", hint="add devices: [...] to the recipe or pass --device")
    devices = [load_board(ref, catalog) for ref in device_ids] if device_ids else list(everything.values())
    reports = [fit(subject, dev, settings, catalog=everything.values(), predicted=predicted)
               for subject, predicted in subjects for dev in devices]
    _emit(reports, as_json, junit, github, wide)


@app.command("plan")
def plan_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file, or a name of `edgekit recipes list`; "
                                          "leave out to rank every recipe of --task.", autocompletion=complete_recipe)] = None,
    device: Annotated[list[str], typer.Option("--device", "-d", help="Device id or profile file (one).",
                                              autocompletion=complete_device)] = None,
    task: Annotated[str, typer.Option("--task", help="Without RECIPE: rank every recipe of this task in the library "
                                      "(and --recipes DIR) that fits the board and meets the floor.")] = None,
    recipes_dir: Annotated[list[Path], typer.Option("--recipes", exists=True, file_okay=False,
                                                    help="Also rank the recipes of this folder (repeatable).")] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Context tokens per sequence.")] = None,
    parallel: Annotated[int, typer.Option("--parallel", help="Sequences served at once (serve's --slots) or texts "
                                          "per batch (serve's --batch-max).")] = None,
    min_tok_s: Annotated[float, typer.Option("--min-tok-s", help="Speed floor for decode tokens/s.")] = None,
    max_latency_ms: Annotated[float, typer.Option("--max-latency-ms", help="Encoders: latency ceiling.")] = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="GGUF: prompt length the time to first token is "
                                               "predicted for (default 128).")] = None,
    max_ttft_s: Annotated[float, typer.Option("--max-ttft-s", help="GGUF: ceiling for the predicted time to first token.")] = None,
    catalog: CatalogOpt = None,
    as_json: JsonFlag = False,
    wide: Annotated[bool, typer.Option("--wide", help="Every column, whatever the terminal's width.")] = False,
) -> None:
    """The best target (quant type) of a recipe for a board; without a recipe, every recipe x target of --task ranked."""
    from edgekit.fit.plan import plan
    from edgekit.formats import TASKS
    from edgekit.schema.device import load_catalog
    from edgekit.schema.recipe import load_recipe

    if not device:
        raise ConfigError("Missing option '--device' / '-d': the board to plan for",
                          hint="e.g. --device rpi-4-2gb; `edgekit devices list` shows the catalog")
    if len(device) > 1:
        compare = f"`edgekit fit --recipe {recipe} -d A -d B`" if recipe else "one plan per device"
        raise ConfigError(f"plan takes one --device, got {len(device)}: {', '.join(device)}",
                          hint=f"run plan once per device, or compare them with {compare}")
    if recipe is None and task is None:
        raise ConfigError("give a RECIPE, or --task TASK to rank every recipe of the library",
                          hint=f"tasks: {', '.join(TASKS)}")
    if task is not None and task not in TASKS:
        raise ConfigError(f"--task {task}: unknown task", hint=did_you_mean(task, list(TASKS), f"tasks: {', '.join(TASKS)}"))
    if recipe is not None and (task is not None or recipes_dir):
        raise ConfigError("give either a RECIPE or --task/--recipes, not both",
                          hint="leave out RECIPE to rank the library")
    device = device[0]
    settings = _settings(ctx, parallel, min_tok_s, max_latency_ms, max_ttft_s=max_ttft_s,
                         **({"prompt_tokens": prompt_tokens} if prompt_tokens is not None else {}))
    everything = load_catalog(catalog)
    board = load_board(device, catalog)
    if recipe is None:
        _plan_library(task, recipes_dir or [], board, settings, everything, as_json, wide)
        return
    loaded = load_recipe(resolve_recipe(recipe)).recipe
    result = plan(loaded, board, settings, everything.values())
    if as_json:
        emit_json(result.as_dict())
    else:
        from edgekit.fit.report import assumption_lines

        console = _console(wide)
        compact = console.width < WIDE_COLUMNS
        columns = ["target", "quant", "in recipe", "RAM MiB", "usable MiB", "disk MiB", "tok/s short / deep", "TTFT s",
                   "verdict", "reason"]
        if compact:
            columns = ["target", "quant", "RAM MiB", "tok/s", "TTFT s", "verdict"]
        table = Table(*columns, title=f"plan for {loaded.name} on {device}", box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD)
        for c in result.candidates:
            r = c.report
            mark = " [bold]<- best[/bold]" if result.best is c else ""
            if compact:
                table.add_row(c.target_name + mark, r.quant, _mib(r.memory["required"]), _decode_cell(r), _ttft_cell(r),
                              VERDICT_STYLE[r.verdict])
            else:
                table.add_row(c.target_name + mark, r.quant, "yes" if c.in_recipe else "no", _mib(r.memory["required"]),
                              _mib(r.usable_ram_bytes), _mib(r.disk_bytes), _decode_cell(r), _ttft_cell(r),
                              VERDICT_STYLE[r.verdict], r.reason)
        console.print(table)
        if compact:
            for c in result.candidates:
                if c.report.verdict != "pass":
                    console.print(f"{c.target_name}: {c.report.reason}", highlight=False)
        for line in assumption_lines([c.report for c in result.candidates]):
            console.print(f"[dim]assumes: {line}[/dim]", highlight=False)
        console.print(result.summary, highlight=False)
    if result.best is None:
        raise GateFailed(result.summary)


def _plan_library(task: str, extra_dirs: list[Path], board, settings, everything, as_json: bool, wide: bool) -> None:
    """Rank every recipe x target of ``task`` in the library (and ``extra_dirs``) on ``board``."""
    from edgekit.fit.plan import plan_library
    from edgekit.library import shipped_folder
    from edgekit.schema.recipe import load_recipe

    recipes = []
    for folder in [shipped_folder("recipes"), *extra_dirs]:
        for path in sorted(folder.glob("*.yaml")):
            try:
                recipes.append((str(path), load_recipe(path).recipe))
            except EdgekitError as exc:
                recipes.append((str(path), str(exc)))
    result = plan_library(recipes, task, board, settings, everything.values())
    if as_json:
        emit_json(result.as_dict())
    else:
        floor = f", decode >= {settings.min_tok_s:g} tok/s" if settings.min_tok_s else ""
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False,
                      title=f"{task} on {board.id} ({_mib(board.usable_ram_bytes)} MiB usable{floor}): best first")
        for name in ("#", "recipe", "target", "quant", "RAM MiB", "tok/s", "TTFT s", "verdict"):
            table.add_column(name, no_wrap=True, justify="right" if name in ("#", "RAM MiB", "tok/s", "TTFT s") else "left")
        for rank, entry in enumerate(result.ranked, 1):
            r = entry.candidate.report
            table.add_row(str(rank), entry.recipe, entry.candidate.target_name, r.quant, _mib(r.memory["required"]),
                          _decode_cell(r), _ttft_cell(r), VERDICT_STYLE[r.verdict])
        console = _console(wide)
        console.print(table)
        if result.dropped and console.width < WIDE_COLUMNS:
            console.print("[bold]dropped[/bold]")
            for entry in result.dropped:
                console.print(f"{entry.recipe} {entry.candidate.target_name}: {entry.candidate.report.reason}", highlight=False)
        elif result.dropped:
            dropped = Table("recipe", "target", "why dropped", title="dropped")
            for entry in result.dropped:
                dropped.add_row(entry.recipe, entry.candidate.target_name, entry.candidate.report.reason)
            console.print(dropped)
        from edgekit.fit.report import assumption_lines

        reports = [entry.candidate.report for entry in result.ranked + result.dropped]
        for line in assumption_lines(reports):
            if not line.startswith(tuple(r.device for r in reports)):  # per-board speed bands: one line per model is noise here
                console.print(f"[dim]assumes: {line}[/dim]", highlight=False)
        for path, error in result.invalid.items():
            err.print(f"[yellow]skipped[/yellow] {path}: {error}")
    if not result.ranked:
        raise GateFailed(f"no {task} recipe fits {board.id} and meets the limits "
                         f"({len(result.dropped)} recipe targets dropped, each with its reason)")


# -- profile-host --------------------------------------------------------------------------------

def profile_id(out_file: Path | None, device_id: str | None) -> str:
    """The written profile's id: the output file's name (a profile's id must equal it), else --id, else 'this-host'."""
    from pydantic import TypeAdapter, ValidationError

    from edgekit.schema.device import DeviceId

    if out_file is not None:
        if device_id is not None and device_id != out_file.stem:
            raise ConfigError(f"--id {device_id} differs from the file name of --out {out_file} "
                              "(a profile's id is its file name)",
                              hint=f"drop --id, or write to {out_file.with_name(device_id + (out_file.suffix or '.yaml'))}")
        device_id = out_file.stem
    device_id = device_id or "this-host"
    try:
        TypeAdapter(DeviceId).validate_python(device_id)
    except ValidationError:
        where = f"--out {out_file}: the file name" if out_file is not None else "--id"
        raise ConfigError(f"{where} '{device_id}' is not a valid device id (lower-case letters, digits, '.', '_', '-'; "
                          "starting with a letter or digit; at most 64 characters)",
                          hint="e.g. --out my-board.yaml") from None
    return device_id


@app.command("profile-host")
def profile_host(
    out_file: Annotated[Path, typer.Option("--out", help="Write the profile YAML here (default: print it); "
                                           "its id is the file name.")] = None,
    device_id: Annotated[str, typer.Option("--id", help="Id of the profile when it is printed (default: this-host).")] = None,
    bundle: Annotated[list[Path], typer.Option("--bundle", help="Also measure this bundle's speed (GGUF decode or ONNX latency); repeatable.")] = None,
    threads: Annotated[int, typer.Option("--threads", min=1, help="Threads for the speed measurements; default: the cores the profile counts (as `edgekit serve` picks them).")] = None,
    bandwidth_mib: Annotated[int, typer.Option("--bandwidth-mib", min=1, help="Array size per copy buffer for the bandwidth test.")] = 256,
    depth: Annotated[int, typer.Option("--depth", min=0, help=f"GGUF: also time decode this many tokens into a context "
                                       f"(calibrates attention over the KV cache; at least {MIN_DEPTH}); 0 skips it.")] = DECODE_DEPTH,
    as_json: JsonFlag = False,
) -> None:
    """Measure this machine (cores, RAM, ISA flags, memory bandwidth, storage, sample speeds) into a device profile."""
    import datetime

    import yaml

    from edgekit.bench.profile import profile_host as measure_host

    output_file(out_file, "--out")
    device_id = profile_id(out_file, device_id)
    bundles = [(folder, _manifest_of(str(folder))) for folder in bundle or []]
    with status("measuring this host") as progress:
        profile = measure_host(device_id, bundles, threads=threads, bandwidth_mib=bandwidth_mib, depth=depth, progress=progress)
    data = json.loads(profile.model_dump_json(exclude_defaults=False))
    text = yaml.safe_dump(data, sort_keys=False)
    if out_file is not None:
        written = f"# Written by `edgekit profile-host` on {datetime.date.today().isoformat()}.\n"
        out_file.write_text(written + text, encoding="utf-8")
        err.print(f"wrote {out_file}")
    if as_json:
        emit_json(data)
    elif out_file is None:
        print(text, end="")
