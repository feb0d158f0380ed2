"""Pydantic schemas of edgekit's files. Import nothing heavy here: the board and CI read these."""

from edgekit.schema.device import Device, KernelCatalog, load_device
from edgekit.schema.loading import load_yaml_model
from edgekit.schema.manifest import FileEntry, GateResult, Manifest, RuntimeConfig
from edgekit.schema.recipe import GgufTarget, OnnxTarget, Recipe, load_recipe

__all__ = [
    "Device",
    "FileEntry",
    "GateResult",
    "GgufTarget",
    "Manifest",
    "OnnxTarget",
    "Recipe",
    "RuntimeConfig",
    "load_device",
    "load_recipe",
    "load_yaml_model",
]


def generated_schemas() -> dict[str, dict]:
    """JSON Schemas checked into the repo, by path relative to the repo root (regenerate: scripts/generate_schemas.py)."""
    return {
        "recipes/recipe.schema.json": Recipe.model_json_schema(),
        "recipes/manifest.schema.json": Manifest.model_json_schema(),
        "devices/device.schema.json": Device.model_json_schema(),
        "devices/kernels/prompt.schema.json": KernelCatalog.model_json_schema(),
    }
