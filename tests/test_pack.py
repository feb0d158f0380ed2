"""`edgekit pack` and the pack's install.sh.

Fast: which build target each catalog board gets, the board-side checks install.sh runs first
(pack_check.py: hashes, unlisted files, Python, CPU features), bad input (unknown device, a bundle
that fails verification). Slow (marked): a real pack for the x86 catalog board (llama-cpp-python built
for x86-64-v3 with the host compiler, ~6 minutes the first time, then cached; the tiny GGUF bundle), installed with
install.sh into a temporary prefix without network, re-run, tampered with, and failed on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import REPO, run_cli
from serve_fixtures import publish_gguf

from edgekit.pack.board import pack_check
from edgekit.pack.targets import PLATFORMS, TARGETS, select_target
from edgekit.runtime.cpu import FEATURE_DESCRIPTIONS
from edgekit.schema.device import load_catalog

EDGEKIT = [str(Path(sys.executable).with_name("edgekit"))]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def edgekit(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEKIT, *args], capture_output=True, text=True, env=ENV, **kwargs)


def linked_copy(source: Path, target: Path, *changed: str) -> Path:
    """A copy of a pack made of hard links, except the ``changed`` files (own copies: the test edits them)."""
    shutil.copytree(source, target, copy_function=os.link)
    for name in changed:
        data = (target / name).read_bytes()
        (target / name).unlink()
        (target / name).write_bytes(data)
    return target


# ---- build targets -------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "target"), [
    ("rpi-5-8gb", "armv8.2-a-dotprod"), ("orange-pi-5-8gb", "armv8.2-a-dotprod"), ("jetson-orin-nano-8gb", "armv8.2-a-dotprod"),
    ("rpi-4-4gb", "armv8-a"), ("rpi-zero-2w", "armv8-a"), ("rpi-3b-plus", "armv8-a"),
    ("intel-n100-16gb", "x86-64-v3"), ("x86-64-avx2-generic", "x86-64-v3"),
])
def test_board_gets_the_most_capable_target_its_profile_supports(device, target):
    assert select_target(load_catalog()[device]).name == target


def test_every_catalog_board_has_a_target_and_every_target_names_known_features():
    for device in load_catalog().values():
        chosen = select_target(device)
        assert chosen.machine == device.cpu.arch
        assert set(chosen.isa) <= {name for name, on in device.cpu.isa if on}
    for target in TARGETS:
        assert set(target.cpu_features) <= set(FEATURE_DESCRIPTIONS)
        assert "-DGGML_NATIVE=OFF" in target.cmake_args and "-DGGML_OPENMP=ON" in target.cmake_args
    dotprod = next(t for t in TARGETS if t.name == "armv8.2-a-dotprod")
    assert "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16" in dotprod.cmake_args
    assert dotprod.cpu_features == ("asimd", "asimddp", "fphp", "asimdhp")


def test_pip_platform_tags_cover_every_manylinux_level_of_the_board_glibc():
    tags = PLATFORMS["aarch64"].pip_platforms((2, 36))
    assert tags[0] == "manylinux_2_36_aarch64" and "manylinux_2_28_aarch64" in tags and "manylinux_2_17_aarch64" in tags
    assert tags[-2:] == ["manylinux2014_aarch64", "linux_aarch64"]
    assert len(tags) == 36 - 17 + 1 + 2


# ---- the board-side checks, on a hand-made pack -------------------------------------------------


def fake_pack(root: Path, *, features: dict[str, str] | None = None, machine: str = "aarch64") -> Path:
    """A minimal pack folder (the keys pack_check reads) with two files and their hashes."""
    (root / "wheels").mkdir(parents=True)
    (root / "wheels" / "demo-1.0-py3-none-any.whl").write_bytes(b"wheel bytes")
    (root / "install.sh").write_text("#!/bin/sh\n")
    files = [{"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": pack_check.sha256_file(str(p))}
             for p in sorted(root.rglob("*")) if p.is_file()]
    manifest = {"schema_version": 1, "pack_id": "demo-cp313-0123456789ab", "files": files,
                "python": "%d.%d" % sys.version_info[:2],
                "glibc_min": "2.17", "requirement": "edgekit[runtime]", "device": {"id": "rpi-5-8gb", "cpu": {"cores": 4}},
                "service": {"unit": "edgekit.service", "threads": 4, "memory_budget_mb": 300, "together": True},
                "target": {"name": "armv8.2-a-dotprod", "machine": machine,
                           "cpu_features": features if features is not None else {"asimd": "Arm Advanced SIMD (NEON), Armv8-A",
                                                                                  "asimddp": "Arm dot product, Armv8.2-A"}}}
    (root / "pack.json").write_text(json.dumps(manifest))
    return root


def test_pack_check_runs_on_the_standard_library_alone(tmp_path):
    """It runs on the board before edgekit is installed: no site-packages (-S), no environment (-I)."""
    pack = fake_pack(tmp_path / "pack", machine=os.uname().machine, features={})
    script = REPO / "edgekit" / "pack" / "board" / "pack_check.py"
    done = subprocess.run([sys.executable, "-I", "-S", str(script), "check", str(pack), "--prefix", str(tmp_path / "prefix")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "PACK_ID=demo-cp313-0123456789ab" in done.stdout.splitlines()
    assert "PACK_PIP_WHEEL=''" in done.stdout.splitlines()


def test_pack_check_passes_an_intact_pack_and_names_each_changed_missing_or_extra_file(tmp_path):
    pack = fake_pack(tmp_path / "pack")
    manifest = pack_check.load_manifest(str(pack))
    assert pack_check.verify_files(str(pack), manifest) == []

    (pack / "install.sh").write_text("#!/bin/sh\nrm -rf /\n")
    (pack / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"x")
    (pack / "wheels" / "demo-1.0-py3-none-any.whl").unlink()
    problems = pack_check.verify_files(str(pack), manifest)
    assert problems == [
        "install.sh: 19 bytes, pack.json says 10",
        "wheels/demo-1.0-py3-none-any.whl: listed in pack.json but missing (or not a regular file)",
        "wheels/evil-1.0-py3-none-any.whl: not listed in pack.json",
    ]


def test_pack_check_refuses_paths_that_leave_the_pack_and_a_manifest_that_is_not_one(tmp_path):
    pack = fake_pack(tmp_path / "pack")
    manifest = pack_check.load_manifest(str(pack))
    manifest["files"].append({"path": "../outside", "bytes": 0, "sha256": "0" * 64})
    assert "'../outside': path leaves the pack" in pack_check.verify_files(str(pack), manifest)
    (pack / "pack.json").write_text('{"schema_version": 7}')
    with pytest.raises(pack_check.PackRefused) as refused:
        pack_check.load_manifest(str(pack))
    assert refused.value.code == 1


def pack_with_cpu_check(root: Path, cpu_module: str) -> tuple[Path, dict]:
    """A fake pack whose edgekit wheel holds ``cpu_module`` as edgekit/runtime/cpu.py, and its manifest."""
    pack = fake_pack(root)
    with zipfile.ZipFile(pack / "wheels" / "edgekit-0.1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("edgekit/__init__.py", "")
        wheel.writestr("edgekit/runtime/__init__.py", "")
        wheel.writestr("edgekit/runtime/cpu.py", cpu_module)
    manifest = pack_check.load_manifest(str(pack))
    manifest["files"].append({"path": "wheels/edgekit-0.1.0-py3-none-any.whl"})
    return pack, manifest


def test_pack_check_names_the_missing_cpu_feature_and_the_board_the_pack_is_for(tmp_path, monkeypatch):
    """edgekit.runtime.cpu, run from the packed wheel, is the one CPU check (features here as a Cortex-A72 reports them)."""
    pack, manifest = pack_with_cpu_check(tmp_path / "pack", (REPO / "edgekit" / "runtime" / "cpu.py").read_text())
    monkeypatch.setattr(pack_check.platform, "machine", lambda: "aarch64")
    monkeypatch.setenv("EDGEKIT_CPU_FEATURES", "fp,asimd,evtstrm,crc32,cpuid")
    lines, code = pack_check.cpu_problems(str(pack), manifest)
    assert code == 3
    assert lines == ["this CPU lacks asimddp (Arm dot product (Armv8.2-A)), which the runtime built for armv8.2-a-dotprod "
                     "needs (features from EDGEKIT_CPU_FEATURES)", "this pack is for rpi-5-8gb (armv8.2-a-dotprod)"]

    monkeypatch.setenv("EDGEKIT_CPU_FEATURES", "fp,asimd,asimddp,fphp,asimdhp")  # Cortex-A76
    assert pack_check.cpu_problems(str(pack), manifest) == ([], 0)

    monkeypatch.setattr(pack_check.platform, "machine", lambda: "x86_64")
    lines, code = pack_check.cpu_problems(str(pack), manifest)
    assert code == 2 and lines == ["this machine is x86_64: this pack is for rpi-5-8gb (armv8.2-a-dotprod), a aarch64 board"]


def test_pack_check_runs_the_packed_wheels_cpu_check_and_refuses_a_wheel_without_one(tmp_path, monkeypatch):
    stub = ("import sys\nneed = sys.argv[sys.argv.index('--require') + 1].split(',')\n"
            "sys.exit('this CPU lacks asimddp (Arm dot product, Armv8.2-A)') if 'asimddp' in need else sys.exit(0)\n")
    pack, manifest = pack_with_cpu_check(tmp_path / "pack", stub)
    monkeypatch.setattr(pack_check.platform, "machine", lambda: "aarch64")
    assert pack_check.cpu_problems(str(pack), manifest) == (["this CPU lacks asimddp (Arm dot product, Armv8.2-A)",
                                                            "this pack is for rpi-5-8gb (armv8.2-a-dotprod)"], 3)
    without = fake_pack(tmp_path / "without")
    lines, code = pack_check.cpu_problems(str(without), pack_check.load_manifest(str(without)))
    assert code == 1 and lines == ["the pack's edgekit wheel has no edgekit/runtime/cpu.py to check this CPU with: this pack "
                                   "is for rpi-5-8gb (armv8.2-a-dotprod)"]


def test_install_sh_refuses_a_tampered_pack_before_writing_anything(tmp_path):
    pack = fake_pack(tmp_path / "pack", machine=os.uname().machine, features={})
    shutil.copy(REPO / "edgekit" / "pack" / "board" / "pack_check.py", pack / "pack_check.py")
    script = (REPO / "edgekit" / "pack" / "board" / "install.sh").read_text().replace("@DEFAULT_PREFIX@", "/nonexistent")
    (pack / "install.sh").write_text(script)
    manifest = json.loads((pack / "pack.json").read_text())
    manifest["files"] = [e for e in manifest["files"] if e["path"] != "install.sh"] + [
        {"path": p, "bytes": (pack / p).stat().st_size, "sha256": pack_check.sha256_file(str(pack / p))}
        for p in ("install.sh", "pack_check.py")]
    (pack / "pack.json").write_text(json.dumps(manifest))
    (pack / "wheels" / "demo-1.0-py3-none-any.whl").write_bytes(b"tampered")
    prefix = tmp_path / "prefix"
    done = subprocess.run(["sh", str(pack / "install.sh"), "--prefix", str(prefix)], capture_output=True, text=True,
                          env={**os.environ, "EDGEKIT_PYTHON": sys.executable})
    assert done.returncode == 1, done.stderr
    assert "wheels/demo-1.0-py3-none-any.whl: 8 bytes, pack.json says 11" in done.stderr
    assert not prefix.exists()


# ---- the unit sized for the board ------------------------------------------------------------------


def test_unit_is_sized_for_the_board_and_a_bundle_too_big_for_it_is_refused(smollm_bundle):
    from edgekit.errors import GateFailed
    from edgekit.pack.assemble import PackRequest, size_service, verify_bundles
    from edgekit.schema.device import load_device
    from edgekit.serve.settings import ServeSettings

    manifests = [m for _, m in verify_bundles((smollm_bundle,))]

    def sized(device: str, **settings):
        request = PackRequest(device=load_device(device), device_ref=device, bundles=(smollm_bundle,), out_dir=Path("unused"),
                              serve=ServeSettings(**settings))
        return size_service(request, manifests)

    record, unit = sized("rpi-5-8gb")
    assert (record.memory_budget_mb, record.threads, record.together) == (353, 4, True)
    assert "ExecStart=@PREFIX@/current/venv/bin/edgekit serve --models @PREFIX@/current/bundles" in unit
    assert "--memory-budget-mb 353" in unit and "--threads 4" in unit and "MemoryMax=513M" in unit
    assert "EDGEKIT_N_CTX" not in unit

    with pytest.raises(GateFailed) as refused:
        sized("rpi-zero-2w")
    assert str(refused.value).startswith("rpi-zero-2w offers 262 MiB to models; smollm2-135m-q4_1 needs 352 MiB")
    # Settings ExecStart does not carry reach the daemon through its environment.
    record, unit = sized("rpi-zero-2w", n_ctx=2048, idle_unload_s=60, prompt_cache_contexts=0)
    assert (record.memory_budget_mb, record.together) == (216, True)
    assert ('Environment="EDGEKIT_IDLE_UNLOAD_S=60.0" "EDGEKIT_N_CTX=2048" "EDGEKIT_PROMPT_CACHE_CONTEXTS=0.0"\n'
            'Restart=on-failure') in unit


# ---- bad input of `edgekit pack` ------------------------------------------------------------------


def test_unknown_device_exits_2_listing_the_known_ids(tmp_path):
    done = run_cli("pack", "--device", "rpi-6", str(tmp_path), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "unknown device 'rpi-6'" in done.stderr
    for known in ("rpi-5-8gb", "rpi-4-4gb", "rpi-zero-2w", "x86-64-avx2-generic"):
        assert known in done.stderr.replace("\n", "")
    assert not (tmp_path / "out").exists()


def test_a_bundle_that_fails_verification_is_refused_by_name(tmp_path, smollm_bundle):
    bad = tmp_path / "tampered"
    shutil.copytree(smollm_bundle, bad)
    with (bad / "model.gguf").open("r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    done = run_cli("pack", "--device", "rpi-5-8gb", str(smollm_bundle), str(bad), "--out", str(tmp_path / "out"))
    assert done.returncode == 1
    assert f"bundle {bad} fails verification" in done.stderr.replace("\n", "")
    assert "sha256 differs" in done.stderr
    assert not (tmp_path / "out").exists()


# ---- a real pack for the x86 catalog board, installed offline --------------------------------------

X86_BOARD = "x86-64-avx2-generic"
PACKED = "tiny-gguf"  # the bundle in the x86 pack


def host_python() -> str:
    """The interpreter the venv was made from: the board's system python3 plays it here."""
    return str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}")


def run_install(pack: Path, prefix: Path, *args: str) -> subprocess.CompletedProcess:
    """install.sh with no network at all (a fresh network namespace) and no systemd service."""
    command = ["unshare", "--net", "--", "sh", str(pack / "install.sh"), "--prefix", str(prefix), "--no-service", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"EDGEKIT_PYTHON": host_python()}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def x86_pack(tmp_path_factory, fake_gguf) -> Path:
    """The pack carries the tiny GGUF bundle: packing and installing copy and hash a bundle's files whatever they hold,
    and 100 MB of SmolLM2 would only add seconds of gzip and sha256 (its unit sizing is tested above)."""
    if os.uname().machine != "x86_64":
        pytest.skip("the x86 pack test builds with the host compiler")
    root = tmp_path_factory.mktemp("pack")
    bundle = publish_gguf(fake_gguf, root / "bundles", PACKED)
    out = root / "x86-pack"
    python = "%d.%d" % sys.version_info[:2]
    done = edgekit("pack", "--device", X86_BOARD, str(bundle), "--out", str(out), "--python", python, "--json",
                   timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["target"] == "x86-64-v3" and summary["device"] == X86_BOARD
    return out


@pytest.fixture(scope="module")
def offline_root():
    if os.geteuid() != 0 or subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("installing without network needs root (unshare --net)")


@pytest.mark.slow
def test_pack_manifest_lists_every_file_with_its_hash(x86_pack):
    manifest = json.loads((x86_pack / "pack.json").read_text())
    on_disk = sorted(p.relative_to(x86_pack).as_posix() for p in x86_pack.rglob("*") if p.is_file())
    on_disk.remove("pack.json")
    assert [f["path"] for f in manifest["files"]] == on_disk
    for entry in manifest["files"]:
        path = x86_pack / entry["path"]
        assert (path.stat().st_size, pack_check.sha256_file(str(path))) == (entry["bytes"], entry["sha256"])
    assert manifest["target"]["name"] == "x86-64-v3"
    assert set(manifest["target"]["cpu_features"]) == {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
    assert manifest["device"]["id"] == X86_BOARD and manifest["python"] == "%d.%d" % sys.version_info[:2]
    assert manifest["versions"]["llama_cpp_python"] == "0.3.36"
    wheels = [f["path"] for f in manifest["files"] if f["path"].startswith("wheels/")]
    assert not [w for w in wheels if any(h in w.lower() for h in ("torch", "transformers", "optimum"))]
    assert manifest["service"]["threads"] == 4 and manifest["service"]["memory_budget_mb"] >= 16
    archive = x86_pack.with_name("x86-pack.tar.gz")
    assert archive.with_name("x86-pack.tar.gz.sha256").read_text() == f"{pack_check.sha256_file(str(archive))}  x86-pack.tar.gz\n"
    with tarfile.open(archive) as tar:
        member = tar.getmember("x86-pack/install.sh")
        assert member.mode & 0o111 and len([m for m in tar.getmembers() if m.isfile()]) == len(manifest["files"]) + 1


@pytest.mark.slow
def test_llama_wheel_carries_each_library_once_plus_libgomp(x86_pack):
    llama = next((x86_pack / "wheels").glob("llama_cpp_python-*.whl"))
    assert llama.name.endswith("-py3-none-linux_x86_64.whl")
    with zipfile.ZipFile(llama) as wheel:
        libraries = sorted(n.removeprefix("llama_cpp/lib/") for n in wheel.namelist() if ".so" in n)
        assert not [n for n in wheel.namelist() if n.startswith(("lib/", "include/"))]
    assert libraries == ["libggml-base.so", "libggml-cpu.so", "libggml.so", "libgomp.so.1", "libllama.so"]


@pytest.mark.slow
def test_install_offline_rerun_tamper_and_failed_upgrade(x86_pack, offline_root, tmp_path):
    prefix = tmp_path / "opt-edgekit"
    manifest = json.loads((x86_pack / "pack.json").read_text())
    release = f"releases/{manifest['pack_id']}"

    done = run_install(x86_pack, prefix)
    assert done.returncode == 0, done.stderr
    assert os.readlink(prefix / "current") == release
    installed = prefix / "current" / "venv" / "bin"
    bundle = prefix / "current" / "bundles" / PACKED
    inspect = subprocess.run([str(installed / "edgekit"), "inspect", str(bundle), "--json"], capture_output=True, text=True)
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["name"] == PACKED
    version = subprocess.run([str(installed / "python"), "-c", "import edgekit, llama_cpp; print(edgekit.__version__, "
                              "llama_cpp.__version__)"], capture_output=True, text=True)
    assert version.stdout.split() == [manifest["versions"]["edgekit"], "0.3.36"]
    cli_version = subprocess.run([str(installed / "edgekit"), "--version"], capture_output=True, text=True)
    assert cli_version.returncode == 0 and manifest["versions"]["edgekit"] in cli_version.stdout
    # pip --no-compile, then bytecode for what the board imports only (edgekit.pack.board.precompile).
    site = next((prefix / release / "venv" / "lib").glob("python3.*/site-packages"))
    tag = sys.implementation.cache_tag
    assert (site / "edgekit" / "serve" / "__pycache__" / f"app.{tag}.pyc").is_file()
    assert (site / "edgekit" / "export" / "__pycache__" / f"__init__.{tag}.pyc").is_file()  # all of edgekit
    assert (site / "uvicorn" / "protocols" / "http" / "__pycache__" / f"h11_impl.{tag}.pyc").is_file()
    assert not list((site / "pip").rglob("*.pyc")) and not list((site / "numpy").rglob("tests/__pycache__/*.pyc"))
    unit = (prefix / "current" / "edgekit.service").read_text()
    assert f"ExecStart={prefix}/current/venv/bin/edgekit serve --models {prefix}/current/bundles" in unit
    assert f"--memory-budget-mb {manifest['service']['memory_budget_mb']}" in unit and "--threads 4" in unit

    # Re-running with the same pack: no rebuild, same release.
    python_inode = (prefix / release / "venv" / "pyvenv.cfg").stat().st_ino
    again = run_install(x86_pack, prefix)
    assert again.returncode == 0, again.stderr
    assert "already installed" in again.stderr
    assert os.readlink(prefix / "current") == release
    assert (prefix / release / "venv" / "pyvenv.cfg").stat().st_ino == python_inode

    # A pack whose pip install fails (a dependency's wheel left out, the manifest consistent): current stays.
    broken = linked_copy(x86_pack, tmp_path / "broken-pack", "pack.json")
    numpy = next((broken / "wheels").glob("numpy-*.whl"))
    numpy.unlink()
    data = json.loads((broken / "pack.json").read_text())
    data["files"] = [f for f in data["files"] if f["path"] != f"wheels/{numpy.name}"]
    data["pack_id"] = data["pack_id"][:-12] + "b" * 12
    (broken / "pack.json").write_text(json.dumps(data))
    failed = run_install(broken, prefix)
    assert failed.returncode == 3, failed.stderr
    assert "current is unchanged" in failed.stderr
    assert os.readlink(prefix / "current") == release
    assert not (prefix / "releases" / data["pack_id"]).exists()
    still = subprocess.run([str(installed / "edgekit"), "inspect", str(bundle)], capture_output=True, text=True)
    assert still.returncode == 0, still.stderr

    # A tampered file: refused before anything is written.
    tampered = linked_copy(x86_pack, tmp_path / "tampered-pack", f"bundles/{PACKED}/manifest.json")
    with (tampered / "bundles" / PACKED / "manifest.json").open("a") as handle:
        handle.write(" ")
    fresh = tmp_path / "fresh-prefix"
    refused = run_install(tampered, fresh)
    assert refused.returncode == 1
    assert f"bundles/{PACKED}/manifest.json" in refused.stderr and "nothing was installed" in refused.stderr
    assert not fresh.exists()


def test_import_check_loads_llama_cpp_from_the_build_or_refuses(tmp_path):
    """The built wheel's llama_cpp is what the check imports; a build missing it does not pass on the host's copy."""
    from edgekit.errors import BackendError
    from edgekit.pack.llama_build import import_check

    built = tmp_path / "built"
    (built / "llama_cpp").mkdir(parents=True)
    (built / "llama_cpp" / "__init__.py").write_text(
        "__version__ = '0.0.0'\ndef llama_print_system_info():\n    return b'CPU : NEON = 1 | '\n")
    import_check(built)
    with pytest.raises(BackendError, match=r"imported llama_cpp from .*, not from the build at"):
        import_check(tmp_path / "empty")
    (built / "llama_cpp" / "__init__.py").write_text("raise ImportError('libllama.so: cannot open shared object file')\n")
    with pytest.raises(BackendError, match="the built llama_cpp does not import: .*libllama.so"):
        import_check(built)
