"""The `edgekit` command: a thin layer that parses, calls and prints.

Data goes to stdout (a table, or JSON with --json); progress and logs go to stderr.
Exit codes: 0 ok, 1 a gate or check failed, 2 usage or configuration error, 3 backend error.
Each command group lives in its own module and registers itself on ``app``; a run imports only the module of the
command it runs (``COMMAND_MODULES``), so `edgekit serve` on a board does not load the export or fleet code.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from edgekit import __version__
from edgekit.errors import EdgekitError

# Each command module and the commands and groups it registers, in the order --help lists them.
COMMAND_MODULES = {
    "export": ("export", "inspect", "bundles", "samples", "recipes"),
    "serve": ("serve", "service"),
    "fit": ("devices", "fit", "plan", "profile-host"),
    "bench": ("bench",),
    "pack": ("pack",),
    "doctor": ("doctor",),
    "fleet": ("push", "pull", "sign", "keygen", "update", "node-labels", "fleet"),
}
_HELP_ORDER = [name for names in COMMAND_MODULES.values() for name in names]


class _Commands(TyperGroup):
    """Lists commands in ``COMMAND_MODULES`` order, whichever modules were imported first."""

    def list_commands(self, ctx) -> list[str]:
        return sorted(super().list_commands(ctx), key=lambda n: _HELP_ORDER.index(n) if n in _HELP_ORDER else len(_HELP_ORDER))


# -h is short for --help on every command (click passes help_option_names down to subcommands).
app = typer.Typer(cls=_Commands, no_args_is_help=True, add_completion=True,
                  help="Edge deployment kit for small language models.",
                  context_settings={"help_option_names": ["-h", "--help"]})

# Piped output (CI logs) gets a wide table instead of rich's 80-column default.
out = Console(width=shutil.get_terminal_size((160, 24)).columns)
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def status(message: str):
    """A live line on stderr (spinner, current step, elapsed time); yields a callback that names the step."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=False) as bar:
        task = bar.add_task(message)
        yield lambda text: bar.update(task, description=f"{message}: {text}")
        bar.update(task, description=f"{message}: done")


def _print_version(requested: bool) -> None:
    if requested:
        sys.stdout.write(f"edgekit {__version__}\n")
        raise typer.Exit()


@app.callback()
def _top_level(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print edgekit's version and exit.")] = False,
) -> None:
    # Only global options live here; each command module registers its own commands on ``app``.
    return None


def load_commands(args: list[str]) -> None:
    """Import the module registering the command ``args`` name (the first word; top-level options take no value), or
    every command module when there is none or it is unknown (help, completion, typer's usage error)."""
    name = next((arg for arg in args if not arg.startswith("-")), None)
    modules = [module for module, names in COMMAND_MODULES.items() if name in names] or list(COMMAND_MODULES)
    for module in modules:
        importlib.import_module(f"edgekit.cli.{module}")


def main() -> None:
    """Entry point: typer reports usage errors itself (help or a message, exit 2); edgekit errors become a message and their exit code."""
    load_commands(sys.argv[1:])
    try:
        # Standalone mode: typer exits itself, 0 on success, typer.Exit's code, or 2 for a usage error.
        app(prog_name="edgekit")
    except EdgekitError as exc:
        from rich.markup import escape

        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
