"""The bounded-memory sensitivity engine: shared weights, chunked feeds, pairs on cut sessions.

Real onnxruntime sessions on the bundled models and on small text-built graphs (no mocks).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import analyze_on_the_fake_quant_session

from onnxq.graph import GraphView
from onnxq.model import load_model
from onnxq.numerics import qparams_from_range
from onnxq.precision import Candidate, Precision
from onnxq.sensitivity import analyze
from onnxq.sensitivity.engine import (
    ActivationQuant,
    EvalContext,
    Evaluator,
    Job,
    Segment,
    WeightPerturbation,
    WeightQuantizer,
    plan_chunks,
)
from onnxq.spec import load_spec

MODELS = Path(__file__).resolve().parent.parent / "models"
RESNET = MODELS / "digits_resnet.onnx"
W8, W4, A8 = Candidate.parse("int8/uint8"), Candidate.parse("int4/uint8"), Candidate.parse("uint8/uint8")
BLOCK = ["/blocks/blocks.0/conv1/conv1.0/Conv", "/blocks/blocks.0/conv2/conv2.0/Conv", "/blocks/blocks.0/Add"]


def _feeds(model: Path, samples: int, batch: int) -> list[dict[str, np.ndarray]]:
    with np.load(model.with_name(f"{model.stem}.calib.npz"), allow_pickle=False) as data:
        arrays = {k: data[k][:samples] for k in data.files}
    return [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, samples, batch)]


@pytest.fixture(scope="module")
def spec():  # type: ignore[no-untyped-def]
    return load_spec("ort-cpu-x86")


@pytest.fixture(scope="module")
def resnet():  # type: ignore[no-untyped-def]
    return load_model(RESNET).proto


def _block_candidates() -> dict[str, list[Candidate]]:
    return {n: [A8] if n.endswith("Add") else [W8, W4] for n in BLOCK}


def _deltas(sens: dict) -> dict[tuple[str, str], float]:
    return {(row["name"], c): e["delta"] for row in sens["layers"] for c, e in row["candidates"].items()}


@pytest.mark.slow  # 3-16 s on the shared machine
def test_shared_weight_sessions_give_the_deltas_of_the_fake_quant_session(resnet, spec) -> None:  # type: ignore[no-untyped-def]
    feeds = _feeds(RESNET, 8, 8)
    kwargs = dict(candidates=_block_candidates(), seed=0, pairs=False, method="central")
    fast = analyze(resnet, feeds, spec, **kwargs)
    slow = analyze_on_the_fake_quant_session(resnet, feeds, spec, **kwargs)
    expected = _deltas(slow)
    for key, value in _deltas(fast).items():
        assert value == pytest.approx(expected[key], rel=0.02, abs=1e-8), key


def test_cut_sessions_hold_no_copy_of_the_weights() -> None:
    # four 512x512 MatMuls (1 MiB of weights each): every cut session used to embed the weights
    # downstream of its cut; now they are graph inputs fed from the one shared array
    size, depth = 512, 4
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(depth):
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal((size, size)).astype(np.float32) / 20, f"w{i}"))
        nodes.append(onnx.helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", size])],
        [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["n", size])], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    model = onnx.shape_inference.infer_shapes(model)
    segments = tuple(Segment(f"mm{i}", (f"w{i}",), (("x",) if i == 0 else (f"h{i - 1}",))) for i in range(depth))
    feeds = ({"x": rng.standard_normal((8, size)).astype(np.float32)},)
    context = EvalContext(model.SerializeToString(), feeds, (), tuple(f"w{i}" for i in range(depth)), {}, "mse",
                          segments=segments, cache_bytes=1 << 30)
    evaluator = Evaluator(context)
    evaluator.set_reference(evaluator.fp32_outputs())
    quantizer = WeightQuantizer("w0", Precision.INT4, 1, True, False, "minmax")
    assert evaluator.loss(Job((WeightPerturbation("w0", 1.0, quantizer),), segments=("mm0",))) > 0
    runner = evaluator.suffix
    assert runner is not None
    for i in range(depth):
        runner.session(f"w:mm{i}")
    assert set(evaluator.shared) == {f"w{i}" for i in range(depth)}
    assert not any(t.name.startswith("w") for t in evaluator.model.graph.initializer)
    for _, _, shared in runner._sessions.values():
        for name, value in shared.items():
            assert value is evaluator.shared[name]  # the same array, not a copy


@pytest.mark.slow  # 3-16 s on the shared machine
def test_a_small_memory_budget_gives_several_chunks_and_the_same_result(resnet, spec) -> None:  # type: ignore[no-untyped-def]
    feeds = _feeds(RESNET, 8, 8)
    kwargs = dict(candidates=_block_candidates(), seed=0, pairs=True)
    whole = analyze(resnet, feeds, spec, **kwargs)
    chunked = analyze(resnet, feeds, spec, memory_budget_mb=1.2, **kwargs)
    assert whole["memory"]["chunks"] == 1
    assert chunked["memory"]["chunks"] > 2
    assert chunked["memory"]["cached_mib"] <= 1.2
    expected = _deltas(whole)
    for key, value in _deltas(chunked).items():
        assert value == pytest.approx(expected[key], rel=1e-4, abs=1e-10), key
    for a, b in zip(whole["pairs"], chunked["pairs"], strict=True):
        assert a["cross"] == pytest.approx(b["cross"], rel=1e-3, abs=1e-9)


def test_plan_chunks_cuts_batches_to_the_budget() -> None:
    feeds = [{"x": np.zeros((10, 4), np.float32)}, {"x": np.zeros((6, 4), np.float32)}]
    # 16 bytes of input per sample, 10x that cached: 160 bytes per sample, budget 3 samples
    chunks = plan_chunks(feeds, 10.0, 480, splittable=True)
    sizes = [sum(len(f["x"]) for f in chunk) for chunk in chunks]
    assert sum(sizes) == 16 and max(sizes) <= 3
    assert plan_chunks(feeds, 10.0, 1 << 20, splittable=True) == [feeds]


def test_unsplittable_feed_over_budget_is_logged(caplog) -> None:  # type: ignore[no-untyped-def]
    feeds = [{"x": np.zeros((10, 4), np.float32)}]
    with caplog.at_level(logging.WARNING):
        chunks = plan_chunks(feeds, 10.0, 100, splittable=False)
    assert len(chunks) == 1 and "memory budget" in caplog.text


@pytest.mark.slow  # 3-16 s on the shared machine
def test_pair_terms_run_on_cut_sessions_and_match_the_slow_path(resnet, spec) -> None:  # type: ignore[no-untyped-def]
    feeds = _feeds(RESNET, 8, 8)
    kwargs = dict(candidates=_block_candidates(), seed=0, pairs=True)
    fast = analyze(resnet, feeds, spec, **kwargs)
    slow = analyze_on_the_fake_quant_session(resnet, feeds, spec, **kwargs)
    assert fast["pairs"]
    for a, b in zip(fast["pairs"], slow["pairs"], strict=True):
        assert (a["a"], a["b"], a["candidates"]) == (b["a"], b["b"], b["candidates"])
        assert a["cross"] == pytest.approx(b["cross"], rel=0.1, abs=2e-7)
    # the chain pair conv1 → conv2 (conv2's input activation computed by conv1's cut session)
    # runs on the cut sessions
    view = GraphView(resnet, {"Conv", "Add"})
    conv1, conv2 = BLOCK[:2]
    runner = Evaluator(EvalContext(
        resnet.SerializeToString(), tuple(feeds), (), (), {}, "mse",
        segments=(Segment(conv1, (view.layers[conv1].weight.tensor,), tuple(view.layers[conv1].activations), (conv2,)),
                  Segment(conv2, (view.layers[conv2].weight.tensor,), tuple(view.layers[conv2].activations), (conv1,))),
    )).suffix
    assert runner is not None
    acts = {t: qparams_from_range(0.0, 4.0, Precision.UINT8, False)
            for t in (*view.layers[conv1].activations, *view.layers[conv2].activations)}
    assert runner.plan((conv1, conv2), acts) == [f"a:{conv1}", f"a:{conv2}"]


def test_one_sided_weight_term_is_the_single_layer_loss(resnet, spec) -> None:  # type: ignore[no-untyped-def]
    feeds = _feeds(RESNET, 8, 8)
    only = {BLOCK[0]: [Candidate.parse("int4/fp32")]}
    sens = analyze(resnet, feeds, spec, only, seed=0, pairs=False)
    central = analyze(resnet, feeds, spec, only, seed=0, pairs=False, method="central")
    assert sens["method"] == "onesided" and sens["evaluations"] == central["evaluations"] - 1
    one, two = (s["layers"][0]["candidates"]["int4/fp32"]["weight"] for s in (sens, central))
    assert one > 0 and one == pytest.approx(two, rel=0.5)


def test_activation_job_uses_cut_tensor(resnet) -> None:  # type: ignore[no-untyped-def]
    # a weightless Add's two inputs quantized: one session, no fallback
    view = GraphView(resnet, {"Add"})
    add = view.layers[BLOCK[2]]
    segment = Segment(add.name, (), tuple(add.activations))
    feeds = tuple(_feeds(RESNET, 8, 8))
    context = EvalContext(resnet.SerializeToString(), feeds, tuple(add.activations), (),
                          {t: (-4.0, 4.0) for t in add.activations}, "mse", segments=(segment,))
    evaluator = Evaluator(context)
    evaluator.set_reference(evaluator.fp32_outputs())
    job = Job((), tuple(ActivationQuant(t, Precision.UINT8, False) for t in add.activations), (add.name,))
    assert evaluator.loss(job) > 0 and not evaluator.fallbacks


CNN = MODELS / "digits_cnn.onnx"


def test_evaluations_stop_once_their_loss_is_known(spec) -> None:  # type: ignore[no-untyped-def]
    """On more than 32 samples an evaluation stops when its standard error is within the
    tolerance: fewer session runs, the same deltas within that error, the same ranking."""
    model = load_model(CNN).proto
    feeds = _feeds(CNN, 128, 32)
    kwargs = dict(max_samples=128, pairs=False, seed=0)
    full = analyze(model, feeds, spec, tolerance=0, **kwargs)
    early = analyze(model, feeds, spec, **kwargs)
    assert full["stopped_early"] == 0
    assert early["stopped_early"] > len(early["layers"]) // 2
    expected, got = _deltas(full), _deltas(early)
    typical = float(np.median(list(expected.values())))
    for key, value in got.items():
        assert abs(value - expected[key]) <= 0.35 * max(expected[key], typical), key
    keys = sorted(expected)
    rho = np.corrcoef(np.argsort(np.argsort([expected[k] for k in keys])),
                      np.argsort(np.argsort([got[k] for k in keys])))[0, 1]
    assert rho > 0.95


def test_analyses_on_32_samples_use_every_sample(spec) -> None:  # type: ignore[no-untyped-def]
    """Inside ``quantize`` (at most 32 samples) every evaluation runs on every sample."""
    model = load_model(CNN).proto
    feeds = _feeds(CNN, 32, 16)
    early = analyze(model, feeds, spec, max_samples=32, pairs=False, seed=0)
    full = analyze(model, feeds, spec, max_samples=32, pairs=False, seed=0, tolerance=0)
    assert early["stopped_early"] == 0
    assert _deltas(early) == _deltas(full)
