"""The layout is the complete decision; the rewrite only applies it (issue 14)."""

from __future__ import annotations

import inspect

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.graph import GraphView, layer_ops_for
from onnxq.layout import plan_layout
from onnxq.placement import BiasMode, ReadForm, WeightForm
from onnxq.precision import Candidate
from onnxq.rewrite import apply_layout
from onnxq.runtime import make_session
from onnxq.spec import load_spec

#: apply_layout applies layout fields in a few steps; decisions belong in onnxq.layout/onnxq.placement
MAX_APPLY_LAYOUT_LINES = 80


def test_apply_layout_stays_small() -> None:
    lines = inspect.getsource(apply_layout).splitlines()
    assert len(lines) < MAX_APPLY_LAYOUT_LINES, f"apply_layout has {len(lines)} lines: move decisions into the layout"


def _conv_relu_conv() -> onnx.ModelProto:
    """int8 Conv → Relu → (fp32 Conv, Shape): the Relu folds, the float Conv gets a guard DQ and a
    boundary, the Shape reads the codes, the int8 Conv's bias is int32."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.3, "b1": rng.normal(size=8).astype(np.float32),
               "w2": rng.normal(size=(4, 8, 3, 3)).astype(np.float32) * 0.3, "b2": rng.normal(size=4).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["r"], ["s"], name="shape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8]),
                               helper.make_tensor_value_info("s", TensorProto.INT64, [4])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


PLAN = {"conv1": Candidate.parse("int8/uint8"), "conv2": Candidate.parse("fp32/fp32")}


def test_layout_holds_every_choice_the_rewrite_writes() -> None:
    spec = load_spec("ort-cpu-x86")
    model = _conv_relu_conv()
    layout = plan_layout(GraphView(model, layer_ops_for(spec)), PLAN, spec)
    assert layout.folded_relus == {"conv1": "relu"}
    readers = {r.node: r for r in layout.wiring["r"].readers}
    assert readers["shape"].form == ReadForm.CODES
    assert readers["conv2"].form == ReadForm.GUARD and readers["conv2"].guard_channels == 8 and readers["conv2"].boundary
    assert [(r.node, r.form, r.boundary) for r in layout.wiring["x"].readers] == [("conv1", ReadForm.DQ, False)]
    assert layout.layer_forms["conv1"].form == WeightForm.DQ
    assert layout.layer_forms["conv1"].bias_mode == BiasMode.INT32
    assert "conv2" not in layout.layer_forms  # float: nothing to write

    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    written = onnxq.quantize(model, feeds, spec, plan={k: str(v) for k, v in PLAN.items()}).model
    producers = {o: n for n in written.graph.node for o in n.output}
    conv2, shape, conv1 = (next(n for n in written.graph.node if n.name == name) for name in ("conv2", "shape", "conv1"))
    boundary = producers[conv2.input[0]]
    guard = producers[boundary.input[0]]
    assert boundary.op_type == "Identity" and guard.op_type == "DequantizeLinear"
    assert [a.i for a in guard.attribute if a.name == "axis"] == [1]
    assert producers[shape.input[0]].op_type == "QuantizeLinear"
    bias_dq = producers[conv1.input[2]]
    bias_codes = next(i for i in written.graph.initializer if i.name == bias_dq.input[0])
    assert bias_dq.op_type == "DequantizeLinear" and bias_codes.data_type == TensorProto.INT32
    assert "relu" not in {n.name for n in written.graph.node}

    reference, quantized = make_session(model), make_session(written)
    for feed in feeds:
        want, got = reference.run(["y"], feed)[0], quantized.run(["y"], feed)[0]
        cosine = float(np.dot(want.ravel(), got.ravel()) / (np.linalg.norm(want) * np.linalg.norm(got)))
        assert cosine > 0.99
