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


# Shell completion of names (typer calls these with what the user has typed so far).

def complete_device(incomplete: str) -> list[str]:
    """Device ids of the shipped catalog."""
    from edgekit.library import shipped_folder

    return sorted(p.stem for p in shipped_folder("devices").glob("*.yaml") if p.stem.startswith(incomplete))


def complete_recipe(incomplete: str) -> list[str]:
    """Recipe names of the shipped library."""
    from edgekit.library import shipped_folder

    return sorted(p.stem for p in shipped_folder("recipes").glob("*.yaml") if p.stem.startswith(incomplete))


def complete_bundle(incomplete: str) -> list[str]:
    """Bundle names under $EDGEKIT_HOME/bundles."""
    from edgekit.paths import kit_paths

    folder = kit_paths().bundles
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "manifest.json").is_file() and p.name.startswith(incomplete))


def load_board(ref: str, catalog: Path | None = None):
    """``load_device``, with a did-you-mean when an id is not in the catalog."""
    from edgekit.errors import DeviceError
    from edgekit.schema.device import default_device_dir, load_device

    directory = Path(catalog) if catalog is not None else default_device_dir()
    is_file = Path(ref).suffix in (".yaml", ".yml", ".json") and Path(ref).exists()
    if not is_file and directory.is_dir() and not (directory / f"{ref}.yaml").is_file():
        known = sorted(p.stem for p in directory.glob("*.yaml"))
        close = did_you_mean(ref, known)
        if close:
            raise DeviceError(f"unknown device '{ref}'", hint=f"{close} (`edgekit devices list` shows the catalog)")
    return load_device(ref, catalog)
