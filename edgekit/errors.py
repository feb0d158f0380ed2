"""The one error tree of edgekit.

Every failure a user can fix or must know about is an ``EdgekitError``; each child carries
the exit code the CLI returns for it. Backend exceptions (onnxruntime, llama.cpp, optimum,
huggingface_hub) are translated into these at the boundary where they are raised; bugs are
not caught and surface as tracebacks.
"""

from __future__ import annotations


class EdgekitError(Exception):
    """Base of every error edgekit reports to a user."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message


class ConfigError(EdgekitError):
    """A recipe, device profile, manifest or setting is invalid (exit 2)."""


class RecipeError(ConfigError):
    """A recipe file is invalid or names something that cannot be used."""


class DeviceError(ConfigError):
    """A device profile is invalid or unknown."""


class SourceError(EdgekitError):
    """A model source cannot be resolved or is unsafe to load (exit 2)."""


class GateFailed(EdgekitError):
    """An export or fit check ran and a gate failed (exit 1)."""

    exit_code = 1


class BackendError(EdgekitError):
    """A backend (optimum, onnxruntime, llama.cpp, pip) failed (exit 3)."""

    exit_code = 3


class ExportError(BackendError):
    """Turning a recipe into a bundle failed."""


class BundleError(EdgekitError):
    """A bundle is missing, tampered with or unsafe; it is never loaded (exit 1)."""

    exit_code = 1


class RuntimeBackendError(BackendError):
    """A model failed while loading or running on the board side."""
