"""Device profile: what one board offers a model (CPU, RAM, bandwidth, storage) and how fast it measured.

Every specification block carries where it comes from: a ``source`` (URL or citation) or
``estimate: true`` with a note on how the figure was derived. Calibration points are published
(or locally measured) speeds of real models on the board; ``edgekit fit`` scales its roofline
prediction by them.
"""

from __future__ import annotations

import datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from edgekit.errors import DeviceError
from edgekit.library import shipped_folder
from edgekit.schema.loading import Strict, load_yaml_model

DeviceId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=64)]
MIB = 1 << 20
# Microarchitectures a profile may name, with the machine architectures they run. The speed model keeps its
# per-core figures under the same names (edgekit.fit.speed.CORE_TYPES; a test holds the two equal), so an
# unknown core is refused when the profile loads rather than failing inside the estimator.
CORE_TYPES: dict[str, tuple[str, ...]] = {
    "cortex-a53": ("aarch64", "armv7l"),
    "cortex-a72": ("aarch64", "armv7l"),
    "cortex-a76": ("aarch64",),
    "cortex-a78ae": ("aarch64",),
    "gracemont": ("x86_64",),
    "x86-64-v3": ("x86_64",),
}
CoreTypeName = Literal[tuple(CORE_TYPES)]
# Instruction-set flags by the machine architectures that can have them.
ARM_FLAGS = ("neon", "dotprod", "i8mm", "fp16")
X86_FLAGS = ("avx2", "avx_vnni", "avx512_vnni")


class Provenance(Strict):
    """Where a specification block comes from; one of ``source`` or ``estimate: true`` is required."""

    source: str | None = Field(None, description="URL or citation the figures in this block come from.")
    estimate: bool = Field(False, description="True when the figures are derived or guessed rather than published.")
    note: str = Field("", description="How an estimate was derived, or what the source measured exactly.")

    @model_validator(mode="after")
    def _sourced_or_estimated(self):
        if not self.source and not self.estimate:
            raise ValueError("give a 'source' (URL or citation) or mark the figures 'estimate: true' with a note")
        if self.estimate and not (self.note or self.source):
            raise ValueError("an estimate needs a 'note' saying how it was derived")
        return self


class IsaFeatures(Strict):
    """Instruction-set features the inference kernels (ggml, onnxruntime MLAS) pick their fast paths by."""

    neon: bool = Field(False, description="Arm Advanced SIMD (asimd).")
    dotprod: bool = Field(False, description="Arm int8 dot product (SDOT/UDOT, asimddp); 4x int8 MACs per lane.")
    i8mm: bool = Field(False, description="Arm int8 matrix multiply (SMMLA).")
    fp16: bool = Field(False, description="Arm half-precision arithmetic (asimdhp / fphp).")
    avx2: bool = Field(False, description="x86 AVX2 + FMA (256-bit integer and float SIMD).")
    avx_vnni: bool = Field(False, description="x86 AVX-VNNI (256-bit int8 dot product, e.g. Gracemont, Alder Lake).")
    avx512_vnni: bool = Field(False, description="x86 AVX-512 VNNI (512-bit int8 dot product).")


class CoreClusterSpec(Strict):
    """Physical cores of one speed, as the kernel reports them (big.LITTLE SoCs have two or three clusters)."""

    cpus: list[int] = Field(min_length=1, description="Logical CPU numbers, one per physical core.")
    capacity: int = Field(ge=0, description="Relative speed: sysfs cpu_capacity (1024 = fastest), else cpufreq max kHz; 0 unknown.")


class CpuSpec(Provenance):
    """The CPU cores inference runs on."""

    arch: Literal["aarch64", "armv7l", "x86_64"] = Field(description="Machine architecture (uname -m).")
    cores: int = Field(ge=1, le=256, description="Cores used for inference (the big cores on big.LITTLE SoCs).")
    core_type: CoreTypeName = Field(description="Microarchitecture of those cores (the speed model's per-core figures).")
    clock_ghz: float = Field(gt=0, le=6, description="Sustained clock of those cores in GHz.")
    isa: IsaFeatures = Field(description="SIMD features of those cores.")
    clusters: list[CoreClusterSpec] = Field(
        default_factory=list, description="Core clusters, fastest first, when measured (edgekit profile-host); 'cores' "
        "counts the first. The daemon pins its workers to the fastest cores of the board it runs on.")

    @model_validator(mode="after")
    def _core_and_isa_fit_arch(self) -> CpuSpec:
        if self.arch not in CORE_TYPES[self.core_type]:
            raise ValueError(f"core_type {self.core_type} is not an {self.arch} core (it runs {', '.join(CORE_TYPES[self.core_type])})")
        foreign = X86_FLAGS if self.arch != "x86_64" else ARM_FLAGS
        wrong = [flag for flag in foreign if getattr(self.isa, flag)]
        if wrong:
            raise ValueError(f"isa flags {', '.join(wrong)} do not exist on {self.arch}")
        return self


class MemorySpec(Provenance):
    """RAM and how much of it a model may use."""

    total_mib: int = Field(ge=64, description="Installed RAM in MiB (2^20 bytes; a '4 GB' board has 4096).")
    os_reserved_mib: int = Field(
        ge=0,
        description="RAM the OS, firmware and GPU carve-out keep on a headless install, in MiB; "
        "usable RAM for models is total_mib - os_reserved_mib.",
    )
    kind: str = Field("", description="Memory technology and bus, e.g. 'LPDDR4X-4267, 32-bit'.")

    @model_validator(mode="after")
    def _reserve_below_total(self) -> MemorySpec:
        if self.os_reserved_mib >= self.total_mib:
            raise ValueError(f"os_reserved_mib ({self.os_reserved_mib}) must be below total_mib ({self.total_mib})")
        return self


class BandwidthSpec(Provenance):
    """Sustained memory bandwidth, as a STREAM-like copy test measures it with all cores."""

    gb_s: float = Field(gt=0, le=2000, description="Sustained bandwidth in GB/s (10^9 bytes/s, read + write counted).")


class StorageSpec(Provenance):
    """Where bundles live on the board; decides cold-load time."""

    kind: Literal["microsd", "emmc", "nvme", "sata-ssd", "usb-ssd", "unknown"] = Field(description="Storage technology.")
    read_mb_s: float = Field(gt=0, description="Sequential read speed in MB/s.")


class CalibrationPoint(Strict):
    """A measured speed of a real model on this board, with where it was published."""

    model: str = Field(description="Model measured, e.g. 'TinyLlama 1.1B'.")
    format: Literal["gguf", "onnx"] = Field("gguf", description="Bundle format (engine family) of the measurement.")
    quant: str = Field(description="Weight type: llama.cpp type (Q8_0, Q4_K_M, F16) or ONNX quantization (int8, fp32).")
    parameters: int = Field(ge=1, description="Parameter count of the model (from its config), for the roofline.")
    weights_bytes: int | None = Field(None, ge=1, description="Size of the weights file when published; default: parameters x bits per weight.")
    n_layer: int | None = Field(None, ge=1, description="Transformer blocks, when known (per-token overhead term).")
    hidden_size: int | None = Field(
        None, ge=1, description="Embedding width. Encoders: the matrix work per token is then 12 x n_layer x hidden_size^2; "
        "GGUF: rows that do not divide into the quant's blocks fall back to llama.cpp's fallback type."
    )
    prompt_tok_s: float | None = Field(None, gt=0, description="Prompt processing speed, tokens/s.")
    prompt_tokens: int = Field(512, ge=1, description="Prompt length prompt_tok_s was measured over, in one batch "
                               "(llama-bench's pp512 by default).")
    decode_tok_s: float | None = Field(None, gt=0, description="Generation speed, tokens/s.")
    latency_ms: float | None = Field(None, gt=0, description="Encoder: batch-1 latency of one short input, ms.")
    seq_len: int | None = Field(None, ge=1, description="Encoder: tokens in the measured input.")
    threads: int | None = Field(None, ge=1, description="Threads used, when published.")
    context_tokens: int = Field(
        0, ge=0, description="Decode: tokens already in the context while decode_tok_s was measured (llama-bench's "
        "depth). 0 for a short prompt; a deeper point calibrates the board's attention cost per token of context "
        "and needs the attention shape (n_layer, n_head, n_head_kv, head_dim)."
    )
    n_head: int | None = Field(None, ge=1, description="Attention heads (query), for a point with context_tokens.")
    n_head_kv: int | None = Field(None, ge=1, description="Key/value heads, for a point with context_tokens.")
    head_dim: int | None = Field(None, ge=1, description="Width of one head, for a point with context_tokens.")
    engine: str = Field("llama.cpp", description="Engine that measured it (llama.cpp, ollama, llamafile, onnxruntime).")
    build: str = Field("", description="The engine build as the source states it (llama.cpp 'b7365 (26ef6770d)', a PR, a date).")
    build_date: datetime.date | None = Field(
        None, description="When that build was made or published. Prompt points older than their kernel family's "
        "kernels_since (devices/kernels/prompt.yaml) ran other matrix kernels and do not calibrate prompt speed.")
    measured_on: str = Field(description="The exact board the source measured (variant, RAM).")
    source: str = Field(min_length=4, description="URL or citation of the measurement.")
    note: str = Field("", description="Anything that qualifies the number (cooling, OS, swap).")

    @model_validator(mode="after")
    def _has_a_speed(self) -> CalibrationPoint:
        if self.prompt_tok_s is None and self.decode_tok_s is None and self.latency_ms is None:
            raise ValueError("a calibration point needs prompt_tok_s, decode_tok_s or latency_ms")
        if self.latency_ms is not None and self.seq_len is None:
            raise ValueError("latency_ms needs seq_len (tokens in the measured input)")
        if self.context_tokens:
            missing = [f for f in ("decode_tok_s", "n_layer", "n_head", "n_head_kv", "head_dim") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"context_tokens needs {', '.join(missing)}")
        return self


class Device(Strict):
    """One board of the device catalog (devices/<id>.yaml)."""

    id: DeviceId = Field(description="Catalog id, equal to the file name without .yaml, e.g. 'rpi-5-8gb'.")
    name: str = Field(description="Human name of the board and variant.")
    description: str = Field("", description="What the board is, in a sentence.")
    cpu: CpuSpec = Field(description="Cores used for inference.")
    memory: MemorySpec = Field(description="RAM and the share the OS keeps.")
    memory_bandwidth: BandwidthSpec = Field(description="Sustained memory bandwidth.")
    storage: StorageSpec = Field(description="Where bundles are read from.")
    calibration: list[CalibrationPoint] = Field(default_factory=list, description="Measured speeds of real models on this board.")

    @property
    def usable_ram_bytes(self) -> int:
        """RAM a model may use: installed minus what the OS keeps."""
        return (self.memory.total_mib - self.memory.os_reserved_mib) * MIB

    @property
    def total_ram_bytes(self) -> int:
        return self.memory.total_mib * MIB


def default_device_dir() -> Path:
    """The shipped catalog: inside the installed package, or devices/ of a source checkout."""
    return shipped_folder("devices")


def load_device_file(path: Path) -> Device:
    """Load one profile; errors name the file and the field. The id must equal the file name."""
    path = Path(path)
    device = load_yaml_model(path, Device, DeviceError)
    if path.suffix in (".yaml", ".yml") and device.id != path.stem:
        raise DeviceError(f"{path}: id: '{device.id}' differs from the file name '{path.stem}'",
                          hint=f"rename the file to {device.id}{path.suffix} or set id: {path.stem}")
    return device


def load_catalog(directory: Path | None = None) -> dict[str, Device]:
    """Every profile in ``directory`` (default: the shipped catalog), by id."""
    directory = Path(directory) if directory is not None else default_device_dir()
    if not directory.is_dir():
        raise DeviceError(f"{directory}: device catalog folder not found", hint="pass --catalog DIR")
    return {device.id: device for device in map(load_device_file, sorted(directory.glob("*.yaml")))}


def load_device(ref: str | Path, directory: Path | None = None) -> Device:
    """A device by catalog id, or by the path of a profile file (e.g. one written by `edgekit profile-host`)."""
    as_path = Path(ref)
    if as_path.suffix in (".yaml", ".yml", ".json") and as_path.exists():
        return load_device_file(as_path)
    directory = Path(directory) if directory is not None else default_device_dir()
    path = directory / f"{ref}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []
        raise DeviceError(f"unknown device '{ref}'", hint=f"known devices: {', '.join(known) or 'none'}; or pass a profile file")
    return load_device_file(path)


# -- kernel families: what ggml-cpu's matrix-matrix kernels reach on each instruction set --------------------

KernelFamilyName = Literal["neon", "neon-dotprod", "avx2"]


class PromptKernel(Provenance):
    """Share of a core's peak multiply-accumulate rate ggml-cpu's prompt (matrix-matrix) kernels reach for some weight types."""

    types: list[str] = Field(min_length=1, description="ggml weight types (Q4_K, Q8_0, F16, ...) these kernels multiply.")
    efficiency: float = Field(gt=0, le=1, description="Sustained share of the core's peak: int8 dot products for "
                              "quantized types, fp32 FMA for F16/BF16/F32 (edgekit.fit.speed.CORE_TYPES).")


class KernelFamily(Strict):
    """One instruction-set family of ggml-cpu (the kernels it picks from the ISA flags)."""

    family: KernelFamilyName = Field(description="Kernel family name (edgekit.fit.speed.kernel_family).")
    isa: str = Field(description="Which CPUs run it, in words.")
    kernels_since: datetime.date = Field(description="llama.cpp builds from this date on run the kernels described here; "
                                         "older prompt measurements do not calibrate them.")
    kernels_since_source: str = Field(min_length=4, description="The change that made them the current kernels.")
    prompt: list[PromptKernel] = Field(min_length=1, description="Prompt-kernel efficiency per group of weight types.")

    def efficiency(self, ggml_type: str) -> float:
        """The prompt-kernel efficiency of ``ggml_type``; a type no row names takes the 'default' row's."""
        for row in self.prompt:
            if ggml_type in row.types:
                return row.efficiency
        return next(row.efficiency for row in self.prompt if "default" in row.types)

    @model_validator(mode="after")
    def _has_default(self) -> KernelFamily:
        if not any("default" in row.types for row in self.prompt):
            raise ValueError("one prompt row must list the type 'default' (types it does not name)")
        return self


class KernelCatalog(Strict):
    """devices/kernels/prompt.yaml: every kernel family of the speed model."""

    families: list[KernelFamily] = Field(description="One entry per kernel family.")

    @model_validator(mode="after")
    def _every_family_once(self) -> KernelCatalog:
        names = [f.family for f in self.families]
        missing = set(KernelFamilyName.__args__) - set(names)
        if missing or len(names) != len(set(names)):
            raise ValueError(f"list every kernel family once (missing: {', '.join(sorted(missing)) or 'none'})")
        return self


def default_kernel_file() -> Path:
    return default_device_dir() / "kernels" / "prompt.yaml"


@cache
def load_kernel_families(path: Path | None = None) -> dict[str, KernelFamily]:
    """The kernel families by name (default: the shipped catalog's devices/kernels/prompt.yaml); read once per path."""
    catalog = load_yaml_model(Path(path) if path is not None else default_kernel_file(), KernelCatalog, DeviceError)
    return {f.family: f for f in catalog.families}
