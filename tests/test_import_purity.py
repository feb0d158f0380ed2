"""What each side of the kit may import: one table, each row checked in a fresh interpreter (a child forked from a
bare one: tests/imported_modules.py --groups).

Board-side modules never pull in the workstation stack; fit runs on a CI runner with only the core install
(no numpy, no engines) and holds no measurement code; doctor imports no engine (it probes each in a subprocess).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

LISTER = Path(__file__).with_name("imported_modules.py")
WORKSTATION = ("torch", "transformers", "optimum", "edgekit.export")
ENGINES = ("llama_cpp", "onnxruntime")
# What a core-only install (a CI runner) lacks: the runtime extra's packages.
CORE_ONLY = (*WORKSTATION, *ENGINES, "onnx", "gguf", "numpy", "tokenizers", "jinja2", "fastapi", "uvicorn",
             "prometheus_client", "psutil")

BOARD = ["edgekit.runtime.encoder", "edgekit.runtime.checks", "edgekit.runtime.llm", "edgekit.runtime.verify",
         "edgekit.runtime.gguf_file", "edgekit.runtime.chat_template", "edgekit.bundle", "edgekit.schema",
         "edgekit.serve", "edgekit.serve.app", "edgekit.serve.worker", "edgekit.bench.run", "edgekit.bench.child",
         "edgekit.cli.serve", "edgekit.cli.bench", "edgekit.fleet.board", "edgekit.fleet.signing", "edgekit.cli.fleet",
         "edgekit.fleet.k8s", "edgekit.fleet.labels", "edgekit.fleet.daemon_check"]
# (modules imported together, packages none of them may load)
RULES = [
    *[((module,), WORKSTATION) for module in BOARD],
    (("edgekit.cli",), WORKSTATION),
    (("edgekit.cli.export",), WORKSTATION),  # the exporter loads lazily, when a recipe is run
    (("edgekit.runtime.gguf_file", "edgekit.runtime.chat_template"), ("llama_cpp",)),  # read headers without the engine
    (("edgekit.runtime.golden",), (*WORKSTATION, "llama_cpp")),
    (("edgekit.cli.doctor",), (*WORKSTATION, *ENGINES)),
    (("edgekit.fit", "edgekit.fit.plan", "edgekit.fit.report", "edgekit.fit.speed"), (*CORE_ONLY, "edgekit.bench")),
    (("edgekit.bundle", "edgekit.cli.fit"), CORE_ONLY),
]


def loaded_by(modules: tuple[str, ...]) -> list[str]:
    done = subprocess.run([sys.executable, str(LISTER), *modules], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def loaded_per_rule() -> dict[tuple[str, ...], list[str]]:
    """What each rule's modules load, every rule in a child of its own from one lister process."""
    groups = [list(modules) for modules, _ in RULES]
    done = subprocess.run([sys.executable, str(LISTER), "--groups", json.dumps(groups)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return {modules: loaded for (modules, _), loaded in zip(RULES, json.loads(done.stdout), strict=True)}


@pytest.mark.parametrize(("modules", "forbidden"), RULES, ids=[" ".join(m) for m, _ in RULES])
def test_imports_stay_on_their_side(modules, forbidden, loaded_per_rule):
    found = [name for name in loaded_per_rule[modules] if any(name == f or name.startswith(f"{f}.") for f in forbidden)]
    assert found == []


def test_the_check_sees_a_forbidden_import():
    """The lister reports what an import pulls in (so an empty answer above means something), in a fresh interpreter and
    in a forked child alike; a child loads only what its own group imports."""
    assert {"edgekit.export", "edgekit.export.onnx"} <= set(loaded_by(("edgekit.export.onnx",)))
    groups = [["edgekit.export.onnx"], ["edgekit.runtime.cpu"]]
    done = subprocess.run([sys.executable, str(LISTER), "--groups", json.dumps(groups)], capture_output=True, text=True,
                          check=True)
    onnx, cpu = map(set, json.loads(done.stdout))
    assert {"edgekit.export", "edgekit.export.onnx"} <= onnx and "edgekit.export" not in cpu and "edgekit.runtime.cpu" in cpu
