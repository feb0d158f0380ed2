"""Workstation side of deploying to a board: `edgekit pack` makes a self-contained offline installer for one board.

- ``targets``     the instruction-set families llama.cpp is built for, and which one a device profile gets;
- ``llama_build`` llama-cpp-python cross-compiled for a target, cached by (version, target);
- ``wheelhouse``  edgekit's wheel and its runtime dependencies for the board's platform and Python;
- ``manifest``    pack.json: every file's sha256, the board, the target, the versions;
- ``assemble``    ``make_pack``: verify bundles, build, download, write the pack folder and DIR.tar.gz;
- ``board/``      what runs on the board: install.sh and the standard-library checks it runs first.
"""
