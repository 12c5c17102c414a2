"""Evaluation of perturbed models: the part of the sensitivity analysis that runs onnxruntime.

A :class:`Job` describes one perturbation *symbolically* (which weights move, by which noise,
which activations are fake-quantized at which precision), so that it is small, hashable and
cheap to send to a worker process or a Ray actor; an :class:`Evaluator` turns it into a feed of
its one :class:`~onnxq.simulate.FakeQuantModel` session and returns the label-free loss of the
outputs against the fp32 reference outputs.

Everything here is deterministic: weight noise is a pure function of the weight and the
quantizer, Rademacher directions come from ``numpy.random.default_rng([seed, index])``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxq.calibration import weight_ranges
from onnxq.numerics import fake_quantize, qparams_from_range
from onnxq.precision import Precision, is_integer
from onnxq.simulate import FakeQuantModel

__all__ = [
    "LOSSES",
    "WeightQuantizer",
    "WeightPerturbation",
    "ActivationQuant",
    "Job",
    "EvalContext",
    "Evaluator",
    "weight_noise",
    "rademacher",
    "loss_between",
]

logger = logging.getLogger(__name__)

#: Label-free losses: KL(softmax(fp32) ‖ softmax(quantized)) per sample, or mean squared error.
LOSSES = ("kl", "mse")


@dataclass(frozen=True)
class WeightQuantizer:
    """How one weight tensor is quantized at one precision (mirrors the rewrite pass).

    Attributes:
        tensor: the weight tensor.
        precision: target precision; integer grids are fake-quantized, ``fp16``/``bf16`` are
            rounded through the float format.
        axis: per-channel axis, ``None`` for one scale.
        symmetric: symmetric quantizer.
        narrow: narrow signed grid.
        method: range method of :func:`onnxq.calibration.weight_ranges` (``mse`` ≤ 4 bits).
    """

    tensor: str
    precision: Precision
    axis: int | None
    symmetric: bool
    narrow: bool
    method: str


@dataclass(frozen=True)
class WeightPerturbation:
    """``W ← W + sign · ΔW``: quantization noise (``quantizer``) or ``eps`` · a Rademacher vector."""

    tensor: str
    sign: float = 1.0
    quantizer: WeightQuantizer | None = None
    direction: int = -1
    eps: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class ActivationQuant:
    """Fake-quantize activation ``tensor`` at ``precision`` with its calibrated range."""

    tensor: str
    precision: Precision
    symmetric: bool


@dataclass(frozen=True)
class Job:
    """One evaluation: all the perturbations applied at once."""

    weights: tuple[WeightPerturbation, ...] = ()
    activations: tuple[ActivationQuant, ...] = ()


@dataclass(frozen=True)
class EvalContext:
    """Everything a worker needs to build its own session (picklable).

    Attributes:
        model_bytes: the serialized fp32 model.
        feeds: the calibration feeds.
        activation_tensors: tensors that get a (disabled) fake-quant subgraph.
        weight_tensors: weights exposed as session inputs.
        ranges: calibrated ``(min, max)`` per activation tensor.
        loss: ``kl`` or ``mse``.
        reference: fp32 outputs per feed (set once by the parent; workers never recompute it).
    """

    model_bytes: bytes
    feeds: tuple[dict[str, np.ndarray], ...]
    activation_tensors: tuple[str, ...]
    weight_tensors: tuple[str, ...]
    ranges: Mapping[str, tuple[float, float]]
    loss: str
    reference: tuple[tuple[np.ndarray, ...], ...] | None = field(default=None, compare=False)


def _round_bf16(w: np.ndarray) -> np.ndarray:
    as_int = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = (as_int + np.uint32(0x7FFF) + ((as_int >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def weight_noise(w: np.ndarray, quantizer: WeightQuantizer) -> np.ndarray:
    """``Q(W) − W`` for one quantizer, float32."""
    w = np.asarray(w, dtype=np.float32)
    precision = quantizer.precision
    if precision is Precision.FP16:
        return (w.astype(np.float16).astype(np.float32) - w).astype(np.float32)
    if precision is Precision.BF16:
        return (_round_bf16(w) - w).astype(np.float32)
    if not is_integer(precision):
        logger.debug("no weight-noise model for %s; treated as exact", precision)
        return np.zeros_like(w)
    lo, hi = weight_ranges(w, quantizer.axis, precision, quantizer.symmetric, method=quantizer.method)
    q = qparams_from_range(lo, hi, precision, quantizer.symmetric, narrow=quantizer.narrow, axis=quantizer.axis)
    return (fake_quantize(w, q) - w).astype(np.float32)


def rademacher(shape: tuple[int, ...], seed: int, direction: int) -> np.ndarray:
    """A deterministic ±1 tensor (``seed``, ``direction`` pick it)."""
    rng = np.random.default_rng([int(seed), int(direction)])
    return (rng.integers(0, 2, size=shape, dtype=np.int8) * 2 - 1).astype(np.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _is_logits(x: np.ndarray) -> bool:
    return x.dtype.kind == "f" and x.ndim == 2 and x.shape[-1] >= 2


def loss_between(
    kind: str,
    reference: Sequence[Sequence[np.ndarray]],
    outputs: Sequence[Sequence[np.ndarray]],
    reference_log_probs: Sequence[Sequence[np.ndarray | None]] | None = None,
) -> float:
    """The label-free loss of ``outputs`` against ``reference`` over all feeds.

    ``kl``: mean over samples of KL(softmax(ref) ‖ softmax(out)) on 2-D logit outputs (other
    outputs add their MSE); ``mse``: mean squared error over all output elements.
    """
    total = 0.0
    count = 0
    for f, (ref, out) in enumerate(zip(reference, outputs, strict=True)):
        for o, (r, y) in enumerate(zip(ref, out, strict=True)):
            if r.dtype.kind != "f":
                continue
            if kind == "kl" and _is_logits(r):
                log_p = reference_log_probs[f][o] if reference_log_probs is not None else None
                if log_p is None:
                    log_p = _log_softmax(r)
                log_q = _log_softmax(y)
                kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
                total += float(np.sum(kl))
                count += r.shape[0]
            else:
                diff = r.astype(np.float64) - y.astype(np.float64)
                rows = r.shape[0] if r.ndim else 1
                total += float(np.sum(diff * diff)) / max(r.size // max(rows, 1), 1)
                count += rows
    return total / max(count, 1)


class Evaluator:
    """One :class:`FakeQuantModel` session that evaluates :class:`Job` s.

    Args:
        context: model, feeds, tensors, ranges and loss; ``context.reference`` may be ``None``
            (then call :meth:`fp32_outputs` and :meth:`set_reference` first).
    """

    #: Bytes of weight noise kept between jobs (plans and pairs reuse every layer's noise).
    NOISE_CACHE_BYTES = 256 << 20

    def __init__(self, context: EvalContext) -> None:
        self.context = context
        model = onnx.ModelProto()
        model.ParseFromString(context.model_bytes)
        self.fq = FakeQuantModel(model, context.activation_tensors, context.weight_tensors)
        inits = {t.name: t for t in model.graph.initializer}
        self.weights: dict[str, np.ndarray] = {}
        for name in context.weight_tensors:
            if name in inits:
                self.weights[name] = onnx.numpy_helper.to_array(inits[name]).astype(np.float32)
        for node in model.graph.node:
            if node.op_type == "Constant" and node.output and node.output[0] in context.weight_tensors:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.weights[node.output[0]] = onnx.numpy_helper.to_array(attr.t).astype(np.float32)
        self._noise: OrderedDict[object, np.ndarray] = OrderedDict()
        self._noise_bytes = 0
        self._log_probs: list[list[np.ndarray | None]] | None = None
        self.evaluations = 0
        if context.reference is not None:
            self.set_reference(context.reference)

    def fp32_outputs(self) -> tuple[tuple[np.ndarray, ...], ...]:
        """Outputs of the session with nothing perturbed (the reference)."""
        return tuple(tuple(out) for out in self.fq.run_all(self.context.feeds))

    def set_reference(self, reference: Sequence[Sequence[np.ndarray]]) -> None:
        self.reference = reference
        self._log_probs = [
            [_log_softmax(r) if self.context.loss == "kl" and _is_logits(r) else None for r in ref]
            for ref in reference
        ]

    def _cached(self, key: object, make) -> np.ndarray:  # type: ignore[no-untyped-def]
        hit = self._noise.get(key)
        if hit is None:
            hit = make()
            self._noise[key] = hit
            self._noise_bytes += hit.nbytes
            while self._noise_bytes > self.NOISE_CACHE_BYTES and len(self._noise) > 1:
                self._noise_bytes -= self._noise.popitem(last=False)[1].nbytes
        else:
            self._noise.move_to_end(key)
        return hit

    def _delta(self, p: WeightPerturbation) -> np.ndarray:
        w = self.weights[p.tensor]
        if p.quantizer is not None:
            quantizer = p.quantizer
            return self._cached(quantizer, lambda: weight_noise(w, quantizer))
        return p.eps * self._cached(("rademacher", p.tensor, p.seed, p.direction),
                                    lambda: rademacher(w.shape, p.seed, p.direction))

    def job_feeds(self, job: Job) -> tuple[dict[str, np.ndarray], dict[str, object]]:
        weights: dict[str, np.ndarray] = {}
        for p in job.weights:
            base = weights.get(p.tensor, self.weights[p.tensor])
            weights[p.tensor] = base + np.float32(p.sign) * self._delta(p)
        acts: dict[str, object] = {}
        for a in job.activations:
            lo, hi = self.context.ranges[a.tensor]
            acts[a.tensor] = qparams_from_range(lo, hi, a.precision, a.symmetric)
        return weights, acts

    def loss(self, job: Job) -> float:
        """The loss of the perturbed model against the fp32 reference."""
        weights, acts = self.job_feeds(job)
        outputs = self.fq.run_all(self.context.feeds, acts, weights)  # type: ignore[arg-type]
        self.evaluations += 1
        return loss_between(self.context.loss, self.reference, outputs, self._log_probs)

    def losses(self, jobs: Sequence[Job]) -> list[float]:
        return [self.loss(job) for job in jobs]
