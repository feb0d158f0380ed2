"""Usage and configuration mistakes get a clear message and exit 2, never a Python traceback.

Each case runs `python -m edgekit` as a user would (the top-level handling in edgekit.cli.main is
part of what is tested); a wide COLUMNS keeps typer's message panels on one line.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import edgekit
from tests.conftest import REPO

RECIPE = str(REPO / "recipes" / "smollm2-135m-instruct.yaml")


def edgekit_cli(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = os.environ | {"COLUMNS": "200", "TERMINAL_WIDTH": "200", "EDGEKIT_HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "edgekit", *args], cwd=tmp_path, env=env, capture_output=True, text=True)


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
