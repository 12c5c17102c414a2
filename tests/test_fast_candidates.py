"""Candidates onnxruntime runs fast: dynamic int8 (``int8/dyn-uint8``) and block-wise
weight-only (``int4b32/fp32``, ``int8b32/fp32``), on real graphs run through onnxruntime.

Each pattern must (1) fuse with default session options, (2) match the exact Q/DQ simulation
(ORT_DISABLE_ALL runs the written ops one by one) within one quantization step, (3) store 4-bit
weights at half a byte each; and the CLI/validate must agree on what the spec declares.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_cli
from onnx import TensorProto, helper, numpy_helper

from onnxq.api import quantize
from onnxq.cost import LayerCost, boundary, estimate
from onnxq.errors import PlanError
from onnxq.options import QuantizeOptions
from onnxq.precision import Candidate, Precision
from onnxq.qdq_patterns import dynamic_activation_qparams, fake_quantize_blockwise
from onnxq.spec import load_spec
from onnxq.validate import validate_model

SPEC_DIR = Path(__file__).resolve().parent.parent / "hardware_specs"


# ------------------------------------------------------------------------------------ helpers


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x_shape: list,
           y_shape: list | None = None) -> onnx.ModelProto:
    y_shape = y_shape if y_shape is not None else [f"y{i}" for i in range(len(x_shape))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def matmul_model(k: int, n: int, *, bias: bool = False, rank3: bool = False, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm" if bias else "y"], name="mm")]
    inits = [numpy_helper.from_array(w, "W")]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "B"))
        nodes.append(helper.make_node("Add", ["mm", "B"], ["y"], name="bias_add"))
    return _model(nodes, inits, ["b", "s", k] if rank3 else ["m", k])


def gemm_model(k: int, n: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)  # transB=1, as torch exports Linear
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "C")]
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc", transB=1, alpha=0.5, beta=2.0)]
    return _model(nodes, inits, ["m", k])


def feeds(shape: tuple[int, ...], count: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> collections.Counter:
    """Op types of the model onnxruntime runs with default session options."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def run(model: onnx.ModelProto, x: np.ndarray, *, exact: bool) -> np.ndarray:
    """``exact``: every written op runs as specified (no fusion); else default session options."""
    options = ort.SessionOptions()
    if exact:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


# ------------------------------------------------------------------------------------ words


@pytest.mark.parametrize("text", ["int8/uint8", "int4/int8", "fp16/fp16", "fp32/fp32", "int8/dyn-uint8",
                                  "int4b32/fp32", "int8b32/fp32", "uint4b128/fp32", "bf16/bf16"])
def test_candidate_words_round_trip(text: str) -> None:
    assert str(Candidate.parse(text)) == text
    assert Candidate.parse(str(Candidate.parse(text))) == Candidate.parse(text)


def test_candidate_refinements_are_distinct_and_checked() -> None:
    assert Candidate.parse("int8/dyn-uint8") != Candidate.parse("int8/uint8")
    assert Candidate.parse("int4b32/fp32") == Candidate(Precision.INT4, Precision.FP32, 32)
    assert Candidate.parse("int8") == Candidate(Precision.INT8, Precision.INT8)
    for bad in ("fp32b32/fp32", "int8/dyn-fp32", "int4b/fp32", "int8/dyn-"):
        with pytest.raises(PlanError):
            Candidate.parse(bad)


# ------------------------------------------------------------------------------------ dynamic int8


@pytest.mark.parametrize("case", ["matmul", "matmul_bias_2d", "matmul_bias_3d", "gemm"])
def test_dynamic_int8_fuses_and_matches_simulation(case: str, tmp_path: Path) -> None:
    k, n = 64, 48
    if case == "gemm":
        fp32, shape = gemm_model(k, n), (16, k)
    else:
        rank3 = case.endswith("3d")
        fp32 = matmul_model(k, n, bias=case != "matmul", rank3=rank3)
        shape = (2, 8, k) if rank3 else (16, k)
    result = quantize(fp32, feeds(shape), "ort-cpu-x86", precision="int8/dyn-uint8")
    model = result.model
    assert result.report["plan"]["layers"] == {"fc" if case == "gemm" else "mm": "int8/dyn-uint8"}
    assert validate_model(model, load_spec("ort-cpu-x86")) == []
    ops = optimized_ops(model, tmp_path)
    assert ops["DynamicQuantizeMatMul"] == 1, ops
    assert ops["MatMul"] == ops["Gemm"] == ops["MatMulInteger"] == 0, ops

    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    fused = run(model, x, exact=False)
    exact = dynamic_reference(model, x)
    # the integer kernel is exact: float32 rounding only, far below one step of the input grid
    assert np.max(np.abs(fused - exact)) <= 1e-4 * np.abs(exact).max()
    reference = run(fp32, x, exact=True)
    cosine = float(np.sum(fused * reference) / np.linalg.norm(fused) / np.linalg.norm(reference))
    assert cosine > 0.999


def _dynamic_weight(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    codes = next(v for v in inits.values() if v.dtype == np.int8 and v.ndim == 2)
    scale = next(v for k, v in inits.items() if k.endswith("_weight_scale"))
    return codes.astype(np.float64), scale.astype(np.float64)


def dynamic_reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The exact Q/DQ arithmetic in float64: DynamicQuantizeLinear's grid, then DQ(x) @ DQ(W) + b."""
    scale, zero = dynamic_activation_qparams(x)
    xq = np.clip(np.rint(x / scale) + zero, 0, 255)
    codes, w_scale = _dynamic_weight(model)
    y = ((xq - zero) * float(scale)) @ (codes * w_scale)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Add":
            y = y + next(inits[t] for t in node.input if t in inits)
    return y


def test_static_int8_matmul_matches_simulation_without_vnni() -> None:
    """x86 U8S8 kernels without VNNI add pairs of products in int16: the spec's reduce_range
    keeps int8 weights on 7 bits, so the fused kernel equals the Q/DQ arithmetic everywhere."""
    k, n = 768, 64
    fp32 = matmul_model(k, n)
    model = quantize(fp32, feeds((8, k)), "ort-cpu-x86", plan={"mm": "int8/uint8"}).model
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert np.abs(inits["W_quantized"]).max() <= 63
    x = feeds((48, k), 1, seed=9)[0]["x"]
    fused, exact = run(model, x, exact=False), run(model, x, exact=True)
    # the integer kernel is exact: float32 rounding only (saturation was off by up to 1.0)
    assert np.max(np.abs(fused - exact)) <= 1e-4 * np.abs(exact).max()


def test_dynamic_int8_simulation_is_per_call() -> None:
    """The scale is the call's own range (what DynamicQuantizeLinear computes), not a calibrated one."""
    x = np.array([[-1.0, 0.5, 3.0]], np.float32)
    scale, zero = dynamic_activation_qparams(x)
    graph = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], "d",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info(t, e, None) for t, e in
                               (("q", TensorProto.UINT8), ("s", TensorProto.FLOAT), ("z", TensorProto.UINT8))])
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)],
                                                     ir_version=10).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    _, s, z = session.run(None, {"x": x})
    assert float(s) == pytest.approx(float(scale), rel=1e-6) and int(z) == zero


# ------------------------------------------------------------------------------------ block-wise


def _spec_with_int8_blocks(tmp_path: Path) -> Path:
    """ort-cpu-x86 plus int8b32/fp32 on MatMul (not built in: see the spec's MatMul comment)."""
    data = json.loads((SPEC_DIR / "ort-cpu-x86.json").read_text())
    data["name"] = "ort-cpu-x86-int8-blocks"
    data["quantizers"]["w_int8_mm"].update(granularity=["per_channel", "per_tensor", "per_block"], block_sizes=[32])
    data["ops"]["MatMul"]["candidates"].insert(0, "int8b32/fp32")
    path = tmp_path / "int8_blocks.json"
    path.write_text(json.dumps(data))
    return path


def test_int8_blocks_are_not_declared_on_x86() -> None:
    """DQ(act) -> MatMul <- DQ(int8 blocks) is taken for MatMulIntegerToFloat whose Run() fails,
    which a mixed plan produces whenever a quantized neighbour shares the layer's input."""
    spec = load_spec("ort-cpu-x86")
    assert not spec.allows("MatMul", Candidate.parse("int8b32/fp32"))
    assert spec.allows("MatMul", Candidate.parse("int4b32/fp32"))


@pytest.mark.parametrize("word,precision", [("int4b32/fp32", Precision.INT4), ("int8b32/fp32", Precision.INT8)])
def test_blockwise_weight_only_fuses_and_matches_simulation(word: str, precision: Precision, tmp_path: Path) -> None:
    k, n = 128, 64
    fp32 = matmul_model(k, n)
    spec = load_spec(str(_spec_with_int8_blocks(tmp_path)))
    result = quantize(fp32, feeds((4, k)), spec, plan={"mm": word})
    model = result.model
    assert validate_model(model, spec) == []
    dq = next(node for node in model.graph.node if node.op_type == "DequantizeLinear")
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 32}
    ops = optimized_ops(model, tmp_path)
    assert ops["MatMulNBits"] == 1 and ops["MatMul"] == 0, ops

    w = numpy_helper.to_array(fp32.graph.initializer[0])
    rule = spec.weight_rule("MatMul", precision)
    expected = fake_quantize_blockwise(w, precision, 32, rule.symmetric, rule.narrow_range)
    x = np.random.default_rng(3).standard_normal((4, k)).astype(np.float32)
    exact = run(model, x, exact=True)
    np.testing.assert_allclose(exact, x @ expected, rtol=1e-4, atol=1e-4)  # the simulation is exact
    fused = run(model, x, exact=False)
    # MatMulNBits may quantize each activation row to int8 (accuracy level 4): one step of that grid
    step = np.abs(x).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(fused - exact) <= step * np.abs(expected).sum(axis=0, keepdims=True) + 1e-4)


def test_int4_weights_are_packed_half_a_byte(tmp_path: Path) -> None:
    k, n = 256, 128
    result = quantize(matmul_model(k, n), feeds((4, k)), "ort-cpu-x86", plan={"mm": "int4b32/fp32"})
    codes = [t for t in result.model.graph.initializer if t.data_type in (TensorProto.INT4, TensorProto.UINT4)]
    assert codes and all(len(t.raw_data) == (np.prod(t.dims) + 1) // 2 and not t.int32_data for t in codes)
    path = tmp_path / "int4.onnx"
    onnx.save(result.model, str(path))
    scales = (k // 32) * n * 4
    assert path.stat().st_size < k * n * 0.5 + scales + 4096  # ~0.5 byte per weight on disk


def test_per_channel_int4_constants_are_packed_too() -> None:
    k, n = 64, 32
    result = quantize(matmul_model(k, n), feeds((4, k)), "ort-cpu-x86", plan={"mm": "int4/uint8"})
    codes = [t for t in result.model.graph.initializer if t.data_type == TensorProto.INT4]
    assert codes and all(t.raw_data and not t.int32_data for t in codes)
    np.testing.assert_array_equal(numpy_helper.to_array(codes[0]).shape, (k, n))
    # the rule prefers per_block, unusable beside uint8 activations: per-channel, not one scale
    (scale,) = [t for t in result.model.graph.initializer if t.name == "W_scale"]
    assert list(scale.dims) == [n]


# ------------------------------------------------------------------------------------ validate


def _spec_without_dynamic(tmp_path: Path) -> Path:
    data = json.loads((SPEC_DIR / "ort-cpu-x86.json").read_text())
    data["name"] = "ort-cpu-x86-static"
    for rule in data["ops"].values():
        if "candidates" in rule:
            rule["candidates"] = [c for c in rule["candidates"] if "dyn-" not in c]
    path = tmp_path / "static.json"
    path.write_text(json.dumps(data))
    return path


def test_validate_quantize_dynamic_output_needs_a_dynamic_candidate(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, out = tmp_path / "fp32.onnx", tmp_path / "dynamic.onnx"
    onnx.save(matmul_model(64, 32, bias=True), str(src))
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
    model = onnx.load(str(out))
    assert any(n.op_type == "MatMulInteger" for n in model.graph.node)
    assert validate_model(model, load_spec("ort-cpu-x86")) == []
    violations = validate_model(model, load_spec(str(_spec_without_dynamic(tmp_path))))
    assert any("int8/dyn-uint8" in v.found and v.op_type == "MatMulInteger" for v in violations), violations


@pytest.mark.slow
def test_cli_validate_reports_quantize_dynamic_output(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, out = tmp_path / "fp32.onnx", tmp_path / "dynamic.onnx"
    onnx.save(matmul_model(64, 32, bias=True), str(src))
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
    cli = run_cli("validate", str(out), "--spec", str(_spec_without_dynamic(tmp_path)))
    assert cli.code == 1 and "int8/dyn-uint8" in cli.stdout
    assert run_cli("validate", str(out), "--spec", "ort-cpu-x86").code == 0


def test_validate_qdq_dynamic_form_needs_a_dynamic_candidate(tmp_path: Path) -> None:
    model = quantize(matmul_model(64, 32), feeds((8, 64)), "ort-cpu-x86", precision="int8/dyn-uint8").model
    assert any(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node)
    assert not any(n.op_type == "MatMulInteger" for n in model.graph.node)  # the plain Q/DQ form
    violations = validate_model(model, load_spec(str(_spec_without_dynamic(tmp_path))))
    assert [(v.node, v.found) for v in violations] == [("mm", "candidate int8/dyn-uint8")]
    # hexagon-npu runs no per-call quantization at all
    assert any("dyn-uint8" in v.found for v in validate_model(model, load_spec("hexagon-npu")))


def test_validate_names_quantized_ops_it_does_not_know() -> None:
    inits = [numpy_helper.from_array(np.ones((4, 4), np.uint8), "B")] + [
        numpy_helper.from_array(np.asarray(v, dt), name) for name, v, dt in
        (("s", 0.1, np.float32), ("z", 0, np.uint8))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("QLinearMatMul", ["xq", "s", "z", "B", "s", "z", "s", "z"], ["yq"], name="qmm"),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])]
    model = _model(nodes, inits, [2, 4])
    violations = validate_model(model, load_spec("ort-cpu-x86"))
    assert [v.node for v in violations] == ["qmm"] and "not recognise" in violations[0].found


def test_spec_check_passes_on_every_builtin_spec() -> None:
    from onnxq.spec import check_spec_file

    for path in sorted(SPEC_DIR.glob("*.json")):
        if path.name != "schema.json":
            assert check_spec_file(path) == [], path.name


# ------------------------------------------------------------------------------------ cost


def test_cost_prices_fast_candidates_by_shape() -> None:
    spec = load_spec("ort-cpu-x86")
    dyn, int4 = Candidate.parse("int8/dyn-uint8"), Candidate.parse("int4b32/fp32")

    def ratio(rows: int, k: int, n: int, candidate: Candidate) -> float:
        layer = LayerCost("mm", "MatMul", rows * k * n, k * n, rows * k, rows * n, weight_channels=n)
        return estimate([layer], {"mm": candidate}, spec).latency_seconds / estimate([layer], {}, spec).latency_seconds

    # a dynamic layer reads and writes float: no Q/DQ boundary with float neighbours
    assert not boundary(dyn, Candidate.parse("fp32/fp32"))
    assert boundary(dyn, Candidate.parse("int8/uint8"))
    assert ratio(48, 768, 768, dyn) < 0.7
    assert ratio(1, 2048, 2048, dyn) < 0.5
    assert ratio(1, 2048, 2048, int4) < 0.5
    assert ratio(48, 2048, 2048, int4) > 1.0


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_cli_dynamic_int8_on_the_bundled_transformer(transformer_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "dyn.onnx"
    cli = run_cli("quantize", str(transformer_path), "--spec", "ort-cpu-x86", "--precision", "int8/dyn-uint8",
                  "-o", str(out), "--report", str(tmp_path / "r.json"))
    assert cli.code in (0, 1), cli.stderr  # 1: outside --max-drop, the model is still written
    assert "int8/dyn-uint8" in cli.stdout
    check = run_cli("validate", str(out), "--spec", "ort-cpu-x86")
    assert check.code == 0, check.stdout
    ops = optimized_ops(onnx.load(str(out)), tmp_path)
    assert ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] >= 10, ops
    assert ops["MatMulInteger"] == 0


# ------------------------------------------------------------------------------------ sensitivity


def _scaled_feeds(k: int) -> list[dict[str, np.ndarray]]:
    """One sample 100x larger than the others: the calibrated range is set by it and wastes the
    grid of every other sample; a per-call (batch-1) range fits each sample."""
    rng = np.random.default_rng(5)
    batches = [rng.standard_normal((8, k)).astype(np.float32) for _ in range(4)]
    batches[1][3] *= 100
    return [{"x": x} for x in batches]


def test_sensitivity_simulates_dynamic_activations_per_call() -> None:
    from onnxq.sensitivity.analyze import analyze

    model = matmul_model(64, 32)
    sens = analyze(model, _scaled_feeds(64), load_spec("ort-cpu-x86"),
                   {"mm": ["int8/uint8", "int8/dyn-uint8"]}, pairs=False, loss="mse")
    (layer,) = sens["layers"]
    static, dynamic = layer["candidates"]["int8/uint8"], layer["candidates"]["int8/dyn-uint8"]
    assert 0 < dynamic["activation"] < static["activation"] / 10


def test_bake_dynamic_matches_the_rewritten_model() -> None:
    """The sensitivity's per-call simulation (bake with DynamicQuant) is the written pattern."""
    from onnxq.simulate import DynamicQuant, bake, fake_quantize_array

    fp32 = matmul_model(64, 32)
    written = quantize(fp32, feeds((8, 64)), "ort-cpu-x86", precision="int8/dyn-uint8").model
    codes, w_scale = _dynamic_weight(written)
    w_dq = (codes * w_scale).astype(np.float32)
    per_call = bake(fp32, {"x": DynamicQuant(per_sample=False)}, {"W": w_dq})
    per_sample = bake(fp32, {"x": DynamicQuant()}, {"W": w_dq})
    for feed in _scaled_feeds(64):
        x = feed["x"]
        np.testing.assert_allclose(run(per_call, x, exact=True), run(written, x, exact=True), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fake_quantize_array(x, DynamicQuant(per_sample=False)) @ w_dq,
                                   run(written, x, exact=True), rtol=1e-4, atol=1e-5)
        # batch-1 calls: each row on its own grid, in the graph as in numpy, as the written model runs it
        rows = np.concatenate([run(written, x[i:i + 1], exact=True) for i in range(len(x))])
        np.testing.assert_allclose(run(per_sample, x, exact=True), rows, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fake_quantize_array(x, DynamicQuant()) @ w_dq, rows, rtol=1e-4, atol=1e-5)


def test_sensitivity_perturbs_blockwise_weights_block_wise() -> None:
    from onnxq.sensitivity.analyze import analyze

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((128, 32)) * 0.1).astype(np.float32)
    w[:32] *= 50  # one block of rows far larger than the rest: per-column scales waste the others
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [numpy_helper.from_array(w, "W")],
                   ["m", 128])
    sens = analyze(model, feeds((8, 128)), load_spec("ort-cpu-x86"), {"mm": ["int8/fp32", "int8b32/fp32"]},
                   pairs=False, loss="mse")
    (layer,) = sens["layers"]
    assert layer["candidates"]["int8b32/fp32"]["weight"] < layer["candidates"]["int8/fp32"]["weight"] / 4


# ------------------------------------------------------------------ layers with no dynamic or block-wise form

def _transposed_gemm() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A Gemm that transposes its activation (transA=1): no dynamic int8 pattern exists for it."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((8, 16)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transA=1, transB=1, alpha=0.7)]
    model = _model(nodes, [numpy_helper.from_array(w, "W")], [16, "m"], ["m", 8])
    return model, {"x": rng.standard_normal((16, 96)).astype(np.float32)}


def _batched_matmul() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A MatMul with a 3-D constant B (one matrix per head): no block-wise or dynamic form, and
    onnxruntime's MatMulInteger kernels refuse per-column parameters for it."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((4, 16, 8)) * 0.3).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="heads")], [numpy_helper.from_array(w, "W")],
                   [4, "m", 16], [4, "m", 8])
    return model, {"x": rng.standard_normal((4, 96, 16)).astype(np.float32)}


def _cosine_to_fp32(model: onnx.ModelProto, quantized: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    ref = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0].ravel()
    out = ort.InferenceSession(quantized.SerializeToString()).run(None, feeds)[0].ravel()
    return float(ref @ out / (np.linalg.norm(ref) * np.linalg.norm(out)))


@pytest.mark.parametrize("make", [_transposed_gemm, _batched_matmul], ids=["gemm-transA", "matmul-3d-weight"])
def test_the_search_never_plans_a_form_the_layer_cannot_take(make) -> None:  # type: ignore[no-untyped-def]
    # the search used to plan dynamic int8 / block-wise here and crash in the rewrite
    model, calib = make()
    options = QuantizeOptions(progress=False, cache_dir="", objective="size")
    result = quantize(model, calib, "ort-cpu-x86", options=options)
    assert result.target_met, result.report.get("shortfall")
    assert _cosine_to_fp32(model, result.model, calib) > 0.99


def test_a_batched_matmul_weight_is_quantized_per_tensor_and_runs() -> None:
    # per-column scales on a 3-D B fused into MatMulIntegerToFloat, which failed at run time
    model, calib = _batched_matmul()
    result = quantize(model, calib, "ort-cpu-x86", precision="int8/uint8", options=QuantizeOptions(progress=False, cache_dir=""))
    scales = [i for i in result.model.graph.initializer if i.name.startswith("W") and i.name.endswith("_scale")]
    assert scales and all(len(s.dims) == 0 for s in scales)
    assert _cosine_to_fp32(model, result.model, calib) > 0.999


def test_uniform_dynamic_takes_static_int8_where_no_dynamic_form_exists() -> None:
    model, calib = _transposed_gemm()
    result = quantize(model, calib, "ort-cpu-x86", precision="int8/dyn-uint8", options=QuantizeOptions(progress=False, cache_dir=""))
    assert result.report["plan"]["layers"]["fc"] == "int8/uint8"
    assert _cosine_to_fp32(model, result.model, calib) > 0.99
    with pytest.raises(PlanError, match="transA"):
        quantize(model, calib, "ort-cpu-x86", plan={"fc": "int8/dyn-uint8"}, options=QuantizeOptions(progress=False, cache_dir=""))
