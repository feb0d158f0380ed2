"""Read a YAML or JSON file into a pydantic model, turning validation errors into file:field messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from edgekit.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base of every file schema: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def describe_validation_error(path: Path, error: ValidationError) -> str:
    """One line per problem: ``file: field.path: what is wrong (got value)``."""
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "<top level>"
        got = item.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        if item["type"] == "extra_forbidden":
            lines.append(f"{path}: {where}: unknown key; remove it or check its spelling")
        elif item["type"] == "missing":
            lines.append(f"{path}: {where}: required field is missing")
        else:
            lines.append(f"{path}: {where}: {item['msg']}{shown[:120]}")
    return "\n".join(lines)


def load_yaml_model(path: Path, model: type[M], error: type[ConfigError] = ConfigError) -> M:
    """Parse ``path`` (YAML or JSON) as ``model``; every failure is a ``ConfigError`` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}", hint="check the path") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(describe_validation_error(path, exc), hint=f"see the schema next to {path.name}") from exc
