#!/usr/bin/env python3
"""`make bench`: camserve against the bare ONNX Runtime Run and pytorch-grad-cam, side by side in one run, on the
default model, with the same thread count. Prints one table with the ratios and writes target/bench/results.json.

Load comes from oha (crates.io), a real HTTP load generator, over loopback. `--quick` runs a few requests of each
kind to keep the benchmark working (CI); its numbers mean nothing.
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
ORT_LIBRARY = ROOT / ".ort/onnxruntime/capi/libonnxruntime.so.1.31.1"
MODEL = ROOT / "models/efficientnet_lite0.onnx"
PHOTO = ROOT / "tests/fixtures/images/chelsea_224.png"
OHA = os.environ.get("OHA", str(ROOT / ".tools/bin/oha"))
VENV_PYTHON = ROOT / ".venv/bin/python"
# Pillow, the reference for what libjpeg-turbo and zlib cost (installed by `make bench`).
BENCH_PYTHON = ROOT / ".tools/bench-venv/bin/python"
# The headline request of the ratios: a photo in, its overlay PNG out.
OVERLAY = "/v1/models/default/explain?output=overlay"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for {pid}")


def oha(url: str, body: Path, requests: int, clients: int) -> dict:
    out = subprocess.run(
        [OHA, "-n", str(requests), "-c", str(clients), "-m", "POST", "-H", "content-type: image/jpeg",
         "-D", str(body), "--no-tui", "--output-format", "json", url],
        check=True, capture_output=True, text=True).stdout
    result = json.loads(out)
    codes = result.get("statusCodeDistribution", {})
    if set(codes) != {"200"}:
        raise RuntimeError(f"non-200 answers from {url}: {codes}")
    return {
        "rps": result["summary"]["requestsPerSec"],
        "p50_ms": result["latencyPercentiles"]["p50"] * 1e3,
        "p99_ms": result["latencyPercentiles"]["p99"] * 1e3,
    }


def post(url: str, body: bytes) -> tuple[float, dict]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "image/jpeg"})
    started = time.perf_counter()
    with urllib.request.urlopen(request) as response:
        response.read()
        return (time.perf_counter() - started) * 1e3, dict(response.headers)


class Server:
    """The release binary serving the default model, as `make run` does, with a queue deep enough for 16 clients:
    `sessions` sessions of `threads // sessions` intra-op threads each, so the thread count stays the same."""

    def __init__(self, threads: int, workdir: Path, sessions: int = 1, binary: Path = RELEASE / "camserve",
                 split_under_load: bool = True, model: Path = MODEL):
        self.port = free_port()
        config = workdir / f"bench-{self.port}.toml"
        config.write_text(
            f'[runtime]\nlibrary = "{ORT_LIBRARY}"\n[limits]\nmax_classes_per_request = 32\n'
            f'[[models]]\nname = "default"\nfile = "{model}"\nsessions = {sessions}\nthreads = {threads // sessions}\n'
            f'split_under_load = {str(split_under_load).lower()}\nqueue_capacity = 256\nmax_batch = 8\n')
        self.process = subprocess.Popen(
            [binary, "serve", "--config", config, "--bind", f"127.0.0.1:{self.port}"],
            stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
        for _ in range(300):
            try:
                urllib.request.urlopen(self.url("/readyz")).read()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("camserve did not become ready")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def bare_ort(threads: int, iterations: int) -> list[dict]:
    out = subprocess.run([RELEASE / "examples/bench_ort", "run", ORT_LIBRARY, MODEL, str(threads), str(iterations)],
                         check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def bare_runs(sessions: int, threads: int, batch: int, seconds: float, model: Path = MODEL) -> list[dict]:
    """`sessions` bare sessions of `threads` threads each, running Runs of `batch` side by side: each one's
    images/s and median Run time."""
    command = [RELEASE / "examples/bench_ort", "throughput", ORT_LIBRARY, model, str(threads), str(batch),
               str(seconds)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(sessions)]
    return [json.loads(run.communicate()[0]) for run in runs]


def bare_throughput(sessions: int, threads: int, batch: int, seconds: float, model: Path = MODEL) -> float:
    return sum(run["images_per_s"] for run in bare_runs(sessions, threads, batch, seconds, model))


def alone(server: Server, body: Path, threads: int, rounds: int, requests: int, seconds: float,
          model: Path = MODEL) -> dict:
    """One client against the bare Run of one image, in interleaved rounds (see `under_load`)."""
    result: dict = {"bare_ms": [], "camserve": []}
    for _ in range(rounds):
        result["bare_ms"].append(bare_runs(1, threads, 1, seconds, model)[0]["median_ms"])
        result["camserve"].append(oha(server.url(OVERLAY), body, requests, 1))
    return result


def under_load(servers: dict, body: Path, threads: int, rounds: int, requests: int, seconds: float,
               model: Path = MODEL) -> dict:
    """16 clients on each server against the bare Run's best throughput, in interleaved rounds: this machine's
    speed drifts by tens of percent within minutes, so each round's ratio is taken against that round's bare
    numbers. The bare Run gets every layout of the same threads (one session of all of them, or one-thread
    sessions side by side) and every batch size; its best is the baseline."""
    layouts = [(1, threads)] + ([(threads, 1)] if threads > 1 else [])
    result: dict = {"bare": [], **{name: [] for name in servers}}
    for _ in range(rounds):
        bare = {f"{sessions}x{per_session} batch {batch}": bare_throughput(sessions, per_session, batch, seconds,
                                                                             model)
                for sessions, per_session in layouts for batch in (1, 4, 8)}
        result["bare"].append(bare)
        for name, server in servers.items():
            result[name].append(oha(server.url(OVERLAY), body, requests, 16))
    return result


# The photo rows: (what, photo, route and query, reference, target). A reference adds up Pillow's costs (see
# bench/pillow_reference.py) and the bare Run of one image. The targets are for answers of one Run, so those rows
# ask for `box_side=input`; the default boxes add a localization Run (docs/localization.md), reported beside them.
PHOTO_ROWS = [
    ("12 MP JPEG, output=boxes&box_side=input", "large", "explain?output=boxes&box_side=input",
     ("draft_decode_ms",), 1.3),
    ("12 MP JPEG, predict", "large", "predict", ("draft_decode_ms",), 1.3),
    ("12 MP JPEG, output=raw", "large", "explain?output=raw", ("draft_decode_ms",), 1.3),
    ("12 MP JPEG, format=labelstudio&box_side=input", "large", "explain?format=labelstudio&box_side=input",
     ("draft_decode_ms",), 1.3),
    ("12 MP JPEG, format=coco&box_side=input", "large", "explain?format=coco&box_side=input",
     ("draft_decode_ms",), 1.3),
    ("12 MP JPEG, format=fiftyone (a 16-bit heatmap PNG at full size)", "large", "explain?format=fiftyone",
     ("draft_decode_ms",), None),
    ("12 MP JPEG, output=boxes (default: and the localization Run)", "large", "explain?output=boxes",
     ("draft_decode_ms",), None),
    ("640x480 JPEG, output=boxes&box_side=input", "medium", "explain?output=boxes&box_side=input",
     ("full_decode_ms",), 1.3),
    ("640x480 JPEG, output=boxes (default: and the localization Run)", "medium", "explain?output=boxes",
     ("full_decode_ms",), None),
    ("640x480 JPEG, output=overlay (PNG)", "medium", "explain?output=overlay", (), 1.5),
    ("12 MP JPEG, output=overlay&image_format=jpeg (full size)", "large",
     "explain?output=overlay&image_format=jpeg", ("full_decode_ms", "jpeg_encode_ms"), 1.3),
    ("12 MP JPEG, output=overlay (PNG, full size)", "large", "explain?output=overlay",
     ("full_decode_ms", "png_encode_ms"), None),
    ("12 MP JPEG, output=json (overlay and heatmap PNGs, full size)", "large", "explain?output=json",
     ("full_decode_ms", "png_encode_ms", "png_encode_ms"), None),
]


def photos(server: Server, bodies: dict, threads: int, rounds: int, requests: int, seconds: float) -> dict:
    """Camera-sized and dataset-sized photos, one client, against references measured in the same rounds."""
    result: dict = {"references": [], "bare_ms": [], "rows": {row[0]: [] for row in PHOTO_ROWS}}
    for _ in range(rounds):
        out = subprocess.run([BENCH_PYTHON, ROOT / "bench/pillow_reference.py", bodies["medium"], bodies["large"],
                              str(max(3, requests // 4))], check=True, capture_output=True, text=True).stdout
        reference = json.loads(out)
        result["references"].append({name: reference[str(path)] for name, path in bodies.items()})
        result["bare_ms"].append(bare_runs(1, threads, 1, seconds)[0]["median_ms"])
        for what, photo, route, _, _ in PHOTO_ROWS:
            result["rows"][what].append(oha(server.url(f"/v1/models/default/{route}"), bodies[photo], requests, 1))
    # Under load: 16 clients on the boxes of each photo, against the bare Run's best throughput of the same round.
    result["load"] = []
    for _ in range(rounds):
        layouts = [(1, threads)] + ([(threads, 1)] if threads > 1 else [])
        bare = max(bare_throughput(sessions, per_session, batch, seconds)
                   for sessions, per_session in layouts for batch in (1, 8))
        result["load"].append({"bare": bare, **{photo: oha(server.url("/v1/models/default/explain?output=boxes"),
                                                           bodies[photo], requests * 2, 16)
                                               for photo in ("medium", "large")}})
    return result


def photo_rows(r: dict) -> list[tuple[str, str, str, str]]:
    """Medians over the rounds; each ratio against its own round's reference."""
    median = statistics.median
    rows = []
    for what, photo, _, parts, target in PHOTO_ROWS:
        runs = r["rows"][what]
        references = [sum(ref[photo][part] for part in parts) + bare
                      for ref, bare in zip(r["references"], r["bare_ms"])]
        ratios = [run["p50_ms"] / reference for run, reference in zip(runs, references)]
        names = " + ".join([*(f"Pillow {part.removesuffix('_ms').replace('_', ' ')}" for part in parts),
                            "bare Run"])
        rows.append((what, f"{median(run['p50_ms'] for run in runs):.1f} ms median against {median(references):.1f}"
                     f" ms ({names})", f"{median(ratios):.2f}x (rounds {', '.join(f'{x:.2f}' for x in ratios)})",
                     f"<= {target}x" if target else "reported"))
    for photo, name in (("medium", "640x480"), ("large", "12 MP")):
        load = r["load"]
        ratios = [round_[photo]["rps"] / round_["bare"] for round_ in load]
        rows.append((f"{name} JPEG, output=boxes, 16 clients", f"{median(x[photo]['rps'] for x in load):.1f} "
                     f"requests/s, p50 {median(x[photo]['p50_ms'] for x in load):.0f} ms, p99 "
                     f"{median(x[photo]['p99_ms'] for x in load):.0f} ms", f"{median(ratios):.2f}x the bare Run's best "
                     f"throughput ({median(x['bare'] for x in load):.0f} images/s)", "reported"))
    ref = r["references"][0]
    rows.append(("Pillow (libjpeg-turbo) on the 12 MP JPEG, first round", f"decode {ref['large']['full_decode_ms']:.1f}"
                 f" ms, draft {ref['large']['draft_size']} {ref['large']['draft_decode_ms']:.1f} ms, JPEG q90 encode "
                 f"{ref['large']['jpeg_encode_ms']:.1f} ms, PNG level 1 encode {ref['large']['png_encode_ms']:.0f} ms",
                 "", ""))
    return rows


def venv_has(modules: str) -> bool:
    """Whether `make venv` has installed these Python modules (comma-separated)."""
    return VENV_PYTHON.exists() and subprocess.run([VENV_PYTHON, "-c", f"import {modules}"],
                                                   capture_output=True).returncode == 0


def pytorch_grad_cam(photo: Path, threads: int, iterations: int) -> dict | None:
    if not venv_has("torch, pytorch_grad_cam, camserve_export"):
        return None
    out = subprocess.run([VENV_PYTHON, ROOT / "bench/pytorch_grad_cam_bench.py", photo, str(threads), str(iterations)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def plain_classifiers(workdir: Path, threads: int, iterations: int) -> list[dict] | None:
    """Augmenting plain classifiers (camserve's own head autodiff): the augmented Run against the plain one."""
    if not venv_has("torch, torchvision, camserve_export"):
        return None
    exported = subprocess.run([VENV_PYTHON, ROOT / "bench/plain_models.py", workdir], check=True,
                              capture_output=True, text=True).stdout
    results = []
    for line in exported.splitlines():
        model = json.loads(line)
        out = subprocess.run([RELEASE / "examples/bench_ort", "plain", ORT_LIBRARY, model["file"], model["target"],
                              str(threads), str(iterations)], check=True, capture_output=True, text=True).stdout
        results.append({"arch": model["arch"], "goal": model["goal"], **json.loads(out)})
    return results


def heavier_model(workdir: Path, body: Path, threads: int, rounds: int, requests: int,
                  seconds: float) -> dict | None:
    """The two headline ratios again on ResNet-18 (random weights, exported here by camserve-export). Its Run costs
    several times the default model's while what camserve adds to each request (HTTP, decoding, maps, the PNG)
    stays the same, so the pair shows how much of each ratio is that fixed cost."""
    if not venv_has("torch, torchvision, camserve_export"):
        return None
    model = workdir / "resnet18.onnx"
    subprocess.run([VENV_PYTHON, "-m", "camserve_export.cli", "--arch", "resnet18", "--seed", "0", "-o", model, "-q"],
                   check=True, capture_output=True)
    (workdir / "resnet18").mkdir()
    server = Server(threads, workdir / "resnet18", model=model)
    try:
        oha(server.url(OVERLAY), body, max(10, requests // 10), 16)  # warm-up
        return {"alone": alone(server, body, threads, rounds, requests, seconds, model),
                "load": under_load({"split": server}, body, threads, rounds, requests, seconds, model)}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--photos", action="store_true", help="only the photo rows (a few minutes)")
    args = parser.parse_args()
    n = (lambda full: max(10, full // 100)) if args.quick else (lambda full: full)
    results: dict = {"machine": machine(), "threads": args.threads, "quick": args.quick}

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        subprocess.run([RELEASE / "examples/bench_ort", "inputs", PHOTO, workdir], check=True)
        small, large = workdir / "photo_224.jpg", workdir / "photo_4000x3000.jpg"
        bodies = {"medium": workdir / "photo_640x480.jpg", "large": large}

        bare = bare_ort(args.threads, n(300))
        results["bare"] = bare
        server = Server(args.threads, workdir)
        if args.photos:
            try:
                oha(server.url("/v1/models/default/explain?output=overlay"), small, n(50), 1)  # warm-up
                results["photos"] = photos(server, bodies, args.threads, rounds=1 if args.quick else 3,
                                           requests=n(40), seconds=0.5 if args.quick else 2)
            finally:
                server.stop()
            print(markdown(results, photo_rows(results["photos"])))
            return
        try:
            explain = server.url("/v1/models/default/explain")
            oha(explain + "?output=overlay", small, n(50), 1)  # warm-up
            results["alone"] = alone(server, small, args.threads, rounds=1 if args.quick else 5, requests=n(300),
                                     seconds=0.5 if args.quick else 2)
            results["top1_boxes"] = oha(explain + "?output=boxes", small, n(300), 1)
            results["top5_boxes"] = oha(explain + "?output=boxes&top_k=5", small, n(300), 1)
            results["top1_json"] = oha(explain + "?output=json", small, n(300), 1)
            results["top5_json"] = oha(explain + "?output=json&top_k=5", small, n(300), 1)

            body = large.read_bytes()
            stages = {}
            for query in ("?output=overlay", "?output=overlay&max_side=1024", "?output=boxes"):
                runs = [post(explain + query, body) for _ in range(n(10))]
                stages[query] = {
                    "client_ms": statistics.median(ms for ms, _ in runs),
                    **{h: statistics.median(float(headers[h]) for _, headers in runs)
                       for h in ("x-decode-time", "x-queue-time", "x-inference-time", "x-render-time",
                                 "x-total-time")},
                }
            results["large"] = {"bytes": len(body), "stages": stages,
                                "peak_rss_mib": rss_mib(server.process.pid, "VmHWM")}

            results["photos"] = photos(server, bodies, args.threads, rounds=1 if args.quick else 3,
                                       requests=n(40), seconds=0.5 if args.quick else 2)

            # Memory after 1,000 and after 10,000 requests of the 224 px photo (the first includes the large ones).
            oha(explain + "?output=overlay", small, n(1000), 4)
            after_1k = rss_mib(server.process.pid)
            oha(explain + "?output=overlay", small, n(9000), 4)
            results["memory"] = {"after_1k_mib": after_1k, "after_10k_mib": rss_mib(server.process.pid)}
        finally:
            server.stop()

        # Under load, the default layout (split_under_load) against Runs that always take every thread.
        (workdir / "split").mkdir()
        (workdir / "whole").mkdir()
        servers = {"split": Server(args.threads, workdir / "split"),
                   "whole": Server(args.threads, workdir / "whole", split_under_load=False)}
        try:
            for server in servers.values():
                oha(server.url(OVERLAY), small, n(100), 16)  # warm-up
            results["load"] = under_load(servers, small, args.threads, rounds=1 if args.quick else 5,
                                         requests=n(1000), seconds=0.5 if args.quick else 3)
        finally:
            for server in servers.values():
                server.stop()
        results["resnet18"] = heavier_model(workdir, small, args.threads, rounds=1 if args.quick else 3,
                                            requests=n(300), seconds=0.5 if args.quick else 3)
        results["pytorch_grad_cam"] = pytorch_grad_cam(small, args.threads, n(100))
        results["plain"] = plain_classifiers(workdir, args.threads, n(200))

    out = ROOT / "target/bench/results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\n(raw numbers: {out.relative_to(ROOT)})")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def single_row(alone: dict, model: str = "") -> tuple[str, str, str, str]:
    """Medians over the rounds; each ratio against its own round's bare Run."""
    median = statistics.median
    ratios = [run["p50_ms"] / bare for run, bare in zip(alone["camserve"], alone["bare_ms"])]
    return (f"{model}camserve, 1 client, 224 px JPEG -> overlay PNG ({len(ratios)} rounds beside the bare Run of 1 "
            "image)",
            f"{median(run['p50_ms'] for run in alone['camserve']):.2f} ms median against "
            f"{median(alone['bare_ms']):.2f} ms", f"{median(ratios):.2f}x the bare Run (rounds "
            f"{', '.join(f'{x:.2f}' for x in ratios)})", "<= 1.3x")


def load_rows(load: dict, threads: int, model: str = "") -> list[tuple[str, str, str, str]]:
    """Medians over the rounds; each ratio against its own round's best bare throughput."""
    median = statistics.median
    best = [max(bare.items(), key=lambda item: item[1]) for bare in load["bare"]]
    # The best of several noisy measurements is biased upwards, so also: the one layout and batch best by its
    # median over the rounds, each round against its own number.
    best_layout = max(load["bare"][0], key=lambda layout: median(bare[layout] for bare in load["bare"]))
    whole = [max(v for k, v in bare.items() if k.startswith(f"1x{threads} ")) for bare in load["bare"]]
    rounds = ", ".join(f"{name} {value:.0f}" for name, value in best)
    rows = [(f"{model}bare Run, best throughput ({len(best)} rounds: the best layout and batch of each)",
             f"{median(v for _, v in best):.0f} images/s ({rounds})", "1.00 (baseline)", "")]
    for name, label in (("split", f"{model}camserve, 16 clients (default: split_under_load)"),
                        ("whole", f"{model}camserve, 16 clients, split_under_load = false")):
        if name not in load:
            continue
        runs = load[name]
        ratios = [run["rps"] / b for run, (_, b) in zip(runs, best)]
        ratios_layout = [run["rps"] / bare[best_layout] for run, bare in zip(runs, load["bare"])]
        ratios_whole = [run["rps"] / b for run, b in zip(runs, whole)]
        rows.append((label, f"{median(r['rps'] for r in runs):.0f} requests/s, p50 "
                     f"{median(r['p50_ms'] for r in runs):.1f} ms, p99 {median(r['p99_ms'] for r in runs):.1f} ms",
                     f"{median(ratios):.2f}x the best bare throughput (rounds {', '.join(f'{x:.2f}' for x in ratios)}"
                     f"); {median(ratios_layout):.2f}x the best bare layout by its median ({best_layout}); "
                     f"{median(ratios_whole):.2f}x one bare session of {threads} threads",
                     ">= 0.9x" if name == "split" else ""))
    return rows


def table(r: dict) -> str:
    bare1 = next(b for b in r["bare"] if b["batch"] == 1 and b["k"] == 1)
    bare5 = next(b for b in r["bare"] if b["batch"] == 1 and b["k"] == 5)
    rows = [
        ("bare ONNX Runtime Run, 1 image, top-1", f"{bare1['median_ms']:.2f} ms median", "1.00 (baseline)", ""),
        single_row(r["alone"]),
        *load_rows(r["load"], r["threads"]),
        ("top-5 vs top-1, output=boxes", f"{r['top5_boxes']['p50_ms']:.2f} vs {r['top1_boxes']['p50_ms']:.2f} ms",
         f"{r['top5_boxes']['p50_ms'] / r['top1_boxes']['p50_ms']:.2f}x", "<= 1.3x"),
        ("top-5 vs top-1, output=json (2 PNGs per class)",
         f"{r['top5_json']['p50_ms']:.2f} vs {r['top1_json']['p50_ms']:.2f} ms",
         f"{r['top5_json']['p50_ms'] / r['top1_json']['p50_ms']:.2f}x", ""),
        ("bare Run, top-5 vs top-1", f"{bare5['median_ms']:.2f} vs {bare1['median_ms']:.2f} ms",
         f"{bare5['median_ms'] / bare1['median_ms']:.2f}x", ""),
    ]
    for query, s in r["large"]["stages"].items():
        rows.append((f"4000x3000 JPEG {query}", f"{s['client_ms']:.0f} ms: decode {s['x-decode-time']:.0f}, "
                     f"inference {s['x-inference-time']:.1f}, render {s['x-render-time']:.0f}", "", ""))
    rows += photo_rows(r["photos"])
    rows.append(("peak resident memory (after the large photos)", f"{r['large']['peak_rss_mib']:.0f} MiB", "", ""))
    m = r["memory"]
    rows.append(("resident memory after 1,000 / 10,000 requests",
                 f"{m['after_1k_mib']:.0f} / {m['after_10k_mib']:.0f} MiB",
                 f"{m['after_10k_mib'] / m['after_1k_mib']:.2f}x", "<= 1.10x"))
    if r["resnet18"]:
        rows += [single_row(r["resnet18"]["alone"], "ResNet-18: "), *load_rows(r["resnet18"]["load"], r["threads"],
                                                                             "ResNet-18: ")]
    else:
        rows.append(("ResNet-18", "not measured: run `make venv` first", "", ""))
    pgc = r["pytorch_grad_cam"]
    if pgc:
        rows.append(("pytorch-grad-cam, same model, photo, threads", f"{pgc['median_ms']:.1f} ms median",
                     f"{pgc['median_ms'] / statistics.median(run['p50_ms'] for run in r['alone']['camserve']):.1f}x "
                     "camserve's time", "several x"))
    else:
        rows.append(("pytorch-grad-cam", "not measured: run `make venv` first", "", ""))
    for p in r["plain"] or []:
        head = " ".join(p["head"]) if len(p["head"]) <= 6 else f"{len(p['head'])} op types"
        rows.append((f"plain {p['arch']} 224 px (head {head}): augmented vs plain Run",
                     f"{p['augmented_ms']:.2f} vs {p['plain_ms']:.2f} ms; augmenting {p['augment_ms']:.0f} ms "
                     f"(shape probe {p['probe_ms']:.0f}, graph {p['edit_ms']:.1f})", f"{p['ratio']:.2f}x",
                     f"<= {p['goal']}x"))
    if r["plain"] is None:
        rows.append(("plain classifiers", "not measured: run `make venv` first", "", ""))
    return markdown(r, rows)


def markdown(r: dict, rows: list[tuple[str, str, str, str]]) -> str:
    lines = [f"machine: {r['machine']}; ONNX Runtime threads: {r['threads']}" + (" (QUICK: not a measurement)"
                                                                                  if r["quick"] else ""),
             "", "| what | measured | ratio | target |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
