#!/usr/bin/env bash
# Runs the tree that the CPU image holds in /opt/camserve (made here by scripts/build-release.sh, as the
# Dockerfile does) the way the image runs it: its baked config, its ONNX Runtime, its model; then the
# HEALTHCHECK command, one explanation, and the resident memory of the default model (for docs/deployment.md).
#   scripts/test-image-root.sh PREFIX
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=$(cd "${1:?PREFIX}" && pwd)
export CAMSERVE_CONFIG=$prefix/config/camserve.toml
camserve=$prefix/bin/camserve
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url=http://127.0.0.1:$port

# Nothing outside PREFIX: no .ort, no repository paths in the config.
if grep -n '\.ort\|/work/' "$CAMSERVE_CONFIG"; then echo "the baked config points outside the image" >&2; exit 1; fi

"$camserve" serve --bind "127.0.0.1:$port" 2> target/image-root.log &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  "$camserve" healthcheck --url "$url/readyz" 2>/dev/null && break
  kill -0 $server 2>/dev/null || { cat target/image-root.log >&2; exit 1; }
  sleep 0.5
done
"$camserve" healthcheck --url "$url/readyz"
echo "healthcheck: ready on $url"

answer=$(python3 - "$url" <<'PY'
import json, sys, urllib.request
image = open("tests/fixtures/images/chelsea_224.png", "rb").read()
for _ in range(20):  # enough requests for the arenas to reach their steady size
    request = urllib.request.Request(sys.argv[1] + "/v1/models/efficientnet_lite0/explain",
                                     data=image, headers={"content-type": "image/png"})
    body = json.load(urllib.request.urlopen(request))
print(body["explanations"][0]["label"])
PY
)
echo "explain: top class \`$answer\`"
[[ $answer == tabby || $answer == "tiger cat" || $answer == "Egyptian cat" ]] || { echo "not a cat" >&2; exit 1; }
grep -E '^(VmRSS|VmHWM)' /proc/$server/status | sed 's/^/memory of the default model (1 session of 2 threads, split under load): /'

kill -TERM $server
wait $server
grep -q '"stopped"\|stopped' target/image-root.log || { echo "camserve did not stop cleanly" >&2; exit 1; }
echo "SIGTERM: stopped cleanly"
