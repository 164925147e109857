#!/usr/bin/env python3
"""camserve's localization set: objects cut from scikit-image's sample photos, pasted at known positions and
scales on plain, noisy and textured backgrounds, so every ground-truth box is known exactly (the pasted patch).

    .venv/bin/python bench/localization_set.py target/localization/set          # the 54 cases of the study
    .venv/bin/python bench/localization_set.py tests/fixtures/localization --ci # the few cases CI checks

Deterministic: the same numpy, Pillow and scikit-image give the same files. Nothing is downloaded: the photos
ship inside the scikit-image wheel. Writes JPEG (quality 95) images and `cases.json`:
`[{"file", "label", "box": [x_min, y_min, x_max, y_max], "source", "background", "scale"}]`, boxes in image
pixels with exclusive maxima, as camserve's boxes are.
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image


@dataclass(frozen=True)
class Source:
    name: str
    label: str  # the object's ImageNet-1k class: the default model's top-1 on the crop alone
    rows: slice  # the crop, tight around the object
    cols: slice
    # A photo whose licence lets its crops be committed (CI fixtures); the others are only generated locally.
    committable: bool

    def crop(self) -> np.ndarray:
        photo = {
            "cat": skimage.data.chelsea,  # CC0
            "espresso": skimage.data.coffee,  # CC0
            "shuttle": skimage.data.astronaut,  # NASA, public domain
            "helmet": skimage.data.astronaut,
            "tripod": lambda: np.stack([skimage.data.camera()] * 3, axis=-1),  # CC0
            "moped": lambda: skimage.data.stereo_motorcycle()[0],  # Middlebury stereo 2014
        }[self.name]()
        return np.ascontiguousarray(photo[self.rows, self.cols, :3])


SOURCES = [
    Source("cat", "Egyptian cat", slice(0, 300), slice(20, 390), True),
    Source("espresso", "espresso", slice(15, 300), slice(170, 420), True),
    Source("shuttle", "space shuttle", slice(0, 290), slice(350, 470), True),
    Source("helmet", "football helmet", slice(340, 512), slice(275, 512), True),
    Source("tripod", "tripod", slice(40, 512), slice(100, 450), True),
    Source("moped", "moped", slice(90, 455), slice(95, 690), False),
]
BACKGROUNDS = ["plain", "noise", "texture"]
# The object's longer side as a fraction of the canvas's side along it.
SCALES = [0.35, 0.55, 0.75]
CANVASES = [(384, 384), (480, 360)]  # (width, height); the model's resize stretches the second
PLAIN_COLOURS = [(128, 128, 128), (225, 220, 205), (60, 70, 90), (170, 195, 215), (90, 120, 80), (240, 240, 240)]
# The cases CI checks (tests/fixtures/localization): one per committable source, every background and scale.
CI_CASES = ["cat_plain_0.55", "espresso_noise_0.75", "shuttle_texture_0.75", "helmet_plain_0.75",
            "tripod_noise_0.55", "cat_texture_0.35"]


def background(kind: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    colour = np.array(PLAIN_COLOURS[rng.integers(len(PLAIN_COLOURS))], dtype=np.float64)
    if kind == "plain":
        canvas = np.broadcast_to(colour, (height, width, 3))
    elif kind == "noise":
        canvas = colour + rng.normal(0.0, 45.0, size=(height, width, 3))
    else:  # a grey photo texture, tinted with the colour: clutter with real image statistics
        texture = [skimage.data.gravel, skimage.data.grass, skimage.data.brick][rng.integers(3)]()
        y, x = rng.integers(0, texture.shape[0] - height), rng.integers(0, texture.shape[1] - width)
        grey = texture[y:y + height, x:x + width].astype(np.float64) / 255.0
        canvas = grey[..., None] * colour * 1.6
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def cases() -> list[dict]:
    """Every case, in a fixed order, with its image as an array."""
    rng = np.random.default_rng(20240604)
    out = []
    for source in SOURCES:
        crop = source.crop()
        for kind in BACKGROUNDS:
            for scale in SCALES:
                width, height = CANVASES[len(out) % len(CANVASES)]
                canvas = background(kind, width, height, rng)
                ch, cw = crop.shape[:2]
                factor = scale * (width / cw if cw / width >= ch / height else height / ch)
                w, h = max(1, round(cw * factor)), max(1, round(ch * factor))
                x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                patch = np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.LANCZOS))
                image = canvas.copy()
                image[y:y + h, x:x + w] = patch
                out.append({"name": f"{source.name}_{kind}_{scale}", "label": source.label, "box": [x, y, x + w, y + h],
                            "source": source.name, "background": kind, "scale": scale,
                            "committable": source.committable, "image": image})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--ci", action="store_true", help="only the CI subset: " + ", ".join(CI_CASES))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = [c for c in cases() if not args.ci or c["name"] in CI_CASES]
    assert not args.ci or all(c["committable"] for c in chosen)
    listing = []
    for case in chosen:
        file = case["name"] + ".jpg"
        Image.fromarray(case["image"]).save(args.out / file, quality=95)
        listing.append({"file": file, **{k: case[k] for k in ("label", "box", "source", "background", "scale")}})
    (args.out / "cases.json").write_text(json.dumps(listing, indent=1) + "\n")
    print(f"{len(listing)} cases in {args.out}")


if __name__ == "__main__":
    main()
