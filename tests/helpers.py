"""Constants and plain helpers the tests share (imported as ``helpers``: pytest puts tests/ on sys.path).

Fixtures live in conftest.py and the serve_fixtures plugin; this module has none, so importing it twice
cannot register anything twice.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM_GGUF = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"


def shared_temp(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this run shares (the run's own temp folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


def write_recipe(path: Path, source_dir: Path, **overrides) -> Path:
    """A small valid feature-extraction recipe pointing at ``source_dir``; ``overrides`` replace top-level keys."""
    import yaml

    recipe = {
        "name": "tiny",
        "source": {"path": str(source_dir)},
        "task": "feature-extraction",
        "max_length": 64,
        "targets": [{"format": "onnx", "name": "int8", "quantization": {"mode": "dynamic"}}],
        "validation": {"samples": ["hello world", "a second, longer sentence about edge devices", "ok"],
                       "gates": {"min_cosine_mean": 0.5}},
    }
    recipe.update(overrides)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, initializer_range=0.5)  # wide init: peaked next-token distributions


def save_checkpoint(model, out: Path, *, bf16: bool = True, safe: bool = True) -> None:
    import torch

    torch.manual_seed(0)
    if bf16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=safe)


def run_cli(*args: str, env: dict[str, str] | None = None, unset: tuple[str, ...] = (), cwd: Path | None = None,
            columns: int = 400):
    """`edgekit ARGS` run in this process through ``edgekit.cli.main``: exit code, stdout and stderr as a subprocess gives them.

    Half a second of interpreter start and imports cheaper than ``python -m edgekit``; the tests that use it keep a few
    real subprocess runs of the same commands. ``env`` is applied to os.environ for the call (settings read it) after
    the variables in ``unset`` are removed; ``columns`` is the terminal width rich and typer see (wide: messages stay
    on one line).
    """
    import contextlib
    import io
    import subprocess
    import sys

    import edgekit.cli as cli

    stdout, stderr = io.StringIO(), io.StringIO()
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    saved_widths = cli.out._width, cli.err._width
    for name in unset:
        os.environ.pop(name, None)
    os.environ.update({"COLUMNS": str(columns), **(env or {})})
    sys.argv = ["edgekit", *map(str, args)]
    cli.out.width = cli.err.width = columns
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):  # sys.exit("message"): Python prints it to stderr
            stderr.write(exc.code + "\n")
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        for name in set(os.environ) - set(saved_env):  # key by key: other threads may read the environment meanwhile
            del os.environ[name]
        os.environ.update({name: value for name, value in saved_env.items() if os.environ.get(name) != value})
        cli.out._width, cli.err._width = saved_widths
    return subprocess.CompletedProcess(["edgekit", *map(str, args)], code, stdout.getvalue(), stderr.getvalue())


def gguf_tensor_values(path: Path, names=None) -> dict:
    """{name: (TensorInfo, values as a flat float32 array)} of a GGUF file's tensors (or those in ``names``).

    Read through edgekit's header parser: gguf's GGUFReader turns every vocabulary string into numpy arrays when it
    opens a file, seconds per open for a 49,152-token vocabulary. Quantized tensors are dequantized with gguf's own code.
    """
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from edgekit.runtime.gguf_file import read_gguf_header

    header = read_gguf_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return {t.name: (t, np.asarray(dequantize(data[t.offset : t.offset + t.nbytes], GGMLQuantizationType[t.ggml_type]), np.float32))
            for t in header.tensors if names is None or t.name in names}


def gguf_metadata(path: Path) -> dict:
    """Every metadata value of a GGUF file, long arrays (tokens, merges) in full, through edgekit's header parser.

    The parser summarises arrays longer than KEEP_ARRAY_ITEMS by type and length; raised here, it keeps them, in
    milliseconds where gguf's GGUFReader takes seconds on a 49,152-token vocabulary.
    """
    from unittest import mock

    from edgekit.runtime import gguf_file

    with mock.patch.object(gguf_file, "KEEP_ARRAY_ITEMS", gguf_file.MAX_ARRAY_ITEMS):
        return gguf_file.read_gguf_header(path).metadata
