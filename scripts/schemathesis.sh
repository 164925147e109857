#!/usr/bin/env bash
# schemathesis against openapi.yaml and the live server (debug build, the tiny fixture model, admin API on):
# every response must conform to the spec and none may be a 5xx.
#   scripts/schemathesis.sh ST_BINARY [SECONDS]
# positive_data_acceptance is left out: the spec can only say "binary" for an image, so random bytes are
# schema-valid, and the server rightly refuses them (400 undecodable_image, 415 unsupported_media_type).
set -euo pipefail
st=$1
seconds=${2:-60}
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir "$work/models"
cp tests/fixtures/tiny_cnn.onnx "$work/models/"
token=schemathesis-token-0123456789
cat >"$work/camserve.toml" <<TOML
[runtime]
library = "$PWD/.ort/onnxruntime/capi/libonnxruntime.so.1.31.1"
[admin]
models_dir = "$work/models"
[label_studio]
model = "tiny"
allowed_hosts = ["127.0.0.1:1"]   # allowed, refuses connections: task images fail to fetch (empty predictions)
fetch_timeout_secs = 2
[[models]]
name = "tiny"
file = "$PWD/tests/fixtures/tiny_cnn.onnx"
TOML
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target/debug/camserve serve --config "$work/camserve.toml" --bind "127.0.0.1:$port" --admin-token "$token" \
  2>"$work/server.log" &
server=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
# One worker: with two, schemathesis 4.32.5 sometimes stopped with an internal KeyError (a race in a cache).
# A fixed seed makes CI reproducible: one random run in six reported ST201 for a multipart explain body that does
# carry its `image` part (schemathesis's negative multipart bodies serialize back into valid ones); change the
# seed by hand to explore further.
"$st" run openapi.yaml --url "http://127.0.0.1:$port" --checks all --exclude-checks positive_data_acceptance \
  -H "Authorization: Bearer $token" --max-time "$seconds" --workers 1 --no-color \
  --seed 248563537464428008921350937073655553785
if grep -q "panicked" "$work/server.log"; then
  echo "the server panicked:" && grep -A5 panicked "$work/server.log" && exit 1
fi
