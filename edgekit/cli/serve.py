"""Board-side commands: `edgekit serve` and `edgekit service unit`.

Their flags are generated from ``ServeSettings`` (one declaration: field name -> --flag-name, field
description -> help, EDGEKIT_<FIELD> env var), the way llama-cpp-python's server derives its
argparse flags from its pydantic settings. A flag left out falls back to the environment, then
to the declared default.
"""

from __future__ import annotations

import inspect
import shutil
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from edgekit.cli import JsonFlag, app, emit_json, err
from edgekit.cli.flags import build_settings, output_file
from edgekit.errors import ConfigError
from edgekit.serve.settings import ServeSettings

service_app = typer.Typer(no_args_is_help=True, help="Install the daemon as a system service.")
app.add_typer(service_app, name="service")


def _cli_type(annotation: Any) -> Any:
    """The click-friendly type of a settings field: Optional stripped, lists kept as List[item]."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _cli_type(args[0])
    if typing.get_origin(annotation) is list:
        return list[_cli_type(args[0])]
    return annotation


def _default_text(name: str) -> str:
    field = ServeSettings.model_fields[name]
    if field.default_factory is not None:
        value = field.default_factory()
        return "" if value in ([], None) else f" (default: {value})"
    return "" if field.default is None else f" (default: {field.default})"


def settings_parameters() -> list[inspect.Parameter]:
    """One keyword parameter (a typer option) per ServeSettings field."""
    parameters = []
    for name, field in ServeSettings.model_fields.items():
        kind = _cli_type(field.annotation)
        repeat = " Repeatable." if typing.get_origin(kind) is list else ""
        help_text = f"{field.description}{repeat}{_default_text(name)} (env EDGEKIT_{name.upper()})"
        option = typer.Option(f"--{name.replace('_', '-')}", help=help_text, show_default=False,
                              metavar="TEXT" if repeat else None)
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=Annotated[kind | None, option]))
    return parameters


def settings_from_flags(flags: dict[str, Any]) -> ServeSettings:
    """ServeSettings from the flags that were given (others: environment, then defaults); errors exit 2."""
    given = {k: v for k, v in flags.items() if k in ServeSettings.model_fields and v is not None and v != [] and v != ()}
    return build_settings(ServeSettings, given)


def with_settings_flags(function):
    """Give ``function`` the settings flags in addition to its own parameters (typer reads __signature__)."""
    own = [p for p in inspect.signature(function, eval_str=True).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    function.__signature__ = inspect.Signature([*own, *settings_parameters()])
    return function


@app.command("serve")
@with_settings_flags
def serve_cmd(**flags: Any) -> None:
    """Serve every verified bundle in --models over an OpenAI-compatible HTTP API (offline)."""
    from edgekit.serve.server import run

    settings = settings_from_flags(flags)
    if not settings.models.is_dir():
        # A daemon serving nothing would look healthy to systemd and to a quick curl; refuse instead.
        raise ConfigError(f"--models {settings.models}: no such folder",
                          hint="pass the folder `edgekit export` wrote the bundles to")
    code = run(settings)
    raise typer.Exit(code)


@service_app.command("unit")
@with_settings_flags
def service_unit(
    exec_path: Annotated[str | None, typer.Option("--exec", help="Path of the edgekit executable on the board.")] = None,
    output: Annotated[Path | None, typer.Option("--output", help="Write the unit here instead of stdout.")] = None,
    as_json: JsonFlag = False,
    **flags: Any,
) -> None:
    """Print a hardened systemd unit (DynamicUser, ProtectSystem=strict, MemoryMax from the fit estimate)."""
    from edgekit.serve.systemd import STATE_DIR, bundles_footprint, check_readable, render_unit, unit_budget

    output_file(output, "--output")
    if flags.get("models") is None:
        flags["models"] = STATE_DIR / "bundles"
    settings = settings_from_flags(flags)
    cap = None
    if settings.device is not None:
        from edgekit.cli.flags import load_board

        cap = load_board(settings.device).usable_ram_bytes  # an unknown id exits 2 here, not in the board's service log
    check_readable(settings.models)
    rows = [] if settings.memory_budget_mb is not None and settings.device is None else bundles_footprint(settings)[1]
    budget, source = unit_budget(settings, rows)
    executable = exec_path or shutil.which("edgekit") or str(Path(sys.argv[0]).resolve())
    unit = render_unit(settings, executable, budget, source, cap)
    if output is not None:
        output.write_text(unit, encoding="utf-8")
        err.print(f"wrote {output}")
    if as_json:
        emit_json({"unit": unit, "budget_bytes": budget, "bundles": dict(rows), "source": source})
    elif output is None:
        sys.stdout.write(unit)  # verbatim: a console would wrap the long ExecStart line
