"""pytorch-grad-cam on the default model, for `make bench`: the same EfficientNet-Lite0 weights, the same photo,
the same thread count as camserve. Prints {"median_ms": ...} as JSON.

    .venv/bin/python bench/pytorch_grad_cam_bench.py PHOTO THREADS ITERATIONS
"""

import json
import statistics
import sys
import time

import torch
from PIL import Image
from pytorch_grad_cam import GradCAM

from camserve_export import efficientnet_lite as lite
from camserve_export.split import ExplicitSplit


def main(photo: str, threads: int, iterations: int) -> None:
    torch.set_num_threads(threads)
    backbone, head, name = lite.split(lite.pretrained_lite0())
    split = ExplicitSplit(backbone, head, name)
    for p in split.root.parameters():
        p.requires_grad_(True)  # pytorch-grad-cam needs gradients to flow through the target layer
    # What a pytorch-grad-cam user does per image: preprocess, then GradCAM for the top class.
    image = Image.open(photo)
    times = []
    with GradCAM(model=split.root, target_layers=[split.target_module]) as cam:
        for i in range(iterations + 3):
            started = time.perf_counter()
            x = lite.PREPROCESS.tensor(image, lite.INPUT_SIZE)
            cam(input_tensor=x, targets=None)  # None: the top class, as camserve's default top_k=1
            if i >= 3:
                times.append((time.perf_counter() - started) * 1e3)
    print(json.dumps({"median_ms": statistics.median(times), "target": name}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
