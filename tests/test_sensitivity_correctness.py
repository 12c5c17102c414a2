"""The sensitivity analysis and the search predict what the rewrite will produce (issue 11,
items 6-9, 11, 12): small graphs built here, every number checked against an independent
computation or the real quantized model run in onnxruntime."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxq.passes.search import SearchPass, build_problem

import onnxq
from onnxq.api import layer_ops_for
from onnxq.cli import main
from onnxq.data import load_feeds
from onnxq.graph import GraphView
from onnxq.model import load_model
from onnxq.options import QuantizeOptions
from onnxq.pipeline import PassContext, Pipeline
from onnxq.precision import Candidate, is_integer
from onnxq.search.candidates import SearchSpace
from onnxq.sensitivity import analyze, predicted_loss
from onnxq.sensitivity.analyze import EVALUATION_COUNTER
from onnxq.spec import load_spec
from onnxq.subgraphs import ensure_unique_node_names

MODELS = Path(__file__).resolve().parent.parent / "models"
CNN = MODELS / "digits_cnn.onnx"
W8, W4 = Candidate.parse("int8/uint8"), Candidate.parse("int4/uint8")


def _model(nodes, inputs, outputs, inits, opset: int = 13) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _float(name: str, shape: list) -> onnx.ValueInfoProto:  # type: ignore[type-arg]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], exact: bool = False) -> list[np.ndarray]:
    """The first output per feed; ``exact``: Q/DQ computed as written, not by fused integer
    kernels (which differ by up to one quantization step, ORT_FACTS.md), the arithmetic the
    sensitivity simulates."""
    options = ort.SessionOptions()
    if exact:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [session.run(None, feed)[0] for feed in feeds]


def _mse(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """The sensitivity's ``mse`` loss, from its definition: the mean over samples of the mean
    squared error per output element."""
    per_sample = [np.mean((r.astype(np.float64) - o) ** 2, axis=-1) for r, o in zip(reference, outputs, strict=True)]
    return float(np.mean(np.concatenate(per_sample)))


# -- item 7: Hutchinson's trace against an exact quadratic ----------------------------------------

def test_hutchinson_trace_matches_an_exact_quadratic() -> None:
    # y = x·W with x = sqrt(c)·I: the mse loss L(W + D) = c·|D|² / (N·B) is exactly quadratic,
    # with Hessian 2c/(N·B)·I, so Tr(H) = 2c·K·N/(N·B) = 2c (B = K) and every Rademacher
    # direction gives vᵀHv = Tr(H) exactly
    k, n, c = 8, 4, 4.0
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(k, n)).astype(np.float32), "w")
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_float("x", ["b", k])],
                   [_float("y", ["b", n])], [w])
    feeds = [{"x": (np.sqrt(c) * np.eye(k)).astype(np.float32)}]
    spec = load_spec("ort-cpu-x86")
    common = dict(candidates={"mm": [W4, W8]}, pairs=False, loss="mse", max_samples=None)
    hutch = analyze(model, feeds, spec, method="hutchinson", **common)
    central = analyze(model, feeds, spec, method="central", **common)
    (row,) = hutch["layers"]
    assert row["hessian_trace"] == pytest.approx(2 * c, rel=1e-3)
    for candidate in ("int4/uint8", "int8/uint8"):
        exact = central["layers"][0]["candidates"][candidate]["weight"]  # ½ΔWᵀHΔW, exact on a quadratic
        assert row["candidates"][candidate]["weight"] == pytest.approx(exact, rel=1e-2)


# -- item 7: cross terms bounded, pair predictions never negative ---------------------------------

TRANSFORMER = MODELS / "digits_transformer.onnx"


def test_cross_terms_obey_cauchy_schwarz() -> None:
    # on the transformer, these two pairs measure cross terms outside |cross| <= 2 sqrt(da db)
    spec = load_spec("ort-cpu-x86")
    model = load_model(TRANSFORMER).proto
    with np.load(TRANSFORMER.with_name("digits_transformer.calib.npz"), allow_pickle=False) as data:
        feeds = [{"input_ids": data["input_ids"][:16]}]
    a8 = "uint8/uint8"
    candidates = {"/layers.0/attn/MatMul": [a8], "/layers.0/attn/Softmax": [a8],
                  "/layers.1/attn/out/MatMul": ["int8/uint8", "int4/uint8"], "/layers.1/Add": [a8]}
    sens = analyze(model, feeds, spec, candidates)
    deltas = {(row["name"], c): max(e["delta"], 0.0) for row in sens["layers"] for c, e in row["candidates"].items()}
    assert len(sens["pairs"]) == 3
    for pair in sens["pairs"]:
        ca, cb = pair["candidates"]
        bound = 2 * np.sqrt(deltas[(pair["a"], ca)] * deltas[(pair["b"], cb)])
        assert abs(pair["cross"]) <= bound * (1 + 1e-9) + 1e-15, pair
        assert predicted_loss(sens, {pair["a"]: ca, pair["b"]: cb}) >= 0, pair


def _kl(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """The sensitivity's ``kl`` loss from its definition: mean over samples of
    KL(softmax(fp32) ‖ softmax(quantized))."""
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    per_sample = [np.sum(np.exp(log_softmax(r)) * (log_softmax(r) - log_softmax(o)), -1)
                  for r, o in zip(reference, outputs, strict=True)]
    return float(np.mean(np.concatenate(per_sample)))


@pytest.mark.slow
def test_pair_predictions_match_the_real_quantized_models() -> None:
    # the loss each measured pair's plan predicts against the loss of the model the rewrite
    # writes (run exactly in onnxruntime): close, and closer with the cross terms than without
    spec = load_spec("ort-cpu-x86")
    model = load_model(CNN).proto
    with np.load(CNN.with_name("digits_cnn.calib.npz"), allow_pickle=False) as data:
        feeds = [{"input": data["input"][i:i + 8]} for i in range(0, 32, 8)]
    view = GraphView(model, layer_ops_for(spec))
    candidates = {name: [W8, W4] if layer.weight is not None else [Candidate.parse("uint8/uint8")]
                  for name, layer in view.layers.items()}
    sens = analyze(model, feeds, spec, candidates, seed=0)
    reference = _run(model, feeds)
    with_cross, without = [], []
    for pair in [p for p in sens["pairs"] if p["scaling"] == "measured"][:10]:
        plan = {pair["a"]: pair["candidates"][0], pair["b"]: pair["candidates"][1]}
        result = onnxq.quantize(model, feeds, spec, plan=plan, options=QuantizeOptions(progress=False))
        real = _kl(reference, _run(result.model, feeds, exact=True))
        with_cross.append(abs(np.log(predicted_loss(sens, plan) / real)))
        without.append(abs(np.log(predicted_loss({"layers": sens["layers"]}, plan) / real)))
    assert max(with_cross) < np.log(1.3), with_cross
    assert np.mean(with_cross) < np.mean(without), (with_cross, without)


def test_the_search_bounds_cross_terms_it_is_given() -> None:
    # a stale or hand-edited sensitivity file with an impossible cross term must not let the
    # solver predict a negative loss
    spec = load_spec("ort-cpu-x86")
    view = GraphView(load_model(CNN).proto, layer_ops_for(spec))
    a, b = "/blocks/blocks.0/dw/dw.0/Conv", "/blocks/blocks.0/pw/pw.0/Conv"
    sens = {"layers": [{"name": a, "candidates": {"int8/uint8": {"delta": 1e-4}}},
                       {"name": b, "candidates": {"int8/uint8": {"delta": 4e-4}}}],
            "pairs": [{"a": a, "b": b, "candidates": ["int8/uint8", "int8/uint8"], "cross": -1.0}]}
    fp32 = Candidate.parse("fp32/fp32")
    space = SearchSpace(layers={a: (fp32, W8), b: (fp32, W8)})
    from onnxq.passes.search import _Costs  # noqa: PLC0415 - the cost table the pass builds

    problem = build_problem(space, sens, _Costs([view], spec), "balanced")
    loss, _ = problem.evaluate({a: W8, b: W8})
    assert loss == pytest.approx(1e-4 + 4e-4 - 2 * np.sqrt(1e-4 * 4e-4))
    assert loss >= 0


# -- item 6: the model the rewrite produces --------------------------------------------------------

def _wide_matmul(opset: int) -> onnx.ModelProto:
    # columns of very different magnitudes: one per-tensor scale crushes the small ones, per
    # channel (what the rewrite writes from opset 13 on) does not
    scales = np.logspace(-2, 1, 16).astype(np.float32)
    w = numpy_helper.from_array(np.random.default_rng(1).normal(size=(16, 16)).astype(np.float32) * scales, "w")
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_float("x", ["b", 16])],
                  [_float("y", ["b", 16])], [w], opset=opset)


def test_an_old_opset_model_is_analysed_per_channel_like_the_rewrite() -> None:
    spec = load_spec("ort-cpu-x86")
    feeds = [{"x": np.random.default_rng(2).normal(size=(32, 16)).astype(np.float32)}]
    kwargs = dict(candidates={"mm": [W8]}, pairs=False, loss="mse")
    old = analyze(_wide_matmul(11), feeds, spec, **kwargs)["layers"][0]["candidates"]["int8/uint8"]["weight"]
    new = analyze(_wide_matmul(13), feeds, spec, **kwargs)["layers"][0]["candidates"]["int8/uint8"]["weight"]
    assert old == pytest.approx(new, rel=1e-3)


def _matmul_then_float(wide_column: float) -> onnx.ModelProto:
    # mm's output feeds a float op (Tanh): the rewrite puts a Q on it; one output column
    # ``wide_column`` times larger than the others makes that Q's per-tensor grid coarse for all
    w = np.random.default_rng(3).normal(size=(16, 16)).astype(np.float32) * 0.3
    w[:, 0] *= wide_column
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Tanh", ["h"], ["y"], name="squash")]
    return _model(nodes, [_float("x", ["b", 16])], [_float("y", ["b", 16])], [numpy_helper.from_array(w, "w")])


def test_the_output_q_of_an_int_layer_feeding_a_float_layer_is_counted() -> None:
    spec = load_spec("ort-cpu-x86")
    x = np.random.default_rng(4).uniform(0, 1, size=(64, 16)).astype(np.float32)
    feeds = [{"x": x[i:i + 8]} for i in range(0, 64, 8)]
    model = _matmul_then_float(30.0)
    sens = analyze(model, feeds, spec, {"mm": [W8]}, pairs=False, loss="mse", max_samples=None)
    predicted = sens["layers"][0]["candidates"]["int8/uint8"]["delta"]
    result = onnxq.quantize(model, feeds, spec, plan={"mm": "int8/uint8"}, options=QuantizeOptions(progress=False))
    real = _mse(_run(model, feeds), _run(result.model, feeds, exact=True))
    assert predicted == pytest.approx(real, rel=0.3)


def test_the_calibration_method_reaches_the_sensitivity() -> None:
    spec = load_spec("ort-cpu-x86")
    model = _matmul_then_float(1.0)
    x = np.random.default_rng(5).normal(size=(4096, 16)).astype(np.float32)
    x[0, 0] = 80.0  # one outlier: minmax spends the grid on it, the 99.99th percentile clips it
    feeds = [{"x": x}]
    kwargs = dict(candidates={"mm": [W8]}, pairs=False, loss="mse", max_samples=None)
    minmax = analyze(model, feeds, spec, calibration="minmax", **kwargs)
    clipped = analyze(model, feeds, spec, calibration="percentile", **kwargs)
    assert clipped["layers"][0]["candidates"]["int8/uint8"]["activation"] < \
        0.5 * minmax["layers"][0]["candidates"]["int8/uint8"]["activation"]


# -- item 8: cache keys ------------------------------------------------------------------------------

def test_a_changed_spec_with_the_same_name_misses_the_cache(tmp_path: Path) -> None:
    spec = load_spec("ort-cpu-x86")
    model = _wide_matmul(13)
    feeds = [{"x": np.random.default_rng(6).normal(size=(16, 16)).astype(np.float32)}]
    kwargs = dict(candidates={"mm": [W8]}, pairs=False, loss="mse", cache_dir=tmp_path)
    first = analyze(model, feeds, spec, **kwargs)
    data = json.loads((MODELS.parent / "hardware_specs" / "ort-cpu-x86.json").read_text())
    # same name, per-tensor int8 weights only
    for quantizer in data["quantizers"].values():
        if quantizer["precision"] == "int8" and "per_channel" in quantizer.get("granularity", []):
            quantizer["granularity"] = ["per_tensor"]
    path = tmp_path / "ort-cpu-x86.json"
    path.write_text(json.dumps(data))
    changed = load_spec(str(path))
    assert changed.name == spec.name
    before = EVALUATION_COUNTER.total
    second = analyze(model, feeds, changed, **kwargs)
    assert EVALUATION_COUNTER.total > before
    assert second["layers"][0]["candidates"]["int8/uint8"]["weight"] != \
        first["layers"][0]["candidates"]["int8/uint8"]["weight"]


def test_cache_keys_carry_the_algorithm_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calibration_cache = importlib.import_module("onnxq.calibration.cache")
    sensitivity = importlib.import_module("onnxq.sensitivity.analyze")

    spec = load_spec("ort-cpu-x86")
    model = _wide_matmul(13)
    feeds = [{"x": np.random.default_rng(7).normal(size=(16, 16)).astype(np.float32)}]
    kwargs = dict(candidates={"mm": [W8]}, pairs=False, loss="mse", cache_dir=tmp_path)
    analyze(model, feeds, spec, **kwargs)
    sens_files = set(tmp_path.glob("sens-*.json"))
    calib_files = set(tmp_path.glob("calib-*.json"))
    monkeypatch.setattr(sensitivity, "ALGORITHM_VERSION", sensitivity.ALGORITHM_VERSION + 1)
    monkeypatch.setattr(calibration_cache, "ALGORITHM_VERSION", calibration_cache.ALGORITHM_VERSION + 1)
    analyze(model, feeds, spec, **kwargs)
    assert set(tmp_path.glob("sens-*.json")) > sens_files
    assert set(tmp_path.glob("calib-*.json")) > calib_files


# -- item 9: feeds of different shapes ---------------------------------------------------------------

def text_model() -> onnx.ModelProto:
    """Token ids [batch, seq] (dynamic sequence axis) → embedding → MatMul → Relu → mean over the
    sequence → Gemm → logits [batch, 6]."""
    rng = np.random.default_rng(8)
    inits = [numpy_helper.from_array(rng.normal(size=(50, 16)).astype(np.float32), "embedding"),
             numpy_helper.from_array((rng.normal(size=(16, 16)) * 0.4).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.normal(size=(16, 6)) * 0.4).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([1], np.int64), "seq_axis")]
    nodes = [helper.make_node("Gather", ["embedding", "ids"], ["emb"], name="embed"),
             helper.make_node("MatMul", ["emb", "w1"], ["h"], name="proj"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("ReduceMean", ["r"], ["pooled"], name="pool", axes=[1], keepdims=0),
             helper.make_node("Gemm", ["pooled", "w2"], ["logits"], name="head")]
    return _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                  [_float("logits", ["batch", 6])], inits[:3])


def _sentences(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(9)
    return [{"ids": rng.integers(0, 50, size=(1, int(length))).astype(np.int64)}
            for length in rng.integers(5, 15, size=count)]


def test_feeds_of_different_lengths_from_the_api() -> None:
    feeds = _sentences(24)
    assert len({f["ids"].shape for f in feeds}) > 3
    spec = load_spec("ort-cpu-x86")
    sens = analyze(text_model(), feeds, spec, pairs=True)
    assert {row["name"] for row in sens["layers"]} >= {"proj", "head"}
    result = onnxq.quantize(text_model(), feeds, spec, max_drop=0.05, options=QuantizeOptions(progress=False))
    assert result.report["search"]["evaluations"] >= 1


def test_feeds_of_different_lengths_from_the_cli(tmp_path: Path) -> None:
    model_path = tmp_path / "text.onnx"
    onnx.save(text_model(), model_path)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, feed in enumerate(_sentences(24)):
        np.savez(calib / f"sentence{i:03d}.npz", **feed)
    code = main(["quantize", str(model_path), "-o", str(tmp_path / "q.onnx"), "--spec", "ort-cpu-x86",
                 "--calib", str(calib), "--max-drop", "0.05", "--quiet", "--report", str(tmp_path / "r.json")])
    assert code in (0, 1)
    assert (tmp_path / "q.onnx").exists()
    code = main(["sensitivity", str(model_path), "--spec", "ort-cpu-x86", "--calib", str(calib),
                 "-o", str(tmp_path / "sens.json"), "--quiet"])
    assert code == 0 and json.loads((tmp_path / "sens.json").read_text())["layers"]


# -- item 11: layers inside an If get per-layer choices ------------------------------------------------

def wrapped_model() -> onnx.ModelProto:
    """The whole network inside an If: ``mm1`` is robust; ``mm2``'s input has one (unused)
    column shifted far away, so a per-tensor uint8 grid there erases the others: it must stay float."""
    rng = np.random.default_rng(10)
    shift = np.zeros(32, np.float32)
    shift[0] = 200.0
    w2 = (rng.normal(size=(32, 8)) * 0.3).astype(np.float32)
    w2[0] = 0.0
    branch_inits = [numpy_helper.from_array((rng.normal(size=(16, 32)) * 0.3).astype(np.float32), "w1"),
                    numpy_helper.from_array(shift, "shift"), numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Tanh", ["h"], ["t"], name="squash"),
             helper.make_node("Add", ["t", "shift"], ["ts"], name="offset"),
             helper.make_node("MatMul", ["ts", "w2"], ["y_then"], name="mm2")]
    then = helper.make_graph(nodes, "then", [], [_float("y_then", ["b", 8])], branch_inits)
    other = helper.make_graph([helper.make_node("MatMul", ["x", "w_else"], ["y_else"], name="mm_else")], "else", [],
                              [_float("y_else", ["b", 8])],
                              [numpy_helper.from_array(np.zeros((16, 8), np.float32), "w_else")])
    gate = helper.make_node("If", ["flag"], ["y"], name="gate", then_branch=then, else_branch=other)
    return _model([gate], [_float("x", ["b", 16]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                  [_float("y", ["b", 8])], [], opset=17)


def test_layers_inside_an_if_get_per_layer_precisions() -> None:
    x = np.random.default_rng(11).normal(size=(64, 16)).astype(np.float32)
    feeds = [{"x": x[i:i + 16], "flag": np.array(True)} for i in range(0, 64, 16)]
    spec = load_spec("ort-cpu-x86")
    model = wrapped_model()
    ensure_unique_node_names(model)
    sens = analyze(model, feeds, spec)
    scoped = {row["name"]: row for row in sens["layers"] if row.get("scope")}
    assert {"mm1", "mm2"} <= set(scoped)
    assert scoped["mm2"]["candidates"]["int8/uint8"]["delta"] > 10 * scoped["mm1"]["candidates"]["int8/uint8"]["delta"]
    # objective size: which toy plan runs fastest is machine load, not what this test is about
    result = onnxq.quantize(model, feeds, spec, max_drop=0.01,
                            options=QuantizeOptions(progress=False, metric="cosine", objective="size"))
    plan = {name: Candidate.parse(text) for name, text in result.report["plan"]["layers"].items()}
    assert result.target_met and result.report["metric"]["drop"] <= 0.01
    inside = {name: plan.get(name, Candidate.parse("fp32/fp32")) for name in ("mm1", "mm2", "mm_else")}
    # chosen layer by layer (not one 8-bit candidate for the whole subgraph, or nothing)
    assert len(set(inside.values())) >= 2 and any(c != Candidate.parse("fp32/fp32") for c in inside.values())
    assert not is_integer(inside["mm2"].activations)  # its uint8 input grid would erase its input


@pytest.mark.parametrize("kind", ["loop", "scan"])
def test_layers_inside_loop_and_scan_bodies_are_analysed(kind: str) -> None:
    from test_control_flow import loop_model, scan_model  # noqa: PLC0415 - the control-flow test graphs

    rng = np.random.default_rng(14)
    if kind == "loop":
        model, feeds = loop_model(), [{"x": rng.normal(size=(8, 16)).astype(np.float32)} for _ in range(4)]
    else:
        model = scan_model()
        feeds = [{"s0": rng.normal(size=(8, 16)).astype(np.float32),
                  "xs": rng.normal(size=(4, 8, 16)).astype(np.float32)} for _ in range(4)]
    ensure_unique_node_names(model)
    sens = analyze(model, feeds, load_spec("ort-cpu-x86"), pairs=False)
    rows = [row for row in sens["layers"] if row.get("scope")]
    assert len(rows) >= 2
    for row in rows:  # every integer candidate of a layer inside the body perturbs the outputs
        integer = [e["delta"] for c, e in row["candidates"].items() if not Candidate.parse(c).is_float]
        assert integer and min(integer) > 0, row


# -- item 12: an integer-only target's front spans its candidates ---------------------------------------

def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(12)
    sizes = [(16, 64), (64, 64), (64, 10)]
    inits = [numpy_helper.from_array((rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32), f"w{i}")
             for i, shape in enumerate(sizes)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="mm0"),
             helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["logits"], name="mm2")]
    return _model(nodes, [_float("x", ["b", 16])], [_float("logits", ["b", 10])], inits)


def test_integer_only_front_spans_the_integer_candidates() -> None:
    # no fp32 on the target: "predicted lossless" is infeasible, yet the front must reach the
    # least lossy integer plan (int8), not stop at the cheapest one (int4)
    spec = load_spec("edge-int-only")
    model = _mlp()
    x = np.random.default_rng(13).normal(size=(128, 16)).astype(np.float32)
    calib = [{"x": x[i:i + 16]} for i in range(0, 128, 16)]
    ctx = PassContext(model=model, options=QuantizeOptions(progress=False, max_drop=0.02))
    ctx.artifacts.update({"spec": spec, "feeds": load_feeds(calib, model, batch_size=16), "fp32_model": model})
    ctx.analyses.register("graph_view", lambda c: GraphView(c.model, layer_ops_for(spec)))
    ctx.analyses.register("scope_views", lambda c: [])
    Pipeline([SearchPass()]).run(ctx)
    front = ctx.artifacts["pareto_front"]
    assert len(front) >= 2
    assert "int4/int8" in front[0]["plan"] and set(front[-1]["plan"]) == {"int8/int8"}


@pytest.mark.parametrize("proj", ["fp32/fp32", "uint4b32/fp32", "int8/uint8"])
def test_layer_reading_a_weight_only_embedding_validates(proj: str) -> None:
    """A weight-only Gather hands its consumer dequantized codes. A float or block-wise MatMul
    after it computes in float; validate once rejected the written model as ``fp32/int8``."""
    feeds = _sentences(12)
    result = onnxq.quantize(text_model(), feeds, "ort-cpu-x86",
                            plan={"embed": "int8/fp32", "proj": proj, "head": "int8/uint8"},
                            options=QuantizeOptions(progress=False, cache_dir=""))
    assert result.report["plan"]["layers"]["embed"] == "int8/fp32"
    reference = ort.InferenceSession(text_model().SerializeToString(), providers=["CPUExecutionProvider"])
    quantized = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in feeds[:4]:
        expected = reference.run(None, feed)[0]
        got = quantized.run(None, feed)[0]
        assert np.corrcoef(expected.ravel(), got.ravel())[0, 1] > 0.95


# -- issue 13: fine grids predicted from a measured coarse one --------------------------------------

def test_fine_grids_are_predicted_as_measuring_them_would_give() -> None:
    # with an 8-bit candidate beside them, int16 and fp16 terms are predicted from its
    # measurement (noise-power scaling); alone, they are measured directly: both agree within
    # a factor of 3 on every layer, and the prediction saves the evaluations
    spec = load_spec("ort-cpu-x86")
    model = load_model(CNN).proto
    with np.load(CNN.with_name("digits_cnn.calib.npz"), allow_pickle=False) as data:
        feeds = [{"input": data["input"][i:i + 16]} for i in range(0, 32, 16)]
    view = GraphView(model, layer_ops_for(spec))
    names = [name for name, layer in view.layers.items() if layer.weight is not None][:6]
    i16, f16 = Candidate.parse("int16/int16"), Candidate.parse("fp16/fp16")
    common = dict(pairs=False, loss="mse", cache_dir=None)
    predicted = analyze(model, feeds, spec, {n: [W8, i16, f16] for n in names}, **common)
    measured = analyze(model, feeds, spec, {n: [i16, f16] for n in names}, **common)
    assert predicted["evaluations"] < measured["evaluations"]
    checked = 0
    for mine, direct in zip(predicted["layers"], measured["layers"], strict=True):
        for candidate in ("int16/int16", "fp16/fp16"):
            for term in ("weight", "activation"):
                p, m = mine["candidates"][candidate][term], direct["candidates"][candidate][term]
                assert (p == 0) == (m == 0), (mine["name"], candidate, term, p, m)
                if m:
                    assert 1 / 3 < p / m < 3, (mine["name"], candidate, term, p, m)
                    checked += 1
    assert checked >= 3 * len(names)


def test_asymmetric_grids_of_one_width_are_measured_once() -> None:
    # uint8 and asymmetric int8 activations dequantize to the same grid: one evaluation serves
    # both, and their terms are equal
    spec = load_spec("ort-cpu-x86")
    model = load_model(CNN).proto
    with np.load(CNN.with_name("digits_cnn.calib.npz"), allow_pickle=False) as data:
        feeds = [{"input": data["input"][:16]}]
    add = "/blocks/blocks.0/Add"
    common = dict(pairs=False, loss="mse", cache_dir=None)
    both = analyze(model, feeds, spec, {add: [Candidate.parse("uint8/uint8"), Candidate.parse("int8/int8")]}, **common)
    one = analyze(model, feeds, spec, {add: [Candidate.parse("uint8/uint8")]}, **common)
    (row,) = both["layers"]
    terms = {c: entry["activation"] for c, entry in row["candidates"].items()}
    assert len(terms) == 2 and len(set(terms.values())) == 1 and next(iter(terms.values())) > 0
    assert both["evaluations"] == one["evaluations"]
