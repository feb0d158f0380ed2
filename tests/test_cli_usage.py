"""Usage and configuration mistakes get a clear message and exit 2, never a Python traceback.

Each case runs edgekit's entry point, edgekit.cli.main, as a user would (its top-level handling is part of
what is tested): in this process through helpers.run_cli, and a few as `python -m edgekit` in a subprocess
(edgekit_process). A wide terminal keeps typer's message panels on one line.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO, run_cli

import edgekit

RECIPE = str(REPO / "recipes" / "smollm2-135m-instruct.yaml")


def edgekit_cli(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=tmp_path, env={"EDGEKIT_HOME": str(tmp_path)}, columns=200)


def edgekit_process(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = os.environ | {"COLUMNS": "200", "TERMINAL_WIDTH": "200", "EDGEKIT_HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "edgekit", *args], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_a_subprocess_reports_usage_errors_help_and_version(tmp_path):
    """`python -m edgekit` itself: a usage error exits 2 without a traceback, -h prints help, --version the version."""
    typo = edgekit_process("devicez", tmp_path=tmp_path)
    assert typo.returncode == 2 and "Traceback" not in typo.stdout + typo.stderr
    assert "No such command 'devicez'" in typo.stderr and "Did you mean 'devices'" in typo.stderr
    usage = edgekit_process("devices", "show", "no-such-board", tmp_path=tmp_path)
    assert usage.returncode == 2 and "error: unknown device 'no-such-board'" in usage.stderr and "Traceback" not in usage.stderr
    helped = edgekit_process("fit", "-h", tmp_path=tmp_path)
    assert helped.returncode == 0 and "Usage: edgekit fit" in helped.stdout and "--help" in helped.stdout
    version = edgekit_process("--version", tmp_path=tmp_path)
    assert (version.returncode, version.stdout, version.stderr) == (0, f"edgekit {edgekit.__version__}\n", "")


@pytest.mark.parametrize(("args", "expected"), [
    ((), ["Usage: edgekit [OPTIONS] COMMAND", "devices", "fit"]),
    (("devicez",), ["No such command 'devicez'", "Did you mean 'devices'"]),
    (("devices", "lisst"), ["No such command 'lisst'", "Did you mean 'list'"]),
    (("devices", "list", "--bogus"), ["No such option: --bogus"]),
    (("plan", RECIPE), ["Missing option '--device'"]),
    (("devices", "show"), ["Missing argument 'device'"]),
    (("fit", "--recipe", RECIPE, "--ctx", "abc"), ["Invalid value for '--ctx'"]),
    (("fit",), ["give bundle folders or --recipe RECIPE"]),
    (("devices",), ["Usage: edgekit devices [OPTIONS] COMMAND", "list", "show"]),
    (("recipes",), ["Usage: edgekit recipes [OPTIONS] COMMAND", "list"]),
    (("devices", "show", "no-such-board"), ["error: unknown device 'no-such-board'", "rpi-5-8gb"]),
    (("fit", "--recipe", "no-such-recipe.yaml"), ["error: no-such-recipe.yaml"]),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_usage_errors_exit_2_without_traceback(args, expected, tmp_path):
    done = edgekit_cli(*args, tmp_path=tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode == 2, text
    assert "Traceback" not in text
    for fragment in expected:
        assert fragment in text


def test_version_prints_the_package_version(tmp_path):
    done = edgekit_cli("--version", tmp_path=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"edgekit {edgekit.__version__}\n", "")


@pytest.mark.parametrize("args", [("-h",), ("--help",), ("devices", "-h"), ("fit", "-h"), ("devices", "list", "-h")],
                         ids=" ".join)
def test_h_is_help_everywhere(args, tmp_path):
    done = edgekit_cli(*args, tmp_path=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr
    assert f"Usage: edgekit {' '.join(a for a in args if not a.startswith('-'))}".rstrip() in done.stdout
    assert "-h" in done.stdout and "--help" in done.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (("fit", "--recipe", RECIPE, "--ctx", "0"), "--ctx 0: must be at least 1"),
    (("fit", "--recipe", RECIPE, "--ctx", "-5"), "--ctx -5: must be at least 1"),
    (("fit", "--recipe", RECIPE, "--parallel", "0"), "--parallel 0: must be at least 1 and at most 256"),
    (("fit", "--recipe", RECIPE, "--headroom", "2"), "--headroom 2.0: must be at least 0 and less than 1"),
    (("fit", "--recipe", RECIPE, "--threads", "0"), "--threads 0: must be at least 1"),
    (("fit", "--recipe", RECIPE, "--min-tok-s", "-1"), "--min-tok-s -1.0: must be greater than 0"),
    (("plan", RECIPE, "-d", "rpi-5-8gb", "--ctx", "0"), "--ctx 0: must be at least 1"),
    (("plan", RECIPE, "-d", "rpi-5-8gb", "--max-latency-ms", "0"), "--max-latency-ms 0.0: must be greater than 0"),
    (("serve", "--port", "70000"), "--port 70000: must be at least 0 and at most 65535"),
    (("profile-host", "--id", "My Host"), "--id 'My Host' is not a valid device id"),
    (("profile-host", "--bandwidth-mib", "0"), "Invalid value for '--bandwidth-mib'"),
    (("bench", "x", "--threads", "0"), "Invalid value for '--threads'"),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_out_of_range_values_name_the_flag_and_range(args, expected, tmp_path):
    done = edgekit_cli(*args, tmp_path=tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode == 2, text
    assert "Traceback" not in text and "pydantic" not in text
    assert expected in text


GOLDEN_Q8 = REPO / "tests" / "golden" / "bundles" / "smollm2-135m-instruct-q8-0"


@pytest.mark.parametrize(("args", "expected"), [
    (("fit", GOLDEN_Q8, "--junit", "{tmp}"), "--junit {tmp}: is a folder; a file path is expected"),
    (("fit", GOLDEN_Q8, "--junit", "{tmp}/missing/fit.xml"), "folder {tmp}/missing does not exist"),
    (("service", "unit", "--memory-budget-mb", "100", "--output", "{tmp}"), "--output {tmp}: is a folder"),
    (("service", "unit", "--memory-budget-mb", "100", "--output", "{tmp}/missing/u.service"),
     "folder {tmp}/missing does not exist"),
    (("bench", GOLDEN_Q8, "--plot", "{tmp}"), "--plot {tmp}: is a folder"),
    (("bench", GOLDEN_Q8, "--plot", "{tmp}/missing/p.png"), "folder {tmp}/missing does not exist"),
    (("profile-host", "--out", "{tmp}"), "--out {tmp}: is a folder"),
    (("profile-host", "--out", "{tmp}/missing/board.yaml"), "folder {tmp}/missing does not exist"),
    (("bundles", "/no/such/dir"), "/no/such/dir: no such folder"),
    (("inspect", "/no/such/path"), "/no/such/path: no such bundle"),
    (("bench", "/no/such/path"), "/no/such/path: no such bundle"),
    (("fit", "/no/such/path"), "/no/such/path: no such bundle"),
    (("fit", RECIPE), f"for a recipe, use `edgekit fit --recipe {RECIPE}`"),
    (("export", RECIPE, "--target", "typo", "--dry-run"), "no target named typo\n  fix: targets are: q8-0, q4-k-m"),
    (("plan", RECIPE, "-d", "rpi-5-8gb", "-d", "rpi-4-2gb"), "plan takes one --device, got 2: rpi-5-8gb, rpi-4-2gb"),
    (("bench", GOLDEN_Q8, "--prompt-file", "{tmp}/missing/prompt.txt"), "Invalid value for '--prompt-file'"),
    (("bench", GOLDEN_Q8, "--calibrate", "{tmp}"), "Invalid value for '--calibrate'"),
    (("recipes", "list", "--dir", "{tmp}/missing"), "Invalid value for '--dir'"),
    (("export", RECIPE, "--out", RECIPE, "--dry-run"), f"--out {RECIPE}: is a file; bundles are written into a folder"),
    (("serve", "--models", "{tmp}/missing"), "--models {tmp}/missing: no such folder"),
    (("fit", "--recipe", RECIPE, "--bundles-dir", "{tmp}/missing"), "Invalid value for '--bundles-dir'"),
    (("service", "unit", "--device", "no-such-board", "--memory-budget-mb", "100"), "unknown device 'no-such-board'"),
], ids=lambda v: " ".join(map(str, v)).replace(str(REPO), "") if isinstance(v, tuple) else None)
def test_bad_paths_exit_2_with_one_clear_line(args, expected, tmp_path):
    tmp = str(tmp_path)
    done = run_cli(*(str(a).replace("{tmp}", tmp) for a in args), cwd=tmp_path, env={"EDGEKIT_HOME": tmp}, columns=300)
    text = done.stdout + done.stderr
    assert done.returncode == 2, text
    assert "Traceback" not in text
    assert expected.replace("{tmp}", tmp) in text
    assert not (tmp_path / "missing").exists()  # missing parent folders are never created


def test_github_annotations_stay_out_of_json_on_stdout(tmp_path):
    import json

    done = edgekit_cli("fit", str(GOLDEN_Q8), "-d", "rpi-zero-2w", "--ctx", "8192", "--github", "--json", tmp_path=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert [r["verdict"] for r in json.loads(done.stdout)] == ["fail"]
    assert "::error title=edgekit fit%3A smollm2-135m-instruct-q8-0 on rpi-zero-2w::" in done.stderr


@pytest.mark.parametrize("args", [
    ("fit", "--recipe", "smollm2-135m-instruct", "-d", "rpi-5-8gb", "--json"),
    ("plan", "smollm2-135m-instruct", "-d", "rpi-5-8gb", "--json"),
], ids=" ".join)
def test_recipe_names_resolve_against_the_library(args, tmp_path):
    import json

    by_name = edgekit_cli(*args, tmp_path=tmp_path)
    by_path = edgekit_cli(*(RECIPE if a == "smollm2-135m-instruct" else a for a in args), tmp_path=tmp_path)
    assert by_name.returncode == by_path.returncode == 0, by_name.stderr
    assert json.loads(by_name.stdout) == json.loads(by_path.stdout)


def test_export_takes_a_recipe_name(tmp_path):
    # The test's model store is empty, so a dry run stops at the source; a bad target shows the recipe was loaded.
    done = edgekit_cli("export", "smollm2-135m-instruct", "--target", "typo", "--dry-run", tmp_path=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "smollm2-135m-instruct.yaml: no target named typo\n  fix: targets are: q8-0, q4-k-m" in done.stderr
    done = edgekit_cli("export", "smollm2-135m-instruct", "--dry-run", tmp_path=tmp_path)
    assert done.returncode == 2 and "HuggingFaceTB/SmolLM2-135M-Instruct: not in the model store" in done.stderr


def test_an_unknown_recipe_name_suggests_the_closest(tmp_path):
    done = edgekit_cli("plan", "smollm2-135m-instrct", "-d", "rpi-5-8gb", tmp_path=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "smollm2-135m-instrct: no such recipe file" in done.stderr
    assert "did you mean 'smollm2-135m-instruct'?" in done.stderr


@pytest.mark.parametrize("command", [("fit", "-d", "rpi-5-8gb", "--json"), ("inspect", "--no-verify", "--json")], ids=" ".join)
def test_bundle_names_resolve_against_the_bundles_folder(command, tmp_path):
    import json
    import shutil

    shutil.copytree(GOLDEN_Q8, tmp_path / "bundles" / GOLDEN_Q8.name)
    name = edgekit_cli(command[0], GOLDEN_Q8.name, *command[1:], tmp_path=tmp_path)
    path = edgekit_cli(command[0], str(GOLDEN_Q8), *command[1:], tmp_path=tmp_path)
    assert name.returncode == path.returncode == 0, name.stderr
    assert json.loads(name.stdout) == json.loads(path.stdout)
    typo = edgekit_cli(command[0], GOLDEN_Q8.name[:-1], *command[1:], tmp_path=tmp_path)
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert f"did you mean '{GOLDEN_Q8.name}'?" in typo.stderr


def test_resolvers_take_paths_names_and_manifest_files(tmp_path, monkeypatch):
    from edgekit.errors import ConfigError
    from edgekit.library import resolve_bundle, resolve_recipe, shipped_folder

    monkeypatch.setenv("EDGEKIT_HOME", str(tmp_path))
    (tmp_path / "bundles" / "b1").mkdir(parents=True)
    assert resolve_bundle("b1") == tmp_path / "bundles" / "b1"
    assert resolve_bundle(GOLDEN_Q8 / "manifest.json") == GOLDEN_Q8
    assert resolve_recipe("smollm2-135m-instruct") == shipped_folder("recipes") / "smollm2-135m-instruct.yaml"
    assert resolve_recipe("smollm2-135m-instruct.yaml") == shipped_folder("recipes") / "smollm2-135m-instruct.yaml"
    with pytest.raises(ConfigError, match="is a recipe, not a bundle"):
        resolve_bundle(RECIPE)
    with pytest.raises(ConfigError, match="no such bundle"):
        resolve_bundle("sub/b1")  # a name is a bare name, never a path into the bundles folder


def test_shell_completion_script_and_names(tmp_path):
    """--show-completion prints the script (shell named explicitly: detection depends on the parent process);
    the script's protocol completes commands, options and names from the catalog and the recipe library."""
    env = {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    script = subprocess.run([sys.executable, "-m", "edgekit", "--show-completion", "bash"], capture_output=True, text=True,
                            env=os.environ | env)
    assert script.returncode == 0 and "_EDGEKIT_COMPLETE=complete_bash" in script.stdout

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        done = run_cli(env={"_EDGEKIT_COMPLETE": "complete_bash", "COMP_WORDS": line, "COMP_CWORD": str(len(words) - 1)})
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    # the protocol through a real process once, the other cases in this one
    by_process = subprocess.run([sys.executable, "-m", "edgekit"], capture_output=True, text=True, env=os.environ | {
        "_EDGEKIT_COMPLETE": "complete_bash", "COMP_WORDS": "edgekit dev", "COMP_CWORD": "1"})
    assert by_process.returncode == 0 and by_process.stdout.split() == ["devices"], by_process.stderr

    assert complete("edgekit dev") == ["devices"]
    assert complete("edgekit fit --dev") == ["--device"]
    assert complete("edgekit fit -d rpi-5") == ["rpi-5-16gb", "rpi-5-4gb", "rpi-5-8gb"]
    assert complete("edgekit plan smollm2-1") == ["smollm2-1.7b-instruct", "smollm2-135m-instruct"]
    assert complete("edgekit devices show rpi-zer") == ["rpi-zero-2w"]


@pytest.mark.parametrize(("args", "expected"), [
    (("devices", "show", "rpi-5-8g"), "did you mean 'rpi-5-8gb'?"),
    (("fit", str(GOLDEN_Q8), "-d", "rpi4-2gb"), "did you mean 'rpi-4-2gb'?"),
    (("plan", "smollm2-135m-instruct", "-d", "rpi-zero2w"), "did you mean 'rpi-zero-2w'?"),
    (("service", "unit", "--device", "rpi-zero-w2", "--memory-budget-mb", "100"), "did you mean 'rpi-zero-2w'?"),
    (("plan", "-d", "rpi-4-2gb", "--task", "text-generaton"), "did you mean 'text-generation'?"),
], ids=lambda v: " ".join(map(str, v)).replace(str(REPO), "") if isinstance(v, tuple) else None)
def test_names_get_a_did_you_mean(args, expected, tmp_path):
    done = edgekit_cli(*args, tmp_path=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert expected in done.stderr


def test_each_command_comes_from_the_module_the_table_names():
    """``COMMAND_MODULES`` (what a run imports for its command) says which module registers each command and group."""
    import importlib

    from edgekit.cli import COMMAND_MODULES, app

    for module in COMMAND_MODULES:
        importlib.import_module(f"edgekit.cli.{module}")
    registered = {command.name: command.callback.__module__ for command in app.registered_commands}
    registered |= {group.name: group.typer_instance.registered_commands[0].callback.__module__ for group in app.registered_groups}
    assert registered == {name: f"edgekit.cli.{module}" for module, names in COMMAND_MODULES.items() for name in names}


def test_a_command_imports_only_its_own_module():
    """`edgekit serve` loads the serve command's module, not the export, fit or fleet code; help loads them all."""
    code = ("import sys; from edgekit.cli import load_commands; load_commands(sys.argv[1:]); "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('edgekit.cli.') and m != 'edgekit.cli.flags')))")
    loaded = {args: subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout.split()
              for args in [("serve", "--models", "fit"), ("--version",), ("node-labels", "-h")]}
    assert loaded[("serve", "--models", "fit")] == ["edgekit.cli.serve"]
    assert loaded[("node-labels", "-h")] == ["edgekit.cli.fleet"]
    assert loaded[("--version",)] == [f"edgekit.cli.{m}" for m in sorted(["bench", "doctor", "export", "fit", "fleet", "pack", "serve"])]
