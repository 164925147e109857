#!/usr/bin/env python3
"""`make hf-export-fixture`: a small Hugging Face ViT exported by Hugging Face's own exporter (optimum-onnx's
`main_export`, what `optimum-cli export onnx` runs), with PyTorch autograd's references, for tests/it/plain.rs.

optimum-onnx needs transformers < 4.58, so this runs in its own venv (.tools/optimum-venv), not the exporter's.
Writes into tests/fixtures/hf_export/: model.onnx with the config.json and preprocessor_config.json optimum writes
beside it, input.npy (one image, preprocessed), reference.json with the logits and the default target's tensor
name, and gradients.npy: for two target classes, the gradients of the target mapped to NCHW.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from optimum.exporters.onnx import main_export
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

SIZE = 64
GRID = 4  # 64 / patch 16
LABELS = ["tabby cat", "tiger", "lynx", "lion", "cheetah"]
# the input of the last block's attention (pytorch-grad-cam's ViT target), as optimum's graph names it
TARGET = "/vit/encoder/layer.1/layernorm_before/LayerNormalization_output_0"


def build() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=SIZE, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=len(LABELS), attn_implementation="eager",
                       id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)})
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():  # Hugging Face initializes small: spread the weights so that the classes differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def references(model: ViTForImageClassification, x: torch.Tensor, classes: list[int]) -> dict:
    """Logits, and per-class gradients of the target, tokens -> [C, h, w] (the class token dropped)."""
    saved = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        saved["target"] = output

    hook = model.vit.encoder.layer[-1].layernorm_before.register_forward_hook(keep)
    try:
        logits = model(pixel_values=x).logits[0]
        gradients = []
        for c in classes:
            saved["target"].grad = None
            logits[c].backward(retain_graph=True)
            gradients.append(to_nchw(saved["target"].grad[0]))
    finally:
        hook.remove()
    return {"logits": logits.detach().numpy(), "gradients": np.stack(gradients)}


def to_nchw(tokens: torch.Tensor) -> np.ndarray:
    return tokens[1:].reshape(GRID, GRID, -1).permute(2, 0, 1).numpy()


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    model = build()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "vit"
        model.save_pretrained(folder)
        ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
        main_export(str(folder), output=out, task="image-classification", no_post_process=False)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    np.save(out / "input.npy", x.numpy())
    with torch.no_grad():
        order = model(pixel_values=x).logits[0].argsort(descending=True).tolist()
    classes = [order[0], order[2]]
    ref = references(model, x, classes)
    np.save(out / "gradients.npy", ref["gradients"])
    (out / "reference.json").write_text(json.dumps({
        "target": TARGET, "classes": classes, "labels": LABELS, "input_size": [SIZE, SIZE],
        "logits": [round(float(v), 7) for v in ref["logits"]],
    }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/hf_export")))
