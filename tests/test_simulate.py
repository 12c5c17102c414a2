"""FakeQuantModel is bit-exact with real QuantizeLinear/DequantizeLinear models."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.errors import CalibrationError
from onnxq.numerics import QParams, qparams_from_range
from onnxq.precision import Precision, onnx_dtype
from onnxq.simulate import FakeQuantModel

RNG = np.random.default_rng(0)
W1 = (RNG.normal(size=(16, 32)) / 4).astype(np.float32)
W2 = (RNG.normal(size=(32, 8)) / 6).astype(np.float32)
X = RNG.standard_t(2.0, size=(128, 16)).astype(np.float32)


def build(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])],
        [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2"), *inits],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def body(x: str = "x", r_out: str = "r", r_in: str = "r") -> list[onnx.NodeProto]:
    return [
        helper.make_node("MatMul", [x, "W1"], ["h"]),
        helper.make_node("Relu", ["h"], [r_out]),
        helper.make_node("MatMul", [r_in, "W2"], ["y"]),
    ]


def qdq(src: str, dst: str, q: QParams, tag: str):
    scale = numpy_helper.from_array(np.asarray(q.scale, np.float32), f"{tag}_s")
    zero = helper.make_tensor(f"{tag}_z", onnx_dtype(q.precision), [], [int(q.zero_point)])
    nodes = [
        helper.make_node("QuantizeLinear", [src, f"{tag}_s", f"{tag}_z"], [f"{tag}_q"]),
        helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_s", f"{tag}_z"], [dst]),
    ]
    return nodes, [scale, zero]


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


@pytest.fixture(scope="module")
def sim() -> FakeQuantModel:
    return FakeQuantModel(build(body()), ["x", "r"], ["W2"])


@pytest.mark.parametrize(
    ("precision", "symmetric"),
    [("uint8", False), ("int8", True), ("int8", False), ("int16", True), ("uint16", False),
     ("int4", True), ("uint4", False)],
)
def test_matches_qdq_model(sim, precision, symmetric):
    prec = Precision(precision)
    qx = qparams_from_range(-3.1, 5.7, prec, symmetric)
    qr = qparams_from_range(0.0, 4.3, prec, symmetric)
    n1, i1 = qdq("x", "xd", qx, "a")
    n2, i2 = qdq("r", "rd", qr, "b")
    real = build([*n1, *body(x="xd")[:2], *n2, body(r_in="rd")[2]], [*i1, *i2])
    expected = run(real, {"x": X})
    got = sim.run({"x": X}, {"x": qx, "r": qr})[0]
    np.testing.assert_array_equal(got, expected)


def test_disabled_is_fp32_and_weights_override(sim):
    fp32 = run(build(body()), {"x": X})
    np.testing.assert_array_equal(sim.run({"x": X})[0], fp32)
    np.testing.assert_array_equal(sim.run({"x": X}, {"x": None, "r": None})[0], fp32)
    w2 = W2 * 2.0
    doubled = sim.run({"x": X}, weights={"W2": w2})[0]
    np.testing.assert_allclose(doubled, 2.0 * fp32, rtol=1e-5, atol=1e-6)
    # the override is per call
    np.testing.assert_array_equal(sim.run({"x": X})[0], fp32)


def test_graph_output_is_fake_quantized():
    model = build(body())
    sim = FakeQuantModel(model, ["y"])
    q = qparams_from_range(-1.0, 1.0, Precision.INT8, True)
    n, i = qdq("y0", "y", q, "c")
    nodes = body()
    nodes[2].output[0] = "y0"
    real = build([*nodes, *n], i)
    np.testing.assert_array_equal(sim.run({"x": X}, {"y": q})[0], run(real, {"x": X}))


def test_unknown_tensor():
    with pytest.raises(CalibrationError):
        FakeQuantModel(build(body()), ["nope"])
    sim = FakeQuantModel(build(body()), ["h"])
    with pytest.raises(CalibrationError):
        sim.run({"x": X}, {"r": qparams_from_range(0, 1, Precision.UINT8, False)})
