"""Where the shipped device catalog (devices/) and recipe library (recipes/) are, and how a name given
on the command line becomes a recipe file or a bundle folder.

The repository keeps both at its top level, their single source. A built wheel carries them inside
the package as ``edgekit/shipped/devices`` and ``edgekit/shipped/recipes`` (see pyproject.toml), so an
installed edgekit needs no checkout. Recipes name their data files relative to the recipe, so
``recipes/data`` travels with them and resolves the same way in both places.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

from edgekit.errors import ConfigError

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


def _did_you_mean(name: str, known: list[str], otherwise: str) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean '{close[0]}'?" if close else otherwise


def _is_bare_name(ref: str) -> bool:
    return Path(ref).name == ref and ref not in (".", "..")


def resolve_recipe(ref: str | Path) -> Path:
    """A recipe file from a path, or from a name of the packaged library (as `edgekit recipes list` shows it)."""
    path = Path(ref)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"{ref}: is a folder; a recipe file is expected", hint="pass a recipe .yaml file or a recipe name")
    library = shipped_folder("recipes")
    known = sorted(p.stem for p in library.glob("*.yaml"))
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if _is_bare_name(str(ref)) and name in known:
        return library / f"{name}.yaml"
    raise ConfigError(f"{ref}: no such recipe file, nor a recipe named so in {library}",
                      hint=_did_you_mean(name, known, "`edgekit recipes list` shows the library's recipe names"))


def resolve_bundle(ref: str | Path) -> Path:
    """A bundle folder from a path (the folder or its manifest.json), or from a bundle name under $EDGEKIT_HOME/bundles."""
    from edgekit.paths import kit_paths

    path = Path(ref)
    if path.is_dir():
        return path
    if path.is_file():
        if path.name == "manifest.json":
            return path.parent
        if path.suffix in (".yaml", ".yml"):
            raise ConfigError(f"{ref}: is a recipe, not a bundle", hint=f"for a recipe, use `edgekit fit --recipe {ref}`")
        raise ConfigError(f"{ref}: is a file, not a bundle folder", hint="pass the bundle's folder")
    bundles = kit_paths().bundles
    if _is_bare_name(str(ref)) and (bundles / path).is_dir():
        return bundles / path
    known = sorted(p.name for p in bundles.iterdir() if p.is_dir()) if bundles.is_dir() else []
    raise ConfigError(f"{ref}: no such bundle (no such folder, nor a bundle named so in {bundles})",
                      hint=_did_you_mean(path.name, known, "pass a bundle folder or a name that `edgekit bundles` lists"))
