"""CPU feature detection (edgekit.runtime.cpu): hwcap decoding, /proc/cpuinfo parsing, the installer's --require check."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from edgekit.runtime import cpu

REPO = Path(__file__).resolve().parent.parent

# /proc/cpuinfo of a Raspberry Pi 4 (Cortex-A72, Armv8.0-A) and a Pi 5 (Cortex-A76, Armv8.2-A), first core.
PI4_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08

processor\t: 1
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU part\t: 0xd08
"""
PI5_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c bmi1 avx2 bmi2
"""


def bits(*positions: int) -> int:
    return sum(1 << p for p in positions)


def test_hwcap_bits_decode_to_kernel_names():
    # Cortex-A76 (Pi 5): fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp.
    a76 = bits(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 16, 20)
    assert cpu.decode_hwcaps(a76, 0) == cpu.parse_feature_list(PI5_FEATURES)
    assert cpu.decode_hwcaps(bits(0, 1, 2, 7, 11), 0) == {"fp", "asimd", "evtstrm", "crc32", "cpuid"}  # Cortex-A72
    assert cpu.decode_hwcaps(bits(22), bits(1, 13, 14)) == {"sve", "sve2", "i8mm", "bf16"}
    assert cpu.decode_hwcaps(bits(32, 40), bits(63)) == {"gcs", "poe"}  # bit 40 of AT_HWCAP is unnamed: skipped


def test_cpuinfo_features_are_what_every_core_has():
    assert cpu.parse_cpuinfo(PI4_CPUINFO) == {"fp", "asimd", "evtstrm", "crc32", "cpuid"}
    assert {"avx2", "fma", "f16c"} <= cpu.parse_cpuinfo(X86_CPUINFO)
    mixed = "Features\t: fp asimd asimddp\n\nFeatures\t: fp asimd\n"
    assert cpu.parse_cpuinfo(mixed) == {"fp", "asimd"}
    assert cpu.parse_cpuinfo("processor : 0\n") == frozenset()


def test_detect_prefers_the_override_then_the_auxv():
    found = cpu.detect({cpu.FEATURES_ENV: "asimd, fp"}, machine="aarch64")
    assert found.features == {"asimd", "fp"} and found.source == cpu.FEATURES_ENV
    here = cpu.detect({})
    assert here.machine == os.uname().machine
    assert here.source == ("getauxval" if here.machine == "aarch64" else cpu.CPUINFO)
    if here.machine == "x86_64":
        assert {"sse2", "sse4_2"} <= here.features


def test_missing_keeps_order_and_names_the_feature():
    a72 = cpu.parse_cpuinfo(PI4_CPUINFO)
    assert cpu.missing(["asimd", "asimddp", "fphp", "asimddp"], a72) == ["asimddp", "fphp"]
    assert cpu.missing(["fp", "asimd"], a72) == []
    line = cpu.missing_message("asimddp", "armv8.2-a+dotprod", "getauxval")
    assert line == ("this CPU lacks asimddp (Arm dot product (Armv8.2-A)), which the runtime built for armv8.2-a+dotprod "
                    "needs (features from getauxval)")
    assert cpu.describe("avx512_vnni") == "avx512_vnni (x86 AVX-512 VNNI (512-bit int8 dot product))"
    assert cpu.describe("ssbs") == "ssbs"


def run_cpu_module(pythonpath: str, *args: str, features: str | None = None) -> subprocess.CompletedProcess:
    """``python -S -m edgekit.runtime.cpu``: -S keeps site-packages out, as on a board before anything is installed."""
    env = {k: v for k, v in os.environ.items() if k != cpu.FEATURES_ENV} | {"PYTHONPATH": pythonpath}
    if features is not None:
        env[cpu.FEATURES_ENV] = features
    return subprocess.run([sys.executable, "-S", "-m", "edgekit.runtime.cpu", *args], capture_output=True, text=True, env=env)


def test_cli_exits_3_with_one_line_per_missing_feature():
    done = run_cpu_module(str(REPO), "--require", "fp,asimd,asimddp,fphp", "--target-name", "rpi-5-8gb",
                          features="fp asimd evtstrm crc32 cpuid")
    assert done.returncode == 3
    assert done.stderr.splitlines() == [
        "this CPU lacks asimddp (Arm dot product (Armv8.2-A)), which the runtime built for rpi-5-8gb needs "
        "(features from EDGEKIT_CPU_FEATURES)",
        "this CPU lacks fphp (Arm half-precision scalar arithmetic (Armv8.2-A)), which the runtime built for rpi-5-8gb "
        "needs (features from EDGEKIT_CPU_FEATURES)",
    ]
    ok = run_cpu_module(str(REPO), "--require", "fp,asimd", features="fp asimd evtstrm")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")


def test_runs_from_a_zip_with_only_the_standard_library(tmp_path):
    """install.sh runs it straight from the wheel (a zip) with the board's system python3: nothing else may load."""
    wheel = tmp_path / "edgekit-slice.zip"
    with zipfile.ZipFile(wheel, "w") as archive:
        for relative in ("edgekit/__init__.py", "edgekit/runtime/__init__.py", "edgekit/runtime/cpu.py"):
            archive.write(REPO / relative, relative)
    here = run_cpu_module(str(wheel), "--list")
    assert here.returncode == 0 and set(here.stdout.split()) == cpu.cpu_features({})
    code = ("import sys, edgekit.runtime.cpu; "
            "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {'edgekit', '__main__'}))")
    env = {k: v for k, v in os.environ.items()} | {"PYTHONPATH": str(wheel)}
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "[]"
