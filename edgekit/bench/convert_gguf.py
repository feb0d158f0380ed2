"""``python -m edgekit.bench.convert_gguf SOURCE OUT``: convert a checkpoint to f16 GGUF in a fresh process.

Workstation side (nothing on the board imports it): scripts/bench_gguf.py times this process so that
edgekit's conversion, like llama.cpp's convert_hf_to_gguf.py next to it, is timed with its imports.
"""

from __future__ import annotations

import sys
from pathlib import Path

from edgekit.export.gguf.convert import convert_checkpoint


def main() -> None:
    source, out = sys.argv[1:3]
    convert_checkpoint(Path(source), Path(out), outtype="F16")


if __name__ == "__main__":
    main()
