"""Graph view: layers, weight locations, MACs, dependencies."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

from onnxq.graph import GraphView, WeightLocation
from onnxq.model import load_model

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[1,3,8,8] x, float[4,3,3,3] w_in) => (float[1,5] y)
<float[4] b1 = {0.1, 0.2, 0.3, 0.4}>
{
  c1 = Conv <pads = [1,1,1,1]> (x, w_in, b1)
  r1 = Relu (c1)
  w2 = Constant <value = float[4,4,1,1] {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}> ()
  c2 = Conv (r1, w2)
  c3 = Conv (r1, w2)
  s = Add (c2, c3)
  j = Add (s, r1)
  p = GlobalAveragePool (j)
  f = Flatten (p)
  w4 = Constant <value = float[4,5] {1,2,3,4,5, 1,2,3,4,5, 1,2,3,4,5, 1,2,3,4,5}> ()
  y = MatMul (f, w4)
}
"""


def _model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(TEXT)
    # a weight that is both a graph input and an initializer (old exporters write these)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.full((4, 3, 3, 3), 0.1, np.float32), "w_in"))
    return model


@pytest.fixture()
def view() -> GraphView:
    return GraphView(load_model(_model()).proto)


def test_layers_and_weight_locations(view: GraphView) -> None:
    names = {layer.op_type + ":" + (layer.weight.location.value if layer.weight else "-") for layer in view.layers.values()}
    assert names == {"Conv:graph-input", "Conv:constant-node", "MatMul:constant-node"}
    assert len(view.layers) == 4
    first = view.layers[view.layer_names[0]]
    assert first.weight is not None and first.weight.location is WeightLocation.GRAPH_INPUT
    assert first.params == 4 * 3 * 3 * 3 + 4
    assert first.macs == 1 * 4 * 8 * 8 * 3 * 3 * 3  # out elements × Cin × k × k
    matmul = view.layers[view.layer_names[-1]]
    assert matmul.macs == 5 * 4


def test_dependencies(view: GraphView) -> None:
    c1, c2, c3, mm = view.layer_names
    assert view.consumers_of(c1) == sorted([c2, c3, mm])  # through Relu, Add, pooling
    assert view.producers(mm) == sorted([c1, c2, c3])
    assert [members for _, members in view.shared_input_groups()] == [tuple(sorted([c2, c3]))]
    joins = dict(view.residual_joins())
    assert any(set(branches) == {c2, c3} for branches in joins.values())
    pairs = view.dependent_pairs(radius=1)
    assert (c2, c3, "sibling") in pairs or (c2, c3, "residual") in pairs
    assert all(a != b for a, b, _ in pairs)


def test_pairs_grow_linearly() -> None:
    # a chain of n residual blocks: pairs per layer must stay bounded
    counts = []
    for blocks in (16, 64):
        nodes, inits = [], []
        prev = "x"
        for i in range(blocks):
            w = np.eye(8, dtype=np.float32)
            inits.append(onnx.numpy_helper.from_array(w, f"w{i}"))
            nodes.append(onnx.helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
            nodes.append(onnx.helper.make_node("Add", [prev, f"m{i}"], [f"a{i}"], name=f"add{i}"))
            prev = f"a{i}"
        graph = onnx.helper.make_graph(nodes, "chain", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
                                       [onnx.helper.make_tensor_value_info(prev, onnx.TensorProto.FLOAT, [1, 8])], inits)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
        counts.append(len(GraphView(load_model(model).proto).dependent_pairs(radius=2)) / blocks)
    # each layer pairs with at most 3 + 3*3 chain neighbours plus a residual and a sibling partner
    assert max(counts) <= 14
    assert counts[1] - counts[0] < 1.5


def test_unnamed_nodes_get_stable_names() -> None:
    model = _model()
    for node in model.graph.node:
        node.name = ""
    first = GraphView(load_model(model).proto).layer_names
    second = GraphView(load_model(model).proto).layer_names
    assert first == second and all(first)


def test_the_spec_says_where_a_layers_weight_is(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A spec whose MatMul rule puts the weight at input 0 (``W @ x``) makes that constant the
    layer's weight in the graph view; the default table says input 1."""
    import json
    from importlib import resources

    from onnxq.graph import layer_ops_for, weight_slots_for
    from onnxq.spec import load_spec

    w = onnx.numpy_helper.from_array(np.ones((4, 8), np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["w", "x"], ["y"], name="left")], "left_weight",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 3])], [w])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    assert GraphView(model).layers["left"].weight is None
    data = json.loads((resources.files("onnxq.hardware_specs") / "ort-cpu-x86.json").read_text("utf-8"))
    data["ops"]["MatMul"]["weight_inputs"] = [0]
    path = tmp_path / "left.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    spec = load_spec(str(path))
    view = GraphView(model, layer_ops_for(spec), weight_slots_for(spec))
    layer = view.layers["left"]
    assert layer.weight is not None and layer.weight.tensor == "w" and layer.activations == ("x",)
