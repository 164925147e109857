"""The target's layout, and the split that maps it to the contract's NCHW inside the graph.

A transformer's usual Grad-CAM target is not an NCHW feature map: a ViT block gives tokens [N,T,D] (P prefix
tokens such as CLS, distillation or register tokens, then h*w patch tokens in row-major order), a Swin block gives
channels-last [N,h,w,C]. `LayoutSplit` exports `activations` as [N,D,h,w] (prefix tokens dropped, patch tokens on
their grid) and `gradients` as d(scores)/d(that grid), so the server computes maps, boxes and every method exactly as
for a CNN. The original layout is recorded in `camserve.target_layout`."""

import json
from dataclasses import dataclass

import torch

from .errors import UserError
from .split import HookSplit

LAYOUTS = ("nchw", "nhwc", "tokens")


@dataclass(frozen=True)
class Layout:
    kind: str = "nchw"  # one of LAYOUTS
    prefix_tokens: int = 0  # tokens only: how many tokens precede the patch grid
    grid: tuple[int, int] | None = None  # tokens only: (h, w) of the patch grid

    def to_json(self) -> str:
        if self.kind == "tokens":
            return json.dumps({"layout": "tokens", "prefix_tokens": self.prefix_tokens, "grid": list(self.grid)})
        return json.dumps({"layout": self.kind})

    def to_nchw(self, out: torch.Tensor) -> torch.Tensor:
        if self.kind == "nchw":
            return out
        if self.kind == "nhwc":
            return out.permute(0, 3, 1, 2)
        h, w = self.grid
        patches = out[:, self.prefix_tokens:]
        return patches.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)

    def from_nchw(self, A: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        """The inverse of to_nchw: A [N,D,h,w] back to the layer's own layout, with `prefix` [N,P,D] in front of
        the patch tokens (tokens only; None when P = 0)."""
        if self.kind == "nchw":
            return A
        if self.kind == "nhwc":
            return A.permute(0, 2, 3, 1).contiguous()  # the blocks after it view() their input
        patches = A.flatten(2).transpose(1, 2)
        return patches if prefix is None else torch.cat([prefix, patches], dim=1)

    def prefix(self, out: torch.Tensor) -> torch.Tensor | None:
        return out[:, :self.prefix_tokens] if self.kind == "tokens" and self.prefix_tokens else None

    def describe(self) -> str:
        if self.kind == "tokens":
            return f"tokens, {self.prefix_tokens} prefix token(s), grid {self.grid[0]}x{self.grid[1]}"
        return self.kind.upper()


def check_layout(layout: Layout, out: torch.Tensor, name: str, input_hw) -> None:
    """The layer's real output must fit the layout: a wrong guess is refused with the override that fixes it."""
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if layout.kind == "tokens":
        if not isinstance(out, torch.Tensor) or out.dim() != 3:
            raise UserError(f"target {name!r} gives {shape}, not tokens [N,T,D]; pass --layout nchw or nhwc")
        h, w = layout.grid
        if out.shape[1] != layout.prefix_tokens + h * w:
            raise UserError(
                f"target {name!r} has {out.shape[1]} tokens, but {layout.prefix_tokens} prefix token(s) and a "
                f"{h}x{w} grid (input {input_hw[0]}x{input_hw[1]}) make {layout.prefix_tokens + h * w}; "
                "pass --prefix-tokens P and/or --grid HxW")
    elif not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise UserError(f"target {name!r} gives {shape}; Grad-CAM needs a 4-D [N,Ch,h,w] or [N,h,w,C] feature map "
                        "or tokens [N,T,D] (--layout tokens)")


class LayoutSplit(HookSplit):
    """A hook split whose layer output is mapped to NCHW; the head maps A back to the layer's layout.

    A transformer target (a block's first norm) sits inside a residual block: `x + attn(norm1(x))` needs the
    block's input x besides the target's output, and a token target needs its prefix tokens. In the traced graph
    (`activations_ctx` / `head_ctx`) both come from the one forward on N rows: a pre-hook hands the block its
    input from there, so nothing before the block runs again on the N*K rows of the head. The eager `head` (the
    checks' reference) simply recomputes them from x."""

    def __init__(self, model, layer, name: str, layout: Layout, block=None, fixed_size: str = ""):
        super().__init__(model, layer, name)
        self.layout, self.block, self.fixed_size = layout, block, fixed_size

    def raw_activations(self, x):
        return super().activations(x)

    def activations(self, x):
        return self.layout.to_nchw(self.raw_activations(x))

    def activations_ctx(self, x):
        """(A, context): the block's positional inputs and the prefix tokens, from this forward."""
        inputs = []
        handle = self.block.register_forward_pre_hook(lambda mod, args: inputs.append(args)) if self.block else None
        try:
            out = self.raw_activations(x)
        finally:
            if handle is not None:
                handle.remove()
        return self.layout.to_nchw(out), (self.layout.prefix(out), inputs[0] if inputs else None)

    def head_ctx(self, x, A, ctx, rep):
        """The head on x's N*K rows (`rep` repeats an [N,...] tensor K times), from A and activations_ctx's
        context."""
        prefix, block_args = ctx
        prefix = None if prefix is None else rep(prefix)
        handles = []
        if block_args is not None:
            args = tuple(rep(a) if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in block_args)
            handles.append(self.block.register_forward_pre_hook(lambda mod, _args: args))
        try:
            return self._run_replaced(x, lambda out: self.layout.from_nchw(A, prefix))
        finally:
            for h in handles:
                h.remove()

    def head(self, x, A):
        return self._run_replaced(x, lambda out: self.layout.from_nchw(A, self.layout.prefix(out)))

    def _run_replaced(self, x, replace):
        handle = self.target_module.register_forward_hook(lambda mod, inp, out: replace(out))
        try:
            return self.root(x)
        finally:
            handle.remove()


def parse_grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--grid wants HxW, e.g. 14x14, not {text!r}") from None
    return h, w
