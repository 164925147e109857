"""Cutting a classifier at the Grad-CAM target: activations(x) -> A and head(x, A) -> logits.

Two ways: a forward hook on a module (HookSplit, works for any model whose target runs exactly once per forward),
or an explicit (backbone, head) pair (ExplicitSplit, for targets a hook can't name, e.g. a shared module)."""

import difflib

import torch
import torch.nn as nn

from .errors import UserError


class _Stop(Exception):
    """Raised by the backbone's hook to skip the rest of the forward."""


class HookSplit:
    """`root` is the model, `target_module` the hooked layer (the pair pytorch-grad-cam takes)."""

    def __init__(self, model: nn.Module, layer: nn.Module, name: str):
        self.root, self.target_module, self.name = model, layer, name

    def activations(self, x):
        handle = self.target_module.register_forward_hook(_raise_output)
        try:
            self.root(x)
        except _Stop as stop:
            return stop.args[0]
        finally:
            handle.remove()
        raise RuntimeError(f"layer {self.name!r} was not reached")  # validate() rules this out

    def head(self, x, A):
        """The whole model again with the layer's output replaced by A. The prefix it recomputes is dead code
        that make_fx's DCE drops. The clone keeps in-place ops after the layer (DenseNet's F.relu(inplace=True)
        after features.norm5) from writing into A, which is also the `activations` output."""
        handle = self.target_module.register_forward_hook(lambda mod, inp, out: A.clone())
        try:
            return self.root(x)
        finally:
            handle.remove()

    def logits(self, x):
        return self.root(x)


class ExplicitSplit:
    """`root` runs head(backbone(x)); `target_module` is the backbone, whose output is the target."""

    def __init__(self, backbone: nn.Module, head: nn.Module, name: str):
        self.root, self.target_module, self.name = nn.Sequential(backbone, head), backbone, name

    def activations(self, x):
        return self.root[0](x)

    def head(self, x, A):
        return self.root[1](A)

    def logits(self, x):
        return self.root(x)


def _raise_output(mod, inp, out):
    raise _Stop(out)


def resolve(model: nn.Module, path: str) -> nn.Module:
    """The module at a path like 'layer4' or 'features.norm5'; unknown paths list the closest names."""
    names = [n for n, _ in model.named_modules() if n]
    if path not in names:
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.4)
        top = [n for n in names if "." not in n]
        hint = f"; close names: {', '.join(close)}" if close else f"; top-level modules: {', '.join(top)}"
        raise UserError(f"no layer {path!r} in the model{hint}")
    return model.get_submodule(path)


def hook_split(model: nn.Module, path: str) -> HookSplit:
    return HookSplit(model, resolve(model, path), path)


class ExtraLayers:
    """Target layers besides the split's own, by module path in split.root (for an ExplicitSplit that is
    nn.Sequential(backbone, head): '0.<path in the backbone>'). `order` lists all targets, the split's own first
    (index 0), in the order the forward reaches them."""

    def __init__(self, split, paths, example: torch.Tensor):
        self.names = list(paths)
        if len(set(self.names)) != len(self.names) or split.name in self.names:
            raise UserError(f"extra layers {self.names} repeat a layer (the target is {split.name!r})")
        self.modules = [resolve(split.root, path) for path in self.names]
        targets = [split.target_module] + self.modules
        if len({id(m) for m in targets}) != len(targets):
            raise UserError(f"extra layers {self.names} name the same module twice, or the target itself")
        outputs = {}
        handles = [m.register_forward_hook(lambda mod, inp, out, i=i: outputs.setdefault(i, []).append(out))
                   for i, m in enumerate(targets)]
        try:
            with torch.no_grad():
                split.root(example)
        finally:
            for h in handles:
                h.remove()
        for i, name in enumerate(self.names, start=1):
            calls = outputs.get(i, [])
            if len(calls) != 1:
                why = "is never called in the model's forward" if not calls else f"is called {len(calls)} times"
                raise UserError(f"extra layer {name!r} {why}; a hook needs exactly one call per forward")
            if not isinstance(calls[0], torch.Tensor) or calls[0].dim() != 4:
                raise UserError(f"extra layer {name!r} does not give a 4-D [N,Ch,h,w] feature map")
        self.order = list(outputs)  # dicts keep insertion order: the order of the first calls
        self.targets = targets


def capture(root: nn.Module, modules, x) -> list[torch.Tensor]:
    """The outputs of `modules` (each called once) in one forward that stops after the last of them."""
    outputs = {}

    def record(i):
        def hook(mod, inp, out):
            outputs[i] = out
            if len(outputs) == len(modules):
                raise _Stop(None)
        return hook

    handles = [m.register_forward_hook(record(i)) for i, m in enumerate(modules)]
    try:
        root(x)
    except _Stop:
        return [outputs[i] for i in range(len(modules))]
    finally:
        for h in handles:
            h.remove()
    raise RuntimeError("a target layer was not reached")  # ExtraLayers rules this out


def validate(split, example: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One eager forward: the target must run exactly once and give [N,Ch,h,w]; returns (A, logits)."""
    if isinstance(split, HookSplit):
        calls = []
        handle = split.target_module.register_forward_hook(lambda mod, inp, out: calls.append(out))
        try:
            with torch.no_grad():
                split.root(example)
        finally:
            handle.remove()
        if not calls:
            raise UserError(f"layer {split.name!r} is never called in the model's forward (not reached)")
        if len(calls) > 1:
            raise UserError(f"layer {split.name!r} is called {len(calls)} times per forward (a shared module?); "
                            "a hook can't pick one call: use an explicit split (--split module:function)")
    with torch.no_grad():
        A = split.activations(example)
        logits = split.head(example, A)
    if not isinstance(A, torch.Tensor) or A.dim() != 4:
        shape = tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__
        raise UserError(f"target {split.name!r} gives {shape}; Grad-CAM needs a 4-D [N,Ch,h,w] feature map")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(f"the model returns {shape}; camserve needs logits [N,C]")
    return A, logits


def accepts_other_sizes(split, size) -> bool:
    """Dynamic H/W is only offered when the head copes with another feature-map size (global or adaptive
    pooling). A flatten+linear head fails here, and the export stays at the fixed input size."""
    try:
        with torch.no_grad():
            h, w = (size, size) if isinstance(size, int) else size
            x = torch.zeros(1, 3, h + 32, w + 16)
            split.head(x, split.activations(x))
        return True
    except Exception:  # any failure at another size means: keep H/W fixed
        return False
