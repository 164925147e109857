"""Guided backpropagation (Springenberg et al.), as pytorch-grad-cam's GuidedBackpropReLUModel does it: every
nn.ReLU module passes back only positive gradients at positive inputs. Other activations (ReLU6, F.relu, GELU)
keep their ordinary gradient there too."""

import contextlib

import torch
import torch.nn as nn


class GuidedReLU(torch.autograd.Function):
    """relu(x) forward; backward grad * (x > 0) * (grad > 0). The setup_context form is what torch.func.vjp needs."""

    @staticmethod
    def forward(x):
        return torch.relu(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ((x > 0) & (grad > 0)).to(grad.dtype)


def gelu_modules(root: nn.Module) -> list[nn.Module]:
    """GELU activations by module (torch's nn.GELU, timm's and Hugging Face's wrappers, QuickGELU...)."""
    return [m for m in root.modules() if "gelu" in type(m).__name__.lower()]


def relu_modules(root: nn.Module) -> list[nn.Module]:
    return [m for m in root.modules() if isinstance(m, nn.ReLU)]


@contextlib.contextmanager
def guided_relus(root: nn.Module):
    """Within the block every nn.ReLU of `root` is guided. A forward hook replaces the module's output, so a module
    used several times (ResNet's blocks) is guided at each call; callers switch in-place ReLUs off first, so the
    hook sees the ReLU's real input."""
    handles = [m.register_forward_hook(lambda mod, inp, out: GuidedReLU.apply(inp[0])) for m in relu_modules(root)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
