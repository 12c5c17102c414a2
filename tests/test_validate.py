"""validate_model on real QDQ models made by onnxruntime's quantize_static."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

from onnxq.spec import load_spec
from onnxq.validate import Violation, validate_model

COMPUTE = {"conv1", "conv2", "fc"}


def _cnn(with_sigmoid: bool = False) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> MaxPool -> Reshape -> MatMul [-> Sigmoid]."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal((256, 10)).astype(np.float32), "wm"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["c2"], ["p"], name="pool", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Reshape", ["p", "shape"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "wm"], ["m" if with_sigmoid else "y"], name="fc"),
    ]
    if with_sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["m"], ["y"], name="sig"))
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


class _Feeds(CalibrationDataReader):
    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        self._it: Iterator[dict[str, np.ndarray]] = iter(
            [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _quantize(tmp_path: Path, model: onnx.ModelProto, name: str, **kwargs: object
              ) -> onnx.ModelProto:
    src, dst = tmp_path / f"{name}.fp32.onnx", tmp_path / f"{name}.onnx"
    onnx.save(model, src)
    options: dict[str, object] = {"per_channel": True, **kwargs}
    quantize_static(str(src), str(dst), _Feeds(), quant_format=QuantFormat.QDQ,
                    **options)  # type: ignore[arg-type]
    return onnx.load(dst)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, onnx.ModelProto]:
    tmp = tmp_path_factory.mktemp("validate")
    return {
        "fp32": _cnn(),
        "int8": _quantize(tmp, _cnn(), "int8"),  # onnxruntime's defaults: int8/int8 asymmetric
        "uint8": _quantize(tmp, _cnn(), "uint8", activation_type=QuantType.QUInt8),
        "sym": _quantize(tmp, _cnn(), "sym", extra_options={
            "ActivationSymmetric": True, "WeightSymmetric": True}),
        "sym_sigmoid": _quantize(tmp, _cnn(with_sigmoid=True), "sym_sigmoid", extra_options={
            "ActivationSymmetric": True, "WeightSymmetric": True}),
    }


def _nodes(violations: list[Violation]) -> set[str]:
    return {v.node for v in violations}


def test_violation_is_one_line() -> None:
    v = Violation("conv1", "Conv", "candidate int8/uint8", "int8/int8")
    assert str(v) == "node conv1 (Conv): found candidate int8/uint8; allowed int8/int8"


def test_quantize_static_int8_conforms_to_ort_cpu(models: dict[str, onnx.ModelProto]) -> None:
    spec = load_spec("ort-cpu-x86")
    assert validate_model(models["int8"], spec) == []
    assert validate_model(models["uint8"], spec) == []
    assert validate_model(models["sym_sigmoid"], spec) == []


def test_fp32_conforms_to_float_target_but_not_integer_only(
        models: dict[str, onnx.ModelProto]) -> None:
    assert validate_model(models["fp32"], load_spec("ort-cpu-x86")) == []
    assert validate_model(models["fp32"], load_spec("tensorrt-gpu")) == []
    violations = validate_model(models["fp32"], load_spec("edge-int-only"))
    assert COMPUTE | {"pool"} <= _nodes(violations)
    assert "relu1" not in _nodes(violations)  # fused with conv1 (fusion group Conv+Relu)
    assert "flat" not in _nodes(violations)  # Reshape only moves data
    conv1 = next(v for v in violations if v.node == "conv1")
    assert conv1.op_type == "Conv" and "float" in conv1.found and "input x" in conv1.found


def test_asymmetric_uint8_activations_violate_tensorrt(
        models: dict[str, onnx.ModelProto]) -> None:
    violations = validate_model(models["uint8"], load_spec("tensorrt-gpu"))
    assert _nodes(violations) == COMPUTE
    for v in violations:
        assert v.found == "candidate int8/uint8" and "int8/int8" in v.allowed
    # onnxruntime's default int8 activations are asymmetric: TensorRT wants zero point 0
    violations = validate_model(models["int8"], load_spec("tensorrt-gpu"))
    assert COMPUTE <= _nodes(violations)
    assert all("asymmetric" in v.found and "symmetric" in v.allowed for v in violations)
    # symmetric int8 from quantize_static is what TensorRT runs
    assert validate_model(models["sym"], load_spec("tensorrt-gpu")) == []


def test_float_op_between_qdq_violates_integer_only(
        models: dict[str, onnx.ModelProto]) -> None:
    edge = load_spec("edge-int-only")
    assert validate_model(models["sym"], edge) == []
    violations = validate_model(models["sym_sigmoid"], edge)
    assert len(violations) == 1
    (v,) = violations
    assert (v.node, v.op_type) == ("sig", "Sigmoid")
    assert "float" in v.found
    assert str(v).startswith("node sig (Sigmoid): found ")


def test_hexagon_wants_unsigned_activations(models: dict[str, onnx.ModelProto]) -> None:
    violations = validate_model(models["int8"], load_spec("hexagon-npu"))
    assert COMPUTE <= _nodes(violations)
    assert validate_model(models["uint8"], load_spec("hexagon-npu")) == []


def test_shared_scale_mismatch_is_reported(models: dict[str, onnx.ModelProto]) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(models["uint8"])
    model.graph.initializer.append(
        numpy_helper.from_array(np.array(0.5, np.float32), "other_scale"))
    q = next(n for n in model.graph.node
             if n.op_type == "QuantizeLinear" and n.input[0] == "p")
    q.input[1] = "other_scale"
    violations = validate_model(model, load_spec("ort-cpu-x86"))
    assert _nodes(violations) == {"pool"}
    assert "shared" in violations[0].allowed and "0.5" in violations[0].found


def test_constant_node_weights_and_com_microsoft_domain(
        models: dict[str, onnx.ModelProto]) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(models["uint8"])
    graph = model.graph
    moved = [i for i in graph.initializer if i.name.endswith("_quantized")]
    for init in moved:
        graph.initializer.remove(init)
        graph.node.insert(0, helper.make_node("Constant", [], [init.name], value=init))
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            node.domain = "com.microsoft"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert validate_model(model, load_spec("ort-cpu-x86")) == []
    violations = validate_model(model, load_spec("tensorrt-gpu"))
    assert _nodes(violations) == COMPUTE


def _int4_matmul(opset: int, granularity: str) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    codes = rng.integers(-8, 8, size=(32, 4))
    w = helper.make_tensor("w_q", TensorProto.INT4, [32, 4], codes.reshape(-1).tolist())
    scale_shape = {"tensor": [], "channel": [4], "block": [1, 4]}[granularity]
    scale = numpy_helper.from_array(np.full(scale_shape, 0.1, np.float32), "w_s")
    dq_attrs = {"channel": {"axis": 1}, "block": {"axis": 0, "block_size": 32}}.get(granularity, {})
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="w_dq", **dq_attrs),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(
        nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def test_int4_needs_opset_21() -> None:
    spec = load_spec("ort-cpu-x86")
    assert validate_model(_int4_matmul(21, "block"), spec) == []
    violations = validate_model(_int4_matmul(19, "block"), spec)
    assert [(v.node, v.op_type) for v in violations] == [("w_dq", "DequantizeLinear")] * 2
    assert "int4" in violations[0].found and "21" in violations[0].allowed


def test_weight_granularity_and_weight_only(models: dict[str, onnx.ModelProto]) -> None:
    # block-wise int4 weight-only MatMul: allowed on ort-cpu-x86 (MatMulNBits), not on hexagon-npu;
    # per-tensor int4 weight-only is not fused by onnxruntime and not declared
    model = _int4_matmul(21, "block")
    assert validate_model(model, load_spec("ort-cpu-x86")) == []
    found = [(v.node, v.found) for v in validate_model(model, load_spec("hexagon-npu"))]
    assert ("mm", "candidate int4b32/fp32") in found
    (v,) = validate_model(_int4_matmul(21, "tensor"), load_spec("ort-cpu-x86"))
    assert v.node == "mm" and v.found == "candidate int4/fp32"


def test_per_tensor_weights_violate_per_channel_only_spec(tmp_path: Path) -> None:
    from importlib import resources

    text = (resources.files("onnxq.hardware_specs") / "edge-int-only.json").read_text("utf-8")
    data = json.loads(text)
    data["name"] = "edge-per-channel"
    data["quantizers"]["w_int8_sym"]["granularity"] = ["per_channel"]
    path = tmp_path / "edge-per-channel.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    spec = load_spec(path)
    model = _quantize(tmp_path, _cnn(), "per_tensor", per_channel=False, extra_options={
        "ActivationSymmetric": True, "WeightSymmetric": True})
    model_pc = _quantize(tmp_path, _cnn(), "per_channel", extra_options={
        "ActivationSymmetric": True, "WeightSymmetric": True})
    assert validate_model(model_pc, spec) == []
    violations = validate_model(model, spec)
    assert _nodes(violations) == COMPUTE
    assert all("per_tensor" in v.found and v.allowed == "per_channel" for v in violations)


def test_no_crash_on_models_without_qdq() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert validate_model(model, load_spec("ort-cpu-x86")) == []
    (v,) = validate_model(model, load_spec("edge-int-only"))
    assert v.node == "Relu_0" and v.op_type == "Relu"
