"""tests/fixtures/plain/ (the plain-classifier zoo) is what the Rust tests of load-time head differentiation trust:
check every file is plain, its recorded target and head are what the file holds, and the references recompute
from PyTorch."""

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import FIXTURES, session, stale_files

from camserve_export import plain_zoo as zoo
from camserve_export.cam import gradcam_lowres, like_pytorch_grad_cam

PLAIN = FIXTURES / "plain"
CASES = json.loads((PLAIN / "cases.json").read_text())
MODELS = {c["model"]: c for c in CASES["models"]}
INPUT = np.load(PLAIN / CASES["models"][0]["input"])


def _torch_model(case):
    """The torch model a case was made from, rebuilt from its family (or hand-made module) and seed."""
    family = next((f for f in zoo.FAMILIES if f.name == case["family"]), None)
    if family is not None:
        return zoo.build_family(family, case["torch_seed"])
    spec = next(s for s in zoo.HAND_MADE if s.name == case["family"])
    return zoo.build_hand_made(spec, case["torch_seed"])


def test_every_file_is_listed_once():
    listed = [c["model"] for c in CASES["models"]] + [c["model"] for c in CASES["refused"]]
    assert sorted(listed) == sorted(p.name for p in PLAIN.glob("*.onnx"))
    assert len(set(listed)) == len(listed)


@pytest.mark.parametrize("path", sorted(PLAIN.glob("*.onnx")), ids=lambda p: p.name)
def test_every_model_is_plain(path):
    """One image input [batch,3,H,W] with a symbolic batch, one output [batch,C]; nothing of the contract."""
    model = onnx.load(str(path))
    image = zoo.graph_input(model)
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, zoo.SIZE, zoo.SIZE]
    names = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    assert not names & {"class_weights", "gradients", "activations", "target_class"}
    assert len(model.graph.output) == 1 and zoo.batch_is_symbolic(model)
    assert not any(p.key.startswith("camserve.") for p in model.metadata_props)


@pytest.mark.parametrize("case", CASES["models"], ids=lambda c: c["model"])
def test_onnx_scores_and_references_agree(case):
    """ONNX Runtime's scores equal torch's logits (through the Softmax or LogSoftmax where there is one), at batch
    1 and in a batch of 3; the recorded target tensor holds activations that, with the autograd gradients, give
    pytorch-grad-cam's map; the arrays have the documented shapes."""
    sess = session(PLAIN / case["model"])
    name = sess.get_inputs()[0].name
    logits = np.asarray(case["logits"], np.float32)
    log_probs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    want = {None: logits, "Softmax": np.exp(log_probs), "LogSoftmax": log_probs}[
        zoo.final_softmax(onnx.load(str(PLAIN / case["model"])))]
    scores = sess.run(None, {name: INPUT})[0][0]
    assert zoo.relative_error(scores, want) <= zoo.TOLERANCE
    batch = sess.run(None, {name: np.concatenate([INPUT[:, :, ::-1], INPUT, INPUT * 0.5])})[0]
    assert np.abs(batch[1] - scores).max() <= 1e-6 * np.abs(scores).max()

    A = zoo.to_nchw(zoo.all_tensors(onnx.load(str(PLAIN / case["model"])), INPUT)[case["target"]],
                    case.get("target_layout"))
    seeds, grads = np.load(PLAIN / case["seeds"]), np.load(PLAIN / case["gradients"])
    assert list(A.shape) == case["target_shape"] and seeds.shape == (1, 3, logits.size)
    assert grads.shape == (1, 3, *A.shape[1:]) and grads.dtype == np.float32
    assert seeds[0, 0].argmax() == case["class"] == logits.argmax()
    cam = np.load(PLAIN / case["gradcam"])
    assert cam.shape == tuple(case["input_size"]) and cam.max() > 0
    assert np.abs(like_pytorch_grad_cam(gradcam_lowres(A[0], grads[0, 0]), cam.shape) - cam).max() <= zoo.TOLERANCE


@pytest.mark.parametrize("case", CASES["models"], ids=lambda c: c["model"])
def test_head_ops_are_the_files(case):
    model = onnx.load(str(PLAIN / case["model"]))
    assert case["output"] == model.graph.output[0].name
    head = zoo.head_nodes(model.graph, case["target"], case["output"])
    assert sorted({n.op_type for n in head}) == case["head_ops"]
    final = zoo.final_softmax(model)
    assert (final is not None) == case["softmax"] and (final is None or final in case["head_ops"])


@pytest.mark.parametrize("case", CASES["refused"], ids=lambda c: c["model"])
def test_refused_op_is_in_the_head(case):
    model = onnx.load(str(PLAIN / case["model"]))
    head = zoo.head_nodes(model.graph, case["target"], case["output"])
    assert [n.op_type for n in head if n.name == case["node"]] == [case["op"]]
    assert zoo.onnx_scores(model, INPUT).shape == (1, zoo.NUM_CLASSES)  # it runs; only differentiating it fails


@pytest.mark.parametrize("stem", ["densenet_legacy_op12", "convnext_dynamo_op20", "keras_softmax", "ops_a",
                                  "vit_legacy_op14"])
def test_gradients_recompute_from_torch(stem):
    """Rebuilt from its family and seed, the torch model gives the committed gradients again (float32 autograd on
    the same CPU ops: equal within 1e-6 of the largest)."""
    case = MODELS[f"{stem}.onnx"]
    model = _torch_model(case)
    module = model.get_submodule(case["torch_target"])
    x, seeds = torch.from_numpy(INPUT), torch.from_numpy(np.load(PLAIN / case["seeds"]))
    final = zoo.final_softmax(onnx.load(str(PLAIN / case["model"])))
    keys = ["gradients"] + ["gradients_keep_softmax"] * case["softmax"]
    for key in keys:
        _, grads = zoo.autograd_reference(model, module, x, seeds, softmax=final if key != "gradients" else None)
        grads = zoo.to_nchw(grads, case.get("target_layout"))
        want = np.load(PLAIN / case[key])
        assert np.abs(grads - want).max() <= 1e-6 * np.abs(want).max(), key
    if case["softmax"]:  # the two differ: keep_softmax is a different derivative
        assert np.abs(np.load(PLAIN / case["gradients"]) - np.load(PLAIN / case["gradients_keep_softmax"])).max() > 0


def test_find_target_by_value():
    """On a hand-made graph, where the name is known: the value match finds it, and a value no tensor holds is
    refused rather than matched to the nearest."""
    spec = next(s for s in zoo.HAND_MADE if s.name == "tf_like")
    model = zoo.build_hand_made(spec, MODELS["tf_like.onnx"]["torch_seed"])
    graph = spec.graph(model)
    x = torch.from_numpy(INPUT)
    A, _ = zoo.autograd_reference(model, model.features, x, torch.eye(zoo.NUM_CLASSES)[None, :1])
    assert zoo.find_target(graph, INPUT, A) == "conv2d_1/Relu:0"
    shifted = A.copy()
    shifted[0, 0, 0, 0] += 1e-2 * np.abs(A).max()
    with pytest.raises(RuntimeError, match="no ONNX tensor"):
        zoo.find_target(graph, INPUT, shifted)


def _alias_graph(twin: bool) -> onnx.ModelProto:
    """input -> Relu `a` -> Identity -> mean; with twin, another Relu of the input (equal to `a`) on a branch of
    its own, added to the mean."""
    b = zoo._GraphBuilder()
    a = b.node("Relu", ["input"], "a")
    out = b.node("ReduceMean", [b.node("Identity", [a], "a_alias")], "pooled", axes=[1, 2, 3], keepdims=0)
    if twin:
        other = b.node("ReduceMean", [b.node("Relu", ["input"], "twin")], "pooled_twin", axes=[1, 2, 3], keepdims=0)
        out = b.node("Add", [out, other], "sum")
    graph = onnx.helper.make_graph(
        b.nodes, "aliases", [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 3, 64, 64])],
        [onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, ["N"])])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)


def test_find_target_accepts_aliases_only_on_the_path():
    """An Identity after the target is an alias (the first is the target); an equal tensor on another branch makes
    the match ambiguous."""
    A = np.maximum(INPUT, 0)
    assert zoo.find_target(_alias_graph(twin=False), INPUT, A) == "a"
    with pytest.raises(RuntimeError, match="unrelated"):
        zoo.find_target(_alias_graph(twin=True), INPUT, A)


def test_zoo_is_up_to_date(tmp_path):
    """Regenerating gives the committed files, numbers within float rounding (about a minute: 17 exports): the zoo
    matches the code that claims to make it, README.md included, and holds nothing else."""
    (tmp_path / "images").symlink_to(FIXTURES / "images")
    zoo.generate(tmp_path / "plain", log=lambda msg: None)
    extra = sorted(p.name for p in PLAIN.iterdir() if not (tmp_path / "plain" / p.name).exists())
    stale = stale_files(tmp_path / "plain", PLAIN) + extra
    assert not stale, f"stale zoo files {stale}: run make plain-fixtures"
