#!/usr/bin/env python3
"""`make hf-export-fixture`: small Hugging Face classifiers exported by Hugging Face's own exporter (optimum-onnx's
`main_export`, what `optimum-cli export onnx` runs), with PyTorch autograd's references, for tests/it/plain.rs.

optimum-onnx needs transformers < 4.58, so this runs in its own venv (.tools/optimum-venv), not the exporter's.
Writes one folder per model into tests/fixtures/hf_export/: model.onnx with the config.json and
preprocessor_config.json optimum writes beside it, input.npy (one image, preprocessed), reference.json (the
logits, the target tensor camserve should default to, its layout, two target classes) and gradients.npy (for
those classes, the target's gradients mapped to NCHW: prefix tokens dropped, patch tokens row by row), from
PyTorch autograd on the model before export.
"""

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from optimum.exporters.onnx import main_export
from transformers import (DeiTConfig, DeiTForImageClassificationWithTeacher, SwinConfig, SwinForImageClassification,
                          ViTConfig, ViTForImageClassification, ViTImageProcessor)

SIZE = 64
LABELS = ["tabby cat", "tiger", "lynx", "lion", "cheetah"]
SMALL = dict(image_size=SIZE, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64, num_labels=len(LABELS), attn_implementation="eager",
             id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)})


@dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    # the input of the last block's attention (pytorch-grad-cam's target), its name in optimum's graph, and what
    # camserve should find there: tokens with P prefix tokens, or channels-last (Hugging Face's Swin views its
    # tokens as [N,h,w,C] before padding and shifting its windows)
    target_module: Callable[[torch.nn.Module], torch.nn.Module]
    target: str
    layout: dict
    # the target's [C, h, w] once mapped
    shape: tuple


CASES = [
    Case("vit", lambda: ViTForImageClassification(ViTConfig(**SMALL)),
         lambda m: m.vit.encoder.layer[-1].layernorm_before,
         "/vit/encoder/layer.1/layernorm_before/LayerNormalization_output_0",
         {"layout": "tokens", "prefix_tokens": 1, "grid": [4, 4]}, (32, 4, 4)),
    # the class and the distillation token; the scores are the mean of their two heads
    Case("deit_distilled", lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**SMALL)),
         lambda m: m.deit.encoder.layer[-1].layernorm_before,
         "/deit/encoder/layer.1/layernorm_before/LayerNormalization_output_0",
         {"layout": "tokens", "prefix_tokens": 2, "grid": [4, 4]}, (32, 4, 4)),
    # windows of 4 on 16x16 and 8x8 grids; the last block shifts its windows
    Case("swin", lambda: SwinForImageClassification(SwinConfig(
        image_size=SIZE, patch_size=4, embed_dim=12, depths=[1, 2], num_heads=[2, 4], window_size=4,
        **{k: v for k, v in SMALL.items() if k in ("num_labels", "attn_implementation", "id2label", "label2id")})),
         lambda m: m.swin.encoder.layers[-1].blocks[-1].layernorm_before,
         "/swin/encoder/layers.1/blocks.1/Reshape_output_0", {"layout": "nhwc"}, (24, 8, 8)),
]


def build(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    model = case.build().eval()
    with torch.no_grad():  # Hugging Face initializes small: spread the weights so that the classes differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def references(case: Case, model: torch.nn.Module, x: torch.Tensor, classes: list[int]) -> dict:
    """Logits, and per-class gradients of the target module's tokens as [C, h, w] (prefix tokens dropped)."""
    saved = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        saved["target"] = output

    hook = case.target_module(model).register_forward_hook(keep)
    try:
        logits = model(pixel_values=x).logits[0]
        gradients = []
        for c in classes:
            saved["target"].grad = None
            logits[c].backward(retain_graph=True)
            channels, h, w = case.shape
            tokens = saved["target"].grad[0, case.layout.get("prefix_tokens", 0):]  # [h*w, C]
            gradients.append(tokens.reshape(h, w, channels).permute(2, 0, 1).numpy())
    finally:
        hook.remove()
    return {"logits": logits.detach().numpy(), "gradients": np.stack(gradients)}


def write(case: Case, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = build(case)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / case.name
        model.save_pretrained(folder)
        ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
        main_export(str(folder), output=out, task="image-classification")
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    np.save(out / "input.npy", x.numpy())
    with torch.no_grad():
        order = model(pixel_values=x).logits[0].argsort(descending=True).tolist()
    classes = [order[0], order[2]]
    ref = references(case, model, x, classes)
    np.save(out / "gradients.npy", ref["gradients"])
    (out / "reference.json").write_text(json.dumps({
        "target": case.target, "layout": case.layout, "shape": list(case.shape), "classes": classes,
        "labels": LABELS, "input_size": [SIZE, SIZE], "logits": [round(float(v), 7) for v in ref["logits"]],
    }, indent=1) + "\n")


def main(root: Path) -> int:
    for case in CASES:
        write(case, root / case.name)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/hf_export")))
