"""camserve-export: a PyTorch classifier -> a camserve contract-v1 ONNX file, checked against autograd.

Exit codes: 0 written; 2 user error (bad arch, layer, path, labels...); 3 a check failed (nothing written);
1 the exporter could not trace or export the model (one line; --debug shows the traceback)."""

import argparse
import json
import sys
from pathlib import Path

import torch

from . import __version__, families
from .errors import CheckFailed, UserError
from .export import export_contract
from .layout import LAYOUTS, parse_grid
from .load import (default_layer, imagenet_labels, load_state_dict, model_from_factory, split_from_factory,
                   torchvision_model)
from .metadata import Preprocess, load_labels
from .split import hook_split


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="camserve-export", description=__doc__.split("\n\n")[0],
                                epilog="Example: camserve-export --arch resnet18 --weights r18.pth -o r18.onnx")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--arch", help="torchvision classification model name, e.g. resnet18 (random weights by default)")
    src.add_argument("--model", metavar="MODULE:FUNCTION", help="a function returning a torch.nn.Module")
    src.add_argument("--timm", metavar="NAME", help="a timm model by name, random weights (or --checkpoint FILE)")
    src.add_argument("--hf", metavar="PATH", help="a Hugging Face image classifier folder written by save_pretrained")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", metavar="FILE", help="state_dict file to load into the model")
    w.add_argument("--checkpoint", metavar="FILE", help="a local timm checkpoint (--timm only)")
    w.add_argument("--torchvision-weights", metavar="NAME",
                   help="torchvision named weights (e.g. IMAGENET1K_V1), only if already in the local cache")
    tgt = p.add_mutually_exclusive_group()
    tgt.add_argument("--layer", help="target module path, e.g. layer4 (default: the family's usual target)")
    tgt.add_argument("--split", metavar="MODULE:FUNCTION",
                     help="function(model) -> (backbone, head[, name]) for targets a hook can't name")
    p.add_argument("--extra-layer", action="append", default=[], metavar="PATH",
                   help="another target layer (repeatable): outputs activations_1/gradients_1, ... for "
                        "multi-layer CAMs; with --split, a path in nn.Sequential(backbone, head), e.g. 0.blocks.14")
    p.add_argument("--guided", action="store_true",
                   help="add input_gradients: guided backpropagation to the input, for Guided Grad-CAM")
    p.add_argument("--labels", metavar="FILE", help="class names: one per line, or a JSON array")
    p.add_argument("--num-classes", type=int, help="classes of a torchvision arch (default: from --labels, or 1000)")
    p.add_argument("--input-size", type=_size, metavar="S|HxW",
                   help="input size the server feeds: S (square) or HxW (default: the model's own, else 224)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="(repeatable) a constructor argument for --arch transformers (vit_*, swin_*, maxvit_t) or "
                        "timm.create_model, e.g. num_layers=2 or depths=[2,2]; VALUE is JSON, else a string")
    p.add_argument("--layout", choices=LAYOUTS, help="the target's layout, if the family's guess is wrong")
    p.add_argument("--prefix-tokens", type=int, metavar="P", help="tokens before the patch grid (CLS, registers)")
    p.add_argument("--grid", metavar="HxW", help="the patch grid of a token target")
    p.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="default: ImageNet's or the weights'")
    p.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="default: ImageNet's or the weights'")
    p.add_argument("--fixed-size", action="store_true", help="keep H and W fixed even if the head allows others")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights (default 0)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"camserve-export {__version__}")
    return p


def _size(text: str):
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected S or HxW, got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected S or HxW, got {text!r}")
    return (parts[0], parts[-1])


def _model_args(pairs) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--model-arg wants KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _build_transformer(args, labels, num_classes, log):
    """--timm, --hf, and torchvision's ViT / Swin / MaxViT: a LayoutSplit at the family's default target."""
    model_args = _model_args(args.model_arg)
    if args.hf:
        if model_args:
            raise UserError("--model-arg does not apply to --hf (the folder's config.json is the model)")
        built = families.hf_model(args.hf, num_classes, args.input_size)
    elif args.timm:
        built = families.timm_model(args.timm, num_classes, model_args, args.input_size, args.checkpoint)
    else:
        model, size = families.torchvision_transformer(args.arch, num_classes or 1000, model_args, args.input_size)
        c = num_classes or 1000
        built = families.Built(model, model, families.torchvision_family(model), Preprocess(),
                               imagenet_labels() if c == 1000 else None,
                               f"torchvision {args.arch}, random weights", size or args.input_size or (224, 224))
    torch.manual_seed(args.seed)
    if args.weights:
        load_state_dict(built.model if not args.hf else built.lookup, args.weights)
        built.source += f", weights {Path(args.weights).name}"
    elif not (args.checkpoint or args.hf):
        built.source += f" (seed {args.seed})"
    size = built.input_size or (224, 224)
    grid = parse_grid(args.grid) if args.grid else None
    split = families.layout_split(built.model, built.lookup, built.family, args.layer, size, layout=args.layout,
                                  prefix_tokens=args.prefix_tokens, grid=grid)
    log(f"{built.family.name}: target {split.name} ({split.layout.describe()}), input {size[0]}x{size[1]}")
    preprocess = Preprocess(mean=tuple(args.mean or built.preprocess.mean), std=tuple(args.std or built.preprocess.std))
    return export_contract(split, args.output, input_size=size, labels=labels or built.labels,
                           preprocess=preprocess, source=built.source, dynamic_hw=False if args.fixed_size else None,
                           extra_layers=args.extra_layer, guided=args.guided, log=log)


def _build(args, log):
    labels = None
    if args.labels:
        try:
            labels = load_labels(args.labels)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read labels {args.labels!r}: {e}") from None
    num_classes = args.num_classes or (len(labels) if labels else None)
    if args.checkpoint and not args.timm:
        raise UserError("--checkpoint is for --timm; use --weights FILE for a state_dict")
    if args.model_arg and not (args.timm or (args.arch and families.is_torchvision_transformer(args.arch))):
        raise UserError("--model-arg applies to --timm and to --arch vit_*, swin_*, swin_v2_*, maxvit_t")
    if args.timm or args.hf or (args.arch and families.is_torchvision_transformer(args.arch)
                                and not args.torchvision_weights):
        if args.split:
            raise UserError("--split does not apply here: pick the target with --layer (and --layout if needed)")
        torch.manual_seed(args.seed)
        return _build_transformer(args, labels, num_classes, log)

    torch.manual_seed(args.seed)
    if args.arch:
        model, preprocess, default_labels, source = torchvision_model(args.arch, num_classes, args.torchvision_weights)
    else:
        if args.num_classes:
            raise UserError("--num-classes only applies to --arch, --timm and --hf; --model builds its own head")
        model, preprocess, default_labels, source = model_from_factory(args.model), Preprocess(), None, args.model
    if args.weights:
        load_state_dict(model, args.weights)
        source += f", weights {Path(args.weights).name}"
    elif not args.torchvision_weights:
        source += f" (seed {args.seed})"

    if args.split:
        split = split_from_factory(args.split, model)
    else:
        layer = args.layer or (default_layer(args.arch) if args.arch else None)
        if layer is None:
            raise UserError("no target: pass --layer MODULE.PATH or --split MODULE:FUNCTION")
        split = hook_split(model, layer)

    if args.layer and (args.layout or args.prefix_tokens is not None or args.grid):
        built = families.Built(model, model, families.torchvision_family(model) or families.Family(args.arch or
                               args.model), preprocess, default_labels, source, args.input_size or (224, 224))
        split = families.layout_split(model, model, built.family, args.layer, built.input_size, layout=args.layout,
                                      prefix_tokens=args.prefix_tokens,
                                      grid=parse_grid(args.grid) if args.grid else None)
    preprocess = Preprocess(mean=tuple(args.mean or preprocess.mean), std=tuple(args.std or preprocess.std))
    return export_contract(split, args.output, input_size=args.input_size or 224, labels=labels or default_labels,
                           preprocess=preprocess, source=source, dynamic_hw=False if args.fixed_size else None,
                           extra_layers=args.extra_layer, guided=args.guided, log=log)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"camserve-export: {msg}", file=sys.stderr))
    try:
        result = _build(args, log)
    except UserError as e:
        print(f"camserve-export: error: {e}", file=sys.stderr)
        return 2
    except CheckFailed as e:
        print(f"camserve-export: check failed, nothing written: {e}", file=sys.stderr)
        return 3
    except Exception as e:
        if args.debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"camserve-export: error: export failed: {type(e).__name__}: {first} (--debug for the traceback)",
              file=sys.stderr)
        return 1
    for note in result.notes:
        log(f"note: {note}")
    errs = ", ".join(f"{k} {v:.1e}" for k, v in result.errors.items())
    print(f"wrote {result.path} ({result.path.stat().st_size / 1e6:.1f} MB): {result.num_classes} classes, "
          f"activations {list(result.activations_shape)}, H/W {'dynamic' if result.dynamic_hw else 'fixed'}; "
          f"max relative error vs autograd: {errs}; {result.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
