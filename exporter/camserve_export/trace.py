"""The contract-v1 graph as a PyTorch function, traced to a symbolic FX graph.

Neither torch.onnx exporter can export torch.autograd.grad or torch.func.vjp directly. make_fx can: it traces the
vjp into plain aten ops (backward ops decomposed), and that graph exports like any forward graph."""

import contextlib

import torch
import torch.nn as nn
from torch._decomp import decomposition_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from .guided import guided_relus
from .split import capture

aten = torch.ops.aten


class ContractGraph(nn.Module):
    """(input [N,3,H,W], class_weights [N,K,C]) -> logits [N,C], activations [N,Ch,h,w],
    gradients [N,K,Ch,h,w], target_class [N,K] int64; then, when asked for, input_gradients [N,K,3,H,W] (guided
    backpropagation) and per extra layer i activations_i, gradients_i."""

    def __init__(self, split, extra=None, guided: bool = False):
        super().__init__()
        self.split, self.extra, self.guided = split, extra, guided

    def forward(self, x, class_weights):
        n, k, c = class_weights.shape

        # The K seeds are folded into the batch: vjp_fn is linear but has to be called once per seed, and K is
        # symbolic. The head runs on N*K rows; logits come from its first copy.
        def rep(t):
            return t.unsqueeze(1).expand(n, k, *t.shape[1:]).reshape(n * k, *t.shape[1:])

        acts, logits_rep, vjp_fn = self._head_vjp(x, rep)
        logits = logits_rep.reshape(n, k, -1)[:, 0]

        # All-zero row k means "k-th best class". A full sort keeps TopK's k static (= C), so K may exceed C
        # (rows past C clamp to the last-ranked class) and tracing works for any K.
        ranked = torch.topk(logits, logits.shape[1], dim=1).indices
        kth = ranked.index_select(1, torch.arange(k).clamp(max=logits.shape[1] - 1))
        onehot = (kth.unsqueeze(-1) == torch.arange(c)).to(class_weights.dtype)
        seeds = torch.where(class_weights.abs().sum(-1, keepdim=True) == 0, onehot, class_weights)
        flat_seeds = seeds.reshape(n * k, c)

        grads = [g.reshape(n, k, *a.shape[1:]) for g, a in zip(vjp_fn(flat_seeds), acts)]
        outputs = [logits, acts[0], grads[0], seeds.argmax(-1)]
        if self.guided:
            # the whole model again, with guided ReLUs: its own backward from the logits to the input
            with guided_relus(self.split.root):
                _, guided_vjp = torch.func.vjp(self.split.logits, rep(x))
            outputs.append(guided_vjp(flat_seeds)[0].reshape(n, k, *x.shape[1:]))
        for a, g in zip(acts[1:], grads[1:]):
            outputs += [a, g]
        return tuple(outputs)

    def _head_vjp(self, x, rep):
        """Activations of every target (the split's first), the head's logits on N*K rows and a function from
        seeds to the gradients of every target."""
        if self.extra is None and hasattr(self.split, "activations_ctx"):
            # a LayoutSplit: A is the layer's output mapped to NCHW; the head maps it back, with the prefix tokens
            # and the enclosing block's input from this same forward (so the backbone runs once, on N rows)
            A, ctx = self.split.activations_ctx(x)
            logits_rep, vjp_fn = torch.func.vjp(lambda a: self.split.head_ctx(rep(x), a, ctx, rep), rep(A))
            return [A], logits_rep, vjp_fn
        if self.extra is None:
            A = self.split.activations(x)
            logits_rep, vjp_fn = torch.func.vjp(lambda a: self.split.head(rep(x), a), rep(A))
            return [A], logits_rep, vjp_fn
        # Several targets: the head starts at the first one the forward reaches (its output replaced, as in
        # HookSplit.head); each later one adds a zero primal to its output, so the gradient with respect to that
        # primal is the gradient with respect to the layer's output, through everything that follows it.
        targets, order = self.extra.targets, self.extra.order
        acts = capture(self.split.root, targets, x)
        primals = [rep(acts[order[0]])] + [torch.zeros_like(rep(acts[i])) for i in order[1:]]

        def head(first, *zeros):
            replace = {order[0]: lambda out: first.clone()}
            replace.update({i: (lambda out, z=z: out + z) for i, z in zip(order[1:], zeros)})
            handles = [targets[i].register_forward_hook(lambda mod, inp, out, f=f: f(out)) for i, f in replace.items()]
            try:
                return self.split.root(rep(x))
            finally:
                for h in handles:
                    h.remove()

        logits_rep, vjp_fn = torch.func.vjp(head, *primals)
        position = {target: p for p, target in enumerate(order)}
        return acts, logits_rep, lambda seeds: [vjp_fn(seeds)[position[i]] for i in range(len(targets))]


def _pool_matrix(n_in, n_out, dtype):
    """[n_out, n_in] averaging matrix of adaptive_avg_pool along one axis, built from tensor ops so that
    symbolic sizes stay symbolic (int() on a SymInt would specialize H and W)."""
    i = torch.arange(n_out).unsqueeze(1)
    j = torch.arange(n_in).unsqueeze(0)
    start = (i * n_in) // n_out
    end = ((i + 1) * n_in + n_out - 1) // n_out
    inside = (j >= start) & (j < end)
    return inside.to(dtype) / (end - start).to(dtype)


def _adaptive_avg_pool2d_backward(grad, inp):
    # torch._decomp has no entry for this op and ONNX has no translation: grad_in = Ph^T @ grad @ Pw.
    ph = _pool_matrix(inp.shape[-2], grad.shape[-2], grad.dtype)
    pw = _pool_matrix(inp.shape[-1], grad.shape[-1], grad.dtype)
    return ph.t() @ grad @ pw


def _conv_input_grad(grad, weight, inp, stride, padding, dilation, groups):
    """Input gradient of a zero-padded 2-D convolution. A transposed conv without padding gives the gradient of the
    padded input, minus the rows/columns no window reached (stride remainder): pad those back with zeros, then
    crop the padding. All sizes stay symbolic."""
    full = torch.nn.functional.conv_transpose2d(grad, weight, stride=stride, dilation=dilation, groups=groups)
    (ph, pw), (h, w) = padding, inp.shape[-2:]
    full = torch.nn.functional.pad(full, [0, w + 2 * pw - full.shape[-1], 0, h + 2 * ph - full.shape[-2]])
    return full[:, :, ph:ph + h, pw:pw + w]


def _convolution_backward(grad, inp, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                          groups, output_mask):
    # a conv in the head (SqueezeNet's classifier); torch._decomp has no entry
    if transposed or inp.dim() != 4 or list(output_mask) != [True, False, False]:
        return NotImplemented  # weight/bias gradients are never needed: parameters are constants here
    return _conv_input_grad(grad, weight, inp, stride, padding, dilation, groups), None, None


def _avg_pool2d_backward(grad, inp, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    # average pooling in the head (no torch._decomp entry): a depthwise conv with weights 1/(kh*kw)
    kh, kw = kernel_size if len(kernel_size) == 2 else (kernel_size[0],) * 2
    padding = list(padding) * 2 if len(padding) == 1 else list(padding)
    if inp.dim() != 4 or ceil_mode or (any(padding) and not count_include_pad):
        return NotImplemented  # the divisor would vary per window
    stride = list(stride) if stride else [kh, kw]
    stride = stride * 2 if len(stride) == 1 else stride
    channels = inp.shape[1]
    weight = torch.ones(channels, 1, kh, kw, dtype=grad.dtype) / (divisor_override or kh * kw)
    return _conv_input_grad(grad, weight, inp, stride, padding, [1, 1], channels)


# Only backward ops are decomposed; forward ops stay whole for the ONNX exporter's own translations.
DECOMPOSITIONS = {op: fn for op, fn in decomposition_table.items() if "backward" in op.name()}
DECOMPOSITIONS[aten._adaptive_avg_pool2d_backward.default] = _adaptive_avg_pool2d_backward
DECOMPOSITIONS[aten.convolution_backward.default] = _convolution_backward
DECOMPOSITIONS[aten.avg_pool2d_backward.default] = _avg_pool2d_backward


@contextlib.contextmanager
def _out_of_place(root: nn.Module):
    """Switch modules like ReLU(inplace=True) to out-of-place while tracing. Same numbers; but every in-place op
    left in the graph costs ~0.2 s of symbolic-shape work when the ONNX exporter functionalizes it (MobileNetV2:
    37 s -> 10 s to export)."""
    flipped = [m for m in root.modules() if getattr(m, "inplace", None) is True]
    for m in flipped:
        m.inplace = False
    try:
        yield
    finally:
        for m in flipped:
            m.inplace = True


_linear = torch.nn.functional.linear


def _folded_linear(x, weight, bias=None):
    """F.linear on a 2-D view: ATen's matmul folds a [B,T,D] input to [B*T,D] with concrete sizes, which
    specializes a symbolic batch (N*K in the head) at its example value."""
    if x.dim() <= 2:
        return _linear(x, weight, bias)
    return _linear(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])


_sdpa = torch.nn.functional.scaled_dot_product_attention


def _math_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention written out (eval: no dropout). The fused op's backward
    (_scaled_dot_product_flash_attention_for_cpu_backward) has no decomposition and no ONNX translation."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(-1) @ v


_adaptive_avg_pool1d = torch.nn.functional.adaptive_avg_pool1d
_adaptive_avg_pool2d = torch.nn.functional.adaptive_avg_pool2d


def _contiguous(pool):
    """On a transposed view (torchvision Swin's permute, Hugging Face Swin's transpose before their pooling) the
    pooling traces to a mean plus as_strided, whose backward (as_strided_scatter) has no ONNX translation. A
    contiguous input avoids it."""
    return lambda x, output_size: pool(x.contiguous(), output_size)


@contextlib.contextmanager
def _traceable_functions():
    """While tracing: F.linear folded to 2-D, F.scaled_dot_product_attention written out, adaptive average
    pooling of a contiguous input (module code looks these up in torch.nn.functional at call time)."""
    F = torch.nn.functional
    F.linear, F.scaled_dot_product_attention = _folded_linear, _math_sdpa
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d = _contiguous(_adaptive_avg_pool1d), _contiguous(_adaptive_avg_pool2d)
    try:
        yield
    finally:
        F.linear, F.scaled_dot_product_attention = _linear, _sdpa
        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d = _adaptive_avg_pool1d, _adaptive_avg_pool2d


def trace(split, x: torch.Tensor, class_weights: torch.Tensor, extra=None, guided: bool = False,
          dynamic_hw: bool = False) -> torch.fx.GraphModule:
    """Symbolic trace in which N, K and, when dynamic_hw, H and W are symbols; the example sizes must not coincide
    where those dims are unrelated (duck sizing would give them one symbol); see export.trace_shapes."""
    graph = ContractGraph(split, extra, guided)
    with _out_of_place(split.root), _traceable_functions():
        if guided:
            # functionalize has no rule for an autograd.Function (the guided ReLU): trace first, then
            # functionalize the traced graph, which holds aten ops only.
            graph = make_fx(graph, decomposition_table=DECOMPOSITIONS, tracing_mode="symbolic",
                            _allow_non_fake_inputs=True)(*_fake_inputs(x, class_weights, dynamic_hw))
        # functionalize removes the in-place ops modules can't switch off (x += y in ResNet, F.relu(inplace=True)
        # in DenseNet) at trace time, where it is cheap.
        graph = make_fx(torch.func.functionalize(graph, remove="mutations"),
                        decomposition_table=DECOMPOSITIONS, tracing_mode="symbolic",
                        _allow_non_fake_inputs=True)(*_fake_inputs(x, class_weights, dynamic_hw))
    graph.graph.eliminate_dead_code()  # the prefix HookSplit.head recomputes
    graph.recompile()
    return graph


def _fake_inputs(x: torch.Tensor, class_weights: torch.Tensor, dynamic_hw: bool):
    """The inputs as fake tensors whose fixed dims are plain numbers. make_fx on real inputs makes every dim a
    symbol; a fixed H and W left symbolic turn each window partition's sizes into nested floor divisions that sympy
    simplifies ever more slowly (MaxViT: 20 s for one block, never finishing for two; 0.7 s with H, W fixed)."""
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    symbol, fixed = DimDynamic.DUCK, DimDynamic.STATIC
    hw = symbol if dynamic_hw else fixed

    def fake(t, dims):
        return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))

    return fake(x, [symbol, fixed, hw, hw]), fake(class_weights, [symbol, symbol, fixed])
