#!/usr/bin/env python3
"""`make localization`: how well camserve's boxes localize objects, per CAM method and binarization threshold.

Starts camserve (the release binary, or --bin) with the default model, POSTs every case of a localization set
(bench/localization_set.py) once per method and threshold with `output=boxes&max_boxes=1`, and compares the box
with the case's ground truth. Prints one table: mean IoU, the share of cases with IoU >= 0.5 (the Grad-CAM paper's
criterion), mean IoU per background, and the median of box area / object area. `default` is whatever the server
does without a `threshold` parameter; the paper's protocol is `gradcam` at 0.15.

The target class is the object's own ImageNet class (`class=<label>`), not the model's top-1: small objects on
clutter are often misclassified, and a map for a wrong class says nothing about where the object is, so the
top-1 would mix classification errors into a comparison of box protocols. `--target top1` measures that instead.

Methods and thresholds are parameters, so methods from other branches (or `--query` options such as several
layers) are measured by the same script.
"""

import argparse
import json
import statistics
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROOT, RELEASE, Server, machine  # noqa: E402

METHODS = "gradcam,gradcampp,xgradcam,hirescam,layercam"
THRESHOLDS = "0.15,0.3,0.4,0.5,0.6,otsu,default"
PAPER = ("gradcam", "0.15")


def iou(a: list[int], b: list[int]) -> float:
    """Intersection over union of two [x_min, y_min, x_max, y_max] boxes with exclusive maxima."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0, w) * max(0, h)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def post(url: str, body: bytes) -> dict:
    request = urllib.request.Request(url, data=body, headers={"content-type": "image/jpeg"})
    with urllib.request.urlopen(request) as response:
        return json.loads(response.read())


def measure(server: Server, cases: list[dict], folder: Path, methods: list[str], thresholds: list[str],
            target: str, extra: str) -> dict:
    """{(method, threshold): [per case {"iou", "area_ratio"}]} and the top-1 labels, case by case."""
    results: dict = {(m, t): [] for m in methods for t in thresholds}
    top1 = []
    for case in cases:
        body = (folder / case["file"]).read_bytes()
        top1.append(post(server.url("/v1/models/default/predict?top_k=1"), body)["predictions"][0]["label"])
        for method in methods:
            for threshold in thresholds:
                query = {"output": "boxes", "max_boxes": "1", "method": method}
                query.update({"class": case["label"]} if target == "object" else {"top_k": "1"})
                if threshold != "default":
                    query["threshold"] = threshold
                url = server.url("/v1/models/default/explain?" + urllib.parse.urlencode(query)
                                 + (f"&{extra}" if extra else ""))
                boxes = post(url, body)["explanations"][0]["boxes"]
                truth = case["box"]
                found = [[b["x_min"], b["y_min"], b["x_max"], b["y_max"]] for b in boxes[:1]]
                results[(method, threshold)].append({
                    "iou": iou(found[0], truth) if found else 0.0,
                    "area_ratio": (boxes[0]["width"] * boxes[0]["height"]) / ((truth[2] - truth[0]) *
                                                                             (truth[3] - truth[1])) if found else 0.0,
                })
    return {"results": results, "top1": top1}


def summary(rows: list[dict], cases: list[dict]) -> dict:
    ious = [r["iou"] for r in rows]
    by_background = {}
    for kind in sorted({c["background"] for c in cases}):
        by_background[kind] = statistics.fmean(r["iou"] for r, c in zip(rows, cases) if c["background"] == kind)
    return {"mean_iou": statistics.fmean(ious), "hit_rate": sum(i >= 0.5 for i in ious) / len(ious),
            "by_background": by_background, "median_area_ratio": statistics.median(r["area_ratio"] for r in rows)}


def table(summaries: dict, backgrounds: list[str]) -> str:
    head = ["method", "threshold", "mean IoU", "IoU >= 0.5", *(f"IoU {b}" for b in backgrounds), "box / object area"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = max(summaries, key=lambda k: summaries[k]["mean_iou"])
    for (method, threshold), s in summaries.items():
        note = " (paper)" if (method, threshold) == PAPER else ""
        note += " **best**" if (method, threshold) == best else ""
        cells = [method, threshold + note, f"{s['mean_iou']:.3f}", f"{s['hit_rate']:.0%}",
                 *(f"{s['by_background'][b]:.3f}" for b in backgrounds), f"{s['median_area_ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", type=Path, default=ROOT / "target/localization/set",
                        help="a folder written by bench/localization_set.py")
    parser.add_argument("--bin", type=Path, default=RELEASE / "camserve")
    parser.add_argument("--methods", default=METHODS, help=f"comma-separated (default {METHODS})")
    parser.add_argument("--thresholds", default=THRESHOLDS,
                        help=f"comma-separated; `default` sends none (default {THRESHOLDS})")
    parser.add_argument("--target", choices=["object", "top1"], default="object")
    parser.add_argument("--query", default="", help="more query parameters for every request, e.g. a=1&b=2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--expected", type=Path,
                        help="also write each case's IoU for gradcam at 0.15 and at the default (CI's figures)")
    args = parser.parse_args()
    cases = json.loads((args.set / "cases.json").read_text())
    methods, thresholds = args.methods.split(","), args.thresholds.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        server = Server(args.threads, Path(tmp), binary=args.bin)
        try:
            measured = measure(server, cases, args.set, methods, thresholds, args.target, args.query)
        finally:
            server.stop()

    results = measured["results"]
    summaries = {key: summary(rows, cases) for key, rows in results.items()}
    backgrounds = sorted({c["background"] for c in cases})
    hits = sum(t == c["label"] for t, c in zip(measured["top1"], cases))
    print(f"{len(cases)} cases from {args.set}; target class: {args.target}; "
          f"the model's top-1 is the object's class in {hits} of {len(cases)}")
    print(f"machine: {machine()}\n")
    print(table(summaries, backgrounds))

    out = ROOT / "target/localization/results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "set": str(args.set), "target": args.target, "query": args.query, "machine": machine(),
        "top1": measured["top1"],
        "summaries": [{"method": m, "threshold": t, **s} for (m, t), s in summaries.items()],
        "cases": [{**c, "iou": {f"{m} {t}": results[(m, t)][i]["iou"] for m, t in results}}
                  for i, c in enumerate(cases)],
    }, indent=1))
    print(f"\n(per case: {out.relative_to(ROOT)})")
    if args.expected:
        figures = {c["file"]: {t: round(results[("gradcam", t)][i]["iou"], 4) for t in ("0.15", "default")}
                   for i, c in enumerate(cases)}
        args.expected.write_text(json.dumps(figures, indent=1) + "\n")
        print(f"expected figures: {args.expected}")


if __name__ == "__main__":
    main()
