"""Will a model fit a board? Peak RAM, disk and speed from metadata only, with a verdict CI can gate on.

Pure: imports the schemas and nothing heavy, never opens a model file. Entry points:
``fit(manifest_or_facts, device, settings) -> FitReport`` and, before any download,
``from_recipe(recipe, target)`` to get the facts of a recipe target.
"""

from edgekit.fit.estimate import Check, FitReport, FitSettings, fit
from edgekit.fit.facts import ModelFacts, from_manifest, from_recipe
from edgekit.fit.memory import MemoryEstimate, RunSettings, estimate_memory, kv_cache_bytes

__all__ = [
    "Check",
    "FitReport",
    "FitSettings",
    "MemoryEstimate",
    "ModelFacts",
    "RunSettings",
    "estimate_memory",
    "fit",
    "from_manifest",
    "from_recipe",
    "kv_cache_bytes",
]
