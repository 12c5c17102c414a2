"""The label-free metrics: continuous where a range decision needs it, honest about embeddings."""

from __future__ import annotations

import numpy as np

from onnxq.metrics import Metric, fidelity, fidelity_interval, resolve_metric


def _outputs(rows: np.ndarray) -> list[list[np.ndarray]]:
    return [[row[None, :].astype(np.float32)] for row in rows]


def test_a_flip_between_near_equal_classes_costs_little_and_a_confident_flip_costs_a_sample() -> None:
    reference = np.array([[2.0, 1.99, -3.0], [6.0, 0.0, -3.0]])
    near_flip = np.array([[1.99, 2.0, -3.0], [6.0, 0.0, -3.0]])
    confident_flip = np.array([[2.0, 1.99, -3.0], [0.0, 6.0, -3.0]])
    hard_near = fidelity(Metric.AGREEMENT, _outputs(reference), _outputs(near_flip))
    soft_near = fidelity(Metric.SOFT_AGREEMENT, _outputs(reference), _outputs(near_flip))
    soft_confident = fidelity(Metric.SOFT_AGREEMENT, _outputs(reference), _outputs(confident_flip))
    assert hard_near == 0.5  # top-1 counts the coin-flip sample as a full miss
    assert soft_near > 0.99  # the class distribution barely moved
    assert 0.49 < soft_confident < 0.52  # the confident sample is (almost) a whole miss


def test_soft_agreement_is_zero_for_nan_and_one_for_identical_outputs() -> None:
    reference = np.random.default_rng(0).normal(size=(8, 10))
    broken = reference.copy()
    broken[3, 2] = np.nan
    assert fidelity(Metric.SOFT_AGREEMENT, _outputs(reference), _outputs(reference)) == 1.0
    assert fidelity(Metric.SOFT_AGREEMENT, _outputs(reference), _outputs(broken)) <= 7 / 8 + 1e-9


def test_auto_reads_embeddings_as_cosine_and_logits_as_soft_agreement() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 10))
    unit = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    wide = rng.normal(size=(4, 4096))
    assert resolve_metric("auto", _outputs(logits)) is Metric.SOFT_AGREEMENT
    assert resolve_metric("auto", _outputs(unit)) is Metric.COSINE
    assert resolve_metric("auto", _outputs(wide)) is Metric.COSINE


def test_interval_brackets_the_mean_and_narrows_with_samples() -> None:
    rng = np.random.default_rng(2)
    few, many = rng.normal(size=(16, 5)), rng.normal(size=(256, 5))
    few_noisy, many_noisy = few + rng.normal(scale=0.5, size=few.shape), many + rng.normal(scale=0.5, size=many.shape)
    lo_f, hi_f = fidelity_interval(Metric.SOFT_AGREEMENT, _outputs(few), _outputs(few_noisy))  # type: ignore[misc]
    lo_m, hi_m = fidelity_interval(Metric.SOFT_AGREEMENT, _outputs(many), _outputs(many_noisy))  # type: ignore[misc]
    mean = fidelity(Metric.SOFT_AGREEMENT, _outputs(many), _outputs(many_noisy))
    assert lo_m <= mean <= hi_m
    assert hi_m - lo_m < hi_f - lo_f
