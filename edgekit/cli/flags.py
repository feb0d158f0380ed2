"""Checks of flag values shared by the commands: settings built from flags, and output files."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from edgekit.errors import ConfigError

Settings = TypeVar("Settings", bound=BaseModel)

# pydantic keeps a field's ge/gt/le/lt as metadata objects carrying an attribute of that name.
_BOUND_WORDS = (("ge", "at least"), ("gt", "greater than"), ("le", "at most"), ("lt", "less than"))
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def allowed_range(model: type[BaseModel], field: str) -> str | None:
    """The declared bounds of a numeric field in words, e.g. 'at least 0 and less than 1'; None when it has none."""
    info = model.model_fields.get(field)
    if info is None:
        return None
    words = [f"{word} {getattr(bound, attr)}" for bound in info.metadata
             for attr, word in _BOUND_WORDS if getattr(bound, attr, None) is not None]
    return " and ".join(words) or None


def build_settings(model: type[Settings], values: dict[str, Any], flag_of: dict[str, str] | None = None) -> Settings:
    """``model(**values)``; a validation error becomes a ConfigError (exit 2) naming each flag, its value and its allowed range.

    ``flag_of`` maps a field name to the flag that sets it; by default the field ``n_ctx`` is ``--n-ctx``.
    """
    flag_of = flag_of or {}
    try:
        return model(**values)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            flag = flag_of.get(field, f"--{field.replace('_', '-')}")
            bounds = allowed_range(model, field)
            reason = f"must be {bounds}" if bounds and error["type"] in _RANGE_ERRORS else error["msg"]
            given = f" {error['input']}" if "input" in error and not isinstance(error["input"], dict) else ""
            lines.append(f"{flag}{given}: {reason}")
        raise ConfigError("; ".join(lines)) from None


def output_file(path: Path | None, flag: str) -> Path | None:
    """Check, before any work, that ``path`` can be written as a file: not a folder, its folder exists (never created)."""
    if path is None:
        return None
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; a file path is expected", hint="give a file path (its folder must exist)")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} {path}: folder {path.parent} does not exist",
                          hint=f"create it first (mkdir -p {path.parent}) or pick another path")
    return path


def did_you_mean(name: str, known: list[str], otherwise: str = "") -> str:
    """A fix line naming the closest known name (difflib), or ``otherwise``."""
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean '{close[0]}'?" if close else otherwise
