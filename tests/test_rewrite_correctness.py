"""The rewrite never hands back a model that computes something else (issue 11).

Each test builds a small real graph, quantizes it through the public API and runs both models in
onnxruntime. Fidelity checks use exact Q/DQ simulation (``session.disable_quant_qdq``) so that
they test the rewrite, not the fused kernels of this machine.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.runtime import make_session

OPSET = 17


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           inits: list[onnx.TensorProto], opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], exact: bool = True) -> list[np.ndarray]:
    session = make_session(model, exact_qdq=exact)
    return [session.run(None, feed)[0] for feed in feeds]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _feeds(shape: tuple[int, ...], count: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


# ---------------------------------------------------------------- item 1: a Relu that ends the graph
def _conv_relu_output() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], [w, b])


def test_relu_that_ends_the_graph_is_kept() -> None:
    model = _conv_relu_output()
    feeds = _feeds((1, 3, 8, 8))
    quantized = onnxq.quantize(model, feeds, "ort-cpu-x86", precision="int8/uint8").model
    for ref, got in zip(_run(model, feeds), _run(quantized, feeds), strict=True):
        assert got.min() >= 0.0  # the Relu still clips
        assert _cosine(ref, got) > 0.999


# ---------------------------------------------------------------- item 2: -inf constants and activations
def _masked_attention() -> onnx.ModelProto:
    """scores = x @ W + mask (causal, -inf above the diagonal); y = Softmax(scores)."""
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 0.2, "w")
    mask = np.triu(np.full((32, 64), -np.inf, dtype=np.float32), k=1)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["s"], name="mm"),
             helper.make_node("Add", ["s", "mask"], ["masked"], name="add_mask"),
             helper.make_node("Softmax", ["masked"], ["y"], name="softmax", axis=-1)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 64])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 64])],
                  [w, numpy_helper.from_array(mask, "mask")])


def _check_masked(model: onnx.ModelProto, quantized: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> None:
    above = np.triu(np.ones((32, 64), dtype=bool), k=1)
    for ref, got in zip(_run(model, feeds), _run(quantized, feeds), strict=True):
        assert np.isfinite(got).all()
        assert np.abs(got[0][above]).max() < 1e-6  # masked positions still get no weight
        assert np.abs(ref - got).max() < 0.05


def test_minus_inf_mask_constant_is_never_compressed() -> None:
    model = _masked_attention()
    feeds = _feeds((1, 32, 64))
    # only the MatMul is integer: the mask is a large float constant beside it (compression path)
    quantized = onnxq.quantize(model, feeds, "ort-cpu-x86", plan={"mm": "int8/uint8"}).model
    _check_masked(model, quantized, feeds)


def test_minus_inf_mask_under_uniform_int8_stays_a_mask() -> None:
    model = _masked_attention()
    feeds = _feeds((1, 32, 64))
    # the Add and the Softmax are integer layers too: the tensor that takes -inf must stay float
    quantized = onnxq.quantize(model, feeds, "ort-cpu-x86", precision="int8/uint8").model
    _check_masked(model, quantized, feeds)


# ---------------------------------------------------------------- item 3: an all-zero weight channel
def test_bias_of_an_all_zero_weight_channel_fits_int32() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
    w[0] = 0.0  # a pruned channel: its output is its bias
    bias = np.array([2.0, 0.1, -0.2, 0.3], dtype=np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                   [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    feeds = _feeds((1, 3, 8, 8))
    quantized = onnxq.quantize(model, feeds, "ort-cpu-x86", precision="int8/uint8").model
    for exact in (True, False):
        for ref, got in zip(_run(model, feeds), _run(quantized, feeds, exact=exact), strict=True):
            assert np.abs(got[0, 0] - 2.0).max() < 1e-3
            assert _cosine(ref, got) > 0.999


# ---------------------------------------------------------------- item 6 (Shape): no DQ computed for a Shape
def _dq_feeding(model: onnx.ModelProto, op_types: set[str]) -> int:
    producers = {o: n for n in model.graph.node for o in n.output}
    return sum(1 for n in model.graph.node if n.op_type in op_types
               for t in n.input if t in producers and producers[t].op_type == "DequantizeLinear")


def test_shape_reads_the_integer_codes_not_a_dq(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(4)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) * 0.3, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) * 0.3, "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Shape", ["h"], ["h_shape"], name="shape"),
             helper.make_node("MatMul", ["h", "w2"], ["g"], name="mm2"),
             helper.make_node("Reshape", ["g", "h_shape"], ["y"], name="reshape")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], [w1, w2])
    feeds = _feeds((4, 16))
    quantized = onnxq.quantize(model, feeds, "ort-cpu-x86", precision="int8/uint8").model
    optimized = tmp_path / "optimized.onnx"
    make_session(quantized, optimized_path=str(optimized))
    assert _dq_feeding(onnx.load(str(optimized)), {"Shape", "Size"}) == 0
    for ref, got in zip(_run(model, feeds), _run(quantized, feeds), strict=True):
        assert _cosine(ref, got) > 0.999


# ---------------------------------------------------------------- u8s8 kernels that saturate (x86 without VNNI)
def test_int8_weights_stay_clear_of_u8s8_saturation() -> None:
    # onnxruntime's u8s8 GEMM on AVX2 / AVX-512 without VNNI adds pairs of u8 x s8 products in
    # int16: with inputs near the top of the uint8 grid and full-range weights of one sign the
    # pairs overflow 2**15 and the fused model is wrong (this is what broke the If test)
    w = np.full((16, 8), 0.5, dtype=np.float32)
    w[:, 4:] = -0.5
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    w2 = np.eye(8, dtype=np.float32)
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                   [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")])
    rng = np.random.default_rng(5)
    sign = np.array([[1.0], [-1.0], [1.0], [-1.0]], dtype=np.float32)  # both signs: zero point mid-grid
    feeds = [{"x": sign * (np.abs(rng.standard_normal((4, 16))).astype(np.float32) + 2.0)} for _ in range(6)]
    quantized = onnxq.quantize(model, feeds, "ort-cpu-x86", precision="int8/uint8").model
    codes = [numpy_helper.to_array(i) for i in quantized.graph.initializer if i.data_type == TensorProto.INT8 and i.dims]
    assert codes and all(int(np.abs(c.astype(np.int64)).max()) <= 64 for c in codes)
    for ref, got in zip(_run(model, feeds), _run(quantized, feeds, exact=False), strict=True):
        assert np.abs(ref - got).max() <= 0.02 * np.abs(ref).max()


# ---------------------------------------------------------------- item 12: integer-only targets
def test_integer_only_target_runs_a_transformer_block_on_integers() -> None:
    # embedding lookup, bias Add (a constant operand: not a layer), Concat with a constant-derived
    # token, LayerNorm, Softmax and the logits: on edge-int-only nothing may stay float
    from onnxq.spec import load_spec
    from onnxq.validate import validate_model

    rng = np.random.default_rng(6)
    table = numpy_helper.from_array(rng.standard_normal((20, 16)).astype(np.float32), "table")
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) * 0.3, "w")
    bias = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "bias")
    cls = numpy_helper.from_array(rng.standard_normal((1, 1, 16)).astype(np.float32), "cls")
    gamma = numpy_helper.from_array(np.ones(16, np.float32) * 1.5, "gamma")
    beta = numpy_helper.from_array(np.full(16, 0.1, np.float32), "beta")
    head = numpy_helper.from_array(rng.standard_normal((16, 5)).astype(np.float32) * 0.3, "head")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("Concat", ["cls", "emb"], ["seq"], name="concat", axis=1),
             helper.make_node("MatMul", ["seq", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "bias"], ["hb"], name="bias_add"),
             helper.make_node("LayerNormalization", ["hb", "gamma", "beta"], ["ln"], name="ln", axis=-1),
             helper.make_node("Softmax", ["ln"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "head"], ["y"], name="logits")]
    model = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 9, 5])],
                   [table, w, bias, cls, gamma, beta, head])
    feeds = [{"ids": rng.integers(0, 20, (1, 8)).astype(np.int64)} for _ in range(8)]
    quantized = onnxq.quantize(model, feeds, "edge-int-only", precision="int8/int8").model
    assert validate_model(quantized, load_spec("edge-int-only")) == []
    for ref, got in zip(_run(model, feeds), _run(quantized, feeds), strict=True):
        assert _cosine(ref, got) > 0.99


def test_shared_scale_concat_covers_every_input() -> None:
    # tensorrt-gpu runs Concat on one shared grid: it must cover the widest input, not only the first
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32) * scale, name)
             for name, scale in (("w_small", 0.1), ("w_large", 5.0))]
    inits.append(numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3, "w_out"))
    nodes = [helper.make_node("Conv", ["x", "w_small"], ["a"], name="small"),
             helper.make_node("Conv", ["x", "w_large"], ["b"], name="large"),
             helper.make_node("Concat", ["a", "b"], ["ab"], name="concat", axis=1),
             helper.make_node("Conv", ["ab", "w_out"], ["y"], name="out")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    feeds = _feeds((1, 3, 8, 8))
    quantized = onnxq.quantize(model, feeds, "tensorrt-gpu", precision="int8/int8").model
    for ref, got in zip(_run(model, feeds), _run(quantized, feeds), strict=True):
        assert _cosine(ref, got) > 0.999


# ---------------------------------------------------------------- weights and biases in Constant nodes
def test_constant_node_bias_replaced_by_int32_codes_leaves_no_dead_constant() -> None:
    # PaddleOCR's exporter keeps every weight and bias in a Constant node: the float bias the
    # rewrite replaces with int32 codes must not stay behind (52 in the quantized PP-OCR detector)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    b = rng.standard_normal(8).astype(np.float32) * 0.1
    nodes = [helper.make_node("Constant", [], ["w"], name="w_const", value=numpy_helper.from_array(w)),
             helper.make_node("Constant", [], ["b"], name="b_const", value=numpy_helper.from_array(b)),
             helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], [])
    feeds = _feeds((1, 3, 8, 8))
    quantized = onnxq.quantize(model, feeds, "ort-cpu-x86", precision="int8/uint8").model
    read = {t for n in quantized.graph.node for t in n.input} | {o.name for o in quantized.graph.output}
    assert all(n.output[0] in read for n in quantized.graph.node if n.op_type == "Constant")
    assert any(n.op_type == "DequantizeLinear" and n.input[0].startswith("b") for n in quantized.graph.node)
    for ref, got in zip(_run(model, feeds), _run(quantized, feeds), strict=True):
        assert _cosine(ref, got) > 0.999
