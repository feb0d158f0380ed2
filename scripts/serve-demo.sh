#!/usr/bin/env bash
# Serve a folder of bundles on loopback, show one curl and one openai-client call against it,
# then keep serving in the foreground until Ctrl-C. Usage: scripts/serve-demo.sh [BUNDLES_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
BUNDLES="${1:-${EDGEKIT_HOME:-$HOME/.cache/edgekit}/bundles}"
PORT="${EDGEKIT_PORT:-8080}"
URL="http://127.0.0.1:$PORT"

edgekit serve --models "$BUNDLES" --port "$PORT" --preload smollm2-135m-instruct-q4-k-m &
DAEMON=$!
trap 'kill -TERM $DAEMON 2>/dev/null; wait $DAEMON' INT TERM
for _ in $(seq 1 240); do
  curl -fsS "$URL/health" >/dev/null 2>&1 && break
  kill -0 $DAEMON 2>/dev/null || { echo "the daemon exited; see its log above" >&2; exit 3; }
  sleep 0.5
done

echo "== models served at $URL/v1" >&2
curl -sS "$URL/v1/models"; echo

echo "== curl: chat completion" >&2
set -x
curl -sS "$URL/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "smollm2-135m-instruct-q4-k-m",
  "messages": [{"role": "user", "content": "Name one use of a Raspberry Pi in a sentence."}],
  "max_tokens": 48, "temperature": 0
}'
{ set +x; } 2>/dev/null
echo

echo "== openai client: embeddings" >&2
python - "$URL" <<'PY'
import sys
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused-on-loopback")
result = client.embeddings.create(model="all-minilm-l6-v2-int8-dynamic", input=["The parcel arrived on time.", "The package was delivered on time."])
a, b = (item.embedding for item in result.data)
print(f"{len(result.data)} embeddings of {len(a)} dims; cosine {sum(x * y for x, y in zip(a, b)):.3f}")
PY

echo "== serving until Ctrl-C (metrics: $URL/metrics)" >&2
wait $DAEMON
