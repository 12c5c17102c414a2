"""The roofline cost model: sizes, BitOps, boundaries, measured latencies."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from onnxq.cost import CostEstimate, LayerCost, boundary, estimate, weight_bytes
from onnxq.precision import Candidate
from onnxq.spec import load_spec

C = Candidate.parse
INT8 = C("int8/uint8")
FP32 = C("fp32/fp32")


def _chain(n: int = 6) -> tuple[list[LayerCost], list[tuple[str, str, int]]]:
    """A chain of equal 3x3 convs, 64 channels on 28x28 (compute-bound on a CPU)."""
    elements = 64 * 28 * 28
    layers = [
        LayerCost(f"conv{i}", "Conv", macs=64 * 64 * 9 * 28 * 28, weight_elements=64 * 64 * 9,
                  input_elements=elements, output_elements=elements, weight_channels=64)
        for i in range(n)
    ]
    edges = [(f"conv{i}", f"conv{i + 1}", elements) for i in range(n - 1)]
    return layers, edges


def test_int8_weights_about_four_times_smaller() -> None:
    spec = load_spec("ort-cpu-x86")
    layers, edges = _chain()
    fp32 = estimate(layers, {}, spec, edges)
    int8 = estimate(layers, {layer.name: INT8 for layer in layers}, spec, edges)
    assert isinstance(fp32, CostEstimate)
    assert fp32.size_bytes == sum(4 * layer.weight_elements for layer in layers)
    ratio = fp32.size_bytes / int8.size_bytes
    assert 3.8 < ratio <= 4.0  # per-channel scales and zero points cost a little
    assert int8.latency_seconds < fp32.latency_seconds  # contiguous int8 pays off on x86
    assert int8.bitops * 16 == fp32.bitops  # 8x8 vs 32x32
    assert set(int8.per_layer) == {layer.name for layer in layers}


def test_int4_packs_two_per_byte() -> None:
    spec = load_spec("ort-cpu-x86")
    layer = LayerCost("mm", "MatMul", macs=0, weight_elements=4096, input_elements=0,
                      output_elements=0, weight_channels=64)
    assert weight_bytes(layer, C("fp32/fp32"), spec) == 4 * 4096
    # weight-only int4 MatMul in blocks of 32: 128 blocks of scale + 4-bit zp (asymmetric rule)
    assert weight_bytes(layer, C("int4b32/fp32"), spec) == 2048 + 128 * 4 + 64
    # int4 weights beside quantized activations cannot be block-wise (onnxruntime fails at Run):
    # the rule's per_block preference falls back to per-channel, never to one per-tensor scale
    assert weight_bytes(layer, C("int4/uint8"), spec) == 2048 + 64 * 4 + 32
    # Conv int4 is per-channel: 64 scales + 64 zero points packed in 32 bytes
    conv = LayerCost("c", "Conv", 0, 4096, 0, 0, weight_channels=64)
    assert weight_bytes(conv, C("int4/uint8"), spec) == 2048 + 64 * 4 + 32


def test_alternating_plan_pays_boundaries() -> None:
    spec = load_spec("ort-cpu-x86")
    layers, edges = _chain()
    contiguous = {layer.name: INT8 for layer in layers}
    alternating = {layer.name: (INT8 if i % 2 == 0 else FP32) for i, layer in enumerate(layers)}
    a = estimate(layers, contiguous, spec, edges)
    b = estimate(layers, alternating, spec, edges)
    assert a.conversion_seconds == 0.0
    assert b.conversion_seconds == pytest.approx(len(edges) * edges[0][2] * spec.cost.conversion_ns_per_element * 1e-9)
    assert b.latency_seconds > a.latency_seconds
    # the conversion is charged to the consumer layer
    no_edges = estimate(layers, alternating, spec)
    assert b.per_layer["conv1"] > no_edges.per_layer["conv1"]
    assert b.latency_seconds == pytest.approx(no_edges.latency_seconds + b.conversion_seconds)


def test_slow_formats_on_x86_are_not_faster_than_fp32() -> None:
    spec = load_spec("ort-cpu-x86")
    layers, edges = _chain()
    fp32 = estimate(layers, {}, spec, edges).latency_seconds
    for cand in ("int16/int16", "int4/uint8", "int8/int8"):
        plan = {layer.name: C(cand) for layer in layers}
        assert estimate(layers, plan, spec, edges).latency_seconds > fp32, cand


def test_boundary_rules() -> None:
    assert not boundary(INT8, C("int4/uint8"))  # same activation format: no conversion
    assert boundary(INT8, FP32)
    assert boundary(C("int8/int8"), INT8)  # different integer formats: requantize
    assert boundary(C("fp16/fp16"), FP32)  # Cast
    assert not boundary(C("int4/fp32"), FP32)  # weight-only layers exchange fp32


def test_plan_accepts_text_and_missing_layers_are_fp32() -> None:
    spec = load_spec("tensorrt-gpu")
    layers, edges = _chain(2)
    text = estimate(layers, {"conv0": "int8/int8"}, spec, edges)  # type: ignore[dict-item]
    typed = estimate(layers, {"conv0": C("int8/int8")}, spec, edges)
    assert text == typed
    assert typed.conversion_seconds > 0  # conv1 stayed fp32


def test_latency_table_overrides_roofline(tmp_path: Path) -> None:
    data = json.loads(
        (resources.files("onnxq.hardware_specs") / "ort-cpu-x86.json").read_text("utf-8"))
    data["name"] = "ort-measured"
    data["cost"]["latency_table"] = {"conv0": {"int8/uint8": 0.5}, "Conv": {"fp32/fp32": 0.25}}
    path = tmp_path / "ort-measured.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    spec = load_spec(path)
    layers, _ = _chain(2)
    result = estimate(layers, {"conv0": INT8}, spec)
    assert result.per_layer == {"conv0": 0.5, "conv1": 0.25}
    assert result.latency_seconds == pytest.approx(0.75)


def test_memory_bound_layer_uses_bandwidth() -> None:
    spec = load_spec("ort-cpu-x86")
    layer = LayerCost("add", "Add", macs=0, weight_elements=0, input_elements=2_000_000,
                      output_elements=1_000_000)
    fp32 = estimate([layer], {}, spec)
    uint8 = estimate([layer], {"add": C("uint8/uint8")}, spec)
    bw = spec.cost.bytes_per_second
    overhead = spec.cost.op_overhead_seconds
    cost = spec.cost

    def extra(candidate: Candidate) -> float:  # per-call and per-element costs of the candidate
        return (cost.candidate_value(cost.candidate_overhead_seconds, candidate)
                + 3_000_000 * cost.candidate_value(cost.candidate_ns_per_element, candidate) * 1e-9)

    assert fp32.latency_seconds == pytest.approx(12_000_000 / bw + overhead + extra(FP32))
    assert uint8.latency_seconds == pytest.approx(3_000_000 / bw + overhead + extra(C("uint8/uint8")))
    assert fp32.size_bytes == 0 and fp32.bitops == 0


# -- size curve, boundaries at float ops, batch --------------------------------------------------

import dataclasses  # noqa: E402
from types import MappingProxyType  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from onnxq.cost import Boundary, boundaries, boundary_edges, layer_costs, nonlayer_work  # noqa: E402
from onnxq.graph import GraphView  # noqa: E402


def _curve_spec(fixed_int8: float = 20e-6, fixed_fp32: float = 1e-6):
    """ort-cpu-x86 with known per-candidate fixed costs (structure tests, not calibration)."""
    spec = load_spec("ort-cpu-x86")
    cost = dataclasses.replace(
        spec.cost,
        candidate_overhead_seconds=MappingProxyType({"int8/uint8": fixed_int8, "fp32": fixed_fp32}),
        candidate_ns_per_element=MappingProxyType({}),
        run_overhead_seconds=5e-6, nonlayer_ns_per_element=0.5, conversion_op_seconds=1e-6)
    return dataclasses.replace(spec, cost=cost)


def _matmul(name: str, m: int, k: int, n: int) -> LayerCost:
    return LayerCost(name, "MatMul", m * k * n, k * n, m * k, m * n, weight_channels=n)


@pytest.mark.parametrize("spec_name", ["curve", "ort-cpu-x86"])
def test_tiny_int8_layer_is_not_cheaper_large_one_is(spec_name: str) -> None:
    spec = _curve_spec() if spec_name == "curve" else load_spec("ort-cpu-x86")
    tiny, large = _matmul("tiny", 16, 32, 32), _matmul("large", 512, 512, 512)
    t_fp32 = estimate([tiny], {}, spec).latency_seconds
    t_int8 = estimate([tiny], {"tiny": INT8}, spec).latency_seconds
    assert t_int8 >= 0.95 * t_fp32  # ~1e4 MACs: the fixed cost of the integer kernel dominates
    l_fp32 = estimate([large], {}, spec).latency_seconds
    l_int8 = estimate([large], {"large": INT8}, spec).latency_seconds
    assert 2.5 < l_fp32 / l_int8 < 5  # ~1e8 MACs: close to the VNNI rate ratio


def test_candidate_overhead_is_per_layer_call_and_keys_fall_back_to_precision() -> None:
    spec = _curve_spec(fixed_int8=20e-6, fixed_fp32=1e-6)
    layer = _matmul("mm", 64, 96, 96)
    base = dataclasses.replace(spec, cost=dataclasses.replace(
        spec.cost, candidate_overhead_seconds=MappingProxyType({})))
    for candidate, fixed in ((INT8, 20e-6), (FP32, 1e-6)):  # "fp32" (precision key) covers fp32/fp32
        delta = estimate([layer], {"mm": candidate}, spec).latency_seconds - \
            estimate([layer], {"mm": candidate}, base).latency_seconds
        assert delta == pytest.approx(fixed)
    assert spec.cost.candidate_value(spec.cost.candidate_overhead_seconds, C("uint8/uint8")) == 0.0


def test_batch_scales_macs_and_elements_not_weights() -> None:
    spec = load_spec("ort-cpu-x86")
    layers, edges = _chain(3)
    one = estimate(layers, {"conv1": INT8}, spec, edges)
    four = estimate(layers, {"conv1": INT8}, spec, edges, batch=4)
    assert four.size_bytes == one.size_bytes
    assert four.bitops == 4 * one.bitops
    assert four.conversion_seconds == pytest.approx(4 * one.conversion_seconds)
    assert one.latency_seconds < four.latency_seconds < 4 * one.latency_seconds  # fixed costs stay
    with pytest.raises(ValueError):
        estimate(layers, {}, spec, batch=0)


def _mm_ln_mm() -> GraphView:
    """x → MatMul → LayerNormalization → MatMul → Reshape → MatMul → y (batch 1, d=64)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w{i}") for i in range(3)]
    inits += [numpy_helper.from_array(np.ones(64, np.float32), "g"), numpy_helper.from_array(np.zeros(64, np.float32), "b"),
              numpy_helper.from_array(np.array([1, 16, 64], np.int64), "shape")]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a"], name="mm0"),
        helper.make_node("LayerNormalization", ["a", "g", "b"], ["n"], name="ln", axis=-1),
        helper.make_node("MatMul", ["n", "w1"], ["c"], name="mm1"),
        helper.make_node("Reshape", ["c", "shape"], ["r"], name="reshape"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return GraphView(onnx.shape_inference.infer_shapes(model), {"MatMul"})


def test_boundaries_charge_float_neighbours() -> None:
    view = _mm_ln_mm()
    spec = _curve_spec()
    plan = {name: INT8 for name in view.layers}
    found = boundaries(view, plan, spec)
    assert all(isinstance(b, Boundary) for b in found)
    kinds = {(b.tensor, b.kind) for b in found}
    # the graph input and the LayerNorm output are quantized standalone; mm0's output is
    # dequantized for the LayerNorm; mm1 → Reshape → mm2 stays integer (no boundary)
    assert kinds == {("x", "quantize"), ("a", "dequantize"), ("n", "quantize")}
    assert all(b.elements == 16 * 64 for b in found)
    # layer-to-layer edges see no boundary in a uniform int8 plan; the view does
    layers = layer_costs(view)
    blind = estimate(layers, plan, spec, view.edges_between_layers())
    seeing = estimate(layers, plan, spec, view=view)
    assert blind.conversion_seconds == 0.0
    assert seeing.conversion_seconds == pytest.approx(3 * (spec.cost.conversion_op_seconds
                                                          + 1024 * spec.cost.conversion_ns_per_element * 1e-9))
    assert seeing.boundaries == found
    # fp32 has no boundaries; whole-model estimates add the run overhead and the float ops
    fp32 = estimate(layers, {}, spec, view=view)
    assert fp32.boundaries == () and fp32.conversion_seconds == 0.0
    ops, elements = nonlayer_work(view)
    assert (ops, elements) == (2, 2048)  # LayerNormalization and Reshape
    assert fp32.fixed_seconds == pytest.approx(spec.cost.run_overhead_seconds + ops * spec.cost.op_overhead_seconds
                                               + elements * spec.cost.nonlayer_ns_per_element * 1e-9)
    assert fp32.latency_seconds == pytest.approx(estimate(layers, {}, spec).latency_seconds + fp32.fixed_seconds)


def test_boundary_edges_reach_float_ops_and_look_through_integer_ops() -> None:
    view = _mm_ln_mm()
    spec = _curve_spec()
    edges = boundary_edges(view, spec)
    assert ("mm0", "ln", 1024) in edges and ("ln", "mm1", 1024) in edges and ("x", "mm0", 1024) in edges
    assert ("mm1", "mm2", 1024) in edges  # through the Reshape
    layers = layer_costs(view)
    plan = {name: INT8 for name in view.layers}
    # the edges price the same boundaries as the exact layout here, minus the fixed per-node cost
    by_edges = estimate(layers, plan, spec, edges)
    assert by_edges.conversion_seconds == pytest.approx(3 * 1024 * spec.cost.conversion_ns_per_element * 1e-9)
    # a float layer between int8 neighbours pays on both sides
    mixed = estimate(layers, {"mm0": INT8, "mm2": INT8}, spec, edges)
    assert mixed.per_layer["mm2"] > estimate(layers, {"mm0": INT8, "mm2": INT8}, spec).per_layer["mm2"]


def test_new_cost_fields_load_from_json(tmp_path: Path) -> None:
    data = json.loads((resources.files("onnxq.hardware_specs") / "ort-cpu-x86.json").read_text("utf-8"))
    data["name"] = "ort-fields"
    data["cost"].update({"candidate_overhead_seconds": {"int8/uint8": 1e-5, "fp32": 1e-6},
                         "candidate_ns_per_element": {"uint8": 0.25}, "run_overhead_seconds": 4e-6,
                         "nonlayer_ns_per_element": 0.3, "conversion_op_seconds": 5e-7})
    path = tmp_path / "ort-fields.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    cost = load_spec(path).cost
    assert cost.candidate_value(cost.candidate_overhead_seconds, INT8) == 1e-5
    assert cost.candidate_value(cost.candidate_ns_per_element, C("uint8/uint8")) == 0.25
    assert (cost.run_overhead_seconds, cost.nonlayer_ns_per_element, cost.conversion_op_seconds) == (4e-6, 0.3, 5e-7)
