"""The real camserve binary and loopback file servers, for the Python tests (tests/consumers, tests/label_studio)."""

import contextlib
import os
import re
import ssl
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
ORT = ROOT / ".ort" / "onnxruntime" / "capi" / "libonnxruntime.so.1.31.1"


def binary():
    if os.environ.get("CAMSERVE_BIN"):
        return Path(os.environ["CAMSERVE_BIN"])
    for profile in ("release", "debug"):
        path = ROOT / "target" / profile / "camserve"
        if path.exists():
            return path
    raise RuntimeError("build camserve first (cargo build)")


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_directory(directory, tls: ssl.SSLContext | None = None):
    """Serves `directory` on a free loopback port (over TLS with `tls`); yields `127.0.0.1:port`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(directory)))
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Camserve:
    """A running camserve: its base URL and every line it has logged so far."""

    def __init__(self, url, log):
        self.url = url
        self.log = log


@contextlib.contextmanager
def start(config_path: Path, env=None):
    """Starts `camserve serve` with the config file (and `env` added to the environment) on a free loopback port;
    stops it (SIGTERM) on exit."""
    process = subprocess.Popen(
        [str(binary()), "serve", "--config", str(config_path), "--bind", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, **(env or {})),
    )
    log = []
    address = None
    for line in process.stderr:
        log.append(line)
        found = re.search(r"address\W+(127\.0\.0\.1:\d+)", line)
        if "serving" in line and found:
            address = found.group(1)
            break
    if address is None:
        process.kill()
        raise RuntimeError("camserve did not start:\n" + "".join(log))
    # Keep reading its log so that it never blocks on a full pipe.
    threading.Thread(target=lambda: log.extend(process.stderr), daemon=True).start()
    try:
        yield Camserve(f"http://{address}", log)
    finally:
        process.terminate()
        process.wait(timeout=10)
