"""Transformer targets (tokens with P prefix tokens, channels-last Swin) exported with their layout mapped to NCHW
in the graph: the Grad-CAM map from ONNX Runtime's outputs (computed as the server does) equals pytorch-grad-cam's
GradCAM with the right reshape_transform, and the gradients equal plain autograd through the unmodified model.
Small random models (camserve_export.transformer_zoo); one test per family also asks the real camserve binary."""

import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import PARITY, REPO, metadata, run, session

from camserve_export import export_contract
from camserve_export.cam import gradcam_lowres, like_pytorch_grad_cam
from camserve_export.cli import main
from camserve_export.transformer_zoo import (CASES, MORE_CASES, autograd_gradients, build_split, case,
                                             pytorch_grad_cam)

MAP_TOLERANCE = 1e-4
EXPECTED_LAYOUT = {
    "deit_distilled": {"layout": "tokens", "prefix_tokens": 2, "grid": [4, 4]},
    "vit_registers": {"layout": "tokens", "prefix_tokens": 5, "grid": [3, 4]},
    "swin": {"layout": "nhwc"},
    "torchvision_vit": {"layout": "tokens", "prefix_tokens": 1, "grid": [4, 4]},
    "hf_vit": {"layout": "tokens", "prefix_tokens": 1, "grid": [4, 4]},
    "hf_deit": {"layout": "tokens", "prefix_tokens": 2, "grid": [3, 4]},
    "hf_beit": {"layout": "tokens", "prefix_tokens": 1, "grid": [4, 4]},
    "hf_dinov2": {"layout": "tokens", "prefix_tokens": 1, "grid": [4, 4]},
    "hf_swin": {"layout": "tokens", "prefix_tokens": 0, "grid": [8, 8]},
    "hf_convnext": {"layout": "nchw"},
    "torchvision_swin_v2": {"layout": "nhwc"},
    "torchvision_maxvit": {"layout": "nchw"},
}


def _export(name, tmp_path):
    built, split = build_split(case(name))
    result = export_contract(split, tmp_path / f"{name}.onnx", input_size=built.input_size)
    return built, split, result


@pytest.mark.parametrize("name", [c.name for c in CASES + MORE_CASES])
def test_transformer_family(name, tmp_path):
    built, split, result = _export(name, tmp_path)
    assert max(result.errors.values()) <= 1e-4  # the export's own check: ORT vs eager autograd at N=3, K=4
    if name == "torchvision_swin_v2":  # its window shift depends on the size: traced at 224x240, wrong at 224x224
        assert not result.dynamic_hw and any("shifts its windows" in note for note in result.notes)
    PARITY[name] = dict(result.errors)
    h, w = built.input_size
    sess = session(result.path)
    meta = metadata(sess)
    assert meta["camserve.target_layout"] == EXPECTED_LAYOUT[name]
    assert meta["camserve.input_size"] == [h, w] and meta["camserve.contract_version"] == 1

    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    out = run(sess, x, np.zeros((2, 1, result.num_classes), np.float32))  # top-1, as the server asks
    classes = out["target_class"][:, 0]
    grid = tuple(EXPECTED_LAYOUT[name].get("grid", out["activations"].shape[2:]))
    assert out["activations"].shape[2:] == grid

    # gradients: plain autograd through the unmodified model, mapped to NCHW by a user's reshape_transform
    A, G = autograd_gradients(split, x, classes)
    rel = np.abs(out["gradients"][:, 0] - G).max() / np.abs(G).max()
    assert np.abs(G).max() > 0 and rel <= 1e-4, rel
    assert np.abs(out["activations"] - A).max() / np.abs(A).max() <= 1e-4
    PARITY[name]["gradients vs autograd"] = float(rel)

    # Grad-CAM as the server computes it from the outputs, vs pytorch-grad-cam with the reshape_transform
    lowres = [gradcam_lowres(out["activations"][i], out["gradients"][i, 0]) for i in range(2)]
    assert all(m.max() > 0 for m in lowres), "degenerate map: the comparison would prove nothing"
    ours = np.stack([like_pytorch_grad_cam(m, (h, w)) for m in lowres])
    theirs = pytorch_grad_cam(split, x, classes)
    assert ours.shape == theirs.shape == (2, h, w)
    err = float(np.abs(ours - theirs).max())
    PARITY[name]["gradcam map"] = err
    assert err <= MAP_TOLERANCE


def test_cnn_records_nchw_layout(tmp_path):
    from toy_models import tiny

    from camserve_export.split import hook_split

    result = export_contract(hook_split(tiny(), "features"), tmp_path / "m.onnx", input_size=32)
    meta = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert json.loads(meta["camserve.target_layout"]) == {"layout": "nchw"}


def _fails(capsys, argv, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_guided_refused_for_gelu(capsys, tmp_path):
    err = _fails(capsys, ["--timm", "vit_tiny_patch16_224", "--model-arg", "depth=1", "--model-arg", "embed_dim=16",
                          "--model-arg", "num_heads=2", "--input-size", "32", "--guided", "-o", str(tmp_path / "m.onnx")])
    assert "--guided" in err and "GELU" in err and "ReLU" in err and "without --guided" in err
    assert list(tmp_path.iterdir()) == []


def test_wrong_prefix_override_names_the_flag(capsys, tmp_path):
    err = _fails(capsys, ["--timm", "vit_tiny_patch16_224", "--model-arg", "depth=1", "--model-arg", "embed_dim=16",
                          "--model-arg", "num_heads=2", "--input-size", "32", "--prefix-tokens", "3",
                          "-o", str(tmp_path / "m.onnx")])
    assert "has 5 tokens" in err and "--prefix-tokens" in err


def test_timm_never_downloads(capsys, tmp_path):
    err = _fails(capsys, ["--timm", "hf-hub:timm/vit_tiny_patch16_224", "-o", str(tmp_path / "m.onnx")])
    assert "nothing is downloaded" in err
    err = _fails(capsys, ["--timm", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "no.pth"),
                          "-o", str(tmp_path / "m.onnx")])
    assert "does not exist" in err


def test_cli_hf_folder(tmp_path):
    """--hf PATH on a save_pretrained folder, through the console script: labels from config.json."""
    import transformers

    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 image_size=32, patch_size=8, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"},
                                 label2id={"cat": 0, "dog": 1, "fox": 2})
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    out = tmp_path / "vit.onnx"
    script = Path(sys.executable).with_name("camserve-export")
    env = dict(os.environ, PYTHONPATH=str(REPO / "exporter"))
    proc = subprocess.run([str(script), "--hf", str(tmp_path / "vit"), "-o", str(out)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["camserve.labels"]) == ["cat", "dog", "fox"]
    assert meta["camserve.target_layer"].endswith("layernorm_before")
    assert json.loads(meta["camserve.target_layout"]) == {"layout": "tokens", "prefix_tokens": 1, "grid": [4, 4]}


# ---------------------------------------------------------------------------------------- the real camserve binary

def _binary():
    if os.environ.get("CAMSERVE_BIN"):
        return Path(os.environ["CAMSERVE_BIN"])
    for profile in ("release", "debug"):
        if (REPO / "target" / profile / "camserve").exists():
            return REPO / "target" / profile / "camserve"
    return None


ORT = REPO / ".ort" / "onnxruntime" / "capi" / "libonnxruntime.so.1.31.1"
SERVED = ["deit_distilled", "swin", "hf_vit"]  # one per family: timm ViT tokens, channels-last Swin, Hugging Face


@pytest.fixture(scope="module")
def camserve():
    if _binary() is None or not ORT.exists():
        pytest.skip("no built camserve binary (cargo build; or CAMSERVE_BIN) or no .ort")
    sys.path.insert(0, str(REPO / "tests" / "support"))
    os.environ.setdefault("CAMSERVE_BIN", str(_binary()))
    from camserve import start

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {}
        for name in SERVED:
            built, split, result = _export(name, tmp)
            models[name] = (built, split)
        config = f'[runtime]\nlibrary = "{ORT}"\n' + "".join(
            f'[[models]]\nname = "{name}"\nfile = "{tmp / (name + ".onnx")}"\n' for name in SERVED)
        (tmp / "camserve.toml").write_text(config)
        with start(tmp / "camserve.toml") as server:
            yield server.url, models, tmp


@pytest.mark.parametrize("name", SERVED)
def test_served_map_equals_pytorch_grad_cam(camserve, name):
    from PIL import Image

    url, models, tmp = camserve
    built, split = models[name]
    h, w = built.input_size
    image = Image.open(REPO / "tests" / "fixtures" / "images" / "chelsea_64.png").convert("RGB").resize((w, h))
    png = tmp / f"{name}.png"
    image.save(png)
    request = urllib.request.Request(f"{url}/v1/models/{name}/explain?output=npy", data=png.read_bytes(),
                                     headers={"content-type": "image/png"}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        import io

        raw = np.load(io.BytesIO(response.read()))
    x = built.preprocess.tensor_hw(image, (h, w))
    with torch.no_grad():
        top = int(split.root(x).argmax(1)[0])
    theirs = pytorch_grad_cam(split, x, [top])[0]
    assert raw.ndim == 3 and raw.shape[0] == 1 and raw[0].max() > 0
    ours = like_pytorch_grad_cam(raw[0], (h, w))
    err = float(np.abs(ours - theirs).max())
    PARITY.setdefault(f"{name} (served)", {})["gradcam map"] = err
    assert err <= MAP_TOLERANCE


def test_fixture_files_listed():
    """The committed fixtures (make transformer-fixtures) are the ones the README lists, and stay small."""
    root = REPO / "tests" / "fixtures" / "transformers"
    if not root.exists():
        pytest.skip("no transformer fixtures")
    cases = json.loads((root / "cases.json").read_text())
    assert {c["name"] for c in cases} == {c.name for c in CASES}
    total = sum(p.stat().st_size for p in root.iterdir())
    assert total < 5_000_000, total
    readme = (root / "README.md").read_text()
    for c in cases:
        assert f"`{c['name']}`" in readme
        assert (root / f"{c['name']}.onnx").exists() and np.load(root / f"{c['name']}.gradcam.npy").ndim == 2


