#!/usr/bin/env bash
# Create .venv and install edgekit with the tested dependency set. Idempotent; sourced by the
# other scripts. The first run builds llama-cpp-python from source (about 6-10 minutes on 2 cores);
# pip caches the wheel afterwards.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGEKIT_VENV:-$ROOT/.venv}"
EXTRAS="${EDGEKIT_EXTRAS:-dev}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "edgekit setup: creating $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$VENV/.edgekit-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" 2>/dev/null | sha256sum | cut -d' ' -f1) $EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "edgekit setup: installing edgekit[$EXTRAS] (first run builds llama-cpp-python: several minutes)" >&2
  # torch==2.13.0 is pinned in pyproject: pip takes the CPU build from local disk, never a CUDA download.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c "$ROOT/constraints.txt" -e "$ROOT[$EXTRAS]" 2> >(grep -v "^WARNING: Location" >&2)
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
