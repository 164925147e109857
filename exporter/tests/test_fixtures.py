"""tests/fixtures/ is what the Rust server's tests trust: check it is consistent, up to date and that each broken
model is broken in exactly its one way."""

import json

import numpy as np
import pytest
from conftest import FIXTURES, metadata, run, session, stale_files
from PIL import Image

from camserve_export.cam import gradcam_lowres, like_pytorch_grad_cam, like_pytorch_grad_cam_layers
from camserve_export.fixtures import generate
from camserve_export.metadata import Preprocess

TOLERANCE = 1e-4
CASES = json.loads((FIXTURES / "reference" / "cases.json").read_text())


def _input(sess, image_path):
    """The tensor the server builds: preprocessing as the model's metadata describes it."""
    meta = metadata(sess)
    pre = meta["camserve.preprocess"]
    assert pre["resize"] == "stretch" and pre["channel_order"] == "RGB"
    image = Image.open(image_path)
    assert list(image.size) == meta["camserve.input_size"]  # fixture images are exactly the input size
    p = Preprocess(mean=tuple(pre["mean"]), std=tuple(pre["std"]), value_range=tuple(pre["value_range"]))
    return p.tensor(image, image.size[0])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['model']}:{c['image']}:{c['class']}")
def test_onnx_runtime_reproduces_reference_maps(case):
    sess = session(FIXTURES / case["model"])
    x = _input(sess, FIXTURES / case["image"])
    logits_ref = np.asarray(case["logits"], np.float32)
    lowres_ref, gradcam_ref = np.load(FIXTURES / case["lowres"]), np.load(FIXTURES / case["gradcam"])
    assert lowres_ref.max() > 0 and gradcam_ref.shape == tuple(metadata(sess)["camserve.input_size"])

    onehot = np.zeros((1, 1, logits_ref.size), np.float32)
    onehot[0, 0, case["class"]] = 1.0
    zeros = np.zeros((1, case["rank"] + 1, logits_ref.size), np.float32)  # last row: the class of rank `rank`
    for seeds, row in ((onehot, 0), (zeros, case["rank"])):
        out = run(sess, x, seeds)
        assert np.abs(out["logits"][0] - logits_ref).max() <= TOLERANCE * np.abs(logits_ref).max()
        assert out["target_class"][0, row] == case["class"]
        lowres = gradcam_lowres(out["activations"][0], out["gradients"][0, row])
        assert lowres.shape == lowres_ref.shape
        assert np.abs(lowres - lowres_ref).max() <= TOLERANCE * lowres_ref.max()
        assert np.abs(like_pytorch_grad_cam(lowres, gradcam_ref.shape) - gradcam_ref).max() <= TOLERANCE


EXTRAS = json.loads((FIXTURES / "reference" / "extras.json").read_text())


@pytest.mark.parametrize("case", EXTRAS, ids=lambda c: f"{c['image']}:{c['class']}")
def test_extras_references(case):
    """tiny_cnn_extras.onnx's optional outputs reproduce pytorch-grad-cam's Guided Grad-CAM and multi-layer maps;
    its primary outputs equal tiny_cnn.onnx's (same weights)."""
    sess = session(FIXTURES / case["model"])
    assert metadata(sess)["camserve.target_layers"] == case["layers"]
    x = _input(sess, FIXTURES / case["image"])
    seeds = np.zeros((1, 1, 10), np.float32)
    seeds[0, 0, case["class"]] = 1.0
    out = run(sess, x, seeds)
    plain = run(session(FIXTURES / "tiny_cnn.onnx"), x, seeds)
    assert np.abs(out["gradients"] - plain["gradients"]).max() <= TOLERANCE * np.abs(plain["gradients"]).max()

    lowres = [gradcam_lowres(out["activations"][0], out["gradients"][0, 0]),
              gradcam_lowres(out["activations_1"][0], out["gradients_1"][0, 0])]
    size = tuple(metadata(sess)["camserve.input_size"])
    mask = like_pytorch_grad_cam(lowres[0], size)
    guided = mask[:, :, None] * out["input_gradients"][0, 0].transpose(1, 2, 0)
    reference = np.load(FIXTURES / case["guided"])
    assert np.abs(reference).max() > 0
    assert np.abs(guided - reference).max() <= TOLERANCE * np.abs(reference).max()
    layers = np.load(FIXTURES / case["layers_maps"]["gradcam"])
    assert np.abs(like_pytorch_grad_cam_layers(lowres, size) - layers).max() <= TOLERANCE


def test_red_detector_highlights_exactly_the_red_square():
    sess = session(FIXTURES / "red_detector.onnx")
    x = _input(sess, FIXTURES / "images" / "red_blue_128.png")
    out = run(sess, x, np.eye(2, dtype=np.float32)[None])  # rows: red, blue
    red, blue = (gradcam_lowres(out["activations"][0], out["gradients"][0, k]) for k in (0, 1))
    cells = np.zeros((16, 16), bool)
    cells[4:8, 2:6] = True  # pixels rows 32-63, cols 16-47 in 8x8 cells
    assert np.array_equal(red > 0, cells) and np.allclose(red[cells], red.max())
    cells = np.zeros((16, 16), bool)
    cells[10:14, 9:15] = True  # rows 80-111, cols 72-119
    assert np.array_equal(blue > 0, cells)
    assert metadata(sess)["camserve.labels"] == ["red", "blue"]


def _tiny_input():
    return np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)


def test_tiny_cnn_contract_semantics():
    """Zero rows are the k-th best class (also past C: clamped), weighted rows are linear in the one-hot rows."""
    sess = session(FIXTURES / "tiny_cnn.onnx")
    x = _tiny_input()
    w = np.zeros((2, 12, 10), np.float32)  # K=12 > C=10
    w[:, 0, 3], w[:, 1, 7] = 1.0, 1.0
    w[:, 2, 3], w[:, 2, 7] = 2.0, -1.0
    out = run(sess, x, w)
    ranked = np.argsort(-out["logits"], axis=1)
    assert (out["target_class"][:, :3] == [3, 7, 3]).all()
    assert (out["target_class"][:, 3:] == ranked[:, np.minimum(np.arange(3, 12), 9)]).all()
    g = out["gradients"]
    assert np.abs(g[:, 2] - (2 * g[:, 0] - g[:, 1])).max() <= 1e-5 * np.abs(g).max()
    assert metadata(sess)["camserve.labels"] == [f"class_{i}" for i in range(10)]


def test_broken_models_are_broken_in_one_way_each():
    tiny = session(FIXTURES / "tiny_cnn.onnx")
    x = _tiny_input()
    w1, w2 = np.zeros((2, 1, 10), np.float32), np.zeros((2, 1, 10), np.float32)
    w1[:, 0, 1], w2[:, 0, 2] = 1.0, 1.0
    assert not np.allclose(run(tiny, x, w1)["gradients"], run(tiny, x, w2)["gradients"])

    s = session(FIXTURES / "broken_no_gradients.onnx")
    assert [o.name for o in s.get_outputs()] == ["logits", "activations", "target_class"]

    s = session(FIXTURES / "broken_constant_gradients.onnx")
    g1, g2 = run(s, x, w1)["gradients"], run(s, x, w2)["gradients"]
    assert g1.shape == (2, 1, 32, 8, 8) and np.array_equal(g1, g2)

    s = session(FIXTURES / "broken_label_count.onnx")
    assert len(metadata(s)["camserve.labels"]) == 9 and run(s, x, w1)["logits"].shape == (2, 10)

    s = session(FIXTURES / "broken_wrong_dtype.onnx")
    assert [i.type for i in s.get_inputs()] == ["tensor(float)", "tensor(double)"]

    s = session(FIXTURES / "broken_no_metadata.onnx")
    assert not any(k.startswith("camserve.") for k in s.get_modelmeta().custom_metadata_map)
    assert np.array_equal(run(s, x, w1)["gradients"], run(tiny, x, w1)["gradients"])

    s = session(FIXTURES / "broken_contract_version.onnx")
    assert metadata(s)["camserve.contract_version"] == 2

    extras = session(FIXTURES / "tiny_cnn_extras.onnx")
    s = session(FIXTURES / "broken_extras_unnamed.onnx")
    assert "camserve.target_layers" not in metadata(s) and "camserve.target_layers" in metadata(extras)
    assert np.array_equal(run(s, x, w1)["gradients_1"], run(extras, x, w1)["gradients_1"])
    s = session(FIXTURES / "broken_extras_numbering.onnx")
    assert [o.name for o in s.get_outputs()][-2:] == ["activations_1", "gradients_2"]
    assert np.array_equal(run(s, x, w1)["gradients_2"], run(extras, x, w1)["gradients_1"])


def test_readme_lists_every_fixture():
    readme = (FIXTURES / "README.md").read_text()
    for path in FIXTURES.glob("*.onnx"):
        assert f"`{path.name}`" in readme, f"{path.name} is not described in tests/fixtures/README.md"


def test_fixtures_are_up_to_date(tmp_path):
    """Regenerating gives the committed files, numbers within float rounding: the fixtures match the code that
    claims to make them. (Files the generator does not write, like README.md or the Rust tests' own fixtures, are
    not compared.)"""
    generate(tmp_path, log=lambda msg: None)
    stale = stale_files(tmp_path, FIXTURES)
    assert not stale, f"stale fixtures {stale}: run .venv/bin/python -m camserve_export.fixtures tests/fixtures"
