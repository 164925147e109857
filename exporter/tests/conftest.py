import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
DEFAULT_MODEL = REPO / "models" / "efficientnet_lite0.onnx"
TESTS = Path(__file__).resolve().parent

# Parity numbers the family tests measured, printed in pytest's summary.
PARITY: dict[str, dict[str, float]] = {}


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess, x, class_weights) -> dict[str, np.ndarray]:
    x, w = (t.numpy() if isinstance(t, torch.Tensor) else t for t in (x, class_weights))
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"input": x, "class_weights": w})))


def metadata(sess) -> dict:
    props = sess.get_modelmeta().custom_metadata_map
    return {k: (json.loads(v) if k != "camserve.source" and k != "camserve.target_layer" else v)
            for k, v in props.items()}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    if PARITY:
        terminalreporter.section("parity: max relative error vs PyTorch (ONNX Runtime)")
        for name, errs in PARITY.items():
            terminalreporter.write_line(f"{name:22s} " + "  ".join(f"{k} {v:.1e}" for k, v in errs.items()))
