"""Byte-compile what the board runs, once at install time: ``python -m edgekit.pack.board.precompile``.

install.sh installs the pack's wheels with ``pip --no-compile``: pip would byte-compile every module of
every wheel (about 41 MB of Python for edgekit[runtime], most of it never imported on a board: numpy's
and onnx's tests, onnxruntime's quantization and transformer tools, pygments' lexers, pip itself), which
took 36 of pip's 51 CPU seconds on an emulated Cortex-A72. This compiles all of edgekit and imports
the modules the board's commands import (the CLI with every command, the daemon, its workers, the
golden checks, the runtimes), so exactly those get their bytecode written. The service runs as a user
that cannot write the release: what is compiled here is what it never recompiles at start.
"""

from __future__ import annotations

import compileall
import importlib
import sys
from pathlib import Path

# What `edgekit` imports at every start (edgekit.cli.main registers one module per command group).
CLI_MODULES = ("edgekit.cli", "edgekit.cli.export", "edgekit.cli.serve", "edgekit.cli.fit", "edgekit.cli.bench",
               "edgekit.cli.pack", "edgekit.cli.doctor")
# What the daemon, its workers and doctor's subprocesses import beyond the CLI, including the parts of
# uvicorn it picks when it starts (imported by name there, not at import).
RUNTIME_MODULES = ("edgekit.serve.app", "edgekit.serve.worker", "edgekit.runtime.golden", "edgekit.runtime.llm",
                   "edgekit.runtime.encoder", "llama_cpp", "onnxruntime", "tokenizers", "uvicorn",
                   "uvicorn.protocols.http.h11_impl", "uvicorn.lifespan.on", "uvicorn.loops.asyncio")


def main() -> int:
    sys.dont_write_bytecode = False  # imports below write their bytecode even under PYTHONDONTWRITEBYTECODE
    import edgekit

    ok = compileall.compile_dir(Path(edgekit.__file__).parent, quiet=1)
    for name in CLI_MODULES + RUNTIME_MODULES:
        importlib.import_module(name)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
