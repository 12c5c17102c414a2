"""Checks on the bundled ``digits_resnet`` model (no torch needed).

``tests/test_models.py`` already runs its generic checks (checker, size,
dynamic batch, recorded accuracy) on every bundled ``<stem>.json`` +
``<stem>.onnx`` pair, including this one; these tests pin down what makes
``digits_resnet`` useful to onnxq: it is a plain ResNet (dense, non-depthwise
convs large enough for onnxruntime's int8 kernels to beat fp32, residual Adds,
BatchNorm folded) and its files match the conventions of the other models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
STEM = "digits_resnet"
MAX_BYTES = 6 * 1024 * 1024


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((MODELS_DIR / f"{STEM}.json").read_text())


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(str(MODELS_DIR / f"{STEM}.onnx"))


def test_files_present() -> None:
    for suffix in (".onnx", ".json", ".calib.npz", ".eval.npz"):
        assert (MODELS_DIR / f"{STEM}{suffix}").is_file(), f"{STEM}{suffix} missing"
    assert (MODELS_DIR / f"train_{STEM}.py").is_file()


def test_checker_size_and_versions(model: onnx.ModelProto) -> None:
    assert (MODELS_DIR / f"{STEM}.onnx").stat().st_size < MAX_BYTES
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    opset = {o.domain: o.version for o in model.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == 17
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value"), "batch axis must be dynamic"


def test_calibration_npz(model: onnx.ModelProto, meta: dict) -> None:
    calib = _npz(MODELS_DIR / f"{STEM}.calib.npz")
    assert list(calib) == [meta["input"]] == [model.graph.input[0].name]
    x = calib[meta["input"]]
    assert x.dtype == np.float32
    assert x.shape == (256, 1, 32, 32)
    assert meta["n_calib"] == 256


@pytest.mark.slow  # test_models.py::test_eval_accuracy_matches_metadata[digits_resnet] runs the same eval
def test_eval_accuracy_matches_metadata(meta: dict) -> None:
    data = _npz(MODELS_DIR / f"{STEM}.eval.npz")
    labels = data.pop("labels")
    assert labels.dtype == np.int64 and labels.shape == (360,)
    assert list(data) == [meta["input"]] and data[meta["input"]].dtype == np.float32
    sess = ort.InferenceSession(str(MODELS_DIR / f"{STEM}.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, data)[0]
    assert logits.shape == (360, 10)
    acc = float(np.mean(np.argmax(logits, axis=1) == labels))
    assert acc == pytest.approx(meta["fp32_accuracy"], abs=1e-6)
    assert acc > 0.97


def test_resnet_structure(model: onnx.ModelProto, meta: dict) -> None:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dense_3x3 = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        assert group == 1, f"{node.name}: expected no grouped/depthwise convs"
        if inits[node.input[1]].shape[2:] == (3, 3):
            dense_3x3.append(node.name)
    assert len(dense_3x3) >= 6
    residual_adds = [n for n in model.graph.node if n.op_type == "Add" and not any(i in inits for i in n.input)]
    assert len(residual_adds) >= 2
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops, "BN should be folded"
    assert "GlobalAveragePool" in ops and "Gemm" in ops
    assert 50e6 <= meta["macs_per_sample"] <= 200e6
    assert 500_000 <= meta["params"] <= 1_500_000
