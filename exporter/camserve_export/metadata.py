"""Contract v1 names and the camserve.* metadata_props that make an ONNX file self-describing."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from PIL import Image

CONTRACT_VERSION = "1"
INPUT_NAMES = ("input", "class_weights")
OUTPUT_NAMES = ("logits", "activations", "gradients", "target_class")
GUIDED_OUTPUT = "input_gradients"  # optional: guided backpropagation to the input, [N,K,3,H,W]


def output_names(extra_layers: int = 0, guided: bool = False) -> list[str]:
    """The contract's outputs, then the optional ones: input_gradients, and activations_i / gradients_i for the
    extra target layers i = 1, 2, ..."""
    names = list(OUTPUT_NAMES) + ([GUIDED_OUTPUT] if guided else [])
    for i in range(1, extra_layers + 1):
        names += [f"activations_{i}", f"gradients_{i}"]
    return names

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """What the server does before `input`: stretch-resize to input_size, pixel/255 mapped onto value_range,
    then (x - mean) / std per channel, channels in channel_order."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "stretch"
    channel_order: str = "RGB"
    value_range: tuple[float, float] = (0.0, 1.0)

    def tensor(self, image: Image.Image, size: int) -> torch.Tensor:
        """A PIL image -> the [1,3,size,size] float32 input the server would feed (bilinear stretch if needed)."""
        return self.tensor_hw(image, (size, size))

    def tensor_hw(self, image: Image.Image, size_hw) -> torch.Tensor:
        """A PIL image -> the [1,3,H,W] float32 input the server would feed (bilinear stretch if needed)."""
        image = image.convert("RGB")
        h, w = size_hw
        if image.size != (w, h):
            image = image.resize((w, h), Image.BILINEAR)
        lo, hi = self.value_range
        x = np.asarray(image, dtype=np.float32) / 255.0 * (hi - lo) + lo
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]

    def to_json(self) -> str:
        return json.dumps({"resize": self.resize, "mean": list(self.mean), "std": list(self.std),
                           "channel_order": self.channel_order, "value_range": list(self.value_range)})


def metadata_props(labels, target_layer, input_size, preprocess, source, extra_layers=(), layout=None
                   ) -> dict[str, str]:
    props = {
        "camserve.contract_version": CONTRACT_VERSION,
        "camserve.labels": json.dumps(list(labels)),
        "camserve.target_layer": target_layer,
        "camserve.input_size": json.dumps([int(input_size[0]), int(input_size[1])]),
        "camserve.preprocess": preprocess.to_json(),
        "camserve.source": source,
        # the target's own layout before the graph mapped it to NCHW: {"layout": "nchw"}, {"layout": "nhwc"} or
        # {"layout": "tokens", "prefix_tokens": P, "grid": [h, w]}
        "camserve.target_layout": layout.to_json() if layout is not None else json.dumps({"layout": "nchw"}),
    }
    if extra_layers:  # every target: index 0 is `activations`, index i is `activations_i`
        props["camserve.target_layers"] = json.dumps([target_layer, *extra_layers])
    return props


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def load_labels(path: str | Path) -> list[str]:
    """A JSON array of strings, or one label per line (blank lines and surrounding spaces ignored)."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        labels = json.loads(text)
        if not all(isinstance(x, str) for x in labels):
            raise ValueError("the JSON labels file must be an array of strings")
        return labels
    return [line.strip() for line in text.splitlines() if line.strip()]


def numbered_labels(n: int) -> list[str]:
    return [f"class_{i}" for i in range(n)]
