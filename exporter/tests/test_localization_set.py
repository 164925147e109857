"""bench/localization_set.py (the localization study's set) and bench/localization.py's IoU."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "tests/fixtures/localization"


def _load(name):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / f"bench/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


localization_set = _load("localization_set")


def test_the_set_has_what_the_study_needs():
    cases = localization_set.cases()
    assert len(cases) >= 30
    assert len({c["source"] for c in cases}) >= 5
    assert {c["background"] for c in cases} >= {"plain", "noise"}
    assert len({c["name"] for c in cases}) == len(cases)
    for case in cases:
        image, (x0, y0, x1, y1) = case["image"], case["box"]
        height, width = image.shape[:2]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, case["name"]
        # The box is the pasted photo: its longer side is the case's scale of the canvas side along it.
        longer = max((x1 - x0) / width, (y1 - y0) / height)
        assert abs(longer - case["scale"]) < 0.01, case["name"]


def test_the_ground_truth_box_is_where_the_object_was_pasted():
    """Independently of the generator's bookkeeping: the patch is the crop resized, and outside it lies the
    background alone (for plain backgrounds: one colour)."""
    case = next(c for c in localization_set.cases() if c["name"] == "cat_plain_0.55")
    x0, y0, x1, y1 = case["box"]
    image = case["image"]
    source = next(s for s in localization_set.SOURCES if s.name == "cat")
    patch = np.asarray(Image.fromarray(source.crop()).resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS))
    assert np.array_equal(image[y0:y1, x0:x1], patch)
    outside = np.ones(image.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert len(np.unique(image[outside], axis=0)) == 1


def test_committed_ci_subset_is_up_to_date(tmp_path):
    """Regenerating the CI subset gives the committed bytes (else: `make localization-fixtures`)."""
    sys.argv = ["localization_set.py", str(tmp_path), "--ci"]
    localization_set.main()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in COMMITTED.iterdir() if p.name != "expected.json")
    for path in tmp_path.iterdir():
        assert path.read_bytes() == (COMMITTED / path.name).read_bytes(), path.name
    expected = json.loads((COMMITTED / "expected.json").read_text())
    assert sorted(expected) == sorted(c["file"] for c in json.loads((tmp_path / "cases.json").read_text()))


def test_iou_by_hand():
    iou = _load("localization").iou
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # exclusive maxima: touching boxes share nothing
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == 50 / 150
    assert iou([0, 0, 4, 4], [1, 1, 3, 3]) == 4 / 16
