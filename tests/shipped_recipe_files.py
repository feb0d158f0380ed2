"""Print every file a shipped recipe names (validation and calibration texts) as JSON: by recipe file and field
path, whether it lies inside the shipped recipe folder, and its size. tests/test_install.py runs it inside an
installed venv and in the checkout; the two answers must be equal apart from where the files are.
"""

import json
import sys
from pathlib import Path

from edgekit.library import shipped_folder
from edgekit.schema.recipe import load_recipe


def paths(value, where=""):
    """(field path, Path) for every path in a dumped recipe."""
    if isinstance(value, Path):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, f"{where}[{index}]")


if __name__ == "__main__":
    folder = shipped_folder("recipes")
    found = {}
    for path in sorted(folder.glob("*.yaml")):
        loaded = load_recipe(path)
        for field, relative in paths(loaded.recipe.model_dump()):
            resolved = loaded.resolve(relative)
            found[f"{path.name}:{field}"] = {"inside": resolved.is_relative_to(folder),
                                             "bytes": resolved.stat().st_size if resolved.is_file() else None}
    json.dump({"folder": str(folder), "files": found}, sys.stdout)
