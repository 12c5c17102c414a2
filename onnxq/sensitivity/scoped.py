"""Sensitivity evaluations that reach into control-flow subgraphs (``If``/``Loop``/``Scan`` bodies).

The cut sessions and the fake-quant session of :mod:`onnxq.sensitivity.engine` perturb the main
graph only. A :class:`ScopedJob` names, per scope (``""``: the main graph, otherwise
:attr:`onnxq.subgraphs.Scope.key`), the weights it moves and the activations it fake-quantizes;
:class:`ScopedEvaluator` bakes them into a copy of the model — each subgraph through
:func:`onnxq.subgraphs.wrap` → :func:`onnxq.simulate.bake` → :func:`onnxq.subgraphs.unwrap` —
and measures the loss of the whole model's outputs against the fp32 reference. One session per
evaluation: slower than the cut sessions, which is why only jobs that touch a subgraph come here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnxq.graph import ScopeView
from onnxq.numerics import qparams_from_range
from onnxq.runtime import make_session
from onnxq.sensitivity.engine import ActivationQuant, WeightPerturbation, loss_between, rademacher, weight_noise
from onnxq.simulate import bake
from onnxq.subgraphs import unwrap, wrap

__all__ = ["MAIN_SCOPE", "ScopeChange", "ScopedJob", "ScopedEvaluator"]

logger = logging.getLogger(__name__)

#: The scope key of the main graph.
MAIN_SCOPE = ""


@dataclass(frozen=True)
class ScopeChange:
    """The perturbations of one scope: weights moved, activations fake-quantized."""

    scope: str
    weights: tuple[WeightPerturbation, ...] = ()
    activations: tuple[ActivationQuant, ...] = ()


@dataclass(frozen=True)
class ScopedJob:
    """One evaluation whose perturbations sit in several scopes (at least one a subgraph)."""

    changes: tuple[ScopeChange, ...]


class ScopedEvaluator:
    """Losses of :class:`ScopedJob` s, one baked model and session per job.

    Args:
        model: the fp32 model.
        scope_views: the subgraph scopes by key (:func:`onnxq.subgraphs.scope_views`).
        weights: fp32 weight values by ``(scope key, tensor)``.
        ranges: calibrated ``(min, max)`` by ``(scope key, tensor)``.
        feeds: the calibration feeds.
        reference: fp32 outputs per feed.
        loss: ``kl`` or ``mse``.
    """

    def __init__(self, model: onnx.ModelProto, scope_views: Mapping[str, ScopeView],
                 weights: Mapping[tuple[str, str], np.ndarray], ranges: Mapping[tuple[str, str], tuple[float, float]],
                 feeds: Sequence[Mapping[str, np.ndarray]], reference: Sequence[Sequence[np.ndarray]], loss: str) -> None:
        self.model = model
        self.scope_views = scope_views
        self.weights = weights
        self.ranges = ranges
        self.feeds = feeds
        self.reference = reference
        self.kind = loss
        self.evaluations = 0

    def _weight(self, scope: str, p: WeightPerturbation, base: np.ndarray | None) -> np.ndarray:
        w = self.weights[(scope, p.tensor)]
        if p.quantizer is not None:
            delta = weight_noise(w, p.quantizer)
        else:
            delta = np.float32(p.eps) * rademacher(w.shape, p.seed, p.direction)
        return (w if base is None else base) + np.float32(p.sign) * delta

    def perturbed_model(self, job: ScopedJob) -> onnx.ModelProto:
        """A copy of the model with every change of ``job`` baked in (inner scopes first)."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        ordered = sorted(job.changes, key=lambda c: (c.scope == MAIN_SCOPE,
                                                     -(self.scope_views[c.scope].scope.depth if c.scope else 0), c.scope))
        for change in ordered:
            weights: dict[str, np.ndarray] = {}
            for p in change.weights:
                weights[p.tensor] = self._weight(change.scope, p, weights.get(p.tensor))
            acts = {a.tensor: qparams_from_range(*self.ranges[(change.scope, a.tensor)], a.precision, a.symmetric)
                    for a in change.activations}
            if change.scope == MAIN_SCOPE:
                model = bake(model, acts, weights)
                continue
            sv = self.scope_views[change.scope]
            wrapper, wrapped = wrap(model, sv.scope)
            unwrap(model, sv.scope, bake(wrapper, acts, weights), wrapped)
        return model

    def loss(self, job: ScopedJob) -> float:
        """The loss of the perturbed model against the fp32 reference."""
        session = make_session(self.perturbed_model(job))
        names = [o.name for o in session.get_outputs()]
        outputs = [session.run(names, dict(feed)) for feed in self.feeds]
        self.evaluations += 1
        return loss_between(self.kind, self.reference, outputs)
