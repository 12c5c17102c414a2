"""The choice among measured plans: what --objective writes, and when it must say so."""

from __future__ import annotations

from onnxq.search.objective import MeasuredPlan, Objective, choose

FP32 = MeasuredPlan(9, 0.0, 1.0, 1.0, 0.0, is_fp32=True)


def test_a_quantized_plan_slower_than_fp32_is_not_written_for_latency() -> None:
    slow = MeasuredPlan(3, 0.004, 0.3, 1.4, 0.05)
    choice = choose([slow, FP32], 0.01, Objective.LATENCY)
    assert choice is not None and choice.plan.is_fp32
    assert choice.notice and "1.40x" in choice.notice


def test_plans_within_the_noise_of_the_fastest_are_decided_by_size() -> None:
    tie = MeasuredPlan(4, 0.002, 0.27, 1.01, 0.01)
    faster_but_bigger = MeasuredPlan(6, 0.001, 0.7, 0.99, 0.01)
    choice = choose([tie, faster_but_bigger, FP32], 0.01, Objective.LATENCY)
    assert choice is not None and choice.plan.index == 4 and choice.notice is not None


def test_the_fastest_plan_inside_the_range_wins_and_plans_outside_never_do() -> None:
    outside = MeasuredPlan(1, 0.05, 0.2, 0.3, 0.01)
    fast = MeasuredPlan(2, 0.008, 0.4, 0.5, 0.02)
    slower = MeasuredPlan(5, 0.001, 0.3, 0.8, 0.02)
    choice = choose([outside, fast, slower, FP32], 0.01, Objective.LATENCY)
    assert choice is not None and choice.plan.index == 2 and choice.notice is None
    assert choose([outside], 0.01, Objective.LATENCY) is None


def test_size_and_balanced_objectives() -> None:
    small_slow = MeasuredPlan(1, 0.005, 0.2, 1.5, 0.0)
    mid = MeasuredPlan(2, 0.005, 0.4, 0.6, 0.0)
    plans = [small_slow, mid, FP32]
    size = choose(plans, 0.01, Objective.SIZE)
    balanced = choose(plans, 0.01, Objective.BALANCED)
    assert size is not None and size.plan.index == 1
    assert balanced is not None and balanced.plan.index == 2


def test_without_measured_latency_the_front_order_decides() -> None:
    untimed = [MeasuredPlan(2, 0.005, 0.4), MeasuredPlan(7, 0.0, 1.0, is_fp32=True)]
    choice = choose(untimed, 0.01, Objective.LATENCY)
    assert choice is not None and choice.plan.index == 2 and choice.notice is None
