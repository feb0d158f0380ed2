"""Bundle formats and tasks as registries: the recipe's ``format:`` value is the key of ``FORMATS``.

A format is one module in this package holding a ``FormatSpec``: the recipe target and manifest
facts types, the tasks it serves and, as dotted paths imported only when called, its build,
runtime check, worker runner, fit hooks and measurement. This package imports nothing heavy
(no torch, onnxruntime or llama_cpp), so both the workstation and the board read it.
"""

from __future__ import annotations

from edgekit.formats.spec import FormatSpec, load
from edgekit.formats.tasks import TASKS, TaskSpec, tasks_for, tasks_of


def _registry() -> dict[str, FormatSpec]:
    from edgekit.formats import gguf, onnx

    return {spec.name: spec for spec in (onnx.SPEC, gguf.SPEC)}


# Format name -> spec. Adding a format: a module in this package with a SPEC, and a row here.
FORMATS: dict[str, FormatSpec] = _registry()


def format_spec(name: str) -> FormatSpec:
    """The spec registered under ``name``; KeyError names the known formats."""
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown bundle format {name!r} (known: {', '.join(FORMATS)})") from None


__all__ = ["FORMATS", "TASKS", "FormatSpec", "TaskSpec", "format_spec", "load", "tasks_for", "tasks_of"]
