"""This CPU's instruction-set features, by the names the Linux kernel reports, and what a runtime build needs.

Standard library only: the board installer runs ``python3 -m edgekit.runtime.cpu --require ...`` with the
system Python before anything else is installed. On aarch64 the features come from the auxiliary vector
(``getauxval(AT_HWCAP)`` / ``AT_HWCAP2``), which is what the kernel sets per core, what qemu-user sets per
emulated core, and what llama.cpp's CPU backend reads itself; /proc/cpuinfo ``Features`` is the fallback.
On x86_64 they come from /proc/cpuinfo ``flags``.

``EDGEKIT_CPU_FEATURES`` (comma-separated names) replaces detection, for tests and for checking a pack
against another board's feature list; every message then says the features came from it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

FEATURES_ENV = "EDGEKIT_CPU_FEATURES"
CPUINFO = "/proc/cpuinfo"
EXIT_MISSING = 3  # the CLI's "backend cannot run" code
AT_HWCAP = 16  # include/uapi/linux/auxvec.h
AT_HWCAP2 = 26

# AT_HWCAP bit -> name, as arch/arm64/include/uapi/asm/hwcap.h defines the bits and
# arch/arm64/kernel/cpuinfo.c (hwcap_str) names them in /proc/cpuinfo.
ARM64_HWCAP: dict[int, str] = {
    0: "fp", 1: "asimd", 2: "evtstrm", 3: "aes", 4: "pmull", 5: "sha1", 6: "sha2", 7: "crc32",
    8: "atomics", 9: "fphp", 10: "asimdhp", 11: "cpuid", 12: "asimdrdm", 13: "jscvt", 14: "fcma", 15: "lrcpc",
    16: "dcpop", 17: "sha3", 18: "sm3", 19: "sm4", 20: "asimddp", 21: "sha512", 22: "sve", 23: "asimdfhm",
    24: "dit", 25: "uscat", 26: "ilrcpc", 27: "flagm", 28: "ssbs", 29: "sb", 30: "paca", 31: "pacg",
    32: "gcs",
}
# AT_HWCAP2 bit -> name (same sources).
ARM64_HWCAP2: dict[int, str] = {
    0: "dcpodp", 1: "sve2", 2: "sveaes", 3: "svepmull", 4: "svebitperm", 5: "svesha3", 6: "svesm4", 7: "flagm2",
    8: "frint", 9: "svei8mm", 10: "svef32mm", 11: "svef64mm", 12: "svebf16", 13: "i8mm", 14: "bf16", 15: "dgh",
    16: "rng", 17: "bti", 18: "mte", 19: "ecv", 20: "afp", 21: "rpres", 22: "mte3", 23: "sme",
    24: "smei16i64", 25: "smef64f64", 26: "smei8i32", 27: "smef16f32", 28: "smeb16f32", 29: "smef32f32",
    30: "smefa64", 31: "wfxt", 32: "ebf16", 33: "sveebf16", 34: "cssc", 35: "rprfm", 36: "sve2p1", 37: "sme2",
    38: "sme2p1", 39: "smei16i32", 40: "smebi32i32", 41: "smeb16b16", 42: "smef16f16", 43: "mops", 44: "hbc",
    45: "sveb16b16", 46: "lrcpc3", 47: "lse128", 48: "fpmr", 49: "lut", 50: "faminmax", 51: "f8cvt", 52: "f8fma",
    53: "f8dp4", 54: "f8dp2", 55: "f8e4m3", 56: "f8e5m2", 57: "smelutv2", 58: "smef8f16", 59: "smef8f32",
    60: "smesf8fma", 61: "smesf8dp4", 62: "smesf8dp2", 63: "poe",
}

# The features inference kernels (ggml, onnxruntime MLAS) pick code paths by, and what each one is.
FEATURE_DESCRIPTIONS: dict[str, str] = {
    "fp": "Arm floating point",  # arm64
    "asimd": "Arm Advanced SIMD / NEON (Armv8-A)",
    "asimddp": "Arm dot product (Armv8.2-A)",
    "fphp": "Arm half-precision scalar arithmetic (Armv8.2-A)",
    "asimdhp": "Arm half-precision SIMD arithmetic (Armv8.2-A)",
    "asimdfhm": "Arm half-precision multiply-accumulate into single precision",
    "atomics": "Arm large-system atomics (Armv8.1-A)",
    "i8mm": "Arm int8 matrix multiply (Armv8.6-A)",
    "bf16": "Arm BFloat16 arithmetic (Armv8.6-A)",
    "sve": "Arm Scalable Vector Extension",
    "sve2": "Arm Scalable Vector Extension 2",
    "sse4_2": "x86 SSE4.2",  # x86_64
    "avx": "x86 AVX (256-bit float SIMD)",
    "avx2": "x86 AVX2 (256-bit integer SIMD)",
    "fma": "x86 FMA3 fused multiply-add",
    "f16c": "x86 F16C half-precision conversion",
    "bmi1": "x86 bit manipulation (BMI1)",
    "bmi2": "x86 bit manipulation (BMI2)",
    "abm": "x86 LZCNT/POPCNT (ABM)",
    "movbe": "x86 MOVBE",
    "avx_vnni": "x86 AVX-VNNI (256-bit int8 dot product)",
    "avx512f": "x86 AVX-512 Foundation",
    "avx512bw": "x86 AVX-512 byte/word instructions",
    "avx512dq": "x86 AVX-512 doubleword/quadword instructions",
    "avx512vl": "x86 AVX-512 vector length extensions",
    "avx512_vnni": "x86 AVX-512 VNNI (512-bit int8 dot product)",
    "avx512_bf16": "x86 AVX-512 BFloat16",
    "avx512vbmi": "x86 AVX-512 vector byte manipulation",
    "neon": "Arm NEON (32-bit Arm)",  # armv7l
    "vfpv4": "Arm VFPv4 floating point (32-bit Arm)",
}


@dataclass(frozen=True)
class CpuFeatures:
    """The features of this CPU and where they were read from."""

    features: frozenset[str]
    source: str  # "getauxval", "/proc/cpuinfo" or FEATURES_ENV
    machine: str


def decode_hwcaps(hwcap: int, hwcap2: int) -> frozenset[str]:
    """Names of the bits set in arm64 AT_HWCAP / AT_HWCAP2 values (bits the kernel has not named are skipped)."""
    names = {name for bit, name in ARM64_HWCAP.items() if hwcap >> bit & 1}
    names |= {name for bit, name in ARM64_HWCAP2.items() if hwcap2 >> bit & 1}
    return frozenset(names)


def parse_cpuinfo(text: str) -> frozenset[str]:
    """Features every processor of a /proc/cpuinfo text has (``Features`` on Arm, ``flags`` on x86)."""
    per_cpu = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("Features", "flags"):
            per_cpu.append(set(value.split()))
    return frozenset(set.intersection(*per_cpu)) if per_cpu else frozenset()


def feature_names(value: str) -> list[str]:
    """``asimd, asimddp`` or ``asimd asimddp`` -> ['asimd', 'asimddp'] (lower case, in order, blanks dropped)."""
    return [part.strip().lower() for part in value.replace(",", " ").split() if part.strip()]


def parse_feature_list(value: str) -> frozenset[str]:
    return frozenset(feature_names(value))


def read_hwcaps() -> tuple[int, int] | None:
    """(AT_HWCAP, AT_HWCAP2) from the C library's getauxval, or None where ctypes or getauxval is unavailable."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        getauxval = libc.getauxval
    except (ImportError, OSError, AttributeError):
        return None
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = [ctypes.c_ulong]
    return int(getauxval(AT_HWCAP)), int(getauxval(AT_HWCAP2))


def read_cpuinfo(path: str = CPUINFO) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def detect(environ: Mapping[str, str] | None = None, machine: str | None = None) -> CpuFeatures:
    """This CPU's features: the override variable if set, else the auxiliary vector (aarch64), else /proc/cpuinfo."""
    environ = os.environ if environ is None else environ
    machine = machine or platform.machine()
    override = environ.get(FEATURES_ENV)
    if override is not None:
        return CpuFeatures(parse_feature_list(override), FEATURES_ENV, machine)
    if machine in ("aarch64", "arm64"):
        hwcaps = read_hwcaps()
        if hwcaps is not None and hwcaps[0]:
            return CpuFeatures(decode_hwcaps(*hwcaps), "getauxval", machine)
    return CpuFeatures(parse_cpuinfo(read_cpuinfo()), CPUINFO, machine)


def cpu_features(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """This CPU's feature names as the kernel reports them (see ``detect``)."""
    return detect(environ).features


def missing(required: Iterable[str], features: Iterable[str] | None = None) -> list[str]:
    """The required features this CPU (or ``features``) lacks, in the order given."""
    have = frozenset(features) if features is not None else cpu_features()
    return [name for name in dict.fromkeys(required) if name not in have]


def describe(feature: str) -> str:
    """'asimddp (Arm dot product (Armv8.2-A))', or the bare name for a feature without a description."""
    description = FEATURE_DESCRIPTIONS.get(feature)
    return f"{feature} ({description})" if description else feature


def missing_message(feature: str, target_name: str | None = None, source: str | None = None) -> str:
    """One line naming a missing feature, the build that needs it and where this CPU's features were read."""
    build = f"the runtime built for {target_name}" if target_name else "this runtime build"
    origin = f" (features from {source})" if source else ""
    return f"this CPU lacks {describe(feature)}, which {build} needs{origin}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m edgekit.runtime.cpu",
                                     description="Check this CPU for the features a runtime build needs.")
    parser.add_argument("--require", default="", help="Comma-separated feature names, e.g. asimd,asimddp.")
    parser.add_argument("--target-name", default=None, help="Name of the build, used in messages.")
    parser.add_argument("--list", action="store_true", help="Print this CPU's features, one per line.")
    args = parser.parse_args(argv)
    found = detect()
    if args.list:
        for name in sorted(found.features):
            print(name)
    absent = missing(feature_names(args.require), found.features)
    for feature in absent:
        print(missing_message(feature, args.target_name, found.source), file=sys.stderr)
    return EXIT_MISSING if absent else 0


if __name__ == "__main__":
    sys.exit(main())
