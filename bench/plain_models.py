"""Plain torchvision classifiers at 224 px for `make bench` (random weights: speed does not depend on them), each
exported by the legacy torch exporter, with its target tensor found by value. Prints one JSON line per model:
{"arch", "file", "target", "goal"} (the goal: the most the augmented Run may cost, as a ratio to the plain one).

    plain_models.py DIR
"""

import json
import sys
from pathlib import Path

import onnx
import torch
import torchvision

from camserve_export.plain_zoo import find_target


def vit_s_16() -> torch.nn.Module:
    """ViT-S/16 (DeiT-S's shape), which torchvision has no builder for."""
    return torchvision.models.VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=6,
                                                hidden_dim=384, mlp_dim=1536)


# (name, builder, the module whose output is the target, goal): for CNNs the last block, as Grad-CAM users pick
# it; for transformers the last block's first norm, as pytorch-grad-cam recommends (its head is that block)
MODELS = [("resnet18", torchvision.models.resnet18, "layer4", 1.2),
          ("mobilenet_v3_small", torchvision.models.mobilenet_v3_small, "features", 1.2),
          ("efficientnet_b0", torchvision.models.efficientnet_b0, "features", 1.2),
          ("vit_s_16", vit_s_16, "encoder.layers.encoder_layer_11.ln_1", 1.3),
          ("swin_t", torchvision.models.swin_t, "features.7.1.norm1", 1.3)]


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    for arch, build, layer, goal in MODELS:
        model = build().eval()
        x = torch.randn(1, 3, 224, 224)
        captured = {}
        hook = model.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
        with torch.no_grad():
            model(x)
        hook.remove()
        path = out / f"{arch}_plain.onnx"
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["image"],
                          output_names=["scores"], dynamic_axes={"image": {0: "n"}})
        target = find_target(onnx.load(path), x.numpy(), captured["a"].numpy())
        print(json.dumps({"arch": arch, "file": str(path), "target": target, "goal": goal}), flush=True)


if __name__ == "__main__":
    main()
