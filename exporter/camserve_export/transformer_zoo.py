"""Small transformer classifiers (random weights, a few layers, 48-64 px) for the tests and the Rust fixtures, and
the independent references they are compared with: pytorch-grad-cam's GradCAM with the reshape_transform a user
would write for the layout, and PyTorch autograd through the unmodified model.

`python -m camserve_export.transformer_zoo tests/fixtures/transformers` (= make transformer-fixtures) writes each
model, the chelsea photo as each model's input and the references; the folder's README lists them."""

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import families
from .layout import Layout, LayoutSplit
from .metadata import Preprocess, numbered_labels

NUM_CLASSES = 5


@dataclass
class Case:
    name: str
    what: str
    build: object  # () -> families.Built


def _timm(name, size, **kw):
    return lambda: families.timm_model(name, NUM_CLASSES, kw, size, None)


def _torchvision_vit():
    model, size = families.torchvision_transformer(
        "vit_b_16", NUM_CLASSES, dict(num_layers=2, hidden_dim=32, num_heads=2, mlp_dim=64), (64, 64))
    return families.Built(model, model, families.torchvision_family(model), Preprocess(), None,
                          "torchvision vit_b_16 (2 layers, width 32), random weights", size)


def _hf(kind: str, **config):
    def build():
        import transformers

        cfg = getattr(transformers, f"{kind}Config")(num_labels=NUM_CLASSES, **config)
        torch.manual_seed(0)
        model = getattr(transformers, f"{kind}ForImageClassification")(cfg).eval()
        # a fixed folder name: the export records it in camserve.source, and the fixtures must not change
        folder = Path(tempfile.mkdtemp()) / f"camserve-hf-{kind.lower()}"
        model.save_pretrained(folder)
        return families.hf_model(str(folder), None, None)
    return build


_SMALL_HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=16)

CASES = [
    Case("deit_distilled", "timm DeiT distilled: CLS + distillation token (P=2), 64x64",
         _timm("deit_tiny_distilled_patch16_224", (64, 64), depth=2, embed_dim=32, num_heads=2)),
    Case("vit_registers", "timm ViT with 4 register tokens (P=1+4), non-square 48x64 input",
         _timm("vit_tiny_patch16_224", (48, 64), depth=2, embed_dim=32, num_heads=2, reg_tokens=4)),
    Case("swin", "timm Swin, channels-last [N,h,w,C] target, 64x64",
         _timm("swin_tiny_patch4_window7_224", (64, 64), depths=(1, 1), num_heads=(2, 4), embed_dim=16,
               window_size=4)),
    Case("torchvision_vit", "torchvision VisionTransformer (vit_b_16 class, 2 layers), P=1, 64x64", _torchvision_vit),
    Case("hf_vit", "Hugging Face ViTForImageClassification (save_pretrained folder), P=1, 64x64",
         _hf("ViT", image_size=64, **_SMALL_HF)),
    Case("hf_deit", "Hugging Face DeiTForImageClassification: CLS + distillation token (P=2), 48x64",
         _hf("DeiT", image_size=[48, 64], **_SMALL_HF)),
]




def _torchvision(arch: str, size, **args):
    def build():
        model, size_hw = families.torchvision_transformer(arch, NUM_CLASSES, args, size)
        return families.Built(model, model, families.torchvision_family(model), Preprocess(), None,
                              f"torchvision {arch} (small), random weights", size_hw)
    return build


# More families, checked by the exporter's tests against autograd and pytorch-grad-cam but not kept as fixtures
# (the fixtures stay small).
MORE_CASES = [
    Case("hf_beit", "Hugging Face BeitForImageClassification, P=1, 64x64", _hf("Beit", image_size=64, **_SMALL_HF)),
    Case("hf_dinov2", "Hugging Face Dinov2ForImageClassification, P=1, 64x64",
         _hf("Dinov2", image_size=64, **_SMALL_HF)),
    Case("hf_swin", "Hugging Face SwinForImageClassification: tokens without prefix on an 8x8 grid, 64x64",
         _hf("Swin", image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)),
    Case("hf_convnext", "Hugging Face ConvNextForImageClassification: an NCHW stage, 64x64",
         _hf("ConvNext", image_size=64, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)),
    Case("torchvision_swin_v2", "torchvision Swin v2 (post-norm blocks), channels-last, 64x64",
         _torchvision("swin_v2_t", (64, 64), embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=[4, 4])),
    Case("torchvision_maxvit", "torchvision MaxViT, two stages of two blocks (MBConv, block and grid attention), "
         "NCHW, 64x64",
         _torchvision("maxvit_t", (64, 64), stem_channels=16, block_channels=[16, 32], block_layers=[2, 2], head_dim=8,
                      partition_size=4)),
]


def case(name: str) -> Case:
    return next(c for c in CASES + MORE_CASES if c.name == name)


def build_split(c: Case, seed: int = 0):
    torch.manual_seed(seed)
    built = c.build()
    split = families.layout_split(built.model, built.lookup, built.family, None, built.input_size)
    return built, split


def reshape_transform(layout: Layout):
    """What a pytorch-grad-cam user writes for the layout (here from the recorded metadata)."""
    if layout.kind == "nhwc":
        return lambda t: t.permute(0, 3, 1, 2)
    if layout.kind == "tokens":
        h, w = layout.grid
        p = layout.prefix_tokens
        return lambda t: t[:, p:, :].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
    return None


def pytorch_grad_cam(split: LayoutSplit, x: torch.Tensor, classes) -> np.ndarray:
    """pytorch-grad-cam's GradCAM maps [N,H,W] (normalized, at the input size) for one class per image."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=split.root, target_layers=[split.target_module],
                 reshape_transform=reshape_transform(split.layout)) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])


def autograd_gradients(split: LayoutSplit, x: torch.Tensor, classes) -> tuple[np.ndarray, np.ndarray]:
    """The target's output and d(logit[c])/d(output) by plain autograd through the unmodified model, mapped to
    NCHW afterwards the way the user's reshape_transform would: (A [N,D,h,w], dY/dA [N,D,h,w])."""
    kept = []
    handle = split.target_module.register_forward_hook(lambda mod, inp, out: kept.append(out))
    try:
        logits = split.root(x)
    finally:
        handle.remove()
    score = logits[torch.arange(len(classes)), torch.as_tensor(classes)].sum()
    (grad,) = torch.autograd.grad(score, kept[0])
    to_nchw = reshape_transform(split.layout) or (lambda t: t)
    return to_nchw(kept[0]).detach().numpy(), to_nchw(grad).numpy()


def write_fixtures(root: Path) -> None:
    from PIL import Image
    from skimage import data

    from .cam import gradcam_lowres
    from .export import export_contract
    from .references import METHODS, pytorch_grad_cam_map

    root.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(data.chelsea())
    listing = []
    for c in CASES:
        built, split = build_split(c)
        h, w = built.input_size
        result = export_contract(split, root / f"{c.name}.onnx", input_size=(h, w),
                                 labels=built.labels or numbered_labels(NUM_CLASSES), preprocess=built.preprocess,
                                 source=built.source, log=lambda m: print(f"  {c.name}: {m}", file=sys.stderr))
        image = photo.resize((w, h), Image.BILINEAR)
        image.save(root / f"{c.name}.input.png")
        x = built.preprocess.tensor_hw(image, (h, w))
        with torch.no_grad():
            top = int(split.root(x).argmax(1)[0])
        A, G = autograd_gradients(split, x, [top])
        np.save(root / f"{c.name}.input.npy", x.numpy())
        np.save(root / f"{c.name}.gradients.npy", G[0].astype(np.float32))
        np.save(root / f"{c.name}.lowres.npy", gradcam_lowres(A[0], G[0]))
        np.save(root / f"{c.name}.gradcam.npy", pytorch_grad_cam(split, x, [top])[0].astype(np.float32))
        # The rest of the CAM family and Score-CAM (every channel) through pytorch-grad-cam with the same
        # reshape_transform, principal components oriented as camserve orients them.
        methods, flipped = {"gradcam": f"{c.name}.gradcam.npy"}, []
        for method in [*(m for m in METHODS if m != "gradcam"), "scorecam"]:
            cam, flips = pytorch_grad_cam_map(split, x, top, method, reshape_transform=reshape_transform(split.layout))
            methods[method] = f"{c.name}.{method}.npy"
            np.save(root / methods[method], cam)
            if flips:
                flipped.append(method)
        listing.append(dict(name=c.name, what=c.what, input_size=[h, w], target=split.name,
                            target_layout=json.loads(split.layout.to_json()), top_class=top, methods=methods,
                            lapack_sign_flipped=flipped,
                            activations=list(result.activations_shape),
                            bytes=(root / f"{c.name}.onnx").stat().st_size,
                            max_relative_error=result.errors))
    (root / "cases.json").write_text(json.dumps(listing, indent=1) + "\n")
    _write_readme(root, listing)


def _write_readme(root: Path, listing) -> None:
    lines = [
        "# Transformer fixtures",
        "",
        "Written by `make transformer-fixtures` (`python -m camserve_export.transformer_zoo tests/fixtures/transformers`,",
        "exporter/camserve_export/transformer_zoo.py): small transformer classifiers, random weights (seed 0),",
        f"{NUM_CLASSES} classes, exported by camserve-export in contract v1. Their target is a token or channels-last",
        "tensor; the graph maps it to NCHW, and `camserve.target_layout` records the original layout.",
        "",
        "Per model NAME:",
        "",
        "- `NAME.onnx`: the contract file (fixed H/W: token grids are fixed by the position embedding).",
        "- `NAME.input.png`: skimage's chelsea photo stretched to the model's input size; `NAME.input.npy`: that",
        "  image preprocessed as the server does (`camserve.preprocess`), [1,3,H,W] float32.",
        "- `NAME.gradcam.npy`: pytorch-grad-cam 1.5.7 `GradCAM` for the top class with the `reshape_transform` for the",
        "  layout (drop the prefix tokens, reshape to the grid; or permute NHWC), [H,W], normalized as it returns it.",
        "- `NAME.lowres.npy`: relu(sum_c mean_hw(dY/dA_c) A_c) on the layer grid [h,w], not normalized (what",
        "  `output=raw` returns), from PyTorch autograd through the unmodified model.",
        "- `NAME.gradients.npy`: d(logit[top]) / d(target) by autograd, mapped to NCHW, [D,h,w].",
        "- `NAME.METHOD.npy`: the other methods (`methods` in `cases.json`: Grad-CAM++, XGrad-CAM, HiResCAM,",
        "  element-wise Grad-CAM, LayerCAM, Eigen-CAM, Eigen-Grad-CAM, Score-CAM over every channel) from",
        "  pytorch-grad-cam's classes with the same `reshape_transform`, principal components oriented as camserve",
        "  orients them (`lapack_sign_flipped` lists where LAPACK's sign was the other one).",
        "",
        "`cases.json` has each model's input size, target, layout, top class, activations shape and the export's",
        "parity check (max relative error vs autograd).",
        "",
        "| name | model | target | layout | input | size |",
        "|---|---|---|---|---|---|",
    ]
    for item in listing:
        layout = item["target_layout"]
        text = layout["layout"] + (f", P={layout['prefix_tokens']}, grid {layout['grid'][0]}x{layout['grid'][1]}"
                                   if layout["layout"] == "tokens" else "")
        lines.append(f"| `{item['name']}` | {item['what']} | `{item['target']}` | {text} | "
                     f"{item['input_size'][0]}x{item['input_size'][1]} | {item['bytes'] / 1e3:.0f} kB |")
    (root / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_fixtures(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/transformers"))
