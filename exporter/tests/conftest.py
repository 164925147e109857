import io
import json
import math
from pathlib import Path

import numpy as np
import onnx
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


def stale_files(generated: Path, committed: Path) -> list[str]:
    """The files under `generated` that differ from those under `committed`. Numbers (in .npy, .json and ONNX
    tensors) may differ by float rounding, which changes with the CPU's vector width (AVX2 vs AVX-512); anything
    else must match byte for byte."""
    stale = []
    for path in sorted(p for p in generated.rglob("*") if p.is_file()):
        name = path.relative_to(generated).as_posix()
        other = committed / name
        if not other.is_file() or not _same(path.suffix, path.read_bytes(), other.read_bytes()):
            stale.append(name)
    return stale


def _same(suffix: str, a: bytes, b: bytes) -> bool:
    if a == b:
        return True
    if suffix == ".npy":
        return _close(np.load(io.BytesIO(a)), np.load(io.BytesIO(b)))
    if suffix == ".json":
        return _close_json(json.loads(a), json.loads(b))
    if suffix == ".onnx":
        (graph_a, tensors_a), (graph_b, tensors_b) = _without_tensors(a), _without_tensors(b)
        return graph_a == graph_b and len(tensors_a) == len(tensors_b) and all(map(_close, tensors_a, tensors_b))
    return False


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not np.issubdtype(a.dtype, np.floating):
        return np.array_equal(a, b)
    scale = float(np.abs(b).max()) if b.size else 0.0
    return bool(np.allclose(a, b, rtol=0, atol=1e-5 * max(scale, 1e-6)))


def _close_json(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_close_json, a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)
    return a == b and type(a) is type(b)


def _without_tensors(data: bytes) -> tuple[bytes, list[np.ndarray]]:
    """The model with its initializers' and constants' values taken out, and those values."""
    model = onnx.load_from_string(data)
    tensors = [t for g in _graphs(model.graph) for t in g.initializer]
    tensors += [a.t for g in _graphs(model.graph) for n in g.node for a in n.attribute if a.HasField("t")]
    values = [onnx.numpy_helper.to_array(t) for t in tensors]
    for t in tensors:
        t.ClearField("raw_data")
        t.ClearField("float_data")
    return model.SerializeToString(), values


def _graphs(graph):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("g"):
                yield from _graphs(a.g)
            for g in a.graphs:
                yield from _graphs(g)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    if PARITY:
        terminalreporter.section("parity: max relative error vs PyTorch (ONNX Runtime)")
        for name, errs in PARITY.items():
            terminalreporter.write_line(f"{name:22s} " + "  ".join(f"{k} {v:.1e}" for k, v in errs.items()))
