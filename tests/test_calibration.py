"""Calibration: one sweep, the range methods, the cache, bad data (real onnxruntime)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibration import (
    CalibrationMethod,
    TensorRange,
    collect_ranges,
    weight_ranges,
)
from onnxq.calibration import sweep as sweep_mod
from onnxq.calibration.histogram import RunningHistogram
from onnxq.calibration.lapq import output_loss
from onnxq.data import feed_samples, load_feeds
from onnxq.errors import CalibrationError, UsageError
from onnxq.numerics import MIN_SCALE, fake_quantize, qparams_from_range
from onnxq.precision import Precision
from onnxq.simulate import FakeQuantModel, activation_qparams

TENSORS = ["x", "h", "r", "y"]


def mlp(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """x[N,16] -> MatMul -> h -> Relu -> r -> MatMul -> y[N,8]."""
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(size=(16, 32)) / 4).astype(np.float32)
    w2 = (rng.normal(size=(32, 8)) / 6).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def heavy_feeds(n: int = 8, batch: int = 64, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"x": rng.standard_t(2.0, size=(batch, 16)).astype(np.float32)} for _ in range(n)
    ]


def reference(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """All tensors of TENSORS, concatenated over feeds, from a plain onnxruntime run."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name in ("h", "r"):
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [sess.run(["h", "r", "y"], f) for f in feeds]
    values = {"x": np.concatenate([f["x"] for f in feeds])}
    for i, name in enumerate(["h", "r", "y"]):
        values[name] = np.concatenate([o[i] for o in outs])
    return values


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return mlp()


@pytest.fixture(scope="module")
def feeds() -> list[dict[str, np.ndarray]]:
    return heavy_feeds()


def test_minmax_equals_numpy(model, feeds):
    ranges = collect_ranges(model, feeds, TENSORS)
    ref = reference(model, feeds)
    assert list(ranges) == TENSORS
    for name in TENSORS:
        assert ranges[name].min == pytest.approx(float(ref[name].min()), rel=1e-6)
        assert ranges[name].max == pytest.approx(float(ref[name].max()), rel=1e-6)
        assert ranges[name].absmax_seen == pytest.approx(float(np.abs(ref[name]).max()), rel=1e-6)


def test_one_sweep_matches_one_tensor_at_a_time(model, feeds):
    before = sweep_mod.sessions_built()
    together = collect_ranges(model, feeds, ["h", "r", "y"], method="entropy")
    assert sweep_mod.sessions_built() - before == 1
    for name in ["h", "r", "y"]:
        alone = collect_ranges(model, feeds, [name], method="entropy")
        assert alone[name] == together[name]


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_clipping_methods_inside_minmax(model, feeds, method):
    mm = collect_ranges(model, feeds, TENSORS)
    clipped = collect_ranges(model, feeds, TENSORS, method=method, percentile=99.9)
    shrunk = 0
    for name in TENSORS:
        assert mm[name].min <= clipped[name].min <= clipped[name].max <= mm[name].max
        shrunk += clipped[name].max - clipped[name].min < mm[name].max - mm[name].min
    assert shrunk == len(TENSORS)


def test_percentile_matches_numpy(model, feeds):
    ref = reference(model, feeds)
    got = collect_ranges(model, feeds, ["h", "r"], method="percentile", percentile=99.0,
                         symmetric_for={"r": True})
    bin_h = float(np.abs(ref["h"]).max()) * 2 / 2048 * 2  # two growth steps at most
    assert got["h"].max == pytest.approx(np.percentile(ref["h"], 99.0), abs=bin_h)
    assert got["h"].min == pytest.approx(np.percentile(ref["h"], 1.0), abs=bin_h)
    assert got["r"].max == pytest.approx(np.percentile(np.abs(ref["r"]), 99.0), abs=bin_h)


def test_mse_and_entropy_clip_harder_at_fewer_bits(model, feeds):
    for method in ("mse", "entropy"):
        r8 = collect_ranges(model, feeds, ["h", "r"], method=method)
        r4 = collect_ranges(model, feeds, ["h", "r"], method=method,
                            precision_for={"h": Precision.UINT4, "r": Precision.UINT4})
        for name in ("h", "r"):
            assert r4[name].max < r8[name].max, (method, name)


def test_mse_is_near_optimal_on_the_data(model, feeds):
    """The histogram-estimated MSE range is close to the best of a brute-force search."""
    ref = reference(model, feeds)["r"]
    got = collect_ranges(model, feeds, ["r"], method="mse",
                         precision_for={"r": Precision.UINT4})["r"]

    def err(hi: float) -> float:
        q = qparams_from_range(0.0, hi, Precision.UINT4, False)
        return float(((fake_quantize(ref, q) - ref) ** 2).mean())

    grid = np.linspace(0.05, 1.0, 200) * float(ref.max())
    best = min(err(h) for h in grid)
    assert err(got.max) <= 1.1 * best


def test_cache_hit_skips_the_sweep(model, feeds, tmp_path):
    first = collect_ranges(model, feeds, TENSORS, method="entropy", cache_dir=tmp_path)
    before = sweep_mod.sessions_built()
    second = collect_ranges(model, feeds, TENSORS, method="entropy", cache_dir=tmp_path)
    assert sweep_mod.sessions_built() == before
    assert second == first
    assert len(list(tmp_path.glob("calib-*.json"))) == 1
    # a different bit width is a different key
    collect_ranges(model, feeds, TENSORS, method="entropy", cache_dir=tmp_path,
                   precision_for={"h": Precision.INT4})
    assert sweep_mod.sessions_built() == before + 1
    # different data is a different key
    collect_ranges(model, heavy_feeds(seed=7), TENSORS, method="entropy", cache_dir=tmp_path)
    assert sweep_mod.sessions_built() == before + 2


def test_lapq_beats_minmax_at_4_bits(model, feeds):
    tensors = ["h", "r"]
    prec = {t: Precision.UINT4 for t in tensors}
    mm = collect_ranges(model, feeds, tensors, precision_for=prec)
    la = collect_ranges(model, feeds, tensors, method="lapq", precision_for=prec)
    sim = FakeQuantModel(model, tensors)
    ref = [sim.run(f) for f in feeds]

    def loss(ranges: dict[str, TensorRange]) -> float:
        q = activation_qparams(ranges, prec)
        return output_loss([sim.run(f, q) for f in feeds], ref)

    assert loss(la) < 0.7 * loss(mm)


def test_lapq_reports_its_progress_off_a_terminal(model, feeds, monkeypatch, caplog):
    """A per-plan LAPQ fit can take minutes: off a terminal it logs evaluations done and time left."""
    monkeypatch.setenv("ONNXQ_PROGRESS_SECONDS", "0")
    prec = {t: Precision.UINT4 for t in ("h", "r")}
    with caplog.at_level(logging.INFO, logger="onnxq.progress"):
        collect_ranges(model, feeds, ["h", "r"], method="lapq", precision_for=prec, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LAPQ ranges (2 tensors): ")]
    assert len(lines) > 5, lines
    assert lines[-1].split(": ")[1].split()[0] == f"{len(lines)}/100", lines[-1]  # 50 per tensor


def test_histogram_regrowth_is_exact():
    rng = np.random.default_rng(3)
    hist = RunningHistogram(64)
    data = [rng.normal(size=1000) * s for s in (0.1, 1.0, 30.0, 0.01)]
    for d in data:
        hist.update(d.astype(np.float32), float(np.abs(d).max()))
    counts, edges = hist.signed()
    expected, _ = np.histogram(np.concatenate(data), bins=edges)
    assert counts.sum() == 4000
    assert np.abs(counts - expected).sum() <= 4  # float32 rounding at bin edges only


def test_constant_and_zero_tensors_get_a_safe_range():
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "zero"], ["z"]),
            helper.make_node("Add", ["z", "three"], ["c"]),
        ],
        "const",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.float32(0.0), "zero"),
         numpy_helper.from_array(np.float32(3.0), "three")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    feeds = [{"x": np.ones((2, 3), np.float32)}]
    for method in CalibrationMethod:
        r = collect_ranges(model, feeds, ["z", "c"], method=method)
        q = qparams_from_range(r["z"].min, r["z"].max, Precision.UINT8, False)
        assert float(q.scale) >= float(MIN_SCALE)
        assert r["z"].max > r["z"].min
        assert r["c"].max == pytest.approx(3.0)


def test_nan_feed_names_the_input(model):
    feeds = heavy_feeds(2)
    feeds[1]["x"][0, 3] = np.nan
    with pytest.raises(CalibrationError, match="feed 1: input 'x'"):
        collect_ranges(model, feeds, ["h"])


def test_bad_arguments(model, feeds):
    with pytest.raises(CalibrationError, match="no calibration feeds"):
        collect_ranges(model, [], ["h"])
    with pytest.raises(CalibrationError, match="'nope'"):
        collect_ranges(model, feeds, ["h", "nope"])
    with pytest.raises(CalibrationError, match="weight initializer"):
        collect_ranges(model, feeds, ["W1"])
    with pytest.raises(CalibrationError, match="lacks the model input 'x'"):
        collect_ranges(model, [{"y": np.zeros((1, 8), np.float32)}], ["h"])
    with pytest.raises(UsageError):
        collect_ranges(model, feeds, ["h"], method="magic")


def test_high_ir_version_and_untyped_tensors(feeds):
    model = mlp(opset=21)
    model.ir_version = 13
    ranges = collect_ranges(model, feeds, ["h"])
    assert ranges["h"].max > 0


def test_weight_ranges_per_channel_and_mse():
    rng = np.random.default_rng(5)
    w = rng.standard_t(3.0, size=(8, 4, 3, 3)).astype(np.float32)
    lo, hi = weight_ranges(w, 0, Precision.INT8, True)
    np.testing.assert_array_equal(lo, w.reshape(8, -1).min(axis=1))
    np.testing.assert_array_equal(hi, w.reshape(8, -1).max(axis=1))
    lo_t, hi_t = weight_ranges(w, None, Precision.INT8, True)
    assert lo_t.shape == () and float(hi_t) == float(w.max())
    lo4, hi4 = weight_ranges(w, 0, Precision.INT4, True, method="mse")
    assert np.all(hi4 <= hi) and np.any(hi4 < hi)

    def err(lo_: np.ndarray, hi_: np.ndarray) -> float:
        q = qparams_from_range(lo_, hi_, Precision.INT4, True, axis=0)
        return float(((fake_quantize(w, q) - w) ** 2).sum())

    assert err(lo4, hi4) < err(lo, hi)
    zlo, zhi = weight_ranges(np.zeros((2, 3), np.float32), 0, Precision.INT8, True)
    q = qparams_from_range(zlo, zhi, Precision.INT8, True, axis=0)
    assert np.all(q.scale >= MIN_SCALE)
    with pytest.raises(CalibrationError):
        weight_ranges(np.array([np.inf], np.float32), None, Precision.INT8, True)


def test_reader_and_progress(model, feeds):
    class Reader:
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    expected = collect_ranges(model, feeds, ["h"])
    assert collect_ranges(model, Reader(), ["h"], progress=True) == expected
    assert collect_ranges(model, iter(feeds), ["h"]) == expected


@settings(max_examples=30, deadline=None)
@given(
    scales=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_histogram_keeps_every_count(scales, seed):
    rng = np.random.default_rng(seed)
    hist = RunningHistogram(32)
    total = 0
    for s in scales:
        x = (rng.normal(size=100) * s).astype(np.float32)
        hist.update(x, float(np.abs(x).max()))
        total += x.size
    counts, edges = hist.signed()
    assert counts.sum() == total
    assert hist.bound > 0
    assert np.all(counts >= 0)


@pytest.mark.parametrize("method", ["minmax", "entropy"])
@pytest.mark.parametrize("bad", [-1.0, 0.0])  # log(-1) = NaN, log(0) = -Inf
def test_nan_or_inf_inside_the_model_stays_out_of_the_range(method, bad):
    # real encoders compute Log(0) = -inf on purpose (a later Where discards it): never refuse
    # the model, never let the value into a scale, and say that the tensor took it
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["l"]), helper.make_node("Relu", ["l"], ["y"])],
        "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1000])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    x = np.linspace(0.5, 2.0, 1000, dtype=np.float32).reshape(1, -1)
    ok = collect_ranges(model, [{"x": x}], ["l"], method=method)
    assert ok["l"].max == pytest.approx(np.log(2.0), abs=1e-3)
    assert not ok["l"].non_finite
    good = x.copy()
    x[0, 500] = bad
    x[0, 0] = 0.25  # the finite minimum of this feed
    ranges = collect_ranges(model, [{"x": good}, {"x": x}], ["l"], method=method)
    assert ranges["l"].non_finite
    assert ranges["l"].max == pytest.approx(np.log(2.0), abs=1e-3)
    if method == "minmax":
        assert ranges["l"].min == pytest.approx(np.log(0.25), abs=1e-2)
    else:  # entropy may clip the lone outlier, never below the finite minimum
        assert np.log(0.25) - 1e-2 <= ranges["l"].min < 0


def test_sweep_reduces_each_tensor_before_the_model_moves_on(tmp_path):
    """The minmax sweep reduces a tensor right after its producer, so onnxruntime frees it then
    (in its default order every reduction ran after the last model node: all tensors of the
    model alive at once, +940 MB on a 22M encoder over batches of 16)."""
    model = mlp()
    reduced, fetch = sweep_mod.reduction_model(model, TENSORS)
    session = sweep_mod.calibration_session(reduced)
    options = session.get_session_options()
    assert options.execution_order == ort.ExecutionOrder.PRIORITY_BASED
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "sweep")
    profiled = ort.InferenceSession(reduced.SerializeToString(), options, providers=["CPUExecutionProvider"])
    profiled.run(fetch, heavy_feeds(1)[0])
    events = json.loads(open(profiled.end_profiling()).read())
    order = [e["name"].removesuffix("_kernel_time") for e in events
             if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    model_nodes = [n for n in order if not n.startswith("onnxq_calib/")]
    assert model_nodes == ["mm1", "relu", "mm2"]
    reduced_when = {name.split("/")[1]: order.index(name) for name in order if name.startswith("onnxq_calib/")}
    next_model_node = {"x": "mm1", "h": "relu", "r": "mm2"}
    for tensor, follower in next_model_node.items():
        assert reduced_when[tensor] < order.index(follower), order


def test_every_feed_is_counted_once_when_none_is_held_back(cnn_path: Path) -> None:
    """With no held-back split the held-back feeds are the calibration feeds: ``all`` (what
    ``onnxq sensitivity`` analyses) must not see each sample twice."""
    model = onnx.load(str(cnn_path))
    calib = str(cnn_path.with_name("digits_cnn.calib.npz"))
    samples = len(next(iter(np.load(calib).values())))
    feeds = load_feeds(calib, model, batch_size=64, held_back_fraction=0.0)
    assert sum(feed_samples(f) for f in feeds.all) == samples == feeds.samples
    split = load_feeds(calib, model, batch_size=16, held_back_fraction=0.25)
    assert sum(feed_samples(f) for f in split.all) == samples and split.held_back
