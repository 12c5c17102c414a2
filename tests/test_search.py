"""The mixed-precision search on the bundled models, with real onnxruntime evaluations."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxq.passes.search import EXTRA_MEASURED_PLANS

from onnxq.api import quantize
from onnxq.options import QuantizeOptions
from onnxq.precision import Candidate
from onnxq.search.ilp import Problem, solve

MODELS = Path(__file__).resolve().parents[1] / "models"
CNN = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_cnn.calib.npz"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("onnxq-cache"))


def _options(cache_dir: str, **kwargs: object) -> QuantizeOptions:
    return QuantizeOptions(cache_dir=cache_dir, progress=False, seed=0, **kwargs)  # type: ignore[arg-type]


def test_max_drop_search_meets_the_range(cache_dir: str) -> None:
    result = quantize(CNN, CALIB, "ort-cpu-x86", max_drop=0.01, options=_options(cache_dir))
    onnx.checker.check_model(result.model, full_check=True)
    report = result.report
    assert result.target_met
    assert report["metric"]["drop"] <= 0.01
    search = report["search"]
    assert search["mode"] == "max-drop" and search["objective"] == "latency"
    assert search["measured_drop"] <= 0.01
    # bisection: real evaluations grow with log2 of the plans considered, plus the extra plans
    # measured for latency between its answer and fp32
    bound = int(np.ceil(np.log2(max(2, search["plans_considered"])))) + 1 + EXTRA_MEASURED_PLANS
    assert search["evaluations"] <= bound
    assert report["pareto_front"] and "predicted_loss" in report["pareto_front"][0]
    # ort-cpu-x86 is this machine: every plan inside the range was timed against fp32, and the
    # written one is the fastest of them (fp32 included) within the noise
    assert search["latency_measured"]
    chosen = report["pareto_front"][search["chosen_index"]]
    timed = [e["measured_latency_ratio"] for e in report["pareto_front"]
             if "measured_latency_ratio" in e and e["measured_drop"] <= 0.01]
    assert timed and chosen["measured_latency_ratio"] <= min(timed) + max(0.03, chosen["measured_latency_spread"])
    if report["layers"]["quantized"] == 0:
        assert "faster than fp32" in search["notice"]  # said in one line, not hidden


def test_size_objective_writes_the_smallest_model_inside_the_range(cache_dir: str) -> None:
    result = quantize(CNN, CALIB, "ort-cpu-x86", max_drop=0.01, options=_options(cache_dir, objective="size"))
    report = result.report
    assert result.target_met and report["metric"]["drop"] <= 0.01
    assert report["layers"]["quantized"] > 0
    inside = [e["measured_size_ratio"] for e in report["pareto_front"]
              if "measured_size_ratio" in e and e["measured_drop"] <= 0.01]
    assert report["pareto_front"][report["search"]["chosen_index"]]["measured_size_ratio"] == min(inside)
    assert report["sizes"]["quantized_bytes"] < 0.5 * report["sizes"]["fp32_bytes"]


def test_plan_round_trip_reproduces_the_model(cache_dir: str, tmp_path: Path) -> None:
    import json

    first = quantize(CNN, CALIB, "ort-cpu-x86", options=_options(cache_dir, target_bits=6.0))
    plan_path = tmp_path / "report.json"
    plan_path.write_text(json.dumps(first.report))
    again = quantize(CNN, CALIB, "ort-cpu-x86", plan=plan_path, options=_options(cache_dir))
    assert again.model.SerializeToString() == first.model.SerializeToString()


@pytest.mark.parametrize("target", [{"target_bits": 5.0}, {"target_size_mb": 0.06}, {"target_latency_ratio": 0.8}])
def test_budget_modes_respect_the_budget(cache_dir: str, target: dict[str, float]) -> None:
    result = quantize(CNN, CALIB, "ort-cpu-x86", options=_options(cache_dir, **target))
    onnx.checker.check_model(result.model, full_check=True)
    chosen, fp32 = result.report["cost"]["chosen"], result.report["cost"]["fp32"]
    if "target_size_mb" in target:
        # the budget holds for the written model, not for the cost model's prediction (issue 11 item 5)
        written = len(result.model.SerializeToString())
        assert result.target_met == (written <= target["target_size_mb"] * 1e6), result.report.get("shortfall")
        return
    if "target_latency_ratio" in target:
        # the budget holds for the measured latency of the written model, not for the cost model's estimate
        if "shortfall" not in result.report["search"]:  # the solver found a plan predicted inside it
            assert chosen["latency_seconds"] <= target["target_latency_ratio"] * fp32["latency_seconds"] * (1 + 1e-6)
        measured = result.report["latency"]["ratio"]
        assert result.target_met == (measured <= target["target_latency_ratio"]), result.report.get("shortfall")
        return
    assert result.target_met, result.report["search"].get("shortfall")
    if "target_bits" in target:
        assert chosen["bits"] <= target["target_bits"] + 1e-9
    else:
        assert chosen["latency_seconds"] <= target["target_latency_ratio"] * fp32["latency_seconds"] * (1 + 1e-6)


def test_impossible_target_reports_a_shortfall(cache_dir: str) -> None:
    result = quantize(CNN, CALIB, "ort-cpu-x86", max_drop=0.0, options=_options(cache_dir, target_bits=2.0))
    assert result.target_met is False
    shortfall = result.report["search"]["shortfall"]
    assert "bits" in shortfall and "2.00" in shortfall
    onnx.checker.check_model(result.model, full_check=True)


def _synthetic(n: int, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    cands = tuple(Candidate.parse(s) for s in ("fp32/fp32", "int8/uint8", "int4/uint8", "fp16/fp16"))
    names = tuple(f"layer{i}" for i in range(n))
    loss = {name: (0.0, float(rng.random() * 1e-3), float(rng.random() * 1e-2), float(rng.random() * 1e-5)) for name in names}
    params = {name: float(rng.integers(1_000, 100_000)) for name in names}
    cost = {name: (32 * params[name], 8 * params[name], 4 * params[name], 16 * params[name]) for name in names}
    pairs = tuple((names[i], cands[2], names[i + 1], cands[2], float(rng.normal() * 1e-3)) for i in range(n - 1))
    return Problem(layers=names, candidates={name: cands for name in names}, loss=loss, cost=cost, pairs=pairs)


def test_ilp_solves_100_layers_under_a_second() -> None:
    problem = _synthetic(100)
    total = sum(problem.cost[name][0] for name in problem.layers)
    for fraction in (0.16, 0.2, 0.3):
        started = time.perf_counter()
        solution = solve(problem, max_cost=total * fraction)
        elapsed = time.perf_counter() - started
        assert solution.plan is not None
        assert solution.cost <= total * fraction * (1 + 1e-6)
        assert elapsed < 1.0, f"{elapsed:.3f} s at {fraction}"


def test_ilp_uses_pair_terms() -> None:
    a, b = Candidate.parse("int4/uint8"), Candidate.parse("int8/uint8")
    fp32 = Candidate.parse("fp32/fp32")
    cands = (fp32, b, a)
    problem = Problem(layers=("x", "y"), candidates={"x": cands, "y": cands},
                      loss={"x": (0.0, 0.01, 0.02), "y": (0.0, 0.01, 0.02)},
                      cost={"x": (4.0, 1.0, 0.5), "y": (4.0, 1.0, 0.5)},
                      pairs=(("x", a, "y", a, -0.025),))
    # both int4 costs 1.0 and, with the negative cross term, predicts less loss than int8+int8
    solution = solve(problem, max_cost=2.0)
    assert solution.plan == {"x": a, "y": a}
    assert solution.loss == pytest.approx(0.015)
