"""Transformer classifiers and their Grad-CAM targets: torchvision's ViT, Swin (v1, v2) and MaxViT at any size
(`--arch` with `--model-arg`), timm models by name (`--timm`, random weights or a local checkpoint) and Hugging
Face image classifiers saved with `save_pretrained` (`--hf PATH`). Nothing is ever downloaded.

Default targets, as pytorch-grad-cam's docs recommend: for token models (ViT, DeiT, BEiT, EVA, DINOv2) the last
block's first norm, i.e. the input of its attention (the last block's output reaches the scores only through the
CLS token, so its maps are useless); for Swin the last stage's last block's norm1 (channels-last); for ConvNeXt and
MaxViT the last stage (NCHW). Prefix tokens (CLS, distillation, registers) are read from the model; the grid follows
from the input size and the patch size, so non-square inputs work."""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .errors import UserError
from .layout import LAYOUTS, Layout, LayoutSplit, check_layout
from .metadata import Preprocess
from .split import resolve


@dataclass
class Family:
    """What the target's layout needs to know about a model. `prefix_tokens` None: not a token model (or not
    known); `patch` None: the grid is inferred from the token count and the input size; `nhwc`: its 4-D
    outputs are channels-last."""

    name: str
    target: str | None = None  # default target path in `lookup`
    prefix_tokens: int | None = None
    patch: tuple[int, int] | None = None
    nhwc: bool = False
    nchw_modules: set = field(default_factory=set)  # paths that are NCHW even in an NHWC model
    # why H and W can't change: a traced graph keeps the branch its code took at the example size, wrong at sizes
    # that take another
    fixed_size: str = ""


@dataclass
class Built:
    model: nn.Module  # x -> logits [N,C]
    lookup: nn.Module  # where module paths resolve (the model, or the Hugging Face model inside the wrapper)
    family: Family
    preprocess: Preprocess
    labels: list | None
    source: str
    input_size: tuple[int, int] | None  # the size the model is built for, if it has one


def _path_of(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


def _last_named(root: nn.Module, suffix: str) -> str | None:
    names = [name for name, _ in root.named_modules() if name.endswith(suffix)]
    return names[-1] if names else None


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


# ---------------------------------------------------------------------------------------------------- torchvision

_VIT = {  # the builders' own configurations (torchvision.models.vit_b_16 ...)
    "vit_b_16": dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "vit_b_32": dict(patch_size=32, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "vit_l_16": dict(patch_size=16, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096),
    "vit_l_32": dict(patch_size=32, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096),
    "vit_h_14": dict(patch_size=14, num_layers=32, num_heads=16, hidden_dim=1280, mlp_dim=5120),
}
_SWIN = {
    "swin_t": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], stochastic_depth_prob=0.2),
    "swin_s": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], stochastic_depth_prob=0.3),
    "swin_b": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], stochastic_depth_prob=0.5),
}
_MAXVIT = {"maxvit_t": dict(stem_channels=64, block_channels=[64, 128, 256, 512], block_layers=[2, 2, 5, 2],
                            head_dim=32, stochastic_depth_prob=0.2, partition_size=7)}


_SWIN_ARCHS = {f"swin_{s}" for s in "tsb"} | {f"swin_v2_{s}" for s in "tsb"}


def is_torchvision_transformer(arch: str) -> bool:
    return arch in _VIT or arch in _SWIN_ARCHS or arch in _MAXVIT


def torchvision_transformer(arch: str, num_classes: int, args: dict, input_size):
    """A torchvision ViT / Swin / MaxViT built from its class with the builder's configuration, `args` replacing
    any of it (e.g. num_layers=2, hidden_dim=64), random weights. -> (model, input size or None)."""
    from torchvision.models import maxvit, swin_transformer, vision_transformer

    try:
        if arch in _VIT:
            kw = dict(_VIT[arch], image_size=224)
            if input_size is not None:
                if input_size[0] != input_size[1]:
                    raise UserError(f"torchvision's {arch} takes square inputs only; use --timm for non-square ViTs")
                kw["image_size"] = input_size[0]
            kw.update(args)
            model = vision_transformer.VisionTransformer(num_classes=num_classes, **kw)
            nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision's zero head: all-zero scores and maps
            return model, _pair(kw["image_size"])
        if arch in _MAXVIT:
            kw = dict(_MAXVIT[arch], input_size=tuple(input_size or (224, 224)))
            kw.update(args)
            return maxvit.MaxVit(num_classes=num_classes, **kw), _pair(kw["input_size"])
        v2 = arch.startswith("swin_v2_")
        kw = dict(_SWIN["swin_" + arch.rsplit("_", 1)[1]], patch_size=[4, 4], window_size=[8, 8] if v2 else [7, 7])
        if v2:
            kw.update(block=swin_transformer.SwinTransformerBlockV2, downsample_layer=swin_transformer.PatchMergingV2)
        kw.update(args)
        return swin_transformer.SwinTransformer(num_classes=num_classes, **kw), input_size
    except TypeError as e:
        raise UserError(f"--model-arg for {arch}: {e}") from None


def torchvision_family(model: nn.Module) -> Family | None:
    from torchvision.models import maxvit, swin_transformer, vision_transformer

    if isinstance(model, vision_transformer.VisionTransformer):
        return Family("torchvision ViT", _path_of(model, model.encoder.layers[-1].ln_1), prefix_tokens=1,
                      patch=_pair(model.patch_size))
    if isinstance(model, swin_transformer.SwinTransformer):
        return Family("torchvision Swin", _path_of(model, model.features[-1][-1].norm1), nhwc=True,
                      nchw_modules={"permute", "avgpool", "flatten", "head"},
                      fixed_size="torchvision's Swin shifts its windows or not by the feature map's size")
    if isinstance(model, maxvit.MaxVit):
        return Family("torchvision MaxViT", _path_of(model, model.blocks[-1]))
    return None


# ----------------------------------------------------------------------------------------------------------- timm

def timm_model(name: str, num_classes: int | None, args: dict, input_size, checkpoint: str | None) -> Built:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: pretrained=False never fetches
    import timm

    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise UserError(f"--timm {name!r}: only model names (random weights, or --checkpoint FILE); nothing is "
                        "downloaded. For a Hugging Face folder use --hf PATH")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise UserError(f"unknown timm model {name!r}" + (f"; e.g. {', '.join(close)}" if close else ""))
    kw = dict(args)
    if num_classes:
        kw.setdefault("num_classes", num_classes)
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise UserError(f"checkpoint {checkpoint!r} does not exist")
        kw["checkpoint_path"] = checkpoint
    if input_size is not None and "img_size" not in kw:
        kw["img_size"] = tuple(input_size)
    try:
        try:
            model = timm.create_model(name, pretrained=False, **kw)
        except TypeError as e:
            if "img_size" not in str(e) or "img_size" in args:
                raise
            kw.pop("img_size")  # a model without a size (a CNN): any input size works
            model = timm.create_model(name, pretrained=False, **kw)
    except (TypeError, ValueError) as e:
        raise UserError(f"timm {name}: {e}") from None
    except RuntimeError as e:  # a checkpoint that doesn't fit
        raise UserError(f"timm {name}: {str(e).splitlines()[0]}") from None
    _unfused_timm(model)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    preprocess = Preprocess(mean=tuple(cfg.get("mean", Preprocess().mean)), std=tuple(cfg.get("std", Preprocess().std)))
    size = None
    patch_embed = getattr(model, "patch_embed", None)
    if getattr(patch_embed, "img_size", None) is not None:
        size = _pair(patch_embed.img_size)
    elif input_size is None and "input_size" in cfg:
        size = _pair(cfg["input_size"][1:])
    weights = f"checkpoint {Path(checkpoint).name}" if checkpoint else "random weights"
    return Built(model, model, timm_family(model), preprocess, None, f"timm {timm.__version__} {name}, {weights}",
                 size if input_size is None else tuple(input_size))


def _unfused_timm(model: nn.Module) -> None:
    """timm's attention uses F.scaled_dot_product_attention when it can; its backward is a fused op the
    tracer can't decompose everywhere. The explicit softmax(q k^T) v form computes the same numbers."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False


def timm_family(model: nn.Module) -> Family:
    kind = type(model).__name__
    blocks = getattr(model, "blocks", None)
    if blocks is not None and hasattr(model, "num_prefix_tokens") and hasattr(blocks[-1], "norm1"):
        # VisionTransformer (ViT, DeiT, DeiT-3, registers), VisionTransformerDistilled, Eva, Beit...
        patch = _pair(model.patch_embed.patch_size) if hasattr(model, "patch_embed") else None
        return Family(f"timm {kind}", _path_of(model, blocks[-1].norm1), prefix_tokens=int(model.num_prefix_tokens),
                      patch=patch)
    if kind.startswith("SwinTransformer"):
        return Family(f"timm {kind}", _path_of(model, model.layers[-1].blocks[-1].norm1), nhwc=True)
    if hasattr(model, "stages") and kind.startswith("ConvNeXt"):
        return Family(f"timm {kind}", _path_of(model, model.stages[-1]))
    info = getattr(model, "feature_info", None)  # timm CNNs name their last feature stage
    if info:
        last = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
        return Family(f"timm {kind}", last)
    return Family(f"timm {kind}")


# --------------------------------------------------------------------------------------------------- Hugging Face

class HFClassifier(nn.Module):
    """A transformers image classifier as x -> logits."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, x):
        return self.hf(pixel_values=x).logits


def hf_model(path: str, num_classes: int | None, input_size) -> Built:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserError(f"--hf {path!r}: no config.json there; pass a folder written by save_pretrained")
    from transformers import AutoConfig, AutoModelForImageClassification

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if num_classes not in (None, config.num_labels):
        raise UserError(f"{path} has {config.num_labels} classes, not {num_classes}")
    try:
        hf = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True,
                                                             attn_implementation="eager")
    except (ValueError, TypeError):  # models without attention (ConvNeXt) take no attn_implementation
        hf = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
    hf.eval()
    labels = [config.id2label[i] for i in range(config.num_labels)]
    if all(label == f"LABEL_{i}" for i, label in enumerate(labels)):
        labels = None
    preprocess, size = _hf_preprocess(folder, config)
    return Built(HFClassifier(hf), hf, hf_family(hf), preprocess, labels,
                 f"Hugging Face {type(hf).__name__} from {folder.name}", tuple(input_size) if input_size else size)


def _hf_preprocess(folder: Path, config):
    mean, std = Preprocess().mean, Preprocess().std
    size = _pair(config.image_size) if getattr(config, "image_size", None) else None
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return Preprocess(mean=mean, std=std), size


def hf_family(hf: nn.Module) -> Family:
    kind, config = type(hf).__name__, hf.config
    base = getattr(hf, hf.base_model_prefix, hf)
    embeddings = getattr(base, "embeddings", None)
    if config.model_type in ("swin", "swinv2", "donut-swin"):  # tokens [N,h*w,C], no prefix
        return Family(f"Hugging Face {kind}", _last_named(hf, "layernorm_before"), prefix_tokens=0)
    if config.model_type.startswith("convnext"):
        return Family(f"Hugging Face {kind}", _last_named(hf, ".stages." + str(len(config.depths) - 1)))
    target = _last_named(hf, "layernorm_before") or _last_named(hf, "norm1")
    if target is None or embeddings is None:
        return Family(f"Hugging Face {kind}")
    prefix = sum(getattr(embeddings, t, None) is not None for t in ("cls_token", "distillation_token"))
    registers = getattr(embeddings, "register_tokens", None)
    if registers is not None:
        prefix += registers.shape[1]
    return Family(f"Hugging Face {kind}", target, prefix_tokens=prefix, patch=_pair(config.patch_size))


# ------------------------------------------------------------------------------------------------------- targets

def infer_layout(family: Family, path: str, out, input_hw, *, layout: str | None = None,
                 prefix_tokens: int | None = None, grid=None) -> Layout:
    """The layout of `path`'s output `out` at input size input_hw; the overrides win over what the family says."""
    if layout is not None and layout not in LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    kind = layout or ("tokens" if isinstance(out, torch.Tensor) and out.dim() == 3 else
                      "nhwc" if family.nhwc and path.split(".")[0] not in family.nchw_modules else "nchw")
    if kind != "tokens":
        return Layout(kind)
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"target {path!r} gives {shape}, not tokens [N,T,D]")
    p = prefix_tokens if prefix_tokens is not None else family.prefix_tokens
    if p is None:
        raise UserError(f"target {path!r} gives tokens {tuple(out.shape)} but the model does not say how many "
                        "prefix tokens (CLS, registers...) come first: pass --prefix-tokens P")
    if grid is None and family.patch is not None:
        grid = (input_hw[0] // family.patch[0], input_hw[1] // family.patch[1])
    if grid is None:
        grid = _grid_from_tokens(out.shape[1] - p, input_hw, path)
    return Layout("tokens", int(p), (int(grid[0]), int(grid[1])))


def _grid_from_tokens(count: int, input_hw, path: str) -> tuple[int, int]:
    """The h x w grid with h*w = count that some stride s gives an H x W input (ceil(H/s), ceil(W/s))."""
    grids = {(math.ceil(input_hw[0] / s), math.ceil(input_hw[1] / s)) for s in range(1, max(input_hw) + 1)}
    found = [g for g in grids if g[0] * g[1] == count]
    if len(found) != 1:
        raise UserError(f"target {path!r}: can't tell the grid of its {count} patch tokens at input "
                        f"{input_hw[0]}x{input_hw[1]}: pass --grid HxW")
    return found[0]


def layout_split(model: nn.Module, lookup: nn.Module, family: Family, path: str | None, input_hw, *,
                 layout: str | None = None, prefix_tokens: int | None = None, grid=None) -> LayoutSplit:
    """The target (default: the family's) as a LayoutSplit, its layout read off one forward at input_hw."""
    path = path or family.target
    if path is None:
        raise UserError(f"no default target for {family.name}: pass --layer MODULE.PATH")
    module = resolve(lookup, path)
    outputs = []
    handle = module.register_forward_hook(lambda mod, inp, out: outputs.append(out))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, *input_hw))
    except Exception as e:
        raise UserError(f"{family.name} does not run at input size {input_hw[0]}x{input_hw[1]}: "
                        f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None
    finally:
        handle.remove()
    if not outputs:
        raise UserError(f"layer {path!r} is never called in the model's forward (not reached)")
    chosen = infer_layout(family, path, outputs[0], input_hw, layout=layout, prefix_tokens=prefix_tokens, grid=grid)
    check_layout(chosen, outputs[0], path, input_hw)
    # a token or channels-last target is a block's first norm: the block's input is its residual
    block = lookup.get_submodule(path.rsplit(".", 1)[0]) if chosen.kind != "nchw" and "." in path else None
    fixed_size = family.fixed_size
    if chosen.kind == "tokens":  # the position embedding fixes the grid
        fixed_size = f"target {path!r} is tokens on a fixed {chosen.grid[0]}x{chosen.grid[1]} grid"
    return LayoutSplit(model, module, path, chosen, block, fixed_size)
