"""export_contract: trace, export, check, then (and only then) put the file in place."""

import contextlib
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from . import __version__
from .check import TOLERANCE, check_parity, check_signature, specialized_axes
from .errors import UserError
from .guided import gelu_modules, relu_modules
from .layout import Layout
from .metadata import INPUT_NAMES, Preprocess, metadata_props, numbered_labels, output_names, set_metadata
from .split import ExtraLayers, accepts_other_sizes, validate
from .trace import trace

EXAMPLE_N = 2  # for the eager probes; the traced shapes come from trace_shapes


@dataclass
class ExportResult:
    path: Path
    num_classes: int
    activations_shape: tuple  # [Ch, h, w] at the input size
    dynamic_hw: bool
    errors: dict  # worst relative error per output, from check_parity
    seconds: float
    notes: list = field(default_factory=list)


def trace_shapes(size, num_classes: int, dynamic_hw: bool):
    """Example shapes whose unrelated dims all differ: make_fx gives equal sizes one symbol (duck sizing), which
    would tie N to C (a 2-class model) or K to C or H to W in the graph. K may exceed C (see ContractGraph)."""
    size_h, size_w = as_hw(size)
    taken = {0, 1, 3, num_classes}  # 0 and 1 are always specialized; 3 is the RGB axis

    def pick(candidates):
        value = next(v for v in candidates if v not in taken)
        taken.add(value)
        return value

    n = pick(range(2, 64))
    k = pick(range(5, 64))
    if not dynamic_hw:  # fixed H/W: the model's own size (duck sizing is harmless for dims that stay fixed)
        return (n, 3, size_h, size_w), (n, k, num_classes)
    h = pick(range(size_h, size_h + 64))
    w = pick(range(h + 16, h + 96))
    return (n, 3, h, w), (n, k, num_classes)


def as_hw(size) -> tuple[int, int]:
    """An input size as (H, W): an int is square."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _reserve_temp(out: Path) -> Path:
    """A temporary file next to the output, so the final rename is atomic; created first so an unwritable
    path fails before minutes of tracing."""
    if out.is_dir():
        raise UserError(f"output path {str(out)!r} is a directory")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {str(out)!r}: directory {str(out.parent)!r} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise UserError(f"cannot write {str(out)!r}: {e.strerror}") from None
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    """eval() and no parameter gradients while exporting (parameters become constants of the trace);
    requires_grad is restored afterwards, eval mode is kept."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval().requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _quiet_fake_tensor():
    """FakeTensor logs a full traceback at ERROR level before raising; the dynamic H/W attempt handles that."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _onnx_export(graph, x, w, dynamic_hw: bool, path: Path, names: list[str]) -> None:
    n = torch.export.Dim("N", min=1, max=1024)
    k = torch.export.Dim("K", min=1, max=4096)
    input_dims = {0: n}
    if dynamic_hw:
        smallest = min(32, x.shape[2], x.shape[3])
        input_dims.update({2: torch.export.Dim("H", min=smallest, max=4096),
                           3: torch.export.Dim("W", min=smallest, max=4096)})
    with warnings.catch_warnings():
        # N names the batch axis of both inputs; torch.onnx warns that the second use of the name is redundant
        warnings.filterwarnings("ignore", message="# The axis name")
        program = torch.onnx.export(graph.eval(), (x, w), dynamo=True, dynamic_shapes=(input_dims, {0: n, 1: k}),
                                    input_names=list(INPUT_NAMES), output_names=names, verbose=False)
    program.save(str(path), external_data=False)


def _trace_and_export(split, input_size, num_classes, dynamic_hw, path, log, extra, guided) -> onnx.ModelProto:
    x_shape, w_shape = trace_shapes(input_size, num_classes, dynamic_hw)
    log(f"tracing (make_fx over torch.func.vjp), H/W {'dynamic' if dynamic_hw else 'fixed'}")
    graph = trace(split, torch.randn(x_shape), torch.zeros(w_shape), extra, guided, dynamic_hw)
    log("exporting (torch.onnx, dynamo)")
    names = output_names(len(extra.names) if extra else 0, guided)
    _onnx_export(graph, torch.randn(x_shape), torch.zeros(w_shape), dynamic_hw, path, names)
    return onnx.load(str(path))


def export_contract(split, out, *, input_size: int | tuple[int, int] = 224, labels=None,
                    preprocess: Preprocess = Preprocess(), source: str = "", dynamic_hw: bool | None = None, tolerance: float = TOLERANCE,
                    extra_check=None, extra_layers=(), guided: bool = False, log=lambda msg: None) -> ExportResult:
    """Export `split` (HookSplit or ExplicitSplit) to `out` in contract v1. dynamic_hw=None decides by probing
    the head at another size. extra_check(session) may raise CheckFailed too. Optional outputs: `extra_layers`
    (module paths in split.root) adds activations_i / gradients_i, `guided` adds input_gradients (guided
    backpropagation). `input_size` is an int (square) or (H, W). A LayoutSplit maps a token or channels-last
    target to NCHW in the graph and records its layout. Raises UserError or CheckFailed; on any failure `out` is
    left untouched."""
    started = time.monotonic()
    out = Path(out)
    size_hw = as_hw(input_size)
    layout = getattr(split, "layout", Layout())
    if guided:
        gelus = gelu_modules(split.root)
        if gelus:
            raise UserError(
                f"--guided: the model uses GELU ({type(gelus[0]).__name__}, {len(gelus)} module(s)); guided "
                "backpropagation is defined for ReLU networks (pytorch-grad-cam's GuidedBackpropReLUModel only "
                "changes nn.ReLU's backward), and through GELU it would be neither guided nor meaningful: export "
                "without --guided")
    if extra_layers and layout.kind != "nchw":
        raise UserError(f"extra layers need an NCHW target; {split.name!r} is {layout.describe()}")
    tmp = _reserve_temp(out)
    try:
        with _frozen(split.root):
            example = torch.randn(EXAMPLE_N, 3, *size_hw, generator=torch.Generator().manual_seed(0))
            A, logits = validate(split, example)
            num_classes = logits.shape[1]
            labels = list(labels) if labels is not None else numbered_labels(num_classes)
            if len(labels) != num_classes:
                raise UserError(f"{len(labels)} labels for a model with {num_classes} classes")
            notes = []
            extra = ExtraLayers(split, extra_layers, example) if extra_layers else None
            if guided and not relu_modules(split.root):
                notes.append("the model has no nn.ReLU module: input_gradients are its plain input gradients "
                             "(as pytorch-grad-cam's GuidedBackpropReLUModel gives for it)")
            auto_hw = dynamic_hw is None
            fixed_at = f"{size_hw[0]}x{size_hw[1]}"
            fixed_why = getattr(split, "fixed_size", "")
            if fixed_why:
                if dynamic_hw:
                    raise UserError(f"H and W can't be dynamic (export with fixed H/W): {fixed_why}")
                if auto_hw:
                    notes.append(f"H and W are fixed at {fixed_at}: {fixed_why}")
                dynamic_hw = False
            elif auto_hw:
                dynamic_hw = accepts_other_sizes(split, size_hw)
                if not dynamic_hw:
                    notes.append(f"the head needs the fixed input size: H and W are fixed at {fixed_at}")
            log(f"target {split.name!r} ({layout.describe()}): activations {list(A.shape[1:])}, "
                f"{num_classes} classes")

            model = None
            if dynamic_hw:
                try:
                    with _quiet_fake_tensor():
                        model = _trace_and_export(split, size_hw, num_classes, True, tmp, log, extra, guided)
                    fixed = specialized_axes(model, dynamic_hw=True)
                    only_hw = fixed.keys() == {"input"} and 0 not in fixed["input"]
                    why = f"dims {fixed} were specialized" if only_hw else ""
                except Exception as e:  # retried below with fixed H/W; a real problem fails there again
                    if not auto_hw:
                        raise
                    why = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
                if auto_hw and why:
                    # The eager head took another size, but the traced graph can't (a size baked into the
                    # model's code, e.g. a pooling kernel read off the tensor): fixed is the honest export.
                    notes.append(f"H and W could not stay symbolic ({why}): they are fixed at {fixed_at}")
                    log(notes[-1])
                    dynamic_hw, model = False, None
            if model is None:
                model = _trace_and_export(split, size_hw, num_classes, dynamic_hw, tmp, log, extra, guided)
            check_signature(model, num_classes, dynamic_hw, len(extra_layers), guided)
            source = source or f"target {split.name}"
            set_metadata(model, metadata_props(labels, split.name, size_hw, preprocess,
                                               f"{source}; camserve-export {__version__} (torch {torch.__version__})",
                                               extra_layers, layout))
            onnx.save(model, str(tmp))

            log("checking against PyTorch autograd with ONNX Runtime")
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            errors = check_parity(session, split, size_hw, dynamic_hw, tolerance, extra, guided)
            if extra_check is not None:
                extra_check(session)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp made it 0600; the model is read by the server, maybe as another user
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportResult(out, num_classes, tuple(A.shape[1:]), dynamic_hw, errors, time.monotonic() - started, notes)
