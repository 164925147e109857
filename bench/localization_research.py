#!/usr/bin/env python3
"""Box protocols for camserve's localization, measured offline with ONNX Runtime on the default model, on the
synthetic set (bench/localization_set.py) and the real-photo set (tests/fixtures/localization_real).

    .venv/bin/python bench/localization_research.py                  # every protocol, both sets, the table
    .venv/bin/python bench/localization_research.py --only default,paper
    .venv/bin/python bench/localization_research.py --layers-model target/research/efficientnet_lite0_layers.onnx

No server: each protocol is a function of (model, photo, class) that returns boxes and how many Runs it took, built
from the same steps camserve takes (stretch resize with antialiased bilinear, the model's normalization, Grad-CAM
from the contract's outputs, pytorch-grad-cam's display map, OpenCV-convention bilinear upsampling, 8-connected
segments). `reference_boxes` is the proposed default written out plainly, step for step, for a port to check
against number for number (`--dump-reference FILE` writes its boxes and intermediate values for every case).

Measures, per set: the share of objects whose box has IoU >= 0.5 with the truth (the first box, as camserve's
`max_boxes=1`), mean IoU, Runs per request and the median time per request on this machine (ONNX Runtime CPU,
--threads threads). The target class is the object's own class (as bench/localization.py's default).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models/efficientnet_lite0.onnx"
SYNTHETIC = ROOT / "target/localization/set"
REAL = ROOT / "tests/fixtures/localization_real"
EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity


# ---------------------------------------------------------------------------------------------------- the model
@dataclass
class RunOut:
    logits: np.ndarray  # [classes]
    layers: list  # [(activations [Ch,h,w], gradients [K,Ch,h,w])], the target layer first
    seconds: float


class Model:
    """A contract model in ONNX Runtime, with camserve's preprocessing. Runs are cached by (image, size, classes)
    so that protocols sharing a Run do not pay twice; each protocol is charged the Run's measured time."""

    def __init__(self, path: Path, threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.labels = json.loads(meta["camserve.labels"])
        pre = json.loads(meta["camserve.preprocess"])
        self.mean = np.array(pre["mean"], np.float32)
        self.std = np.array(pre["std"], np.float32)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.extra = sorted(n for n in self.outputs if n.startswith("activations_"))
        self.cache: dict = {}
        self.inside = 0.0  # seconds spent inside run(), cached or not: callers subtract it and add Run times

    def tensor(self, image: np.ndarray, width: int, height: int) -> np.ndarray:
        """camserve's Preprocess::write_tensor: antialiased bilinear stretch (PIL's = fast_image_resize's), then
        (pixel / 255 - mean) / std, planar RGB."""
        pil = Image.fromarray(image)
        if pil.size != (width, height):
            pil = pil.resize((width, height), Image.Resampling.BILINEAR)
        x = np.asarray(pil, np.float32) / np.float32(255.0)
        x = (x - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])

    def run(self, key, image: np.ndarray, width: int, height: int, classes: list[int]) -> RunOut:
        cache_key = (key, width, height, tuple(classes))
        entered = time.perf_counter()
        try:
            return self._run(cache_key, image, width, height, classes)
        finally:
            self.inside += time.perf_counter() - entered

    def _run(self, cache_key, image, width, height, classes) -> RunOut:
        if cache_key in self.cache:
            return self.cache[cache_key]
        seeds = np.zeros((1, len(classes), len(self.labels)), np.float32)
        for k, c in enumerate(classes):
            seeds[0, k, c] = 1.0
        started = time.perf_counter()
        x = self.tensor(image, width, height)
        got = dict(zip(self.outputs, self.session.run(None, {"input": x, "class_weights": seeds})))
        seconds = time.perf_counter() - started
        layers = [(got["activations"][0], got["gradients"][0])]
        for name in self.extra:
            i = name.split("_")[1]
            layers.append((got[f"activations_{i}"][0], got[f"gradients_{i}"][0]))
        out = RunOut(got["logits"][0], layers, seconds)
        self.cache[cache_key] = out
        return out


# ------------------------------------------------------------------------------------------------- map helpers
def grad_cam(activations: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Grad-CAM on the layer's grid, after ReLU: weights are the gradients' spatial means."""
    weights = gradients.mean(axis=(1, 2), dtype=np.float32)
    cam = np.tensordot(weights, activations, axes=(0, 0)).astype(np.float32)
    return np.maximum(cam, 0)


def normalized(m: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's scale_cam_image (camserve's Map::normalized): (x - min) / (1e-7 + max - min)."""
    lo, hi = np.float32(m.min()), np.float32(m.max())
    return ((m - lo) / (np.float32(1e-7) + (hi - lo))).astype(np.float32)


def display_map(raw: np.ndarray, width: int, height: int) -> np.ndarray:
    """camserve's cam::display_map: ReLU, min-max, OpenCV-convention bilinear resize, min-max again."""
    small = normalized(np.maximum(raw, 0).astype(np.float32))
    return normalized(cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR))


def combine_layers(raws: list, width: int, height: int) -> np.ndarray:
    """camserve's cam::combine_layers (pytorch-grad-cam's multi-layer map) at the input size, then min-max."""
    maps = [np.maximum(cv2.resize(normalized(np.maximum(r, 0)), (width, height), interpolation=cv2.INTER_LINEAR),
                       0) for r in raws]
    return normalized(np.mean(maps, axis=0).astype(np.float32))


def segments(binary: np.ndarray, values: np.ndarray | None = None) -> list[dict]:
    """8-connected segments, largest area first (ties in raster order of their first pixel, as boxes::regions),
    each with its box [x0, y0, x1, y1) on the map, area, peak and a label image index."""
    labels, count = ndimage.label(binary, structure=EIGHT)
    if count == 0:
        return []
    found = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        part = labels[sl] == i
        first = np.flatnonzero((labels == i).ravel())[0]
        found.append({"box": [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop], "area": int(part.sum()),
                      "peak": float(values[sl][part].max()) if values is not None else 1.0, "first": int(first),
                      "label": i})
    found.sort(key=lambda s: (-s["area"], s["first"]))
    return found, labels


def scale_box(box, map_size, image_size) -> list[int]:
    """explain.rs scale_region: floor the minima, ceil the maxima."""
    sx, sy = image_size[0] / map_size[0], image_size[1] / map_size[1]
    return [int(np.floor(box[0] * sx)), int(np.floor(box[1] * sy)), min(image_size[0], int(np.ceil(box[2] * sx))),
            min(image_size[1], int(np.ceil(box[3] * sy)))]


def fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    """explain.rs fit: scaled down, aspect kept, longer side at most max_side."""
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    s = max_side / longer
    return max(1, round(width * s)), max(1, round(height * s))


def aspect_size(width: int, height: int, long_side: int, multiple: int = 32) -> tuple[int, int]:
    """The input size for a Run with the photo's aspect kept: the longer side `long_side`, the shorter one
    scaled by the same factor, both rounded to a multiple of `multiple` (the model's stride; at least one)."""
    s = long_side / max(width, height)
    r = lambda v: max(multiple, int(np.floor(v * s / multiple + 0.5)) * multiple)  # noqa: E731
    return r(width), r(height)


# -------------------------------------------------------------------------------------------- box extraction
def level(m: np.ndarray, threshold) -> float:
    from skimage import filters

    if isinstance(threshold, float):
        return threshold * float(m.max())
    return float({"otsu": filters.threshold_otsu, "li": filters.threshold_li, "yen": filters.threshold_yen,
                  "triangle": filters.threshold_triangle, "mean": lambda a: float(a.mean())}[threshold](m))


def boxes_threshold(m: np.ndarray, threshold, max_boxes: int = 1, min_share: float = 0.0) -> list[list[int]]:
    """Segments at or above the level, largest first; `min_share` drops those smaller than that share of the
    largest (for several boxes)."""
    got = segments(m >= level(m, threshold), m)
    if not got:
        return []
    found, _ = got
    top = found[0]["area"]
    return [s["box"] for s in found if s["area"] >= min_share * top][:max_boxes]


def boxes_mass(m: np.ndarray, floor: float, mass: float, seg_threshold: float | None = None) -> list[list[int]]:
    """The box that holds `mass` of the map's weight per axis: weights max(map - floor, 0) (restricted to the
    largest segment at `seg_threshold` when given), the box spans the marginals' (1-mass)/2 and (1+mass)/2
    quantiles."""
    w = np.maximum(m - floor, 0).astype(np.float64)
    if seg_threshold is not None:
        got = segments(m >= seg_threshold * m.max(), m)
        if not got:
            return []
        found, labels = got
        w = np.where(labels == found[0]["label"], w, 0)
    if w.sum() <= 0:
        return []
    lo, hi = (1 - mass) / 2, (1 + mass) / 2
    out = []
    for marginal in (w.sum(axis=0), w.sum(axis=1)):
        c = np.cumsum(marginal) / marginal.sum()
        out.append((int(np.searchsorted(c, lo, side="left")), int(np.searchsorted(c, hi, side="left")) + 1))
    (x0, x1), (y0, y1) = out
    return [[x0, y0, min(x1, m.shape[1]), min(y1, m.shape[0])]]


def boxes_grabcut(image: np.ndarray, m: np.ndarray, threshold: float, iterations: int = 3) -> list[list[int]]:
    """Refinement on the photo's colours and edges: OpenCV's GrabCut seeded by the map (definite foreground at
    0.9 of the maximum, probable foreground at `threshold`, probable background elsewhere), at most 320 px; the
    box of the largest foreground segment."""
    h, w = m.shape
    small = fit(w, h, 320)
    img = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
    mm = cv2.resize(m, small, interpolation=cv2.INTER_LINEAR)
    mask = np.full(mm.shape, cv2.GC_PR_BGD, np.uint8)
    mask[mm >= threshold * mm.max()] = cv2.GC_PR_FGD
    mask[mm >= 0.9 * mm.max()] = cv2.GC_FGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(np.ascontiguousarray(img[..., ::-1]), mask, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return boxes_threshold(m, threshold)
    fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    got = segments(fg)
    if not got:
        return boxes_threshold(m, threshold)
    return [scale_box(got[0][0]["box"], small, (w, h))]


# --------------------------------------------------------------------------------------------------- protocols
@dataclass
class Answer:
    boxes: list  # in the photo's pixels
    runs: int
    seconds: float  # Runs plus everything after them
    size: tuple = ()  # the explained input size(s)
    extra: dict = field(default_factory=dict)


def explain_map(model: Model, key, image, size, cls, layers: str = "target"):
    """One Run at `size` (W, H) and the display map at the photo's analysis size; returns (map, run)."""
    out = model.run(key, image, size[0], size[1], [cls])
    h, w = image.shape[:2]
    aw, ah = fit(w, h, 1024)
    if layers == "target":
        m = display_map(grad_cam(out.layers[0][0], out.layers[0][1][0]), aw, ah)
    else:
        chosen = [int(i) for i in layers.split("+")]
        raws = [grad_cam(out.layers[i][0], out.layers[i][1][0]) for i in chosen]
        m = cv2.resize(combine_layers(raws, size[0], size[1]), (aw, ah), interpolation=cv2.INTER_LINEAR)
        m = normalized(np.maximum(m, 0))
    return m, out


def single(model, key, image, cls, *, side=None, extract=("t", 0.5), layers="target", max_boxes=1,
           min_share=0.0) -> Answer:
    """One Run: stretched to 224 (side None), or aspect kept with the longer side `side`."""
    started, inside = time.perf_counter(), model.inside
    h, w = image.shape[:2]
    size = (224, 224) if side is None else aspect_size(w, h, side)
    m, out = explain_map(model, key, image, size, cls, layers)
    boxes = extract_boxes(image, m, extract, max_boxes, min_share)
    aw, ah = m.shape[1], m.shape[0]
    boxes = [scale_box(b, (aw, ah), (w, h)) for b in boxes]
    post = time.perf_counter() - started - (model.inside - inside)
    return Answer(boxes, 1, out.seconds + post, (size,))


def extract_boxes(image, m, extract, max_boxes=1, min_share=0.0):
    kind, *params = extract
    if kind == "t":
        return boxes_threshold(m, params[0], max_boxes, min_share)
    if kind == "mass":
        return boxes_mass(m, *params)
    if kind == "grabcut":
        return boxes_grabcut(fit_image(image, m), m, params[0])
    raise ValueError(kind)


def fit_image(image, m):
    h, w = m.shape
    return image if image.shape[:2] == (h, w) else cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


def zoomed(model, key, image, cls, *, side=None, first=("t", 0.5), second=("t", 0.5), margin=0.5, zoom_side=224,
           min_crop=0.0) -> Answer:
    """Two Runs: the first as `single`; the second on the first box grown by `margin` of its size on every
    side (clamped to the photo), aspect kept with longer side `zoom_side`; the box is the second map's."""
    a = single(model, key, image, cls, side=side, extract=first)
    if not a.boxes:
        return Answer([], 1, a.seconds)
    started, inside = time.perf_counter(), model.inside
    h, w = image.shape[:2]
    x0, y0, x1, y1 = a.boxes[0]
    bw, bh = x1 - x0, y1 - y0
    grow_x, grow_y = max(margin * bw, min_crop * w / 2), max(margin * bh, min_crop * h / 2)
    cx0, cy0 = max(0, int(np.floor(x0 - grow_x))), max(0, int(np.floor(y0 - grow_y)))
    cx1, cy1 = min(w, int(np.ceil(x1 + grow_x))), min(h, int(np.ceil(y1 + grow_y)))
    crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1])
    size = aspect_size(cx1 - cx0, cy1 - cy0, zoom_side)
    out = model.run((key, cx0, cy0, cx1, cy1), crop, size[0], size[1], [cls])
    m = display_map(grad_cam(out.layers[0][0], out.layers[0][1][0]), *fit(cx1 - cx0, cy1 - cy0, 1024))
    boxes = extract_boxes(crop, m, second)
    boxes = [scale_box(b, (m.shape[1], m.shape[0]), (cx1 - cx0, cy1 - cy0)) for b in boxes]
    boxes = [[b[0] + cx0, b[1] + cy0, b[2] + cx0, b[3] + cy0] for b in boxes]
    post = time.perf_counter() - started - (model.inside - inside)
    return Answer(boxes, 2, a.seconds + out.seconds + post, (a.size, size))


# ---------------------------------------------------------------------------- the proposed default, written out
REFERENCE = {"long_side": 320, "multiple": 32, "threshold": "otsu"}


def reference_boxes(session: ort.InferenceSession, photo: np.ndarray, cls: int, params: dict = REFERENCE,
                    trace: dict | None = None) -> tuple[list[int] | None, int]:
    """The proposed default, plainly, for a port to follow step for step (docs/localization.md, "The default,
    step by step"). `photo`: the decoded RGB uint8 [H, W, 3], EXIF orientation applied. Returns (box or None, Runs)."""
    height, width = photo.shape[:2]
    meta = session.get_modelmeta().custom_metadata_map
    pre = json.loads(meta["camserve.preprocess"])
    n_classes = len(json.loads(meta["camserve.labels"]))
    # 1. The input size: the photo's aspect kept, longer side `long_side`, each side rounded to the nearest
    #    multiple of 32 (floor(v / 32 + 0.5), in float64), at least 32.
    s = params["long_side"] / max(width, height)
    m32 = params["multiple"]
    side = lambda v: max(m32, int(np.floor(v * s / m32 + 0.5)) * m32)  # noqa: E731
    in_w, in_h = side(width), side(height)
    # 2. The tensor: PIL's antialiased bilinear resize to (in_w, in_h), /255, (x - mean) / std, planar RGB.
    x = np.asarray(Image.fromarray(photo).resize((in_w, in_h), Image.Resampling.BILINEAR), np.float32)
    x = (x / np.float32(255.0) - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
    # 3. One Run, one seed row for the class.
    seeds = np.zeros((1, 1, n_classes), np.float32)
    seeds[0, 0, cls] = 1.0
    acts, grads = session.run(["activations", "gradients"], {"input": x, "class_weights": seeds})
    acts, grads = acts[0], grads[0, 0]  # [Ch, h, w] on the grid of (in_h // 32, in_w // 32)
    # 4. Grad-CAM on the grid: channel weights = the gradients' spatial means; ReLU of the weighted sum.
    raw = np.maximum(np.tensordot(grads.mean(axis=(1, 2), dtype=np.float32), acts, axes=(0, 0)), 0)
    raw = raw.astype(np.float32)
    # 5. The display map at the analysis size (the photo's size, scaled down to at most 1024 px, aspect kept):
    #    min-max, OpenCV-convention bilinear resize, min-max.
    aw, ah = fit(width, height, 1024)
    heat = display_map(raw, aw, ah)
    # 6. The level: Otsu's threshold of the map (skimage.filters.threshold_otsu; camserve's boxes::otsu), or a
    #    fraction of its maximum.
    t = params["threshold"]
    lev = level(heat, t)
    # 7. The largest 8-connected segment at or above the level (ties: the first in raster order); its box,
    #    moved to the photo's pixels (floor the minima, ceil the maxima).
    found = segments(heat >= lev, heat)
    if trace is not None:
        trace.update({"input_size": [in_w, in_h], "grid": list(raw.shape[::-1]), "raw_max": float(raw.max()),
                      "analysis_size": [aw, ah], "level": lev})
    if not found:
        return None, 1
    box = scale_box(found[0][0]["box"], (aw, ah), (width, height))
    return box, 1


# ------------------------------------------------------------------------------------------------- evaluation
def iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0, w) * max(0, h)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def load_set(folder: Path) -> list[dict]:
    cases = json.loads((folder / "cases.json").read_text())
    photos = {}
    for c in cases:
        if c["file"] not in photos:
            photos[c["file"]] = np.asarray(Image.open(folder / c["file"]).convert("RGB"))
        c["image"] = photos[c["file"]]
        c["key"] = str(folder / c["file"])
    return cases


def protocols(layers_model: bool) -> dict:
    """name -> (function(model, key, image, cls) -> Answer, model: 'default' | 'layers')."""
    P = {}
    for t in (0.15, 0.3, 0.4, 0.5, 0.6, "otsu", "li", "yen", "triangle", "mean"):
        P[f"224 stretch, threshold {t}"] = (lambda mo, k, im, c, t=t: single(mo, k, im, c, extract=("t", t)),
                                            "default")
    for side in (224, 320, 384, 448, 512):
        for t in (0.15, 0.3, 0.4, 0.5, 0.6, "otsu"):
            P[f"aspect {side}, threshold {t}"] = (
                lambda mo, k, im, c, s=side, t=t: single(mo, k, im, c, side=s, extract=("t", t)), "default")
    for side in (None, 448):
        name = "224 stretch" if side is None else f"aspect {side}"
        for floor in (0.0, 0.2, 0.3):
            for mass in (0.8, 0.9, 0.95):
                P[f"{name}, mass box floor {floor} mass {mass}"] = (
                    lambda mo, k, im, c, s=side, f=floor, ms=mass: single(mo, k, im, c, side=s,
                                                                         extract=("mass", f, ms)), "default")
        for t in (0.3, 0.5):
            P[f"{name}, grabcut seeded at {t}"] = (
                lambda mo, k, im, c, s=side, t=t: single(mo, k, im, c, side=s, extract=("grabcut", t)), "default")
    for side in (None, 320, 448):
        name = "224 stretch" if side is None else f"aspect {side}"
        for margin in (0.25, 0.5, 1.0):
            for zs in (224, 320):
                for t2 in (0.4, 0.5):
                    P[f"{name} + zoom margin {margin} at {zs}, threshold {t2}"] = (
                        lambda mo, k, im, c, s=side, mg=margin, z=zs, t2=t2:
                        zoomed(mo, k, im, c, side=s, margin=mg, zoom_side=z, second=("t", t2)), "default")
    if layers_model:
        for side in (None, 448):
            name = "224 stretch" if side is None else f"aspect {side}"
            for layers in ("1", "0+1", "0+2", "0+1+2"):
                for t in (0.3, 0.5, "otsu"):
                    P[f"{name}, layers {layers}, threshold {t}"] = (
                        lambda mo, k, im, c, s=side, la=layers, t=t: single(mo, k, im, c, side=s, layers=la,
                                                                           extract=("t", t)), "layers")
    return P


def several(model: Model, cases: list[dict], side, threshold, min_share: float, max_boxes: int = 5) -> list[float]:
    """Several objects of one class in one photo: the segments at the threshold whose area is at least
    `min_share` of the largest's (up to `max_boxes`), matched one to one to the objects, best IoU first.
    Returns each object's IoU (0 when no box is left for it) and the photos' unmatched boxes count."""
    groups: dict = {}
    for c in cases:
        groups.setdefault((c["file"], c["label"]), []).append(c)
    ious, extra = [], 0
    for (_, label), objects in groups.items():
        if len(objects) < 2:
            continue
        cls = model.labels.index(label)
        a = single(model, objects[0]["key"], objects[0]["image"], cls, side=side, extract=("t", threshold),
                   max_boxes=max_boxes, min_share=min_share)
        pairs = sorted(((iou(b, o["box"]), i, j) for i, b in enumerate(a.boxes) for j, o in enumerate(objects)),
                       reverse=True)
        used_b, got = set(), {}
        for v, i, j in pairs:
            if i not in used_b and j not in got:
                used_b.add(i)
                got[j] = v
        ious += [got.get(j, 0.0) for j in range(len(objects))]
        extra += len(a.boxes) - len(used_b)
    return ious, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=Path, default=SYNTHETIC)
    parser.add_argument("--real", type=Path, default=REAL)
    parser.add_argument("--layers-model", type=Path, help="a contract model with extra layers (activations_i)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="semicolon-separated substrings of protocol names")
    parser.add_argument("--several", action="store_true",
                        help="only the several-objects table (photos with two objects of one class)")
    parser.add_argument("--check-reference", type=Path, metavar="FILE",
                        help="run reference_boxes on every case of both sets, check it against its protocol's "
                             "boxes, and write every box and intermediate value to FILE (a port's fixture)")
    parser.add_argument("--out", type=Path, default=ROOT / "target/localization/research.json")
    args = parser.parse_args()
    if not (args.synthetic / "cases.json").exists():
        subprocess.run([sys.executable, str(ROOT / "bench/localization_set.py"), str(args.synthetic)], check=True)
    sets = {"synthetic": load_set(args.synthetic), "real": load_set(args.real)}
    models = {"default": Model(MODEL, args.threads)}
    if args.layers_model:
        models["layers"] = Model(args.layers_model, args.threads)
    if args.check_reference:
        model = models["default"]
        t = REFERENCE["threshold"]
        name = f"aspect {REFERENCE['long_side']}, threshold {t}"
        fn = protocols(False)[name][0]
        dump, mismatches = {"params": REFERENCE, "model": str(MODEL.relative_to(ROOT)), "cases": []}, 0
        for set_name, cases in sets.items():
            ious = []
            for c in cases:
                cls = model.labels.index(c["label"])
                trace: dict = {}
                box, runs = reference_boxes(model.session, c["image"], cls, REFERENCE, trace)
                other = fn(model, c["key"], c["image"], cls).boxes
                mismatches += (other[0] if other else None) != box
                ious.append(iou(box, c["box"]) if box else 0.0)
                dump["cases"].append({"set": set_name, "file": c["file"], "class_index": cls, "truth": c["box"],
                                      "box": box, "iou": round(ious[-1], 6), "runs": runs, **trace})
            print(f"{set_name}: IoU >= 0.5 {sum(i >= 0.5 for i in ious)}/{len(ious)}, mean IoU "
                  f"{statistics.fmean(ious):.3f}")
        args.check_reference.write_text(json.dumps(dump, indent=1) + "\n")
        print(f"reference == protocol '{name}' on {sum(map(len, sets.values())) - mismatches} of "
              f"{sum(map(len, sets.values()))} cases; written {args.check_reference}")
        sys.exit(1 if mismatches else 0)
    if args.several:
        model = models["default"]
        print("| side | threshold | boxes kept | objects at IoU >= 0.5 | mean IoU | unmatched boxes |")
        print("|---|---|---|---|---|---|")
        for side in (None, 448):
            for t in (0.3, 0.5):
                for share, most in ((0.0, 1), (0.1, 5), (0.25, 5), (0.5, 5)):
                    ious, extra = several(model, sets["real"], side, t, share, most)
                    kept = "largest only" if most == 1 else f"area >= {share} x largest"
                    print(f"| {'224 stretch' if side is None else f'aspect {side}'} | {t} | {kept} | "
                          f"{sum(i >= 0.5 for i in ious)}/{len(ious)} | {statistics.fmean(ious):.3f} | {extra} |")
        return
    chosen = protocols(bool(args.layers_model))
    if args.only:
        wanted = args.only.split(";")
        chosen = {k: v for k, v in chosen.items() if any(w in k for w in wanted)}
    results = {}
    for name, (fn, which) in chosen.items():
        model = models[which]
        row = {}
        for set_name, cases in sets.items():
            ious, runs, seconds = [], [], []
            for c in cases:
                cls = model.labels.index(c["label"])
                a = fn(model, c["key"], c["image"], cls)
                ious.append(iou(a.boxes[0], c["box"]) if a.boxes else 0.0)
                runs.append(a.runs)
                seconds.append(a.seconds)
            row[set_name] = {"hit": sum(i >= 0.5 for i in ious) / len(ious), "mean_iou": statistics.fmean(ious),
                             "runs": max(runs), "ms": 1000 * statistics.median(seconds), "ious": ious}
        results[name] = row
        s, r = row["synthetic"], row["real"]
        print(f"| {name} | {s['hit']:.0%} | {s['mean_iou']:.3f} | {r['hit']:.0%} | {r['mean_iou']:.3f} | "
              f"{max(s['runs'], r['runs'])} | {s['ms']:.0f} / {r['ms']:.0f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "protocols": results,
                                    "cases": {k: [c["file"] for c in v] for k, v in sets.items()}}, indent=1))


if __name__ == "__main__":
    main()
