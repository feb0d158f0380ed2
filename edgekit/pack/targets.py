"""Build targets: the instruction-set families llama.cpp is compiled for, one row each, and how a board picks one.

A board's device profile says which SIMD features its cores have (``cpu.isa``); the pack takes the
first row of ``TARGETS`` for the board's machine whose ``isa`` flags the profile all sets (rows are
ordered most capable first). ``cpu_features`` are the names the Linux kernel reports for the same
features (``/proc/cpuinfo``, ``AT_HWCAP``), described in ``edgekit.runtime.cpu``, which install.sh runs
from the packed wheel to refuse a CPU that lacks one of them (a build that uses them dies with SIGILL there). A new family (say Armv8.6 with i8mm) is one row.
"""

from __future__ import annotations

import platform as host_platform
from dataclasses import dataclass

from edgekit.errors import DeviceError
from edgekit.runtime.cpu import FEATURE_DESCRIPTIONS
from edgekit.schema.device import Device, IsaFeatures


@dataclass(frozen=True)
class Platform:
    """A machine architecture the pack can target: toolchain, wheel tags, Debian packages."""

    machine: str  # uname -m of the board
    gnu_triplet: str  # prefix of Debian's cross tools (gcc, g++, strip)
    cross_packages: tuple[str, ...]  # Debian packages with those cross compilers

    @property
    def wheel_platform(self) -> str:
        """Tag of the llama-cpp-python wheel built here (a plain linux tag: it is not audited as manylinux)."""
        return f"linux_{self.machine}"

    def pip_platforms(self, glibc: tuple[int, int]) -> list[str]:
        """Every wheel platform tag a board with this glibc accepts, newest first (pip --platform, repeated)."""
        major, minor = glibc
        tags = [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, 16, -1)]
        return [*tags, f"manylinux2014_{self.machine}", self.wheel_platform]


PLATFORMS: dict[str, Platform] = {
    "aarch64": Platform("aarch64", "aarch64-linux-gnu", ("gcc-aarch64-linux-gnu", "g++-aarch64-linux-gnu")),
    "x86_64": Platform("x86_64", "x86_64-linux-gnu", ("gcc-x86-64-linux-gnu", "g++-x86-64-linux-gnu")),
}

# The oldest C library the pack's wheels may need: Debian 12 "bookworm" (and Raspberry Pi OS built on
# it) ships glibc 2.36, Debian 13 "trixie" 2.41.
BOARD_GLIBC: tuple[int, int] = (2, 36)

# CMake options every build shares: portable (no -march=native), OpenMP threads, only the library
# llama-cpp-python loads (no HTTPS client, tools, examples, tests, server or multimodal library).
COMMON_CMAKE: dict[str, str] = {
    "GGML_NATIVE": "OFF",
    "GGML_OPENMP": "ON",
    "GGML_BACKEND_DL": "OFF",
    "GGML_CCACHE": "OFF",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_TOOLS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_SERVER": "OFF",
    "LLAVA_BUILD": "OFF",
}

_X86_OFF = {name: "OFF" for name in ("GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2",
                                     "GGML_AVX_VNNI", "GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16")}


@dataclass(frozen=True)
class BuildTarget:
    """One instruction-set family llama.cpp is compiled for."""

    name: str
    machine: str
    isa: tuple[str, ...]  # IsaFeatures fields a board's profile must set to take this target
    cpu_features: tuple[str, ...]  # kernel names of the features the build's code uses
    cmake: dict[str, str]  # ggml options selecting the instruction set
    boards: str  # which cores it is for, in words

    @property
    def platform(self) -> Platform:
        return PLATFORMS[self.machine]

    @property
    def cmake_args(self) -> list[str]:
        return [f"-D{k}={v}" for k, v in {**COMMON_CMAKE, **self.cmake}.items()]

    def supports(self, isa: IsaFeatures) -> bool:
        return all(getattr(isa, flag) for flag in self.isa)

    def describe_features(self) -> dict[str, str]:
        return {name: FEATURE_DESCRIPTIONS[name] for name in self.cpu_features}


# Most capable first within a machine; a board takes the first row it supports.
TARGETS: tuple[BuildTarget, ...] = (
    BuildTarget("armv8.2-a-dotprod", "aarch64", ("neon", "dotprod", "fp16"), ("asimd", "asimddp", "fphp", "asimdhp"),
                {"GGML_CPU_ARM_ARCH": "armv8.2-a+dotprod+fp16"}, "Cortex-A55/A76/A78 (Raspberry Pi 5, RK3588)"),
    BuildTarget("armv8-a", "aarch64", ("neon",), ("asimd",),
                {"GGML_CPU_ARM_ARCH": "armv8-a"}, "Cortex-A53/A72 (Raspberry Pi 3/4/Zero 2 W) and every 64-bit Arm core"),
    BuildTarget("x86-64-v3", "x86_64", ("avx2",), ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"),
                {**_X86_OFF, "GGML_SSE42": "ON", "GGML_AVX": "ON", "GGML_AVX2": "ON", "GGML_FMA": "ON", "GGML_F16C": "ON",
                 "GGML_BMI2": "ON"}, "Haswell and later, Zen, Gracemont (Intel N100)"),
    BuildTarget("x86-64", "x86_64", (), (), dict(_X86_OFF), "any x86-64 CPU (SSE2 only)"),
)
TARGETS_BY_NAME: dict[str, BuildTarget] = {t.name: t for t in TARGETS}


def select_target(device: Device) -> BuildTarget:
    """The most capable target the board's profile supports."""
    for target in TARGETS:
        if target.machine == device.cpu.arch and target.supports(device.cpu.isa):
            return target
    machines = sorted({t.machine for t in TARGETS})
    raise DeviceError(f"device {device.id}: no build target for {device.cpu.arch} (cpu.arch)",
                      hint=f"edgekit packs for {', '.join(machines)} boards")


def host_machine() -> str:
    """uname -m of this workstation."""
    return host_platform.machine()
