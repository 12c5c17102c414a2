"""Measured latency (onnxq.latency): interleaved whole-model ratios and the per-layer table.

No test asserts an absolute time: the table is checked against a direct whole-model measurement
taken on the same machine in the same run.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

from onnxq.errors import UsageError
from onnxq.graph import GraphView
from onnxq.latency import (
    build_latency_table,
    capture_layer_inputs,
    deploy_feeds,
    layer_model,
    measure_latency,
    region_builder,
    time_interleaved,
)
from onnxq.runtime import make_session, optimized_op_types

ROWS, WIDTH = 48, 768


def matmul_relu_model(rows: int = ROWS, width: int = WIDTH) -> onnx.ModelProto:
    """x[rows, width] → MatMul(W[width, width]) → Relu: one big MatMul layer, real-sized."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"), helper.make_node("Relu", ["h"], ["y"], name="act")],
        "matmul-relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[onnx.numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def embedding_encoder_model() -> onnx.ModelProto:
    """ids → Gather(table) → MatMul(W1) → Relu → MatMul(W2): three layers of different kinds."""
    rng = np.random.default_rng(1)
    table = rng.standard_normal((100, 32)).astype(np.float32)
    w1 = rng.standard_normal((32, 64)).astype(np.float32)
    w2 = rng.standard_normal((64, 16)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
            helper.make_node("MatMul", ["e", "W1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="act"),
            helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2"),
        ],
        "embed-mlp",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])],
        initializer=[onnx.numpy_helper.from_array(a, n) for a, n in ((table, "table"), (w1, "W1"), (w2, "W2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def dynamic_int8(model: onnx.ModelProto, _inputs: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Every MatMul with a constant weight → DynamicQuantizeLinear + DQ(int8 per-channel W) → MatMul."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = {init.name: init for init in out.graph.initializer}
    replaced = set()
    nodes = []
    for node in out.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            nodes.append(node)
            continue
        x, w = node.input
        replaced.add(w)
        value = onnx.numpy_helper.to_array(weights[w])
        scale = (np.abs(value).max(axis=0) / 127.0).astype(np.float32)
        quantized = np.clip(np.round(value / scale), -127, 127).astype(np.int8)
        out.graph.initializer.extend([
            onnx.numpy_helper.from_array(quantized, f"{w}_q"),
            onnx.numpy_helper.from_array(scale, f"{w}_scale"),
            onnx.numpy_helper.from_array(np.zeros_like(quantized[0]), f"{w}_zero"),
        ])
        nodes += [
            helper.make_node("DynamicQuantizeLinear", [x], [f"{x}_q", f"{x}_s", f"{x}_z"], name=f"{node.name}_dql"),
            helper.make_node("DequantizeLinear", [f"{x}_q", f"{x}_s", f"{x}_z"], [f"{x}_dq"], name=f"{node.name}_xdq"),
            helper.make_node("DequantizeLinear", [f"{w}_q", f"{w}_scale", f"{w}_zero"], [f"{w}_dq"], axis=1,
                             name=f"{node.name}_wdq"),
            helper.make_node("MatMul", [f"{x}_dq", f"{w}_dq"], list(node.output), name=node.name),
        ]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    kept = [init for init in out.graph.initializer if init.name not in replaced]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    del out.opset_import[:]
    out.opset_import.append(helper.make_opsetid("", 21))
    return out


def fp32_copy(model: onnx.ModelProto, _inputs: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    return model


def deploy_feed() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(2).standard_normal((ROWS, WIDTH)).astype(np.float32)}


def test_dynamic_builder_fuses_and_is_close(tmp_path):
    """The test's candidate really is onnxruntime's fast dynamic kernel, and computes the same layer."""
    fp32 = matmul_relu_model()
    candidate = dynamic_int8(fp32)
    assert "DynamicQuantizeMatMul" in optimized_op_types(candidate, str(tmp_path / "opt.onnx"))
    feed = deploy_feed()
    expected = make_session(fp32).run(None, feed)[0]
    got = make_session(candidate).run(None, feed)[0]
    cosine = float((expected * got).sum() / np.linalg.norm(expected) / np.linalg.norm(got))
    assert cosine > 0.999


@pytest.mark.slow  # timing: needs a quiet core (it failed under the default suite's parallel load)
def test_table_agrees_with_a_direct_whole_model_measurement(tmp_path):
    """The table ranks the candidate on the same side of fp32 as the whole model does, whenever
    the direct measurement is clearly on one side (by its quartiles, or by a 20% margin). Timing
    noise gets three attempts; a systematic disagreement fails all three."""
    fp32 = matmul_relu_model()
    feed = deploy_feed()
    disagreements = []
    for attempt in range(3):
        direct = measure_latency(dynamic_int8(fp32), fp32, [feed], budget_seconds=0.6, min_rounds=7)
        table = build_latency_table(fp32, feed, {"int8/dyn-uint8": dynamic_int8}, budget_seconds=20,
                                    per_pair_seconds=0.6, cache_dir=tmp_path / str(attempt))
        ratio = table.ratio("fc", "int8/dyn-uint8")
        assert ratio is not None and not table.untimed
        entry = table.entries[0]
        assert entry.shapes == f"{ROWS}x{WIDTH}" and entry.fp32_ms > 0 and entry.candidate_ms > 0
        faster = direct.ratio_high < 1.0 or direct.ratio < 0.8
        slower = direct.ratio_low > 1.0 or direct.ratio > 1.25
        if (not faster or ratio < 1.0) and (not slower or ratio > 1.0):
            return
        disagreements.append((ratio, direct))
    raise AssertionError(f"table and whole model disagree in every attempt: {disagreements}")


def test_second_call_hits_the_cache(tmp_path):
    model = embedding_encoder_model()
    feed = {"ids": np.arange(24, dtype=np.int64).reshape(2, 12)}
    builders = {"int8/dyn-uint8": dynamic_int8}
    first = build_latency_table(model, feed, builders, budget_seconds=20, per_pair_seconds=0.05, cache_dir=tmp_path)
    assert first.cache_hits == 0 and len(first.entries) == 3 and not first.untimed
    second = build_latency_table(model, feed, builders, budget_seconds=0, cache_dir=tmp_path)
    assert second.cache_hits == len(second.entries) == 3 and not second.untimed
    assert [(e.layer, e.candidate, e.ratio) for e in second.entries] == [(e.layer, e.candidate, e.ratio)
                                                                         for e in first.entries]
    # another deploy shape is another measurement: no hit
    other = build_latency_table(model, {"ids": feed["ids"][:1]}, builders, budget_seconds=0, cache_dir=tmp_path)
    assert other.cache_hits == 0 and len(other.untimed) == 3


def test_zero_budget_times_nothing_and_says_so(tmp_path):
    model = embedding_encoder_model()
    table = build_latency_table(model, {"ids": np.zeros((1, 4), np.int64)}, {"int8/dyn-uint8": dynamic_int8},
                                budget_seconds=0, cache_dir=tmp_path)
    assert table.entries == ()
    assert sorted(layer for layer, _, _ in table.untimed) == ["embed", "fc1", "fc2"]
    assert {reason for _, _, reason in table.untimed} == {"time budget spent"}
    assert "3 not timed, they fall back to the cost model" in table.summary()
    assert not list(tmp_path.iterdir())


def test_a_failing_builder_leaves_only_its_pairs_untimed(tmp_path):
    def broken(model: onnx.ModelProto, _inputs: Mapping[str, np.ndarray]) -> onnx.ModelProto:
        raise ValueError("no such kernel")

    model = embedding_encoder_model()
    table = build_latency_table(model, {"ids": np.zeros((1, 4), np.int64)}, {"broken": broken, "fp32/fp32": fp32_copy},
                                budget_seconds=20, per_pair_seconds=0.05)
    assert {e.candidate for e in table.entries} == {"fp32/fp32"} and len(table.entries) == 3
    assert {(c, r) for _, c, r in table.untimed} == {("broken", "ValueError: no such kernel")}


def test_one_layer_models_compute_what_the_layer_computes():
    model = embedding_encoder_model()
    view = GraphView(model)
    feed = {"ids": np.array([[3, 7, 99, 0, 42]], np.int64)}
    inputs = capture_layer_inputs(model, view, ["embed", "fc1", "act", "fc2"], feed)
    final = make_session(model).run(None, feed)[0]
    for layer, produced in (("embed", inputs["e"]), ("fc1", inputs["h"]), ("fc2", final)):
        one = layer_model(model, view, layer, inputs)
        onnx.checker.check_model(one, full_check=True)
        assert [i.name for i in one.graph.initializer] == [view.layers[layer].weight.tensor]
        feeds = {i.name: inputs[i.name] for i in one.graph.input}
        np.testing.assert_array_equal(make_session(one).run(None, feeds)[0], produced)


def test_interleaved_reference_is_its_own_unit():
    model = matmul_relu_model(rows=4, width=64)
    sessions = {"a": make_session(model), "b": make_session(model)}
    timings = time_interleaved(sessions, [{"x": np.ones((4, 64), np.float32)}], "a", budget_seconds=0.0,
                               min_rounds=6, max_rounds=6)
    assert timings["a"].ratio == timings["a"].ratio_low == timings["a"].ratio_high == 1.0
    assert timings["b"].rounds == 6 and timings["b"].median_ms > 0


def test_measure_latency_rejects_no_feeds():
    model = matmul_relu_model(rows=4, width=64)
    with pytest.raises(UsageError):
        measure_latency(model, model, [])


def test_a_quantized_whole_model_serves_as_a_candidate(tmp_path):
    """onnxruntime's own quantize_dynamic output, cut per layer, is timed like a builder's model."""
    source, quantized = tmp_path / "fp32.onnx", tmp_path / "dynamic.onnx"
    model = embedding_encoder_model()
    onnx.save(model, source)
    quantize_dynamic(str(source), str(quantized), per_channel=True, weight_type=QuantType.QInt8)
    feed = {"ids": np.arange(10, dtype=np.int64).reshape(1, 10)}
    builder = region_builder(str(quantized))
    view = GraphView(model)
    inputs = capture_layer_inputs(model, view, ["fc1", "fc2"], feed)
    region = builder(layer_model(model, view, "fc2", inputs), {"r": inputs["r"]})
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in region.graph.node}
    expected = make_session(model).run(None, feed)[0]
    got = make_session(region).run(None, {"r": inputs["r"]})[0]
    assert float((expected * got).sum() / np.linalg.norm(expected) / np.linalg.norm(got)) > 0.999

    table = build_latency_table(model, feed, {"ort-dynamic": builder}, budget_seconds=20, per_pair_seconds=0.05)
    assert {e.layer for e in table.entries} == {"fc2"}
    # quantize_dynamic also quantized the embedding's output, so fc1's float input no longer exists
    # and the Gather's output is an integer tensor: those two layers cannot be cut and stay untimed
    assert sorted(layer for layer, _, _ in table.untimed) == ["embed", "fc1"]


def test_deploy_feeds_pad_ragged_text_to_the_batch():
    ragged = [{"ids": np.full((1, n), n, np.int64), "mask": np.ones((1, n), np.int64)} for n in (5, 7, 6)]
    single = deploy_feeds(ragged, 1)
    assert [f["ids"].shape for f in single] == [(1, 5), (1, 7), (1, 6)]
    (pair,) = deploy_feeds(ragged, 2)  # the short last group is dropped
    assert pair["ids"].shape == (2, 7) and pair["mask"].sum(1).tolist() == [5, 7]
    assert pair["ids"][0].tolist() == [5] * 5 + [0, 0]
    stacked = deploy_feeds([{"x": np.arange(12, dtype=np.float32).reshape(6, 2)}], 4)
    assert len(stacked) == 1 and stacked[0]["x"].tolist() == np.arange(8).reshape(4, 2).tolist()
    # a padded batch runs where the model's axes are dynamic
    model = embedding_encoder_model()
    (batch,) = deploy_feeds([{"ids": np.arange(n, dtype=np.int64)[None]} for n in (3, 4)], 2)
    assert make_session(model).run(None, batch)[0].shape == (2, 4, 16)


class _Reader:
    """Calibration feeds for onnxruntime's quantize_static."""

    def __init__(self) -> None:
        self.feeds = iter([{"ids": np.arange(i, i + 10, dtype=np.int64)[None]} for i in range(8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def test_a_region_keeps_the_quantize_on_its_output(tmp_path):
    """DQ(table) → Gather → Q runs as a Gather on int8 data; without its Q the table would be
    dequantized whole on every call, so the region must carry the Q to time what the model runs."""
    source, quantized = tmp_path / "fp32.onnx", tmp_path / "static.onnx"
    model = embedding_encoder_model()
    onnx.save(model, source)
    quantize_static(str(source), str(quantized), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    view = GraphView(model)
    inputs = capture_layer_inputs(model, view, ["embed"], {"ids": np.arange(10, dtype=np.int64)[None]})
    region = region_builder(str(quantized))(layer_model(model, view, "embed", inputs), {"ids": inputs["ids"]})
    assert [n.op_type for n in region.graph.node] == ["DequantizeLinear", "Gather", "QuantizeLinear"]
    assert optimized_op_types(region, str(tmp_path / "optimized.onnx")) == ["Gather"]
