"""Plain torchvision classifiers at 224 px for `make bench` (random weights: speed does not depend on them), each
exported by the legacy torch exporter, with its target tensor found by value. Prints one JSON line per model:
{"arch", "file", "target"}.

    plain_models.py DIR
"""

import json
import sys
from pathlib import Path

import onnx
import torch
import torchvision

from camserve_export.plain_zoo import find_target

# (architecture, the module whose output is the target: the last block, as Grad-CAM users pick it)
MODELS = [("resnet18", "layer4"), ("mobilenet_v3_small", "features"), ("efficientnet_b0", "features")]


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    for arch, layer in MODELS:
        model = getattr(torchvision.models, arch)().eval()
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
        print(json.dumps({"arch": arch, "file": str(path), "target": target}), flush=True)


if __name__ == "__main__":
    main()
