#!/usr/bin/env python3
"""`make soak`: 50 concurrent clients for 60 s against the release binary on loopback, twice: once plain, once
with the model replaced through the admin API in the middle. Passes when every answer is 200 or a deliberate 503
(a full queue), no connection fails, and resident memory stays flat (with replacements: comes back to within
10% of where it was). Prints p50 and p99.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench import MODEL, OHA, ORT_LIBRARY, PHOTO, RELEASE, free_port, rss_mib

TOKEN = "soak-admin-token-0123456789"


def start(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = workdir / "soak.toml"
    config.write_text(
        f'[runtime]\nlibrary = "{ORT_LIBRARY}"\n[admin]\nmodels_dir = "{MODEL.parent}"\n'
        f'[[models]]\nname = "default"\nfile = "{MODEL}"\nsessions = 1\nthreads = 2\nqueue_capacity = 32\n')
    process = subprocess.Popen([RELEASE / "camserve", "serve", "--config", config, "--bind", f"127.0.0.1:{port}",
                                "--admin-token", TOKEN], stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(base + "/readyz").read()
            return process, base
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("camserve did not become ready")


def replace_model(base: str) -> int:
    body = json.dumps({"file": MODEL.name, "threads": 2}).encode()
    request = urllib.request.Request(base + "/v1/models/default", data=body, method="PUT",
                                     headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return response.status


def soak(base: str, pid: int, body: Path, seconds: int, clients: int, replace: bool) -> dict:
    samples: list[float] = []
    replacements: list[int] = []
    done = threading.Event()

    def watch():
        started = time.monotonic()
        replaced_at = {seconds // 3, 2 * seconds // 3} if replace else set()
        while not done.wait(1.0):
            elapsed = int(time.monotonic() - started)
            samples.append(rss_mib(pid))
            if elapsed in replaced_at:
                replaced_at.discard(elapsed)
                replacements.append(replace_model(base))

    watcher = threading.Thread(target=watch)
    watcher.start()
    out = subprocess.run([OHA, "-z", f"{seconds}s", "-c", str(clients), "-m", "POST", "-H", "content-type: image/jpeg",
                          "-D", str(body), "--no-tui", "--output-format", "json",
                          base + "/v1/models/default/explain?output=overlay"],
                         check=True, capture_output=True, text=True).stdout
    done.set()
    watcher.join()
    result = json.loads(out)
    warm = samples[len(samples) // 4:]  # after the first quarter: allocators and caches have grown
    return {
        "statuses": result.get("statusCodeDistribution", {}),
        # oha's duration mode cuts the requests still in flight when time is up: not the server's doing.
        "errors": {k: v for k, v in result.get("errorDistribution", {}).items() if k != "aborted due to deadline"},
        "rps": result["summary"]["requestsPerSec"],
        "p50_ms": result["latencyPercentiles"]["p50"] * 1e3,
        "p99_ms": result["latencyPercentiles"]["p99"] * 1e3,
        "rss_first_mib": warm[0],
        "rss_last_mib": warm[-1],
        "rss_max_mib": max(warm),
        "replacements": replacements,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        subprocess.run([RELEASE / "examples/bench_ort", "inputs", PHOTO, workdir], check=True)
        process, base = start(workdir)
        try:
            for name, replace in (("plain", False), ("model replaced twice", True)):
                r = soak(base, process.pid, workdir / "photo_224.jpg", args.seconds, args.clients, replace)
                print(f"{name}: {r['rps']:.0f} requests/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                      f"statuses {r['statuses']}, connection errors {r['errors']}, resident memory "
                      f"{r['rss_first_mib']:.0f} -> {r['rss_last_mib']:.0f} MiB (max {r['rss_max_mib']:.0f})"
                      + (f", replacements answered {r['replacements']}" if replace else ""))
                unexpected = set(r["statuses"]) - {"200", "503"}
                if unexpected or r["errors"] or "200" not in r["statuses"]:
                    failures.append(f"{name}: statuses {r['statuses']}, errors {r['errors']}")
                # A replacement holds two copies of the model while the old one drains: the peak may rise then,
                # but memory must come back.
                grown = r["rss_last_mib"] if replace else r["rss_max_mib"]
                if grown > 1.10 * r["rss_first_mib"]:
                    failures.append(f"{name}: memory grew from {r['rss_first_mib']:.0f} to {grown:.0f} MiB")
                if replace and r["replacements"] != [200, 200]:
                    failures.append(f"{name}: replacements answered {r['replacements']}")
        finally:
            process.terminate()
            process.wait(timeout=60)
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
