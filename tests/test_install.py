"""The built wheel, installed core-only into fresh venvs away from the checkout, is a working CLI.

For each of Python 3.11, 3.12 and 3.13: build the wheel once, install it (no runtime/export extras, the
tested dependency set from constraints.txt) into a new venv under a temporary folder, and run the
installed `edgekit` there with the checkout off sys.path. The venvs are made without pip of their own
(this checkout's pip installs into them with --python: seconds of ensurepip and bytecode saved per venv).
The shipped device catalog and recipe library must come from inside the installed package and give the
same numbers as the checkout. The CI example docs/ci/github-fit-gate.yml is run step by step with the
installed wheel too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers import REPO

pytestmark = pytest.mark.slow

PYTHONS = ("3.11", "3.12", "3.13")
FIT_RECIPE = "smollm2-135m-instruct.yaml"
FIT_DEVICE = "rpi-5-8gb"
WORKFLOW = REPO / "docs" / "ci" / "github-fit-gate.yml"

# Lists every file a shipped recipe names, run inside the installed venv and in the checkout.
RECIPE_FILES = Path(__file__).with_name("shipped_recipe_files.py")
# Answers recorded `edgekit` calls with the edgekit of the python that runs it, all in one process.
CLI_CALLS = Path(__file__).with_name("cli_calls.py")


def find_python(version: str) -> str | None:
    """An interpreter of this version: on PATH, or among pyenv's installed versions (its shims need a selection)."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [shutil.which(f"python{version}"),
                  *map(str, sorted(pyenv_root.glob(f"versions/{version}.*/bin/python{version}"), reverse=True))]
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
    return None


def clean_env(home: Path, bin_dir: Path | None = None) -> dict[str, str]:
    """The environment of a user's shell: no checkout on sys.path, an empty edgekit home (no exported bundles)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(EDGEKIT_HOME=str(home), COLUMNS="200", PIP_DISABLE_PIP_VERSION_CHECK="1")
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def checkout_env(home: Path, bin_dir: Path | None = None) -> dict[str, str]:
    """The same, running the checkout's code (the reference the installed wheel must match)."""
    return clean_env(home, bin_dir) | {"PYTHONPATH": str(REPO)}


# What the installed package says about itself, read once per venv: Python version, click, shipped folders, version.
FACTS = """import importlib.metadata as m, importlib.util as u, json, sys
from edgekit.library import shipped_folder as f
print(json.dumps({"python": "%d.%d" % sys.version_info[:2], "click_absent": u.find_spec("click") is None,
                  "devices": str(f("devices")), "recipes": str(f("recipes")), "version": m.version("edgekit")}))"""


class Installed:
    """A fresh venv with the wheel in it; runs its `edgekit` from a folder outside the checkout."""

    def __init__(self, version: str, root: Path, wheel: Path) -> None:
        python = find_python(version)
        if python is None:
            pytest.skip(f"Python {version} interpreter not found (python{version} on PATH or under pyenv)")
        root = root.resolve()
        self.version, self.root = version, root
        self.venv, self.cwd, self.home = root / "venv", root / "elsewhere", root / "home"
        self.cwd.mkdir(parents=True)
        self.home.mkdir()
        subprocess.run([python, "-m", "venv", "--without-pip", str(self.venv)], check=True)
        self.bin = self.venv / "bin"
        done = subprocess.run([sys.executable, "-m", "pip", "--python", str(self.bin / "python"), "install", "--quiet",
                               "--no-compile", "-c", str(REPO / "constraints.txt"), str(wheel)],
                              cwd=self.cwd, env=clean_env(self.home), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        facts = self.python(FACTS)
        assert facts.returncode == 0, facts.stderr
        self.facts = json.loads(facts.stdout)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "edgekit"), *args], cwd=self.cwd, env=clean_env(self.home),
                              capture_output=True, text=True)

    def run_together(self, *calls: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
        """Several `edgekit ARGS` answered by the installed edgekit.cli.main in one process of the venv (tests/cli_calls.py)."""
        folder = Path(tempfile.mkdtemp(dir=self.root))
        for n, args in enumerate(calls):
            (folder / f"{n}.args").write_text("".join(f"{a}\0" for a in args))
            (folder / f"{n}.cwd").write_text(str(self.cwd))
        done = subprocess.run([str(self.bin / "python"), str(CLI_CALLS), str(folder)], cwd=self.cwd, env=clean_env(self.home),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return [subprocess.CompletedProcess(["edgekit", *args], int((folder / f"{n}.code").read_text()),
                                            (folder / f"{n}.out").read_text(), (folder / f"{n}.err").read_text())
                for n, args in enumerate(calls)]

    def script(self, path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "python"), str(path)], cwd=self.cwd, env=clean_env(self.home),
                              capture_output=True, text=True)

    def python(self, code: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "python"), "-c", code], cwd=self.cwd, env=clean_env(self.home),
                              capture_output=True, text=True)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(REPO), "-w", str(out)],
                          cwd=out, env=clean_env(out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (built,) = out.glob("edgekit-*.whl")
    return built


@pytest.fixture(scope="module")
def install(wheel, tmp_path_factory):
    """install(version) -> Installed, one venv per Python version for the whole module."""
    made: dict[str, Installed] = {}

    def make(version: str) -> Installed:
        if version not in made:
            made[version] = Installed(version, tmp_path_factory.mktemp(f"py{version}"), wheel)
        return made[version]

    return make


@pytest.mark.parametrize("version", PYTHONS)
def test_installed_cli_lists_the_shipped_catalog(install, version):
    env = install(version)
    # typer carries its own click since 0.29; the core install must not need the separate package.
    assert env.facts["click_absent"] is True
    assert env.facts["python"] == version

    done = env.run("devices", "list", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    repo_ids = sorted(p.stem for p in (REPO / "devices").glob("*.yaml"))
    assert repo_ids and len(rows) == len(repo_ids)
    assert sorted(row["id"] for row in rows) == repo_ids
    assert all(row["error"] is None for row in rows)

    where = [env.facts["devices"], env.facts["recipes"]]
    assert [Path(p).relative_to(env.venv).parts[-3:] for p in where] == [("edgekit", "shipped", "devices"),
                                                                          ("edgekit", "shipped", "recipes")]
    # the console script above; the other commands answered by the installed CLI in one process
    recipes, version_line, typo = env.run_together(("recipes", "list", "--json"), ("--version",), ("devicez",))
    assert recipes.returncode == 0, recipes.stderr
    assert sorted(row["file"] for row in json.loads(recipes.stdout) if row["error"] is None) == \
        sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))

    assert version_line.returncode == 0 and version_line.stdout == f"edgekit {env.facts['version']}\n"
    assert typo.returncode == 2 and "Did you mean 'devices'" in typo.stderr and "Traceback" not in typo.stdout + typo.stderr


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> dict:
    """The checkout's answers the installed wheels must give (fit of a shipped recipe, the recipes' data files), run once."""
    cwd = tmp_path_factory.mktemp("checkout")
    (cwd / "home").mkdir()
    fitted = subprocess.run([sys.executable, "-m", "edgekit", "fit", "--recipe", str(REPO / "recipes" / FIT_RECIPE),
                             "--device", FIT_DEVICE, "--json"], cwd=cwd, env=checkout_env(cwd / "home"),
                            capture_output=True, text=True)
    assert fitted.returncode == 0, fitted.stderr
    files = subprocess.run([sys.executable, str(RECIPE_FILES)], cwd=cwd, env=checkout_env(cwd / "home"),
                           capture_output=True, text=True)
    assert files.returncode == 0, files.stderr
    return {"fit": json.loads(fitted.stdout), "recipe_files": json.loads(files.stdout)}


@pytest.mark.parametrize("version", PYTHONS)
def test_installed_fit_of_a_shipped_recipe_matches_the_checkout(install, version, checkout):
    env = install(version)
    recipe = Path(env.facts["recipes"]) / FIT_RECIPE
    assert recipe.is_relative_to(env.venv) and recipe.read_bytes() == (REPO / "recipes" / FIT_RECIPE).read_bytes()

    (installed,) = env.run_together(("fit", "--recipe", str(recipe), "--device", FIT_DEVICE, "--json"))
    assert installed.returncode == 0, installed.stderr
    got, want = json.loads(installed.stdout), checkout["fit"]
    assert [r["subject"] for r in got] == ["smollm2-135m-instruct-q8-0", "smollm2-135m-instruct-q4-k-m"]
    assert [r["memory"]["weights"] for r in got] == [r["memory"]["weights"] for r in want]
    assert all(r["memory"]["weights"] > 50_000_000 and r["device"] == FIT_DEVICE and r["verdict"] == "pass" for r in got)
    assert got == want


@pytest.mark.parametrize("version", PYTHONS)
def test_installed_recipes_find_their_data_files(install, version, checkout):
    env = install(version)
    installed = env.script(RECIPE_FILES)
    assert installed.returncode == 0, installed.stderr
    got, want = json.loads(installed.stdout), checkout["recipe_files"]
    assert Path(got["folder"]).is_relative_to(env.venv) and Path(want["folder"]) == REPO / "recipes"
    assert got["files"] == want["files"]
    assert got["files"]  # the shipped recipes name validation and calibration texts
    assert all(entry["inside"] and entry["bytes"] for entry in got["files"].values())


# `edgekit` for a workflow step: records its arguments (a NUL after each) in a numbered file, or replays recorded answers.
RECORDING_SHIM = """#!/bin/sh
n=$(ls "$EDGEKIT_CALLS" | grep -c '\\.args$')
pwd > "$EDGEKIT_CALLS/$n.cwd"
printf '%s\\0' "$@" > "$EDGEKIT_CALLS/$n.args"
"""
REPLAYING_SHIM = """#!/bin/sh
n=$(cat "$EDGEKIT_CALLS/next" 2>/dev/null || echo 0)
echo $((n + 1)) > "$EDGEKIT_CALLS/next"
[ -f "$EDGEKIT_CALLS/$n.code" ] || { echo "edgekit call $n was not recorded: the step took another path" >&2; exit 99; }
cat "$EDGEKIT_CALLS/$n.out"
cat "$EDGEKIT_CALLS/$n.err" >&2
exit "$(cat "$EDGEKIT_CALLS/$n.code")"
"""


def run_step(script: str, workspace: Path, calls: Path, env: dict[str, str], python: str) -> subprocess.CompletedProcess:
    """A workflow step run by bash as written, its `edgekit` calls answered by ``python``'s edgekit in one process.

    bash runs the step twice: first with an `edgekit` that records each call's arguments and folder (every call
    returns 0; the step's calls do not depend on earlier exit codes), then, once tests/cli_calls.py has run every
    recorded call through edgekit.cli.main, with one that replays what each call printed and returned, in turn.
    Each call answered costs a tenth of an `edgekit` process start.
    """
    shims = {"record": calls / "record-bin", "replay": calls / "replay-bin"}
    for kind, text in (("record", RECORDING_SHIM), ("replay", REPLAYING_SHIM)):
        shims[kind].mkdir(parents=True)
        (shims[kind] / "edgekit").write_text(text)
        (shims[kind] / "edgekit").chmod(0o755)
    env = env | {"EDGEKIT_CALLS": str(calls)}

    def bash(kind: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-e", "-c", script], cwd=workspace, capture_output=True, text=True,
                              env=env | {"PATH": f"{shims[kind]}{os.pathsep}{env['PATH']}"})

    recorded = bash("record")
    assert recorded.returncode == 0, recorded.stderr
    answered = subprocess.run([python, str(CLI_CALLS), str(calls)], cwd=workspace, env=env, capture_output=True, text=True)
    assert answered.returncode == 0, answered.stderr
    return bash("replay")


def test_ci_fit_gate_example_runs_verbatim_with_the_wheel(install, tmp_path):
    """docs/ci/github-fit-gate.yml: its run steps, unchanged, behave with the installed wheel as with the checkout (each
    step's edgekit calls answered in one process of the venv's python, or of this python with the checkout)."""
    workflow = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    steps = workflow["jobs"]["fit"]["steps"]
    version = next(s["with"]["python-version"] for s in steps if s.get("uses", "").startswith("actions/setup-python"))
    runs = [s for s in steps if "run" in s]
    # The install step builds and installs this same wheel; the venv stands in for it.
    assert runs[0]["run"].strip() == "pip install ."
    env = install(str(version))

    results = {}
    for label, python, make_env in (("wheel", str(env.bin / "python"), clean_env), ("checkout", sys.executable, checkout_env)):
        # A checkout of the repository as the runner sees it, plus the bundles artifact (manifests only).
        workspace = tmp_path / label
        shutil.copytree(REPO / "recipes", workspace / "recipes")
        shutil.copytree(REPO / "tests" / "golden" / "bundles", workspace / "bundles")
        run_env = make_env(env.home) | {"GITHUB_STEP_SUMMARY": str(workspace / "summary.md")}
        codes = []
        for step in runs[1:]:
            done = run_step(step["run"], workspace, tmp_path / f"{label}-calls-{len(codes)}", run_env, python)
            assert "Traceback" not in done.stdout + done.stderr, done.stderr
            annotations = [line for line in done.stdout.splitlines() if line.startswith("::")]
            codes.append((step.get("name"), done.returncode, annotations))
        reports = {p.name: p.read_text() for p in sorted((workspace / "reports").glob("*.xml"))}
        results[label] = codes, reports, (workspace / "summary.md").read_text()

    codes, reports, summary = results["wheel"]
    assert [name for name, _, _ in codes] == ["Recipes fit their boards (predicted)", "Bundles fit the target boards"]
    assert all(code in (0, 1) for _, code, _ in codes)  # a gate verdict, never a usage, config or backend error
    gated = sorted(f"fit-{p.stem}.xml" for p in (REPO / "recipes").glob("*.yaml")
                   if {"devices", "architecture"} <= set(yaml.safe_load(p.read_text()) or {}))
    assert sorted(reports) == sorted([*gated, "fit-bundles.xml"]) and gated
    assert results["wheel"] == results["checkout"]
    assert summary.count("\n") > 20
