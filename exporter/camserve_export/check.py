"""Checks an exported file must pass before it replaces anything: its signature (names, dtypes, symbolic dims)
and parity with PyTorch autograd, run through ONNX Runtime at sizes the trace never saw."""

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .errors import CheckFailed
from .guided import guided_relus
from .metadata import GUIDED_OUTPUT, INPUT_NAMES, OUTPUT_NAMES, output_names
from .trace import _out_of_place

TOLERANCE = 1e-4  # max |onnx - torch| relative to max |torch|
CHECK_N = 3  # differs from the traced N (2, or 4 for a 2-class model)


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def check_signature(model: onnx.ModelProto, num_classes: int, dynamic_hw: bool, extra_layers: int = 0,
                    guided: bool = False) -> None:
    """torch.onnx silently specializes a dim when torch.export reports a constraint; the saved file is the
    only place to see it."""
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    want_in = {"input": (f32, 4), "class_weights": (f32, 3)}
    want_out = {"logits": (f32, 2), "activations": (f32, 4), "gradients": (f32, 5), "target_class": (i64, 2),
                GUIDED_OUTPUT: (f32, 5)}
    for i in range(1, extra_layers + 1):
        want_out.update({f"activations_{i}": (f32, 4), f"gradients_{i}": (f32, 5)})
    outputs = output_names(extra_layers, guided)
    want_out = {name: want_out[name] for name in outputs}
    for values, want, names in ((model.graph.input, want_in, INPUT_NAMES),
                                (model.graph.output, want_out, outputs)):
        got = {v.name: v for v in values}
        if sorted(got) != sorted(names):
            raise CheckFailed(f"signature: expected {list(names)}, the file has {list(got)}")
        for name, (dtype, rank) in want.items():
            t = got[name].type.tensor_type
            if t.elem_type != dtype or len(t.shape.dim) != rank:
                raise CheckFailed(f"signature: {name} is {onnx.TensorProto.DataType.Name(t.elem_type)} rank "
                                  f"{len(t.shape.dim)}, expected {onnx.TensorProto.DataType.Name(dtype)} rank {rank}")
    per_seed = [o for o in model.graph.output if len(o.type.tensor_type.shape.dim) == 5]  # [N,K,...] outputs
    fixed_nk = {o.name: _dims(o)[:2] for o in per_seed if not all(isinstance(d, str) for d in _dims(o)[:2])}
    if fixed_nk:
        raise CheckFailed(f"symbolic dims: N and K of {fixed_nk} were fixed during export")
    fixed = specialized_axes(model, dynamic_hw)
    if fixed:
        what = "; ".join(f"{name} axes {axes} were specialized during export" for name, axes in fixed.items())
        raise CheckFailed(f"symbolic dims: {what} (dims {_all_dims(model)})")
    inputs = _all_dims(model)
    if inputs["input"][1] != 3 or inputs["class_weights"][2] != num_classes:
        raise CheckFailed(f"signature: input {inputs['input']}, class_weights {inputs['class_weights']}; "
                          f"expected 3 channels and {num_classes} classes")


def _all_dims(model):
    return {v.name: _dims(v) for v in model.graph.input}


def specialized_axes(model: onnx.ModelProto, dynamic_hw: bool) -> dict[str, list[int]]:
    """Input axes that should be symbolic but are fixed numbers in the saved file."""
    inputs = _all_dims(model)
    symbolic = {"input": [0, 2, 3] if dynamic_hw else [0], "class_weights": [0, 1]}
    fixed = {name: [a for a in axes if not isinstance(inputs[name][a], str)] for name, axes in symbolic.items()}
    return {name: axes for name, axes in fixed.items() if axes}


def relative_error(got, ref) -> float:
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return float(np.abs(got - ref).max()) / max(scale, 1e-30) if ref.size else 0.0


def reference(split, x: torch.Tensor, seeds: torch.Tensor):
    """Eager PyTorch autograd, independent of the traced graph: logits, A and d(sum(logits*seed_k))/dA."""
    with torch.no_grad():
        logits = split.logits(x)
    A = split.activations(x).detach().requires_grad_(True)
    head_logits = split.head(x, A)
    grads = [torch.autograd.grad((head_logits * seeds[:, k]).sum(), A, retain_graph=True)[0]
             for k in range(seeds.shape[1])]
    return logits.numpy(), A.detach().numpy(), torch.stack(grads, 1).numpy()


def reference_guided(split, x: torch.Tensor, seeds: torch.Tensor) -> np.ndarray:
    """Guided backpropagation in eager PyTorch: d(sum(logits*seed_k))/d(input) with guided ReLUs, [N,K,3,H,W]."""
    grads = []
    with _out_of_place(split.root), guided_relus(split.root):
        for k in range(seeds.shape[1]):
            xr = x.clone().requires_grad_(True)
            grads.append(torch.autograd.grad((split.logits(xr) * seeds[:, k]).sum(), xr)[0])
    return torch.stack(grads, 1).numpy()


def reference_layers(split, modules, x: torch.Tensor, seeds: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """(A, d(sum(logits*seed_k))/dA [N,K,...]) per module, by eager autograd through the whole model."""
    outputs = {}

    def keep(i):  # the clone keeps later in-place ops off the captured output
        return lambda mod, inp, out: (outputs.__setitem__(i, out), out.clone())[1]

    handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(modules)]
    try:
        logits = split.root(x.clone().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    acts = [outputs[i] for i in range(len(modules))]
    per_seed = [torch.autograd.grad((logits * seeds[:, k]).sum(), acts, retain_graph=True)
                for k in range(seeds.shape[1])]
    return [(a.detach().numpy(), torch.stack([g[i] for g in per_seed], 1).numpy()) for i, a in enumerate(acts)]


def _explicit_seeds(n, k, c, gen):
    """Row 0, 1: one-hot; row 2: a weighted (contrastive) target; row 3: all zero = 4th best class."""
    seeds = torch.zeros(n, k, c)
    for i in range(n):
        perm = torch.randperm(c, generator=gen).tolist()
        a, b = perm[0], perm[min(1, c - 1)]
        seeds[i, 0, a] = 1.0
        if k > 1:
            seeds[i, 1, b] = 1.0
        if k > 2:
            seeds[i, 2, a], seeds[i, 2, b] = 1.0, -0.5
    return seeds


def check_parity(session: ort.InferenceSession, split, size, dynamic_hw: bool, tol: float = TOLERANCE,
                 extra=None, guided: bool = False):
    """Runs the file at N=3 and K=min(4,C) (traced at N=2 or 4, K>=5), with explicit seeds and with all-zero seeds
    (the latter, for dynamic H/W, at another spatial size), and at N=K=1. Returns the worst relative error
    per output (the optional ones included: guided backpropagation and extra layers)."""
    c = session.get_inputs()[1].shape[2]
    k = min(4, c)
    size_h, size_w = (size, size) if isinstance(size, int) else size
    gen = torch.Generator().manual_seed(0)
    cases = [("explicit seeds", (size_h, size_w), _explicit_seeds(CHECK_N, k, c, gen)),
             ("all-zero seeds (top-k)", (size_h + 32, size_w + 16) if dynamic_hw else (size_h, size_w),
              torch.zeros(CHECK_N, k, c)),
             ("top-1 of one image", (size_h, size_w), torch.zeros(1, 1, c))]  # the server's usual call
    names = output_names(len(extra.names) if extra else 0, guided)
    worst = {name: 0.0 for name in names if name != "target_class"}
    for label, (h, w), seeds in cases:
        n, k = seeds.shape[:2]
        x = torch.randn(n, 3, h, w, generator=gen)
        got = dict(zip(names, session.run(names, {"input": x.numpy(), "class_weights": seeds.numpy()})))
        logits, A, G, target = (got[name] for name in OUTPUT_NAMES)
        where = f"{label}, N={n}, K={k}, {h}x{w}"

        # Expected classes: argmax of a non-zero row, else the k-th best by the file's own logits (so that a
        # 1e-7 near-tie between ONNX Runtime and PyTorch can't flip the order).
        ranked = np.argsort(-logits, axis=1, kind="stable")
        zero = (seeds.abs().sum(-1) == 0).numpy()
        expected = np.where(zero, ranked[:, np.minimum(np.arange(k), c - 1)], seeds.argmax(-1).numpy())
        if not np.array_equal(target, expected):
            raise CheckFailed(f"target_class ({where}): got {target.tolist()}, expected {expected.tolist()}")

        resolved = torch.where(torch.from_numpy(zero)[..., None],
                               torch.nn.functional.one_hot(torch.from_numpy(expected), c).float(), seeds)
        ref = dict(zip(("logits", "activations", "gradients"), reference(split, x, resolved)))
        if guided:
            ref[GUIDED_OUTPUT] = reference_guided(split, x, resolved)
        if extra:
            for i, (a, g) in enumerate(reference_layers(split, extra.modules, x, resolved), start=1):
                ref[f"activations_{i}"], ref[f"gradients_{i}"] = a, g
        for name in worst:
            if got[name].shape != ref[name].shape:
                raise CheckFailed(f"{name} ({where}): shape {got[name].shape}, PyTorch gives {ref[name].shape}")
            err = relative_error(got[name], ref[name])
            if not err <= tol:  # also catches NaN
                raise CheckFailed(f"{name} ({where}): max |onnx - torch| = "
                                  f"{np.abs(got[name] - ref[name]).max():.3g}, max |torch| = "
                                  f"{np.abs(ref[name]).max():.3g}, relative {err:.3g} > {tol:g}")
            worst[name] = max(worst[name], err)
    return worst
