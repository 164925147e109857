"""The CLI's contract with its user: exit codes, one-line errors, and never a half-written or clobbered output."""

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from conftest import TESTS

from camserve_export.cli import main


@pytest.fixture(autouse=True)
def _in_tests_dir(monkeypatch):
    monkeypatch.chdir(TESTS)  # so --model toy_models:... imports


def _fails(capsys, argv, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_unknown_arch(capsys, tmp_path):
    err = _fails(capsys, ["--arch", "resnet19", "-o", str(tmp_path / "m.onnx")])
    assert err.startswith("camserve-export: error: unknown torchvision classification arch 'resnet19'")
    assert "resnet18" in err


def test_unknown_layer_lists_close_names(capsys, tmp_path):
    err = _fails(capsys, ["--arch", "resnet18", "--layer", "layer5", "-o", str(tmp_path / "m.onnx")])
    assert "no layer 'layer5'" in err and "layer4" in err
    assert not (tmp_path / "m.onnx").exists() and list(tmp_path.iterdir()) == []


def test_layer_never_reached(capsys, tmp_path):
    err = _fails(capsys, ["--model", "toy_models:unused_branch", "--layer", "unused", "-o", str(tmp_path / "m.onnx")])
    assert "layer 'unused' is never called in the model's forward (not reached)" in err


def test_layer_reached_twice(capsys, tmp_path):
    """EfficientNet-Lite's one ReLU6 module runs after the stem and after the head conv."""
    err = _fails(capsys, ["--model", "camserve_export.efficientnet_lite:random_lite0", "--layer", "_swish",
                          "-o", str(tmp_path / "m.onnx")])
    assert "layer '_swish' is called 2 times per forward" in err and "--split" in err


def test_layer_without_feature_map(capsys, tmp_path):
    err = _fails(capsys, ["--arch", "resnet18", "--layer", "fc", "--input-size", "64", "-o", str(tmp_path / "m.onnx")])
    assert "target 'fc' gives (2, 1000)" in err and "4-D" in err


@pytest.mark.parametrize("where", ["missing_dir", "is_dir", "unwritable"])
def test_unwritable_output(capsys, tmp_path, where):
    out = {"missing_dir": tmp_path / "nope" / "m.onnx", "is_dir": tmp_path,
           "unwritable": Path("/sys/m.onnx")}[where]  # sysfs refuses new files even to root
    err = _fails(capsys, ["--arch", "resnet18", "-o", str(out)])
    expected = {"missing_dir": "does not exist", "is_dir": "is a directory", "unwritable": "Permission denied"}[where]
    assert err.startswith("camserve-export: error: ") and expected in err


def test_label_count_mismatch(capsys, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    err = _fails(capsys, ["--model", "toy_models:tiny", "--layer", "features", "--labels", str(labels),
                          "-o", str(tmp_path / "m.onnx")])
    assert "3 labels for a model with 10 classes" in err


def test_failed_check_keeps_existing_output(capsys, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the user's previous model")
    err = _fails(capsys, ["--model", "toy_models:noisy", "--layer", "features", "--input-size", "32", "-o", str(out)],
                 code=3)
    assert err.startswith("camserve-export: check failed, nothing written: logits (")
    assert "relative" in err and "> 0.0001" in err
    assert out.read_bytes() == b"the user's previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left behind


def test_export_through_console_script(tmp_path):
    """The installed entry point, end to end: labels file, custom mean/std, metadata in the file."""
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([f"thing {i}" for i in range(10)]))
    out = tmp_path / "tiny.onnx"
    script = Path(sys.executable).with_name("camserve-export")
    proc = subprocess.run([str(script), "--model", "toy_models:tiny", "--layer", "features", "--input-size", "48",
                           "--labels", str(labels), "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25",
                           "-o", str(out)], capture_output=True, text=True, cwd=TESTS, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out} ")
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["camserve.contract_version"] == "1"
    assert json.loads(meta["camserve.labels"]) == [f"thing {i}" for i in range(10)]
    assert meta["camserve.target_layer"] == "features"
    assert json.loads(meta["camserve.input_size"]) == [48, 48]
    assert json.loads(meta["camserve.preprocess"]) == {"resize": "stretch", "mean": [0.5, 0.5, 0.5],
                                                       "std": [0.25, 0.25, 0.25], "channel_order": "RGB",
                                                       "value_range": [0.0, 1.0]}
    assert "toy_models:tiny" in meta["camserve.source"] and "camserve-export 0.1.0" in meta["camserve.source"]


def test_named_weights_only_from_the_local_cache(capsys, tmp_path, monkeypatch):
    """Never a download: missing from the torch hub cache is a user error; present, it is used."""
    import torch
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    argv = ["--arch", "resnet18", "--torchvision-weights", "IMAGENET1K_V1", "-o", str(tmp_path / "m.onnx")]
    err = _fails(capsys, argv)
    assert "are not in the local cache" in err and "never downloads" in err

    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cached)  # stands in for the real file
    assert main(argv + ["--input-size", "64", "-q"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert "weights IMAGENET1K_V1" in meta["camserve.source"]
    assert json.loads(meta["camserve.labels"])[281] == "tabby"


def test_weights_file(capsys, tmp_path):
    import torch
    from toy_models import tiny, unused_branch

    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save(tiny().state_dict(), good)
    torch.save(unused_branch().state_dict(), bad)
    err = _fails(capsys, ["--model", "toy_models:tiny", "--layer", "features", "--weights", str(bad),
                          "-o", str(tmp_path / "m.onnx")])
    assert f"weights file '{bad}' does not fit the model: " in err and "features.4.weight" in err
    assert main(["--model", "toy_models:tiny", "--layer", "features", "--weights", str(good), "--input-size", "32",
                 "-q", "-o", str(tmp_path / "m.onnx")]) == 0
    source = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}["camserve.source"]
    assert "weights good.pt" in source


@pytest.mark.parametrize("extra, message", [
    ("layer9", "no layer 'layer9'"),
    ("layer4", "repeat a layer"),
    ("fc", "extra layer 'fc' does not give a 4-D"),
])
def test_bad_extra_layer(capsys, tmp_path, extra, message):
    err = _fails(capsys, ["--arch", "resnet18", "--layer", "layer4", "--extra-layer", extra, "--input-size", "64",
                          "-o", str(tmp_path / "m.onnx")])
    assert message in err and list(tmp_path.iterdir()) == []


def test_extra_layer_never_reached(capsys, tmp_path):
    err = _fails(capsys, ["--model", "toy_models:unused_branch", "--layer", "features", "--extra-layer", "unused",
                          "-o", str(tmp_path / "m.onnx")])
    assert "extra layer 'unused' is never called in the model's forward" in err
