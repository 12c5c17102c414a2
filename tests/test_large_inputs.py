"""The search on models with large inputs and few calibration samples (a 640×640 detector with a
dozen pages took 516-1135 s): held-back samples of their own, a sensitivity analysis on one page,
a bisection that stops at the cheapest plan when it is inside the range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxq.passes.search import ANCHOR_CANDIDATES, EXTRA_MEASURED_PLANS, input_sample_limit

from onnxq import quantize
from onnxq.data import load_feeds
from onnxq.options import QuantizeOptions

MODELS = Path(__file__).resolve().parent.parent / "models"


def _page_model(size: int = 640) -> onnx.ModelProto:
    """Two stride-2 convolutions and a per-pixel sigmoid map, like a detector's head (opset 13)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((1, 8, 3, 3)) * 0.3).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Sigmoid", ["c2"], ["prob"], name="sigmoid")]
    graph = helper.make_graph(nodes, "page", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1, size // 4, size // 4])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _pages(count: int, size: int = 640) -> np.ndarray:
    return np.random.default_rng(1).uniform(-1, 1, size=(count, 3, size, size)).astype(np.float32)


def test_a_dozen_stacked_samples_keep_held_back_samples_of_their_own() -> None:
    feeds = load_feeds({"x": _pages(12, 32)}, _page_model(32), batch_size=16)
    assert [len(f["x"]) for f in feeds.calibration] == [3, 3, 3] and [len(f["x"]) for f in feeds.held_back] == [3]
    calibrated = np.concatenate([f["x"] for f in feeds.calibration])
    assert not any(np.array_equal(page, other) for page in feeds.held_back[0]["x"] for other in calibrated)
    many = load_feeds({"x": _pages(40, 32)}, _page_model(32), batch_size=16)
    assert [len(f["x"]) for f in many.all] == [16, 16, 8]  # two batches or more: cut as asked


def test_large_pages_are_analysed_one_at_a_time(tmp_path: Path) -> None:
    x = _pages(12)
    assert input_sample_limit([{"x": x[:3]}]) == 1
    assert input_sample_limit([{"x": x[:3, :, :224, :224]}]) == 13
    options = QuantizeOptions(cache_dir=str(tmp_path), progress=False, seed=0)
    result = quantize(_page_model(), {"x": x}, "ort-cpu-x86", max_drop=0.05, options=options)
    search = result.report["search"]
    assert search["sensitivity_samples"] == 1
    assert result.report["calibration"]["held_back_feeds"] == 1 and result.report["metric"]["drop"] <= 0.05


@pytest.mark.parametrize("max_drop", [0.5])
def test_a_cheapest_plan_inside_the_range_ends_the_bisection(tmp_path: Path, max_drop: float) -> None:
    options = QuantizeOptions(cache_dir=str(tmp_path), progress=False, seed=0)
    result = quantize(MODELS / "digits_cnn.onnx", MODELS / "digits_cnn.calib.npz", "ort-cpu-x86", max_drop=max_drop,
                      options=options)
    search = result.report["search"]
    front = result.report["pareto_front"]
    assert search["plans_considered"] >= 6  # a bisection from the middle would measure three or more
    assert front[0]["measured_drop"] <= max_drop
    assert search["evaluations"] <= 1 + EXTRA_MEASURED_PLANS + len(ANCHOR_CANDIDATES)
