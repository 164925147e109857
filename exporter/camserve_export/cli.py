"""camserve-export: a PyTorch classifier -> a camserve contract-v1 ONNX file, checked against autograd.

Exit codes: 0 written; 2 user error (bad arch, layer, path, labels...); 3 a check failed (nothing written);
1 the exporter could not trace or export the model (one line; --debug shows the traceback)."""

import argparse
import sys
from pathlib import Path

import torch

from . import __version__
from .errors import CheckFailed, UserError
from .export import export_contract
from .load import (default_layer, load_state_dict, model_from_factory, split_from_factory, torchvision_model)
from .metadata import Preprocess, load_labels
from .split import hook_split


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="camserve-export", description=__doc__.split("\n\n")[0],
                                epilog="Example: camserve-export --arch resnet18 --weights r18.pth -o r18.onnx")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--arch", help="torchvision classification model name, e.g. resnet18 (random weights by default)")
    src.add_argument("--model", metavar="MODULE:FUNCTION", help="a function returning a torch.nn.Module")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", metavar="FILE", help="state_dict file to load into the model")
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
    p.add_argument("--input-size", type=int, default=224, help="square input size the server feeds (default 224)")
    p.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="default: ImageNet's or the weights'")
    p.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="default: ImageNet's or the weights'")
    p.add_argument("--fixed-size", action="store_true", help="keep H and W fixed even if the head allows others")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights (default 0)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"camserve-export {__version__}")
    return p


def _build(args, log):
    labels = None
    if args.labels:
        try:
            labels = load_labels(args.labels)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read labels {args.labels!r}: {e}") from None
    num_classes = args.num_classes or (len(labels) if labels else None)

    torch.manual_seed(args.seed)
    if args.arch:
        model, preprocess, default_labels, source = torchvision_model(args.arch, num_classes, args.torchvision_weights)
    else:
        if args.num_classes:
            raise UserError("--num-classes only applies to --arch; --model builds its own head")
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

    preprocess = Preprocess(mean=tuple(args.mean or preprocess.mean), std=tuple(args.std or preprocess.std))
    return export_contract(split, args.output, input_size=args.input_size, labels=labels or default_labels,
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
