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
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from edgekit.errors import EdgekitError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Edge deployment kit for small language models.")

# Piped output (CI logs) gets a wide table instead of rich's 80-column default.
out = Console(width=shutil.get_terminal_size((160, 24)).columns)
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
REPO_ROOT = Path(__file__).resolve().parent.parent.parent


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


def main() -> None:
    """Entry point: run the app and turn edgekit errors into messages and exit codes."""
    import click

    from edgekit.cli import export  # noqa: F401  (registers its commands)
    from edgekit.cli import serve  # noqa: F401  (registers `serve` and `service`)
    from edgekit.cli import fit  # noqa: F401  (registers devices, fit, plan, profile-host)
    from edgekit.cli import bench  # noqa: F401  (registers `bench`)
    from edgekit.cli import pack  # noqa: F401  (registers `pack`)

    try:
        # Without standalone mode click returns (not raises) the code of typer.Exit.
        code = app(standalone_mode=False)
    except EdgekitError as exc:
        from rich.markup import escape

        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
