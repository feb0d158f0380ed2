"""The `edgekit` command: a thin layer that parses, calls and prints.

Data goes to stdout (a table, or JSON with --json); progress and logs go to stderr.
Exit codes: 0 ok, 1 a gate or check failed, 2 usage or configuration error, 3 backend error.
Each command group lives in its own module and registers itself on ``app``.
"""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console

from edgekit import __version__
from edgekit.errors import EdgekitError

# -h is short for --help on every command (click passes help_option_names down to subcommands).
app = typer.Typer(no_args_is_help=True, add_completion=True, help="Edge deployment kit for small language models.",
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


def main() -> None:
    """Entry point: typer reports usage errors itself (help or a message, exit 2); edgekit errors become a message and their exit code."""
    from edgekit.cli import export  # noqa: F401  (registers its commands)
    from edgekit.cli import serve  # noqa: F401  (registers `serve` and `service`)
    from edgekit.cli import fit  # noqa: F401  (registers devices, fit, plan, profile-host)
    from edgekit.cli import bench  # noqa: F401  (registers `bench`)
    from edgekit.cli import pack  # noqa: F401  (registers `pack`)
    from edgekit.cli import doctor  # noqa: F401  (registers `doctor`)
    from edgekit.cli import fleet  # noqa: F401  (registers push, pull, sign, keygen, update)

    try:
        # Standalone mode: typer exits itself, 0 on success, typer.Exit's code, or 2 for a usage error.
        app(prog_name="edgekit")
    except EdgekitError as exc:
        from rich.markup import escape

        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
