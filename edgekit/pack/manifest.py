"""Pack manifest (``pack.json``): every file of an offline installer with its sha256, and what the pack is for.

install.sh checks the files against it before anything is written on the board (``board/pack_check.py``
reads it with the standard library only, since it runs before edgekit is installed).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from edgekit.schema.device import Device
from edgekit.schema.loading import Strict
from edgekit.schema.manifest import FileEntry

PACK_MANIFEST_NAME = "pack.json"
PACK_SCHEMA_VERSION = 1


class TargetRecord(Strict):
    """The instruction-set family llama.cpp was built for, and what a CPU needs to run it."""

    name: str = Field(description="Build target (edgekit.pack.targets), e.g. 'armv8.2-a-dotprod'.")
    machine: Literal["aarch64", "x86_64"] = Field(description="Machine architecture (uname -m).")
    cpu_features: dict[str, str] = Field(
        description="Linux CPU feature names (/proc/cpuinfo) the build uses -> what each is; install.sh refuses a CPU "
        "lacking one."
    )
    cmake_args: list[str] = Field(description="CMake options llama-cpp-python was built with.")


class BundleRecord(Strict):
    """One verified bundle in the pack."""

    name: str = Field(description="Bundle name (its folder under bundles/).")
    format: str = Field(description="Bundle format (gguf, onnx).")
    task: str = Field(description="What the model does (text-generation, feature-extraction, ...).")
    bytes: int = Field(ge=0, description="Size of the bundle's files.")


class Versions(Strict):
    """Versions of the packages that decide what runs on the board."""

    edgekit: str
    llama_cpp_python: str
    onnxruntime: str


class ServiceRecord(Strict):
    """The systemd unit the pack installs, sized for the board."""

    unit: str = Field(description="The unit file in the pack; install.sh puts the install prefix in place of @PREFIX@.")
    memory_budget_mb: int = Field(ge=16, description="Memory for loaded models, MiB (the daemon's --memory-budget-mb).")
    threads: int = Field(ge=1, description="CPU threads per model worker (default: the board's inference cores).")
    together: bool = Field(description="Whether every bundle fits in the budget at once (else they take turns).")


class BuildRecord(Strict):
    """How and when the pack was made."""

    created: datetime = Field(description="When the pack was assembled (UTC).")
    pack_seconds: float = Field(ge=0, description="Wall time of `edgekit pack`, seconds.")
    llama_build_seconds: float = Field(ge=0, description="Wall time of the llama-cpp-python build (the first one when cached).")
    llama_build_cached: bool = Field(description="True when the llama-cpp-python wheel came from the build cache.")
    host: str = Field(description="Workstation the pack was made on (uname -m, Python).")


class PackManifest(Strict):
    """pack.json: an offline installer of edgekit and bundles for one board."""

    schema_version: Literal[1] = Field(PACK_SCHEMA_VERSION, description="Version of this schema.")
    pack_id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$",
                         description="<device>-cp<python>-<hash of the file list>; names the release on the board.")
    device: Device = Field(description="The board's device profile (also in device.yaml).")
    target: TargetRecord = Field(description="The llama.cpp build target chosen from the profile.")
    python: str = Field(pattern=r"^3\.\d+$", description="Python (major.minor) of the board's python3 the wheels are for.")
    platform_tags: list[str] = Field(description="Wheel platform tags the wheelhouse was resolved for (pip --platform).")
    glibc_min: str = Field(description="Oldest C library (glibc) the wheels need.")
    versions: Versions = Field(description="Versions of edgekit, llama-cpp-python and onnxruntime.")
    requirement: str = Field(description="What install.sh installs from wheels/ (pip --no-index).")
    bundles: list[BundleRecord] = Field(description="Bundles under bundles/.")
    service: ServiceRecord = Field(description="The systemd unit and how it is sized.")
    build: BuildRecord = Field(description="When and how the pack was built.")
    files: list[FileEntry] = Field(description="Every file of the pack except pack.json, sorted by path.")

    @property
    def wheel_bytes(self) -> int:
        return sum(f.bytes for f in self.files if f.path.startswith("wheels/"))

    @property
    def bundle_bytes(self) -> int:
        return sum(f.bytes for f in self.files if f.path.startswith("bundles/"))

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)
