"""Where models come from: torchvision archs (random weights, a state_dict file, or named weights already in the
local torch hub cache; never a download) and user code given as module:function."""

import difflib
import importlib
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torchvision

from .errors import UserError
from .metadata import Preprocess
from .split import ExplicitSplit

# Default Grad-CAM target per torchvision family: the last feature map before global pooling. Only families the
# test suite covers are listed; others need --layer.
DEFAULT_LAYERS = {
    "resnet": "layer4", "resnext": "layer4", "wide_resnet": "layer4",
    "vgg": "features",
    "mobilenet_v2": "features", "mobilenet_v3": "features",
    "efficientnet": "features",
    "densenet": "features.norm5",
    "convnext": "features",
    "regnet": "trunk_output",
    "squeezenet": "features",
}


def default_layer(arch: str) -> str | None:
    prefixes = sorted((p for p in DEFAULT_LAYERS if arch.startswith(p)), key=len, reverse=True)
    return DEFAULT_LAYERS[prefixes[0]] if prefixes else None


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names in index order, as torchvision ships them in its weights metadata."""
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _classification_archs() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def torchvision_model(arch: str, num_classes: int | None = None, named_weights: str | None = None):
    """-> (model, preprocess, labels or None, description). Random weights unless named_weights is given."""
    archs = _classification_archs()
    if arch not in archs:
        close = difflib.get_close_matches(arch, archs, n=5, cutoff=0.5)
        hint = f"did you mean: {', '.join(close)}" if close else "see torchvision.models.list_models()"
        raise UserError(f"unknown torchvision classification arch {arch!r}; {hint}")
    if named_weights is None:
        model = torchvision.models.get_model(arch, num_classes=num_classes or 1000)
        c = num_classes or 1000
        labels = imagenet_labels() if c == 1000 else None
        return model, Preprocess(), labels, f"torchvision {torchvision.__version__} {arch}, random weights"

    enum = torchvision.models.get_model_weights(arch)
    try:
        weights = enum[named_weights]
    except KeyError:
        raise UserError(f"{arch} has no weights {named_weights!r}; it has: {', '.join(w.name for w in enum)}") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if not cached.is_file():
        raise UserError(f"{arch} weights {weights.name} are not in the local cache ({cached}); camserve-export never "
                        "downloads: put the file there, or pass a state_dict with --weights FILE")
    categories = weights.meta["categories"]
    if num_classes not in (None, len(categories)):
        raise UserError(f"{arch} {weights.name} has {len(categories)} classes, not {num_classes}")
    model = torchvision.models.get_model(arch, weights=weights)  # found in the cache: no network access
    transform = weights.transforms()
    preprocess = Preprocess(mean=tuple(transform.mean), std=tuple(transform.std))
    return model, preprocess, list(categories), f"torchvision {torchvision.__version__} {arch}, weights {weights.name}"


def load_state_dict(model: nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"weights file {path!r} does not exist") from None
    except Exception as e:
        raise UserError(f"cannot read weights file {path!r}: {e}".splitlines()[0]) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # "Error(s) in loading state_dict for X:" then one tab-indented line per problem
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise UserError(f"weights file {path!r} does not fit the model: {'; '.join(details)[:300]}") from None


def import_object(spec: str):
    """'package.module:name' -> the object; the current directory is importable, like `python -m`."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"expected MODULE:FUNCTION, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"cannot import {module_name!r}: {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"module {module_name!r} has no {attr!r}") from None


def model_from_factory(spec: str) -> nn.Module:
    model = import_object(spec)()
    if not isinstance(model, nn.Module):
        raise UserError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def split_from_factory(spec: str, model: nn.Module) -> ExplicitSplit:
    """The function takes the model and returns (backbone, head) or (backbone, head, target name)."""
    parts = import_object(spec)(model)
    if not (isinstance(parts, tuple) and len(parts) in (2, 3) and all(isinstance(p, nn.Module) for p in parts[:2])):
        raise UserError(f"{spec} must return (backbone, head) or (backbone, head, name) with nn.Module parts")
    return ExplicitSplit(parts[0], parts[1], parts[2] if len(parts) == 3 else spec)
