"""Quantize a GGUF file with llama.cpp's own quantizer (``llama_model_quantize`` via llama-cpp-python)."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from edgekit.errors import ExportError
from edgekit.formats.gguf import FILE_TYPES
from edgekit.runtime.placement import bound_openmp_spin

# Recipe quant name -> llama_ftype constant in llama_cpp (the file-type table of edgekit.formats.gguf).
QUANT_FTYPES: dict[str, str] = {name: file_type.ftype for name, file_type in FILE_TYPES.items()}
# Source file types that are precise enough to start from without opting in (issue 3).
LOSSLESS_ENOUGH = tuple(name for name, file_type in FILE_TYPES.items() if file_type.lossless_enough)


def default_threads() -> int:
    """Threads for llama.cpp and torch: the cores not already busy, 1 to 4.

    llama.cpp's threads spin at barriers, so oversubscribed cores cost more than they give
    (on 2 busy cores, 2 threads took twice as long as 1 on a SmolLM2 window; PyTorch 3x).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(4, cores - busy))


@contextmanager
def quiet_llama(verbose: bool = False):
    """Let llama.cpp's log lines through llama-cpp-python's logger only at ERROR level unless verbose.

    llama.cpp also logs from destructors after the call returns, so an unset level is left at
    ERROR afterwards rather than restored to "everything".
    """
    logger = logging.getLogger("llama-cpp-python")
    previous = logger.level if logger.level != logging.NOTSET else logging.ERROR
    logger.setLevel(logging.DEBUG if verbose else logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextmanager
def captured_stderr():
    """Collect what native code writes to file descriptor 2 (llama.cpp prints per-tensor notes there).

    Yields a callable returning the captured text, for error messages.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (sink.seek(0), sink.read().decode("utf-8", errors="replace"))[1]
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def quantize(source: Path, out: Path, quant: str, *, requantize: bool = False, threads: int | None = None) -> Path:
    """Write ``source`` quantized to ``quant`` at ``out``; ``requantize`` must be set when the source is quantized."""
    bound_openmp_spin()
    import llama_cpp
    import llama_cpp._logger  # noqa: F401  (installs the log callback the quiet_llama level applies to)

    if quant not in QUANT_FTYPES:
        raise ExportError(f"quant type {quant!r} unknown", hint=f"use one of {', '.join(QUANT_FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[quant])
    params.nthread = threads or default_threads()
    params.allow_requantize = requantize
    with quiet_llama(verbose=True), captured_stderr() as log:  # all of it into the capture
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
        if status != 0 or not out.is_file():
            text = log()
            # llama.cpp reports the cause as "...: failed to quantize: <why>", possibly mid-line.
            reasons = re.findall(r"failed to quantize: ([^\n]+)", text)
            tail = reasons[-1] if reasons else "\n".join(text.strip().splitlines()[-8:])
            failed = True
        else:
            failed = False
    if failed:
        raise ExportError(f"llama.cpp could not quantize {source.name} to {quant} (status {status}): {tail}")
    return out
