"""Layers inside If, Loop and Scan subgraphs are found, calibrated and quantized."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.options import QuantizeOptions
from onnxq.runtime import make_session

RNG = np.random.RandomState(0)


def _mlp(prefix: str, x: str, out: str, scale: float) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    w1 = numpy_helper.from_array((RNG.randn(16, 32) * scale).astype(np.float32), f"{prefix}_w1")
    w2 = numpy_helper.from_array((RNG.randn(32, 16) * 0.3).astype(np.float32), f"{prefix}_w2")
    nodes = [helper.make_node("MatMul", [x, w1.name], [f"{prefix}_h"], name=f"{prefix}_mm1"),
             helper.make_node("Relu", [f"{prefix}_h"], [f"{prefix}_r"], name=f"{prefix}_relu"),
             helper.make_node("MatMul", [f"{prefix}_r", w2.name], [out], name=f"{prefix}_mm2")]
    return nodes, [w1, w2]


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           inits: list[onnx.TensorProto] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "control_flow", inputs, outputs, inits or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def if_model() -> onnx.ModelProto:
    branches = {}
    for name, scale in (("then", 0.5), ("else", 0.2)):
        nodes, inits = _mlp(name, "x", f"{name}_y", scale)
        branches[name] = helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [None, 16])], inits)
    gate = helper.make_node("If", ["flag"], ["y"], name="gate", then_branch=branches["then"], else_branch=branches["else"])
    return _model([gate], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16]),
                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])])


def loop_model() -> onnx.ModelProto:
    nodes, inits = _mlp("body", "h_in", "h_mlp", 0.3)
    nodes.append(helper.make_node("Tanh", ["h_mlp"], ["h_out"], name="body_tanh"))
    nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"))
    body = helper.make_graph(nodes, "body", [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
                                             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                                             helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [None, 16])],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [None, 16])], inits)
    trip = numpy_helper.from_array(np.array(3, np.int64), "trip")
    cond = numpy_helper.from_array(np.array(True), "cond")
    loop = helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="recurrence", body=body)
    return _model([loop], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])], [trip, cond])


def scan_model() -> onnx.ModelProto:
    nodes, inits = _mlp("cell", "x_t", "u", 0.3)
    nodes.append(helper.make_node("Add", ["u", "s_in"], ["s_out"], name="cell_add"))
    nodes.append(helper.make_node("Identity", ["s_out"], ["y_t"], name="cell_copy"))
    body = helper.make_graph(nodes, "cell", [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [None, 16]),
                                             helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [None, 16])],
                             [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [None, 16]),
                              helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [None, 16])], inits)
    scan = helper.make_node("Scan", ["s0", "xs"], ["s_final", "ys"], name="sequence", body=body, num_scan_inputs=1)
    return _model([scan], [helper.make_tensor_value_info("s0", TensorProto.FLOAT, [None, 16]),
                           helper.make_tensor_value_info("xs", TensorProto.FLOAT, [4, None, 16])],
                  [helper.make_tensor_value_info("s_final", TensorProto.FLOAT, [None, 16]),
                   helper.make_tensor_value_info("ys", TensorProto.FLOAT, [4, None, 16])])


def _feeds(kind: str) -> list[dict[str, np.ndarray]]:
    if kind == "if":
        return [{"x": RNG.randn(8, 16).astype(np.float32), "flag": np.array(i % 2 == 0)} for i in range(8)]
    if kind == "loop":
        return [{"x": RNG.randn(8, 16).astype(np.float32)} for _ in range(8)]
    return [{"s0": RNG.randn(8, 16).astype(np.float32), "xs": RNG.randn(4, 8, 16).astype(np.float32)} for _ in range(8)]


def _subgraph_ops(model: onnx.ModelProto) -> list[str]:
    ops = []
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                ops.extend(n.op_type for n in attr.g.node)
    return ops


@pytest.mark.parametrize("kind,build", [("if", if_model), ("loop", loop_model), ("scan", scan_model)])
def test_subgraph_layers_are_quantized(kind: str, build) -> None:  # type: ignore[no-untyped-def]
    model = build()
    feeds = _feeds(kind)
    result = onnxq.quantize(model, feeds, "ort-cpu-x86", precision="int8/uint8")
    quantized = result.model
    onnx.checker.check_model(quantized, full_check=True)
    weights = {"if": 4, "loop": 2, "scan": 2}[kind]
    layers = weights + (1 if kind == "scan" else 0)  # the Scan cell's state Add is an integer layer too
    assert result.report["layers"]["quantized"] == layers
    ops = _subgraph_ops(quantized)
    assert ops.count("DequantizeLinear") >= weights + 1
    assert "QuantizeLinear" in ops
    # weights are stored as int8 inside the subgraphs, not as fp32
    for node in quantized.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                assert not [i for i in attr.g.initializer if i.data_type == TensorProto.FLOAT and i.name.endswith(("_w1", "_w2"))]
    reference, candidate = make_session(model), make_session(quantized)
    # the Loop runs its uint8 cell three times over (7-bit weights on ort-cpu-x86): the rounding
    # of each step compounds (about 9% of the output's range with exact Q/DQ)
    bound = {"if": 0.1, "loop": 0.15, "scan": 0.1}[kind]
    for feed in feeds[:3]:
        for ref, got in zip(reference.run(None, feed), candidate.run(None, feed), strict=True):
            scale = np.abs(ref).max()
            assert np.abs(ref - got).max() <= bound * scale


def test_inspect_lists_subgraph_layers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from conftest import run_cli

    path = tmp_path / "gate.onnx"
    onnx.save(if_model(), str(path))
    result = run_cli("inspect", str(path))
    assert result.code == 0, result.stderr
    assert "then_mm1" in result.stdout and "else_mm2" in result.stdout


def test_search_quantizes_a_network_that_lives_inside_an_if() -> None:
    """The default search mode: the layers of a model whose whole network sits in an If."""
    # objective size: on a toy graph every quantized plan runs slower than fp32, and the default
    # latency objective would rightly write fp32 (test_search covers that choice)
    options = QuantizeOptions(progress=False, max_drop=0.02, objective="size")
    result = onnxq.quantize(if_model(), _feeds("if"), "ort-cpu-x86", max_drop=0.02, options=options)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.target_met
    assert result.report["layers"]["quantized"] == 4
    assert result.report["metric"]["drop"] <= 0.02
    # weight-only candidates (int4b32/fp32) leave no QuantizeLinear: the quantized weights are DQs
    assert "DequantizeLinear" in _subgraph_ops(result.model)
