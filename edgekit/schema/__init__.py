"""Pydantic schemas of edgekit's files. Import nothing heavy here: the board and CI read these.

The names below load their module on first use, so a model worker reading a manifest does not build the recipe and
device schemas as well.
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and the module under edgekit.schema that defines it.
_HOMES = {
    "Device": "device", "KernelCatalog": "device", "load_device": "device",
    "load_yaml_model": "loading",
    "FileEntry": "manifest", "GateResult": "manifest", "Manifest": "manifest", "RuntimeConfig": "manifest",
    "GgufTarget": "recipe", "OnnxTarget": "recipe", "Recipe": "recipe", "load_recipe": "recipe",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def generated_schemas() -> dict[str, dict]:
    """JSON Schemas checked into the repo, by path relative to the repo root (regenerate: scripts/generate_schemas.py)."""
    from edgekit.schema.device import Device, KernelCatalog
    from edgekit.schema.manifest import Manifest
    from edgekit.schema.recipe import Recipe

    return {
        "recipes/recipe.schema.json": Recipe.model_json_schema(),
        "recipes/manifest.schema.json": Manifest.model_json_schema(),
        "devices/device.schema.json": Device.model_json_schema(),
        "devices/kernels/prompt.schema.json": KernelCatalog.model_json_schema(),
    }
