"""camserve's labeling formats, read by the tools that consume them.

Starts the real camserve binary on a free port with the fixture red detector, POSTs the fixture image and
decodes and validates the answers with pycocotools, Label Studio's SDK and FiftyOne's label classes.
The expected mask is computed here, independently of camserve, from the fixture's known geometry.
"""

import base64
import io
import json
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import fiftyone.core.labels as fo_labels
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from camserve import FIXTURES, ORT, serve_directory, start  # noqa: E402

IMAGE = FIXTURES / "images" / "red_blue_128.png"


@pytest.fixture(scope="module")
def image_host():
    """Serves the fixture images on loopback, as Label Studio's file storage would."""
    with serve_directory(IMAGE.parent) as host:
        yield host


@pytest.fixture(scope="module")
def camserve(image_host):
    config = f"""
[runtime]
library = "{ORT}"
[[models]]
name = "red"
file = "{FIXTURES / 'red_detector.onnx'}"
[label_studio]
model = "red"
allowed_hosts = ["{image_host}"]
top_k = 2
threshold = 0.5
"""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "camserve.toml"
        path.write_text(config)
        with start(path) as server:
            yield server.url


def post(url, body, content_type):
    request = urllib.request.Request(url, data=body, headers={"content-type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def explain(camserve, query):
    status, body = post(f"{camserve}/v1/models/red/explain?{query}", IMAGE.read_bytes(), "image/png")
    assert status == 200, body
    return body


def expected_map():
    """The red class's Grad-CAM display map for the fixture, computed independently: the 16x16 grid is 1 on the
    red square's cells (rows 4-7, cols 2-5) and 0 elsewhere; upsampled bilinearly to 128 px with half-pixel
    centres clamped at the border (OpenCV's INTER_LINEAR), then divided by its maximum."""
    grid = np.zeros((16, 16))
    grid[4:8, 2:6] = 1.0
    src = np.clip((np.arange(128) + 0.5) / 8 - 0.5, 0, 15)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, 15)
    frac = src - low
    # Along rows, then along columns.
    rows = grid[low, :] * (1 - frac)[:, None] + grid[high, :] * frac[:, None]
    full = rows[:, low] * (1 - frac)[None, :] + rows[:, high] * frac[None, :]
    return full / full.max()


def expected_mask(threshold):
    heat = expected_map()
    return heat >= threshold * heat.max()


def test_coco_rle_and_box_decode_with_pycocotools(camserve):
    body = explain(camserve, "class=red&format=coco&threshold=0.5")
    [annotation] = body["annotations"]
    rle = dict(annotation["segmentation"], counts=annotation["segmentation"]["counts"].encode())
    decoded = mask_utils.decode(rle).astype(bool)
    mask = expected_mask(0.5)
    assert decoded.shape == (128, 128)
    assert np.array_equal(decoded, mask), np.argwhere(decoded != mask)[:5]
    # The square itself, rows 32-63 and cols 16-47: pycocotools' own box and area agree with camserve's.
    assert annotation["bbox"] == [16, 32, 32, 32]
    assert mask_utils.toBbox(rle).tolist() == [16.0, 32.0, 32.0, 32.0]
    assert int(mask_utils.area(rle)) == annotation["area"] == int(mask.sum())
    assert body["categories"] == [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]

    # The COCO API takes the answer as results against a ground truth holding the same image and categories.
    truth = COCO()
    truth.dataset = {
        "images": body["images"],
        "categories": body["categories"],
        "annotations": [dict(annotation, segmentation=annotation["segmentation"])],
    }
    truth.createIndex()
    results = truth.loadRes(body["annotations"])
    [loaded] = results.loadAnns(results.getAnnIds())
    assert np.array_equal(results.annToMask(loaded).astype(bool), mask)


def test_coco_uncompressed_counts_roundtrip(camserve):
    # pycocotools' uncompressed form of the same mask re-encodes to camserve's string.
    body = explain(camserve, "class=red&format=coco&threshold=0.5")
    mask = expected_mask(0.5)
    ours = body["annotations"][0]["segmentation"]["counts"]
    theirs = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
    assert ours == theirs


def test_label_studio_brush_and_rectangles_decode(camserve):
    body = explain(camserve, "class=red&format=labelstudio&threshold=0.5")
    rect, brush = body["result"]
    width, height = rect["original_width"], rect["original_height"]
    value = rect["value"]
    assert [value["x"] * width / 100, value["y"] * height / 100] == [16, 32]
    assert [value["width"] * width / 100, value["height"] * height / 100] == [32, 32]
    rgba = decode_rle(brush["value"]["rle"]).reshape(height, width, 4)
    assert np.array_equal(rgba[:, :, 3] == 255, expected_mask(0.5))
    assert set(np.unique(rgba)) <= {0, 255}


LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image"><Label value="red"/><Label value="blue"/></RectangleLabels>'
    '<BrushLabels name="mask" toName="image"><Label value="red"/><Label value="blue"/></BrushLabels></View>'
)


def test_label_studio_validates_the_prediction(camserve):
    # Label Studio's own validator: regions, tag names, labels and geometry against the labeling config.
    interface = LabelInterface(LABEL_CONFIG)
    prediction = explain(camserve, "top_k=2&format=labelstudio")
    assert len(prediction["result"]) == 4  # a box and a brush mask per class
    assert interface.validate_prediction(prediction, return_errors=True) == []
    # The validator is not a rubber stamp: a label outside the config is refused.
    prediction["result"][0]["value"]["rectanglelabels"] = ["green"]
    assert interface.validate_prediction(prediction, return_errors=True) != []


def test_label_studio_backend_end_to_end(camserve, image_host):
    label_config = LABEL_CONFIG
    request = {
        "tasks": [{"id": 1, "data": {"image": f"http://{image_host}/red_blue_128.png"}}],
        "label_config": label_config,
        "project": "1.1",
    }
    status, body = post(f"{camserve}/label-studio/predict", json.dumps(request).encode(), "application/json")
    assert status == 200, body
    [prediction] = body["results"]
    assert LabelInterface(label_config).validate_prediction(prediction, return_errors=True) == []
    by_label = {}
    for region in prediction["result"]:
        labels = region["value"].get("rectanglelabels") or region["value"]["brushlabels"]
        by_label[(region["type"], labels[0])] = region
    red_mask = decode_rle(by_label[("brushlabels", "red")]["value"]["rle"]).reshape(128, 128, 4)[:, :, 3] == 255
    assert np.array_equal(red_mask, expected_mask(0.5))
    blue = by_label[("rectanglelabels", "blue")]["value"]
    # The blue square: rows 80-111, cols 72-119.
    assert [blue["x"], blue["y"], blue["width"], blue["height"]] == [56.25, 62.5, 37.5, 25.0]

    # The same image from a host that is not allowed: nothing fetched, and that task's prediction is empty.
    port = image_host.split(":")[1]
    request["tasks"].append({"id": 2, "data": {"image": f"http://localhost:{port}/red_blue_128.png"}})
    status, body = post(f"{camserve}/label-studio/predict", json.dumps(request).encode(), "application/json")
    assert status == 200, body
    assert [len(p["result"]) for p in body["results"]] == [4, 0]
    assert LabelInterface(label_config).validate_prediction(body["results"][1], return_errors=True) == []


def test_cvat_rectangles(camserve):
    body = explain(camserve, "class=red&format=cvat&threshold=0.5")
    assert [shape["points"] for shape in body] == [[16, 32, 48, 64]]
    assert body[0]["type"] == "rectangle" and body[0]["label"] == "red"


def test_fiftyone_detections_and_heatmap(camserve):
    body = explain(camserve, "class=red&format=fiftyone&threshold=0.5")
    [heat] = body["heatmaps"]
    png = Image.open(io.BytesIO(base64.b64decode(heat["png"])))
    levels = np.array(png).astype(np.float64)
    assert levels.shape == (128, 128)
    low, high = heat["range"]
    assert (low, high) == (0, 65535)
    # The PNG is the normalized map: within half a level of the independently computed one.
    assert np.abs(levels / high - expected_map()).max() <= 1.0 / high

    detection = body["detections"]["detections"][0]
    assert detection["bounding_box"] == [0.125, 0.25, 0.25, 0.25]
    detections = fo_labels.Detections.from_dict(body["detections"])
    assert detections.detections[0].bounding_box == [0.125, 0.25, 0.25, 0.25]
    assert detections.detections[0].label == "red"
    heatmap = fo_labels.Heatmap(map=np.array(png), range=heat["range"])
    assert heatmap.range == [0, 65535] and heatmap.map.shape == (128, 128)
