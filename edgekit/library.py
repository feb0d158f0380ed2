"""Where the shipped device catalog (devices/) and recipe library (recipes/) are.

The repository keeps both at its top level, their single source. A built wheel carries them inside
the package as ``edgekit/shipped/devices`` and ``edgekit/shipped/recipes`` (see pyproject.toml), so an
installed edgekit needs no checkout. Recipes name their data files relative to the recipe, so
``recipes/data`` travels with them and resolves the same way in both places.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_DIR = PACKAGE_DIR / "shipped"

ShippedFolder = Literal["devices", "recipes"]


def shipped_folder(name: ShippedFolder) -> Path:
    """The installed package's copy of ``name`` if there is one, else the checkout's top-level folder."""
    installed = SHIPPED_DIR / name
    if installed.is_dir():
        return installed
    checkout = PACKAGE_DIR.parent / name
    if checkout.is_dir():
        return checkout
    # Neither exists (a broken install): name the path the wheel should have, for the error message.
    return installed
