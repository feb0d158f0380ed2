"""`edgekit pack`: a self-contained offline installer of edgekit and bundles for one board."""

from __future__ import annotations

import inspect
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgekit.cli import JsonFlag, app, emit_json, out, status
from edgekit.pack.assemble import DEFAULT_PREFIX, DEFAULT_PYTHON, PYTHONS

MIB = 1 << 20
# The --python choices, from the one list in edgekit.pack.assemble.
PythonVersion = Enum("PythonVersion", {f"cp{v.replace('.', '')}": v for v in PYTHONS}, type=str)
# Serve settings the pack decides itself: the bundles live under the install prefix, the board is --device.
PACK_DECIDES = ("models", "device")


def with_serve_flags(function):
    """Give ``function`` the `edgekit serve` settings flags (for the unit on the board) besides its own parameters."""
    from edgekit.cli.serve import settings_parameters

    own = [p for p in inspect.signature(function, eval_str=True).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    function.__signature__ = inspect.Signature([*own, *(p for p in settings_parameters() if p.name not in PACK_DECIDES)])
    return function


@app.command("pack")
@with_serve_flags
def pack_cmd(
    bundles: Annotated[list[Path], typer.Argument(help="Bundle folders to install on the board (each is verified first).")],
    device: Annotated[str, typer.Option("--device", "-d", help="The board: a catalog device id or a profile file.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Pack folder to write; DIR.tar.gz is written beside it.")],
    python: Annotated[PythonVersion, typer.Option("--python", help="The board's python3 version (Debian 13: 3.13, "
                                                  "Debian 12: 3.11).")] = PythonVersion(DEFAULT_PYTHON),
    edgekit_wheel: Annotated[Path | None, typer.Option("--edgekit-wheel", help="edgekit wheel to ship; default: built from this "
                                                       "source checkout.")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build llama-cpp-python again even when it is cached.")] = False,
    as_json: JsonFlag = False,
    **flags: Any,
) -> None:
    """Make an offline installer for a board: wheels for its CPU and Python, the bundles, a systemd unit, install.sh.

    The `edgekit serve` flags set the daemon's settings on the board; the unit's memory budget is sized from them.
    """
    from edgekit.cli.serve import settings_from_flags
    from edgekit.pack.assemble import PackRequest, make_pack
    from edgekit.paths import kit_paths
    from edgekit.schema.device import load_device

    board = load_device(device)  # DeviceError (exit 2) lists the known ids
    request = PackRequest(device=board, device_ref=device, bundles=tuple(bundles), out_dir=out_dir, python=python.value,
                          edgekit_wheel=edgekit_wheel, rebuild=rebuild, serve=settings_from_flags(flags))
    with status(f"packing for {board.id}") as progress:
        result = make_pack(request, kit_paths(), progress)
    manifest = result.manifest
    summary = {
        "pack": str(result.out_dir), "archive": str(result.archive), "pack_id": manifest.pack_id, "device": board.id,
        "target": manifest.target.name, "cpu_features": list(manifest.target.cpu_features), "python": manifest.python,
        "glibc_min": manifest.glibc_min, "versions": manifest.versions.model_dump(),
        "bytes": {"wheels": manifest.wheel_bytes, "llama_cpp_python_wheel": result.llama_wheel_bytes,
                  "bundles": manifest.bundle_bytes, "total": manifest.total_bytes, "archive": result.archive_bytes},
        "seconds": {"pack": manifest.build.pack_seconds, "llama_build": manifest.build.llama_build_seconds},
        "llama_build_cached": manifest.build.llama_build_cached,
    }
    if as_json:
        emit_json(summary)
        return
    table = Table("", "", title=f"pack {manifest.pack_id}", show_header=False)
    table.add_row("board", f"{board.id} ({board.name})")
    needs = ", ".join(manifest.target.cpu_features) or "nothing extra"
    table.add_row("llama.cpp build", f"{manifest.target.name}, needs {needs}")
    table.add_row("Python / glibc", f"{manifest.python} / {manifest.glibc_min} or newer")
    table.add_row("wheels", f"{manifest.wheel_bytes / MIB:.1f} MiB (llama-cpp-python {result.llama_wheel_bytes / MIB:.1f} MiB)")
    table.add_row("bundles", f"{manifest.bundle_bytes / MIB:.1f} MiB: {', '.join(b.name for b in manifest.bundles)}")
    service = manifest.service
    turns = "all loaded at once" if service.together else "taking turns"
    table.add_row("service", f"{service.unit}: {service.memory_budget_mb} MiB for models ({turns}), {service.threads} threads")
    table.add_row("archive", f"{result.archive} ({result.archive_bytes / MIB:.1f} MiB)")
    cached = "cached" if manifest.build.llama_build_cached else "built now"
    table.add_row("time", f"{manifest.build.pack_seconds:.0f} s (llama-cpp-python {cached}, "
                          f"{manifest.build.llama_build_seconds:.0f} s to build)")
    table.add_row("on the board", f"sha256sum -c {result.archive.name}.sha256 && tar xzf {result.archive.name} && "
                                  f"sudo ./{result.out_dir.name}/install.sh [--prefix {DEFAULT_PREFIX}]")
    out.print(table)
