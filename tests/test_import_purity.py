"""Board-side modules never pull in the workstation stack (torch, transformers, optimum)."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "optimum")


@pytest.mark.parametrize("module", ["edgekit.runtime.encoder", "edgekit.runtime.checks", "edgekit.serve.app", "edgekit.serve.worker", "edgekit.runtime.llm", "edgekit.runtime.verify", "edgekit.bundle", "edgekit.schema", "edgekit.cli",
                                    "edgekit.serve", "edgekit.bench.run", "edgekit.bench.child", "edgekit.cli.serve", "edgekit.cli.bench",
                                    "edgekit.cli.fit", "edgekit.cli.export"])
def test_board_side_import_is_light(module):
    code = f"import json, sys, {module}; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []
