"""Checks on the bundled reference models in ``models/`` (no torch needed).

For every ``models/<stem>.onnx`` with a ``<stem>.json`` these tests check that
the model is valid ONNX, small, runs in onnxruntime with a dynamic batch axis,
reproduces the recorded fp32 accuracy on its eval split, and that its
calibration and eval ``.npz`` files match the declared graph inputs.  The
architecture tests pin down the structure that onnxq's other tests rely on
(depthwise convs and residual Adds in the CNN; an embedding Gather,
LayerNorm, Softmax and activation x activation MatMuls in the transformer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
#: Models that must be present; any other ``<stem>.json`` + ``<stem>.onnx`` pair is checked too.
REQUIRED = ("digits_cnn", "digits_transformer")
STEMS = sorted(set(REQUIRED) | {p.stem for p in MODELS_DIR.glob("*.json") if p.with_suffix(".onnx").exists()})
MAX_BYTES = 5 * 1024 * 1024


def _meta(stem: str) -> dict[str, Any]:
    return json.loads((MODELS_DIR / f"{stem}.json").read_text())


def _model(stem: str) -> onnx.ModelProto:
    return onnx.load(str(MODELS_DIR / f"{stem}.onnx"))


def _session(stem: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(MODELS_DIR / f"{stem}.onnx"), providers=["CPUExecutionProvider"])


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real graph inputs (excluding any that are initializers)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _constant_names(model: onnx.ModelProto) -> set[str]:
    """Names of tensors that are weights: initializers and Constant node outputs."""
    names = {t.name for t in model.graph.initializer}
    names |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return names


def _check_feeds_match_inputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for vi in _graph_inputs(model):
        arr = feeds[vi.name]
        tt = vi.type.tensor_type
        assert arr.dtype == onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type), vi.name
        dims = tt.shape.dim
        assert arr.ndim == len(dims), vi.name
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value"):
                assert arr.shape[axis] == dim.dim_value, (vi.name, axis)


def test_required_models_present() -> None:
    for stem in REQUIRED:
        for suffix in (".onnx", ".json", ".calib.npz", ".eval.npz"):
            assert (MODELS_DIR / f"{stem}{suffix}").is_file(), f"{stem}{suffix} missing"


@pytest.mark.parametrize("stem", STEMS)
def test_metadata(stem: str) -> None:
    meta = _meta(stem)
    assert meta["model"] == stem
    assert meta["task"] == "classification"
    assert meta["metric"] == "accuracy"
    assert 0.0 <= meta["fp32_accuracy"] <= 1.0
    assert isinstance(meta["params"], int) and meta["params"] > 0
    assert [i.name for i in _graph_inputs(_model(stem))] == [meta["input"]]


@pytest.mark.parametrize("stem", STEMS)
def test_checker_full_and_size(stem: str) -> None:
    path = MODELS_DIR / f"{stem}.onnx"
    assert path.stat().st_size < MAX_BYTES
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names), "node names must be unique and non-empty"


@pytest.mark.parametrize("stem", STEMS)
def test_calibration_npz_matches_inputs(stem: str) -> None:
    model = _model(stem)
    calib = _npz(MODELS_DIR / f"{stem}.calib.npz")
    assert set(calib) == {i.name for i in _graph_inputs(model)}
    _check_feeds_match_inputs(model, calib)
    assert len({len(a) for a in calib.values()}) == 1 and len(next(iter(calib.values()))) >= 1


@pytest.mark.parametrize("stem", STEMS)
def test_eval_accuracy_matches_metadata(stem: str) -> None:
    model, meta = _model(stem), _meta(stem)
    data = _npz(MODELS_DIR / f"{stem}.eval.npz")
    labels = data.pop("labels")
    assert labels.dtype == np.int64 and labels.ndim == 1
    assert set(data) == {i.name for i in _graph_inputs(model)}
    _check_feeds_match_inputs(model, data)
    assert all(len(a) == len(labels) for a in data.values())
    logits = _session(stem).run(None, data)[0]
    assert logits.shape[0] == len(labels)
    acc = float(np.mean(np.argmax(logits, axis=1) == labels))
    assert acc == pytest.approx(meta["fp32_accuracy"], abs=1e-6)


@pytest.mark.parametrize("stem", STEMS)
def test_dynamic_batch(stem: str) -> None:
    calib = _npz(MODELS_DIR / f"{stem}.calib.npz")
    sess = _session(stem)
    full = sess.run(None, {k: v[:7] for k, v in calib.items()})[0]
    one = sess.run(None, {k: v[:1] for k, v in calib.items()})[0]
    assert full.shape[0] == 7 and one.shape[0] == 1
    np.testing.assert_allclose(one, full[:1], rtol=1e-4, atol=1e-4)


def test_cnn_structure() -> None:
    model = _model("digits_cnn")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = _constant_names(model)
    depthwise = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        w = inits[node.input[1]]
        # depthwise: one filter per input channel (W is [C, 1, kh, kw]) and group == C > 1
        if group > 1 and w.shape[1] == 1 and group == w.shape[0]:
            depthwise.append(node.name)
    assert depthwise, "expected at least one depthwise Conv (group == channels > 1)"
    residual_adds = [
        n for n in model.graph.node if n.op_type == "Add" and not any(i in weights for i in n.input)
    ]
    assert len(residual_adds) >= 2
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node), "BN should be folded"
    assert any(n.op_type in ("Gemm", "MatMul") for n in model.graph.node)


def test_transformer_structure() -> None:
    model = _model("digits_transformer")
    weights = _constant_names(model)
    ops = [n.op_type for n in model.graph.node]
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in weights]
    assert gathers, "expected an embedding-table Gather"
    assert "LayerNormalization" in ops or ops.count("ReduceMean") >= 2
    assert "Softmax" in ops
    act_matmuls = [
        n for n in model.graph.node if n.op_type == "MatMul" and not any(i in weights for i in n.input)
    ]
    assert act_matmuls, "expected a MatMul whose both inputs are activations"
    assert len(act_matmuls) >= 2
