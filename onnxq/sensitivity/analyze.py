"""Per-layer × candidate sensitivity, inter-layer pair terms, and their validation.

Conventions (also written into the JSON under ``"conventions"``):

* The model analysed is the one the rewrite will produce: upgraded to the opset the prepare
  pass gives a plan of the analysed candidates (so weights are per-channel exactly when the
  rewrite writes them so), activation ranges calibrated with ``--calibration``, layers inside
  ``If``/``Loop``/``Scan`` bodies analysed like main-graph ones (rows carry their ``"scope"``;
  :mod:`onnxq.sensitivity.scoped`).
* The loss ``L`` is label-free, against the fp32 outputs on the calibration feeds: the mean
  over samples of KL(softmax(fp32) ‖ softmax(quantized)) for 2-D logit outputs (``kl``), the
  mean squared error otherwise (``mse``). ``L(0)`` (nothing quantized) is 0 up to rounding and
  is reported as ``loss_fp32``; every term below subtracts it.
* ``delta`` of layer ``i`` at candidate ``c`` = weight term + activation term, the predicted
  increase of ``L`` when only that layer takes ``c``:

  - weight term, ``onesided`` (the default): ``L(W+ΔW) − L(W)`` with ``ΔW = Q(W) − W`` (below).
    The loss is measured against the fp32 outputs, so ``L`` has its minimum at the fp32 weights
    ``W``: ``L(W) = 0`` and ``∇L(W) = 0``. Taylor's expansion there gives ``L(W+ΔW) − L(W) = ½
    ΔWᵀHΔW + O(‖ΔW‖³)``: the one-sided difference is already the second-order term, without the
    first-order error a one-sided difference has elsewhere, and it is exactly the loss that
    quantizing the layer causes. The ``W−ΔW`` run of ``central`` only cancels the third-order
    term, at the price of a third of the single-layer runs.
  - weight term, ``central``: ``½ (L(W+ΔW) + L(W−ΔW) − 2 L(W)) ≈ ½ ΔWᵀHΔW`` with
    ``ΔW = Q(W) − W`` at the candidate's weight precision (the spec's weight rule: symmetric,
    narrow range, per-channel along :func:`onnxq.rewrite.weight_axis` when preferred, MSE
    clipping at ≤ 4 bits — the same quantizer as the rewrite pass). The gradient of ``L`` at the
    fp32 weights is 0, and central differences cancel the odd terms anyway.
  - weight term, ``hutchinson`` (HAWQ-V2): ``½ · Tr(H)/n · ‖ΔW‖²`` with ``Tr(H)`` estimated from
    Rademacher directions ``v``: ``vᵀHv ≈ (L(W+εv) + L(W−εv) − 2L(W)) / ε²``, whose mean over
    directions is already ``Tr(H)`` (``E[vᵀHv] = Tr(H)``, reported as ``hessian_trace``); ``ε`` is the RMS of
    the layer's coarsest integer weight noise, so the curvature is probed at the scale that
    matters. One trace per layer serves all its weight precisions.
  - activation term: the sum over the tensors the layer's Q/DQ quantize — its float inputs and,
    where the layout puts a Q on its output (:func:`onnxq.layout.plan_layout`: a float or
    integer consumer, after a folded Relu), that output — of ``L(x̃) − L(0)`` with the tensor
    fake-quantized at the candidate's activation precision (calibrated ranges, symmetric as the
    spec says; ``activation_terms``). A tensor two layers of a plan share counts once. Float
    activation precisions (fp16…) add 0.
* ``cross`` of a dependent pair ``(a, b)`` at candidates ``(c_a, c_b)``: ``L(a+b) − L(a) − L(b) +
  L(0)``, all four measured for real (weights quantized, activations fake-quantized). One
  candidate pair per dependent pair is measured: each layer's most aggressive candidate (fewest
  weight bits, then fewest activation bits) — the common one when both layers allow it. The
  number of evaluations is linear in the number of layers. Every other candidate combination
  ``(c, d)`` gets an entry too, ``cross* · sqrt(δa(c)·δb(d) / (δa*·δb*))`` (``"scaling":
  "sqrt-delta"``, ``"measured_at"``: the measured candidates; the measured entry has ``"scaling":
  "measured"``): the cross term of two weight noises is the bilinear ``ΔW_aᵀ H_ab ΔW_b``, and a
  layer's noise size scales as ``sqrt(δ)`` since ``δ ≈ ½ ΔWᵀHΔW``. So the JSON keeps the DESIGN
  rule (a pair entry counts when a plan gives both layers its candidates) and every consumer of
  the pairs (the search's ILP) sees the scaled terms. Every entry is bounded as a positive
  semi-definite form allows, ``|cross| ≤ 2 sqrt(δa δb)``, and never below what would make the
  pair's predicted loss negative (:func:`bounded_cross`; ``raw_cross`` keeps the unbounded value).
* The predicted loss of a plan is the sum of its layers' deltas plus the cross terms of the
  pairs whose two layers both take the pair's candidates (:func:`predicted_loss`).
* The loss is measured on the first ``max_samples`` (64) samples, concatenated into batches of
  up to 256 when the batch dimension is dynamic — only feeds of the same shape are batched
  together (one feed per sentence, each of its own length, gives one batch per length).

How evaluations run (:mod:`onnxq.sensitivity.engine`): one fp32 run per chunk of feeds caches
every tensor where a layer's suffix of the graph is cut off (chunks sized to the memory budget);
a single-layer evaluation then runs only the nodes downstream of that layer, with its input
activations fake-quantized in numpy (no fake-quant nodes in the graph); a pair chains its two
layers' cut sessions. All sessions share one copy of the weights. Validation plans run in a
model built for the plan. When the model has control flow, evaluations go through one
:class:`~onnxq.simulate.FakeQuantModel` session instead (logged as a warning). Jobs that touch a layer inside a subgraph run in a model baked for the job
(:mod:`onnxq.sensitivity.scoped`).
* When one activation tensor feeds layers at different precisions (a plan, a pair), the
  simulation quantizes it once at the lowest bit width among them.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.calibration import cache as _cache
from onnxq.calibration import collect_ranges
from onnxq.calibration.weights import weight_range_method
from onnxq.data import feed_samples
from onnxq.errors import CalibrationError, PlanError, UsageError
from onnxq.graph import GraphView, Layer, graph_view_for, scope_views_for
from onnxq.layout import activation_symmetric, effective_candidate, plan_layout
from onnxq.model import atomic_write_text, shape_skeleton
from onnxq.numerics import qparams_from_range
from onnxq.precision import FP32, Candidate, Precision, bits, is_integer
from onnxq.rewrite import per_channel_shape, weight_axis
from onnxq.sensitivity.engine import (
    ActivationQuant,
    EvalContext,
    Evaluator,
    Job,
    Segment,
    WeightPerturbation,
    WeightQuantizer,
    default_memory_budget,
    detach_weights,
    peak_rss_mib,
    weight_noise,
)
from onnxq.sensitivity.executors import require_executor, run_jobs
from onnxq.sensitivity.scoped import MAIN_SCOPE, ScopeChange, ScopedEvaluator, ScopedJob
from onnxq.simulate import WeightFormat, weight_format
from onnxq.spec.model import Granularity, HardwareSpec
from onnxq.statistics import spearman
from onnxq.subgraphs import expose

__all__ = ["SENSITIVITY_FORMAT", "METHODS", "ALGORITHM_VERSION", "analyze", "predicted_loss", "bounded_cross",
           "spec_digest", "EVALUATION_COUNTER"]

logger = logging.getLogger(__name__)

SENSITIVITY_FORMAT = "onnxq-sensitivity/1"
METHODS = ("onesided", "central", "hutchinson")
#: Rademacher directions per layer for ``method="hutchinson"``.
HUTCHINSON_DIRECTIONS = 4
#: Bumped whenever the numbers this module computes change (part of the cache key).
ALGORITHM_VERSION = 8
#: Calibration samples the analysis uses by default (the first ones; ``max_samples``).
DEFAULT_SAMPLES = 64
#: Relative standard error at which an evaluation on more than SEQUENTIAL_MIN_SAMPLES samples
#: stops (``analyze(tolerance=...)``): the rank of a layer among others moves little once its
#: loss is known to 10%, and the search checks every plan it keeps by a real evaluation.
SEQUENTIAL_TOLERANCE = 0.1
#: Feeds are concatenated into batches of up to this many samples when the model's inputs have
#: a dynamic leading (batch) dimension: one run of a batch of 64 is far cheaper than 64 runs.
MAX_BATCH = 256


@dataclass
class _Counter:
    """Evaluations actually run by :func:`analyze` in this process (cache hits add 0)."""

    total: int = 0


EVALUATION_COUNTER = _Counter()


def _default_candidates(layer: Layer, spec: HardwareSpec) -> list[Candidate]:
    out: list[Candidate] = []
    for candidate in spec.candidates_for(layer.op_type):
        eff = effective_candidate(layer.weight is not None, candidate)
        if eff == FP32 or eff in out:
            continue
        out.append(eff)
    return out


def _most_aggressive(options: Sequence[Candidate]) -> Candidate:
    """Fewest weight bits, then fewest activation bits; ties go to the spec's first listed."""
    return min(options, key=lambda c: (bits(c.weights), bits(c.activations), options.index(c)))


def _weight_quantizer(layer: Layer, node: onnx.NodeProto, fmt: WeightFormat, spec: HardwareSpec) -> WeightQuantizer:
    assert layer.weight is not None
    precision = fmt.precision
    rank = len(layer.weight.shape)
    rule = spec.weight_rule(layer.op_type, precision)
    symmetric = True if rule is None else rule.symmetric
    narrow = False if rule is None else rule.narrow_range
    per_channel = (is_integer(precision) and per_channel_shape(layer.op_type, rank) and not fmt.block_size
                   and spec.unblocked_weight_granularity(layer.op_type, precision) == Granularity.PER_CHANNEL)
    axis = weight_axis(layer.op_type, node, rank) if per_channel else None
    method = weight_range_method(precision) if is_integer(precision) else "minmax"
    if fmt.dynamic:  # dynamic int8: always per column, as onnxq.qdq_patterns writes it
        axis = weight_axis(layer.op_type, node, rank) if rank >= 2 else None
    return WeightQuantizer(layer.weight.tensor, precision, axis, symmetric, narrow, method,
                           block_size=fmt.block_size, reduce_range=fmt.reduce_range)


def _inferred_shapes(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Shapes of ``model``'s intermediate tensors, inferred on a copy without the weights' data."""
    try:
        return list(onnx.shape_inference.infer_shapes(shape_skeleton(model), strict_mode=False).graph.value_info)
    except Exception as exc:  # noqa: BLE001 - shapes only feed MACs and cut-tensor types
        logger.debug("shape inference failed (%s)", exc)
        return []


class _Planner:
    """Turns (layer, candidate) choices into jobs.

    Layers live in scopes (``""``: the main graph; otherwise a control-flow subgraph, see
    :mod:`onnxq.sensitivity.scoped`). A layer at an integer activation precision quantizes the
    tensors the layout gives its Q/DQ: its float inputs and, when its output gets a Q (a float
    consumer, or an integer one), that output. Jobs that touch only the main graph are engine
    :class:`Job` s; the others :class:`ScopedJob` s.
    """

    def __init__(self, views: Mapping[str, GraphView], home: Mapping[str, str], spec: HardwareSpec,
                 quantizers: Mapping[tuple[str, WeightFormat], WeightQuantizer]) -> None:
        self.views = views
        self.home = home
        self.spec = spec
        self.quantizers = quantizers
        self.ranges: dict[tuple[str, str], tuple[float, float]] = {}
        self._tensors: dict[tuple[str, Precision, bool], list[ActivationQuant]] = {}

    def layer(self, name: str) -> Layer:
        return self.views[self.home[name]].layers[name]

    def node(self, name: str) -> onnx.NodeProto:
        return self.views[self.home[name]].nodes[name]

    def tensor_quants(self, name: str, precision: Precision, dynamic: bool = False) -> list[ActivationQuant]:
        """The activations a layer at ``precision`` quantizes (as the layout places its Q/DQ);
        ``dynamic`` (``int8/dyn-uint8``): its inputs only, each call on its own range."""
        if not is_integer(precision):
            return []
        hit = self._tensors.get((name, precision, dynamic))
        if hit is None:
            view = self.views[self.home[name]]
            layer = view.layers[name]
            sym = activation_symmetric(self.spec, layer.op_type, precision)
            hit = [ActivationQuant(t, precision, sym, dynamic) for t in layer.activations]
            if dynamic:
                self._tensors[(name, precision, dynamic)] = hit
                return hit
            layout = plan_layout(view, {name: Candidate(precision, precision)}, self.spec)
            hit += [ActivationQuant(q.tensor, precision, q.symmetric) for q in layout.tensors.values()
                    if q.from_layer and q.tensor not in layer.activations]
            self._tensors[(name, precision, dynamic)] = hit
        return hit

    def activation_quants(self, name: str, precision: Precision, dynamic: bool = False) -> list[ActivationQuant]:
        scope = self.home[name]
        return [a for a in self.tensor_quants(name, precision, dynamic) if (scope, a.tensor) in self.ranges]

    def weight_format(self, name: str, candidate: Candidate) -> WeightFormat:
        return weight_format(self.spec, self.layer(name).op_type, candidate)

    def term_name(self, name: str, tensor: str) -> str:
        """A tensor's name in ``activation_terms`` (qualified by its scope inside a subgraph)."""
        scope = self.home[name]
        return tensor if scope == MAIN_SCOPE else f"{scope}::{tensor}"

    def weight_perturbation(self, name: str, fmt: WeightFormat, sign: float = 1.0) -> list[WeightPerturbation]:
        quantizer = self.quantizers.get((name, fmt))
        if quantizer is None:
            return []
        return [WeightPerturbation(quantizer.tensor, sign, quantizer)]

    def job(self, changes: Mapping[str, tuple[Sequence[WeightPerturbation], Sequence[ActivationQuant]]],
            segments: tuple[str, ...] = ()) -> Job | ScopedJob:
        """The job of per-scope changes: an engine :class:`Job` when only the main graph moves."""
        if set(changes) <= {MAIN_SCOPE}:
            weights, acts = changes.get(MAIN_SCOPE, ((), ()))
            return Job(tuple(weights), tuple(acts), segments=segments)
        return ScopedJob(tuple(ScopeChange(scope, tuple(w), tuple(a)) for scope, (w, a) in sorted(changes.items())))

    def plan_job(self, plan: Mapping[str, Candidate], segments: tuple[str, ...] = ()) -> Job | ScopedJob:
        """All of ``plan``'s layers quantized at once (weights and activations)."""
        weights: dict[str, dict[str, WeightPerturbation]] = {}
        acts: dict[str, dict[str, ActivationQuant]] = {}
        for name in self.home:
            candidate = plan.get(name)
            if candidate is None or candidate == FP32:
                continue
            scope = self.home[name]
            for p in self.weight_perturbation(name, self.weight_format(name, candidate)):
                weights.setdefault(scope, {}).setdefault(p.tensor, p)  # a shared weight is quantized once
            for a in self.activation_quants(name, candidate.activations, candidate.dynamic):
                current = acts.setdefault(scope, {}).get(a.tensor)
                if current is None or bits(a.precision) < bits(current.precision):
                    acts[scope][a.tensor] = a
        changes = {scope: (list(weights.get(scope, {}).values()), [acts.get(scope, {})[t] for t in sorted(acts.get(scope, {}))])
                   for scope in sorted(set(weights) | set(acts))}
        return self.job(changes, segments)


def _choose(views: Mapping[str, GraphView], spec: HardwareSpec,
            candidates: Mapping[str, Sequence[Candidate | str]] | None) -> tuple[dict[str, list[Candidate]], dict[str, str]]:
    """The candidates analysed per layer, and each layer's scope, main graph first (graph order)."""
    chosen: dict[str, list[Candidate]] = {}
    home: dict[str, str] = {}
    for scope, view in views.items():
        for name in view.layer_names:
            layer = view.layers[name]
            if candidates is None:
                options = _default_candidates(layer, spec)
            elif name in candidates:
                options = []
                for c in candidates[name]:
                    eff = effective_candidate(layer.weight is not None, _as_candidate(c))
                    if eff != FP32 and eff not in options:
                        options.append(eff)
            else:
                continue
            if options and name not in home:
                chosen[name] = options
                home[name] = scope
    if candidates is not None:
        known = {name for view in views.values() for name in view.layers}
        unknown = sorted(set(candidates) - known)
        if unknown:
            raise PlanError(f"sensitivity candidates name unknown layers: {', '.join(unknown[:5])}",
                            "use the layer names `onnxq inspect` shows")
    return chosen, home


def _calibrate(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]], planner: _Planner,
               chosen: Mapping[str, Sequence[Candidate]], method: str, cache_dir: str | os.PathLike[str] | None,
               seed: int) -> dict[tuple[str, str], tuple[float, float]]:
    """Ranges of every tensor the analysed candidates quantize, by ``(scope, tensor)``, in one sweep.

    Like the calibrate pass: ``method`` is ``--calibration``, each tensor is calibrated at the
    fewest bits any analysed candidate gives it, symmetric if any of them is; subgraph tensors
    are threaded out to main-graph outputs (:func:`onnxq.subgraphs.expose`).
    """
    finest: dict[tuple[str, str], Precision] = {}
    symmetric: dict[tuple[str, str], bool] = {}
    for name, options in chosen.items():
        for c in options:
            for a in planner.tensor_quants(name, c.activations):
                key = (planner.home[name], a.tensor)
                if key not in finest or bits(a.precision) < bits(finest[key]):
                    finest[key] = a.precision
                symmetric[key] = symmetric.get(key, False) or a.symmetric
    if not finest:
        return {}
    scoped = sorted({t for scope, t in finest if scope != MAIN_SCOPE})
    exposed, mapping = expose(model, scoped) if scoped else (model, {})
    name_of = {key: (key[1] if key[0] == MAIN_SCOPE else mapping[key[1]]) for key in finest}
    targets = sorted(set(name_of.values()))
    collected = collect_ranges(exposed, feeds, targets, method, cache_dir=cache_dir, seed=seed,
                               precision_for={name_of[k]: p for k, p in finest.items()},
                               symmetric_for={name_of[k]: s for k, s in symmetric.items()})
    return {key: (float(collected[name].min), float(collected[name].max))
            for key, name in name_of.items() if name in collected}


def _cache_path(cache_dir: str | os.PathLike[str], key: str) -> Path:
    return Path(cache_dir).expanduser() / f"sens-{key}.json"


def _load_cached(cache_dir: str | os.PathLike[str] | None, key: str) -> dict | None:
    if cache_dir is None:
        return None
    path = _cache_path(cache_dir, key)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable sensitivity cache entry %s (%s)", path, exc)
        return None
    if not isinstance(data, dict) or data.get("format") != SENSITIVITY_FORMAT:
        return None
    logger.info("sensitivity loaded from cache %s", path)
    return data


def _store_cached(cache_dir: str | os.PathLike[str] | None, key: str, result: dict) -> None:
    if cache_dir is None:
        return
    path = _cache_path(cache_dir, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=1, sort_keys=True))
    except OSError as exc:
        logger.warning("cannot write sensitivity cache %s (%s)", path, exc)


def _resolve_loss(loss: str, reference: Sequence[Sequence[np.ndarray]]) -> str:
    if loss in ("kl", "mse"):
        return loss
    if loss != "auto":
        raise UsageError(f"unknown sensitivity loss {loss!r}", "use auto, kl or mse")
    first = reference[0][0]
    return "kl" if first.dtype.kind == "f" and first.ndim == 2 and first.shape[-1] >= 2 else "mse"


def _random_plans(layers: Sequence[str], candidates: Mapping[str, Sequence[Candidate]], count: int,
                  seed: int) -> list[dict[str, Candidate]]:
    """Seeded random mixed plans: each plan quantizes a random fraction of the layers, each
    quantized layer at a uniformly drawn candidate of its own."""
    rng = np.random.default_rng([int(seed), 0x5E75])
    plans = []
    for _ in range(count):
        fraction = rng.uniform(0.2, 1.0)
        plan: dict[str, Candidate] = {}
        for name in layers:
            options = candidates[name]
            if options and rng.uniform() < fraction:
                plan[name] = options[int(rng.integers(len(options)))]
        plans.append(plan)
    return plans


def _pair_list(view: GraphView, layer_names: Sequence[str], chosen: Mapping[str, Sequence[Candidate]],
               radius: int) -> list[tuple[str, str, str, Candidate, Candidate]]:
    """The dependent pairs and the candidate pair each is measured at (most aggressive)."""
    out = []
    analysed = set(layer_names)
    for a, b, kind in view.dependent_pairs(radius):
        if a not in analysed or b not in analysed:
            continue
        common = [c for c in chosen[a] if c in chosen[b]]
        if common:
            ca = cb = _most_aggressive(common)
        else:
            ca, cb = _most_aggressive(chosen[a]), _most_aggressive(chosen[b])
        out.append((a, b, kind, ca, cb))
    return out


def bounded_cross(cross: float, delta_a: float, delta_b: float, pair_free: float | None = None) -> float:
    """``cross`` clipped to what a positive semi-definite quadratic form allows.

    For noises ``e_a, e_b`` and a PSD Hessian, ``δ = ½ eᵀHe`` and ``cross = e_aᵀ H e_b``, so
    Cauchy-Schwarz bounds ``|cross| ≤ 2 sqrt(δa δb)`` (negative deltas count as 0). The lower
    bound also keeps the pair's predicted loss ``pair_free + cross`` (``pair_free``: the
    prediction without the cross term, ``δa + δb`` by default) from going negative, which a
    solver minimising the loss would otherwise exploit. Non-finite crosses become 0.
    """
    if not math.isfinite(cross):
        return 0.0
    da, db = max(delta_a, 0.0), max(delta_b, 0.0)
    limit = 2.0 * math.sqrt(da * db)
    floor = -min(limit, max(da + db if pair_free is None else pair_free, 0.0))
    return float(min(max(cross, floor), limit))


def _canonical(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "source"}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True, default=str))
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def spec_digest(spec: HardwareSpec) -> str:
    """sha256 of the spec's content (every field but where it was loaded from): two specs that
    share a name but differ in a rule get different cache entries."""
    payload = json.dumps(_canonical(spec), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _expand_pair(a: str, b: str, kind: str, ca: Candidate, cb: Candidate, cross: float,
                 chosen: Mapping[str, Sequence[Candidate]],
                 deltas: Mapping[tuple[str, Candidate], float],
                 pair_free: Callable[[Candidate, Candidate], float]) -> list[dict[str, Any]]:
    """One pair entry per candidate combination of ``(a, b)``.

    The measured combination keeps its cross term (``"scaling": "measured"``); every other one
    gets ``cross · sqrt(δa(c)·δb(d) / (δa(ca)·δb(cb)))`` (``"scaling": "sqrt-delta"``, with
    ``"measured_at"`` the measured candidates): for weight noise the cross term is
    ``ΔW_aᵀ H_ab ΔW_b``, bilinear in the two noises, whose sizes scale as ``sqrt(δ)`` since
    ``δ ≈ ½ ΔWᵀHΔW``. A combination whose delta (or the measured one's) is not positive gets 0.
    Every entry is then bounded by :func:`bounded_cross` (``pair_free(c, d)``: the pair's
    prediction without its cross term); ``"raw_cross"`` keeps the value before the bound.
    """
    da0, db0 = deltas.get((a, ca), 0.0), deltas.get((b, cb), 0.0)
    out: list[dict[str, Any]] = []
    for c in chosen[a]:
        for d in chosen[b]:
            entry: dict[str, Any] = {"a": a, "b": b, "kind": kind, "candidates": [str(c), str(d)]}
            da, db = deltas.get((a, c), 0.0), deltas.get((b, d), 0.0)
            if (c, d) == (ca, cb):
                raw = cross
                entry.update(scaling="measured")
            else:
                ratio = da * db / (da0 * db0) if da0 > 0 and db0 > 0 and da > 0 and db > 0 else 0.0
                raw = float(cross * np.sqrt(ratio))
                entry.update(scaling="sqrt-delta", measured_at=[str(ca), str(cb)])
            entry["cross"] = bounded_cross(raw, da, db, pair_free(c, d))
            if entry["cross"] != raw:
                entry["raw_cross"] = raw
            out.append(entry)
    return out


#: What each job tag measures, for the log.
_JOB_KINDS = {"w": "weight", "h": "hutchinson", "t": "activation", "pair": "pair", "plan": "validation plan"}
#: Grids of at least this many bits are predicted from a measured coarser grid, not measured.
FINE_BITS = 16


def _act_tag(scope: str, quant: ActivationQuant) -> tuple:
    return ("t", scope, quant.tensor, quant.precision, quant.symmetric, quant.dynamic)


def _grid_key(quant: ActivationQuant) -> tuple:
    """Quants with equal keys dequantize to the same grid (asymmetric: any type of the width)."""
    return quant.dynamic, bits(quant.precision), str(quant.precision) if quant.symmetric else "asymmetric"


def _step(lo: float, hi: float, quant: ActivationQuant) -> float:
    return float(np.max(qparams_from_range(lo, hi, quant.precision, quant.symmetric).scale))


def _activation_sources(quants: Mapping[tuple[str, str], Mapping[ActivationQuant, None]],
                        ranges: Mapping[tuple[str, str], tuple[float, float]]
                        ) -> dict[tuple[str, ActivationQuant], tuple[ActivationQuant, float]]:
    """For every analysed ``(scope, activation quant)``: the quant whose measured loss stands for
    it and the factor that converts it.

    * An asymmetric grid over ``[lo, hi]`` dequantizes to the same values whatever integer type
      of its width holds the codes (uint8 and int8 differ only in the zero point), so one of
      them is measured, with factor 1.
    * A static grid of at least :data:`FINE_BITS` bits adds rounding noise of variance Δ²/12,
      independent of the signal when nothing is clipped (Widrow's model); to second order its
      loss is the measured loss of the same tensor's finest ≤ 8-bit static grid times
      ``(Δ/Δ_ref)²`` — about 1.5e-5 at 16 bits, well below the float noise a direct
      measurement of it would be lost in.
    * Dynamic quants (per-call ranges) and tensors with no coarse static grid are measured.
    """
    out: dict[tuple[str, ActivationQuant], tuple[ActivationQuant, float]] = {}
    for (scope, tensor), found in quants.items():
        ordered = sorted(found, key=lambda q: (q.dynamic, bits(q.precision), str(q.precision), q.symmetric))
        same_grid: dict[tuple, ActivationQuant] = {}
        for q in ordered:
            same_grid.setdefault(_grid_key(q), q)
        coarse = [q for q in ordered if not q.dynamic and bits(q.precision) <= 8]
        lo, hi = ranges[(scope, tensor)]
        for q in ordered:
            source = same_grid[_grid_key(q)]
            if not q.dynamic and bits(q.precision) >= FINE_BITS and coarse:
                ref = max(coarse, key=lambda r: (r.symmetric == q.symmetric, bits(r.precision)))
                ref = same_grid[_grid_key(ref)]
                out[(scope, q)] = (ref, (_step(lo, hi, q) / max(_step(lo, hi, ref), 1e-30)) ** 2)
            else:
                out[(scope, q)] = (source, 1.0)
    return out


def _weight_sources(name: str, formats: Sequence[WeightFormat],
                    quantizers: Mapping[tuple[str, WeightFormat], WeightQuantizer],
                    weights: Mapping[str, np.ndarray]) -> dict[tuple[str, WeightFormat], tuple[WeightFormat, float]]:
    """Layer ``name``'s weight formats of at least :data:`FINE_BITS` bits (fp16, bf16, int16)
    predicted from its finest measured ≤ 8-bit format: ``δ ≈ ½ ΔWᵀHΔW`` scales with the noise's
    energy ``|ΔW|²`` when the noise is uncorrelated with the curvature's directions, the same
    assumption as the Hutchinson estimate; the fine formats' deltas are 1e-4 or less of the
    coarse one's, below what a finite difference resolves."""
    coarse = [f for f in formats if bits(f.precision) <= 8]
    fine = [f for f in formats if bits(f.precision) >= FINE_BITS]
    if not coarse or not fine:
        return {}
    ref = max(coarse, key=lambda f: (bits(f.precision), str(f)))
    w = weights.get(quantizers[(name, ref)].tensor)
    if w is None:
        return {}
    energy = {f: float(np.sum(weight_noise(w, quantizers[(name, f)]).astype(np.float64) ** 2)) for f in (ref, *fine)}
    if energy[ref] <= 0:
        return {}
    return {(name, f): (ref, energy[f] / energy[ref]) for f in fine}


def _signature(feed: Mapping[str, np.ndarray]) -> tuple:
    """What must match for two feeds to be concatenated: names, dtypes, shapes after axis 0."""
    return tuple((k, np.asarray(v).dtype.str, np.shape(v)[1:]) for k, v in sorted(feed.items()))


def _pair_free(sens: Mapping[str, Any], a: str, b: str) -> Callable[[Candidate, Candidate], float]:
    """The predicted loss of ``{a: c, b: d}`` without pair terms, as a function of ``(c, d)``."""
    def predict(c: Candidate, d: Candidate) -> float:
        return predicted_loss(sens, {a: c, b: d})
    return predict


def _rebatch(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
             max_samples: int | None) -> list[dict[str, np.ndarray]]:
    """The first ``max_samples`` samples, in batches of up to :data:`MAX_BATCH` when possible.

    Feeds are only cut or merged when every input of every feed has the same leading dimension
    and every graph input declares a dynamic first dimension; otherwise they are kept as given.
    Only feeds of the same shape (after the batch axis) are merged: one ``.npz`` per sentence,
    each trimmed to its own length, gives one batch per distinct length (in first-seen order).
    """
    if not feeds:
        return feeds
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    dynamic = all(i.type.tensor_type.HasField("shape") and len(i.type.tensor_type.shape.dim) > 0
                  and not i.type.tensor_type.shape.dim[0].HasField("dim_value") for i in inputs)
    sizes = []
    for feed in feeds:
        leading = {np.asarray(v).shape[0] if np.ndim(v) else -1 for v in feed.values()}
        if len(leading) != 1 or -1 in leading or set(feed) != set(feeds[0]):
            return feeds
        sizes.append(leading.pop())
    kept, total = [], 0
    for feed, size in zip(feeds, sizes, strict=True):
        if max_samples is not None and total >= max_samples:
            break
        take = size if max_samples is None or not dynamic else min(size, max(1, int(max_samples)) - total)
        kept.append(feed if take == size else {k: np.asarray(v)[:take] for k, v in feed.items()})
        total += take
    if not dynamic:
        return kept
    groups: dict[tuple, list[dict[str, np.ndarray]]] = {}
    for feed in kept:
        groups.setdefault(_signature(feed), []).append(feed)
    out: list[dict[str, np.ndarray]] = []
    for members in groups.values():
        merged = {k: np.concatenate([np.asarray(f[k]) for f in members]) for k in members[0]}
        count = feed_samples(merged)
        out.extend({k: v[i:i + MAX_BATCH] for k, v in merged.items()} for i in range(0, count, MAX_BATCH))
    return out


def analyze(
    model: onnx.ModelProto,
    feeds: Sequence[dict[str, np.ndarray]],
    spec: HardwareSpec,
    candidates: Mapping[str, Sequence[Candidate]] | None = None,
    *,
    method: str = "onesided",
    radius: int = 1,
    pairs: bool = True,
    random_plans: int = 0,
    workers: int = 0,
    executor: str = "local",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    seed: int = 0,
    loss: str = "auto",
    max_samples: int | None = DEFAULT_SAMPLES,
    calibration: str = "minmax",
    memory_budget_mb: float | None = None,
    tolerance: float = SEQUENTIAL_TOLERANCE,
) -> dict:
    """Sensitivity of every layer × candidate, pair terms, and an optional validation.

    Args:
        model: the fp32 model (not modified).
        feeds: calibration feeds (complete input dicts, one per batch).
        spec: the hardware spec (candidates, weight and activation quantizer rules).
        candidates: per layer, the candidates to analyse (strings or :class:`Candidate`);
            ``None``: every non-fp32 candidate the spec allows for the layer's op (weightless
            layers use the activation side on both, see :func:`onnxq.layout.effective_candidate`).
            Layers left out of the mapping are not analysed.
        method: ``onesided`` (``L(W+ΔW) − L(W)``), ``central`` (finite differences along the
            quantization noise) or
            ``hutchinson`` (trace estimate × ‖ΔW‖²/n).
        radius: layer hops of the chain pairs (:meth:`GraphView.dependent_pairs`).
        pairs: measure the inter-layer cross terms.
        random_plans: number of seeded random mixed plans whose measured loss validates the
            predictions (Spearman correlation, with and without pair terms).
        workers: ``0``/``1`` in-process; ``N > 1`` worker processes (or Ray actors).
        executor: ``local``, ``ray`` or ``ray:ADDRESS``.
        cache_dir: on-disk cache of the result (and of the activation ranges); ``None``: none.
        progress: tqdm bar over the evaluations.
        seed: seed of the Rademacher directions and of the random plans.
        loss: ``auto`` (``kl`` for 2-D logits, ``mse`` otherwise), ``kl`` or ``mse``.
        max_samples: use only the first ``max_samples`` samples of the feeds (``None``: all);
            the feeds are then concatenated into batches of up to :data:`MAX_BATCH` samples when
            the model's batch dimension is dynamic (only feeds of equal shapes are merged).
        calibration: the activation range method (``--calibration``), as the calibrate pass
            will use it: each tensor calibrated at the finest precision analysed for it.
            the model's batch dimension is dynamic.
        memory_budget_mb: bound on the activations cached between evaluations (the feeds are
            processed in chunks that fit); ``None``: :func:`default_memory_budget` (a quarter of the
            size of the model, at least 128 MiB, at most a quarter of the available memory).
        tolerance: on more than :data:`~onnxq.sensitivity.engine.SEQUENTIAL_MIN_SAMPLES`
            samples, a layer's evaluation stops once the standard error of its loss is within
            this fraction of it (:func:`~onnxq.sensitivity.engine.converged`); ``0``: every
            evaluation runs on every sample.

    Returns:
        The ``onnxq-sensitivity/1`` JSON dict (DESIGN.md), plus ``method``, ``spec``,
        ``loss_fp32``, ``options``, ``conventions`` and, with ``random_plans``, ``validation``.

    Raises:
        UsageError: bad options. CalibrationError: no feeds.
    """
    if method not in METHODS:
        raise UsageError(f"unknown sensitivity method {method!r}", "use onesided, central or hutchinson")
    if radius < 1:
        raise UsageError(f"radius {radius} must be at least 1", "e.g. --radius 1")
    if random_plans < 0 or workers < 0:
        raise UsageError("random_plans and workers must be >= 0", "e.g. --random-plans 20 --workers 2")
    require_executor(executor)
    feed_list = _rebatch(model, [dict(f) for f in feeds], max_samples)
    if not feed_list:
        raise CalibrationError("no calibration feeds for the sensitivity analysis", "pass at least one feed")
    start = time.perf_counter()

    model_sha = _cache.model_digest(model)
    # the model is analysed at its own opset (fake-quantization is float arithmetic and numpy
    # noise, valid at any opset); the rewrite upgrades it to 13+ for any integer plan (or fails),
    # so weights are quantized per channel as it will write them. Converting here cost a copy of
    # the model and, on a 110M encoder, 30 s of onnx.version_converter.
    work = model
    shapes = _inferred_shapes(work)
    view = graph_view_for(work, spec, shapes)
    scoped_views = {sv.scope.key: sv for sv in scope_views_for(work, spec)}
    views: dict[str, GraphView] = {MAIN_SCOPE: view, **{k: sv.view for k, sv in scoped_views.items()}}
    chosen, home = _choose(views, spec, candidates)
    layer_names = list(home)

    options_key: dict[str, Any] = {
        "format": SENSITIVITY_FORMAT, "algorithm": ALGORITHM_VERSION, "spec": spec.name,
        "spec_sha256": spec_digest(spec), "calibration": calibration,
        "spec_ops": sorted(view.layer_ops),
        "candidates": {n: [str(c) for c in chosen[n]] for n in layer_names},
        "method": method, "radius": int(radius), "pairs": bool(pairs), "random_plans": int(random_plans),
        "seed": int(seed), "loss": loss, "max_samples": max_samples, "tolerance": float(tolerance),
    }
    key = _cache.cache_key(model_sha, _cache.feeds_digest(feed_list), options_key)
    hit = _load_cached(cache_dir, key)
    if hit is not None:
        return hit

    # -- the one session: every analysed weight exposed, every activation fake-quantizable
    quantizers: dict[tuple[str, WeightFormat], WeightQuantizer] = {}
    planner = _Planner(views, home, spec, quantizers)
    weight_tensors: list[str] = []
    for name in layer_names:
        layer = planner.layer(name)
        if layer.weight is not None:
            for c in chosen[name]:
                fmt = planner.weight_format(name, c)
                if c.weights is not Precision.FP32 and (name, fmt) not in quantizers:
                    quantizers[(name, fmt)] = _weight_quantizer(layer, planner.node(name), fmt, spec)
            if home[name] == MAIN_SCOPE and any((name, planner.weight_format(name, c)) in quantizers
                                                for c in chosen[name]):
                weight_tensors.append(layer.weight.tensor)
    weight_tensors = list(dict.fromkeys(weight_tensors))
    planner.ranges.update(_calibrate(work, feed_list, planner, chosen, calibration, cache_dir, seed))
    ranges = {t: r for (scope, t), r in planner.ranges.items() if scope == MAIN_SCOPE}
    act_tensors = sorted(ranges)

    pair_list = [p for scope, v in views.items() if pairs
                 for p in _pair_list(v, [n for n in layer_names if home[n] == scope], chosen, radius)]
    partners: dict[str, list[str]] = {n: [] for n in layer_names}
    for a, b, _, _, _ in pair_list:
        partners[a].append(b)
        partners[b].append(a)
    segments = []
    for name in layer_names:
        if home[name] != MAIN_SCOPE:
            continue
        layer = view.layers[name]
        seg_weights = (layer.weight.tensor,) if layer.weight is not None and layer.weight.tensor in weight_tensors else ()
        seg_acts = dict.fromkeys(q.tensor for c in chosen[name]
                                 for q in planner.activation_quants(name, c.activations, c.dynamic))
        segments.append(Segment(name, seg_weights, tuple(seg_acts), tuple(dict.fromkeys(partners[name]))))
    segments.extend(Segment(f"tensor:{t}", (), (t,)) for t in act_tensors)
    skeleton, shared = detach_weights(work, shapes)
    weight_bytes = len(skeleton) + sum(w.nbytes for w in shared.values())
    context = EvalContext(
        model_bytes=skeleton, feeds=tuple(feed_list), activation_tensors=tuple(act_tensors),
        weight_tensors=tuple(weight_tensors), ranges=ranges, loss="mse", segments=tuple(segments),
        cache_bytes=int(memory_budget_mb * 2**20) if memory_budget_mb else default_memory_budget(weight_bytes),
        weights=shared, tolerance=float(tolerance),
    )
    local = Evaluator(context)
    reference = local.fp32_outputs()
    loss_kind = _resolve_loss(loss, reference)
    context = replace(context, loss=loss_kind, reference=reference)
    local.context = context
    local.set_reference(reference)
    loss0 = local.loss(Job())

    # -- jobs, in a fixed order ---------------------------------------------------------------
    jobs: list[Job | ScopedJob] = []
    index: dict[tuple, int] = {}

    by_job: dict[Job | ScopedJob, int] = {}

    def add(tag: tuple, job: Job | ScopedJob) -> None:
        if tag not in index:  # an identical job (a pair's single at a float activation) runs once
            index[tag] = by_job.setdefault(job, len(jobs))
            if index[tag] == len(jobs):
                jobs.append(job)

    weights_cache: dict[str, np.ndarray] = {}
    scoped_weights: dict[tuple[str, str], np.ndarray] = {}
    eps: dict[str, float] = {}
    noise_sq: dict[tuple[str, WeightFormat], float] = {}
    act_quants: dict[tuple[str, str], dict[ActivationQuant, None]] = {}
    w_sources: dict[tuple[str, WeightFormat], tuple[WeightFormat, float]] = {}
    for name in layer_names:
        layer = planner.layer(name)
        scope = home[name]
        if layer.weight is not None and scope != MAIN_SCOPE:
            value = views[scope].weight_value(layer.weight.tensor)
            if value is not None:
                scoped_weights[(scope, layer.weight.tensor)] = value.astype(np.float32)
        wprecs = [p for p in dict.fromkeys(planner.weight_format(name, c) for c in chosen[name])
                  if (name, p) in quantizers]
        if method in ("central", "onesided"):
            if scope == MAIN_SCOPE:
                w_sources.update(_weight_sources(name, wprecs, quantizers, local.weights))
            for p in wprecs:
                if w_sources.get((name, p), (p,))[0] != p:
                    continue
                q = quantizers[(name, p)]
                for sign in ((1.0, -1.0) if method == "central" else (1.0,)):
                    add(("w", name, p, sign), planner.job({scope: ([WeightPerturbation(q.tensor, sign, q)], [])},
                                                          (name,)))
        elif wprecs and layer.weight is not None:
            value = views[scope].weight_value(layer.weight.tensor)
            assert value is not None
            weights_cache[name] = value.astype(np.float32)
            for p in wprecs:
                noise = weight_noise(weights_cache[name], quantizers[(name, p)])
                noise_sq[(name, p)] = float(np.sum(noise.astype(np.float64) ** 2))
            coarsest = min(wprecs, key=lambda p: (bits(p.precision), str(p)))
            n = max(weights_cache[name].size, 1)
            eps[name] = max(float(np.sqrt(noise_sq[(name, coarsest)] / n)), 1e-6)
            for d in range(HUTCHINSON_DIRECTIONS):
                for sign in (1.0, -1.0):
                    perturbation = WeightPerturbation(layer.weight.tensor, sign, None, d, eps[name],
                                                      seed * 1_000_003 + layer.index)
                    add(("h", name, d, sign), planner.job({scope: ([perturbation], [])}, (name,)))
        for p, dynamic in dict.fromkeys((c.activations, c.dynamic) for c in chosen[name]):
            for quant in planner.activation_quants(name, p, dynamic):  # one term per tensor: shared ones once
                act_quants.setdefault((scope, quant.tensor), {})[quant] = None
    act_sources = _activation_sources(act_quants, planner.ranges)
    for (scope, quant), (source, _) in act_sources.items():
        if source == quant:
            add(_act_tag(scope, quant), planner.job({scope: ([], [quant])}, (f"tensor:{quant.tensor}",)))

    for a, b, _, ca, cb in pair_list:
        add(("pair", a, b), planner.plan_job({a: ca, b: cb}, (a, b)))

    plans = _random_plans(layer_names, chosen, random_plans, seed)
    for i, plan in enumerate(plans):
        add(("plan", i), planner.plan_job(plan))

    first_tag: dict[int, str] = {}
    for tag, i in index.items():  # in insertion order: the tag that created the job comes first
        first_tag.setdefault(i, tag[0])
    kinds = Counter(_JOB_KINDS.get(kind, kind) for kind in first_tag.values())
    logger.info("sensitivity: %d layers (%d in subgraphs), %d pairs, %d evaluations (%s; %s, workers=%d, %s)",
                len(layer_names), sum(home[n] != MAIN_SCOPE for n in layer_names), len(pair_list), len(jobs),
                ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())), method, workers, executor)
    main_jobs = [j for j in jobs if isinstance(j, Job)]
    main_list, usage = run_jobs(context, main_jobs, workers=workers, executor=executor, progress=progress, local=local)
    main_losses = iter(main_list)
    usage = usage or local.usage()
    if usage.stopped_early:
        logger.info("sensitivity: %d of %d evaluations stopped before the last of %d chunks (standard error "
                    "within %.0f%%)", usage.stopped_early, len(main_jobs), usage.chunks, 100 * tolerance)
    scoped = ScopedEvaluator(work, scoped_views, scoped_weights, planner.ranges, feed_list, reference, loss_kind)
    losses = [next(main_losses) if isinstance(j, Job) else scoped.loss(j) for j in jobs]
    EVALUATION_COUNTER.total += len(jobs) + 1

    def measured(tag: tuple) -> float:
        return losses[index[tag]] - loss0

    # -- assemble ------------------------------------------------------------------------------
    deltas: dict[tuple[str, Candidate], float] = {}
    layers_json = []
    for name in layer_names:
        layer = planner.layer(name)
        scope = home[name]
        trace = None
        if method == "hutchinson" and name in eps:
            curv = [(measured(("h", name, d, 1.0)) + measured(("h", name, d, -1.0))) / eps[name] ** 2
                    for d in range(HUTCHINSON_DIRECTIONS)]
            trace = float(np.mean(curv))  # E[vᵀHv] = Tr(H) for Rademacher v: no factor n
        entry: dict[str, Any] = {}
        for c in chosen[name]:
            w_term = 0.0
            fmt = planner.weight_format(name, c)
            if (name, fmt) in quantizers:
                source, factor = w_sources.get((name, fmt), (fmt, 1.0))
                if method == "central":
                    w_term = factor * 0.5 * (measured(("w", name, source, +1)) + measured(("w", name, source, -1)))
                elif method == "onesided":
                    w_term = factor * measured(("w", name, source, +1))
                elif trace is not None:
                    w_term = 0.5 * trace / weights_cache[name].size * noise_sq[(name, fmt)]
            a_terms = {planner.term_name(name, q.tensor): act_sources[(scope, q)][1]
                       * measured(_act_tag(scope, act_sources[(scope, q)][0]))
                       for q in planner.activation_quants(name, c.activations, c.dynamic)}
            a_term = float(sum(a_terms.values()))
            deltas[(name, c)] = w_term + a_term
            item: dict[str, Any] = {"delta": w_term + a_term, "weight": w_term, "activation": a_term}
            if a_terms:
                item["activation_terms"] = a_terms
            entry[str(c)] = item
        row: dict[str, Any] = {"name": name, "op_type": layer.op_type, "params": int(layer.params),
                               "macs": int(layer.macs), "candidates": entry}
        if scope != MAIN_SCOPE:
            row["scope"] = scope
        if trace is not None:
            row["hessian_trace"] = trace
        layers_json.append(row)

    pairs_json = []
    alone = {"layers": layers_json, "pairs": []}
    for a, b, kind, ca, cb in pair_list:
        # the cross term is what the pair-free prediction misses of the measured pair, so the
        # prediction of the measured combination is its measured loss (before the bound)
        cross = measured(("pair", a, b)) - predicted_loss(alone, {a: ca, b: cb})
        pairs_json.extend(_expand_pair(a, b, kind, ca, cb, cross, chosen, deltas, _pair_free(alone, a, b)))

    result: dict[str, Any] = {
        "format": SENSITIVITY_FORMAT,
        "model_sha256": model_sha,
        "spec": spec.name,
        "loss": loss_kind,
        "method": method,
        "loss_fp32": loss0,
        "layers": layers_json,
        "pairs": pairs_json,
        "evaluations": len(jobs) + 1,
        "samples": sum(feed_samples(f) for f in feed_list),
        "stopped_early": local.stopped_early,
        "options": {k: v for k, v in options_key.items() if k in ("method", "radius", "pairs", "random_plans", "seed",
                                                                    "calibration")},
        "conventions": ("delta = predicted loss increase when only that layer takes the candidate: "
                        "weight term 1/2 dWᵀH dW (onesided: L(W+dW)-L(W), second order since L is minimal at the "
                        "fp32 W; central: 1/2(L(W+dW)+L(W-dW)-2L(W)); hutchinson: "
                        "1/2 Tr(H)/n |dW|², Tr(H) = mean of v'Hv) + measured loss change with each tensor "
                        "the layer's Q/DQ quantize (inputs, and its output where the layout puts a Q) "
                        "fake-quantized; cross = L(a+b) - L(a) - L(b) + L(0) measured at the pair's "
                        "most aggressive candidates (scaling 'measured') and, for every other candidate "
                        "combination, scaled as cross* sqrt(delta_a(c) delta_b(d) / (delta_a* delta_b*)) "
                        "(scaling 'sqrt-delta', the second-order form of dW_a'H_ab dW_b), bounded by "
                        "|cross| <= 2 sqrt(delta_a delta_b) and a non-negative pair prediction; predicted loss "
                        "of a plan = sum of deltas + matching crosses"),
    }
    if plans:
        base = {"layers": layers_json, "pairs": []}
        predicted_with = [predicted_loss(result, plan) for plan in plans]
        predicted_without = [predicted_loss(base, plan) for plan in plans]
        real = [measured(("plan", i)) for i in range(len(plans))]
        result["validation"] = {
            "plans": len(plans),
            "spearman_with_pairs": spearman(predicted_with, real),
            "spearman_without_pairs": spearman(predicted_without, real),
            "measured": real,
            "predicted_with_pairs": predicted_with,
            "predicted_without_pairs": predicted_without,
        }
    result["seconds"] = round(time.perf_counter() - start, 3)
    # the budget, chunks and cache are each worker's; with workers, the peak is given per process
    result["memory"] = {"peak_rss_mib": round(peak_rss_mib(), 1), "budget_mib": round(context.cache_bytes / 2**20, 1),
                        "chunks": usage.chunks, "cached_mib": round(usage.cached_bytes / 2**20, 1)}
    if usage.process != os.getpid():
        result["memory"]["worker_peak_rss_mib"] = round(usage.peak_rss_mib, 1)
    _store_cached(cache_dir, key, result)
    return result


def _as_candidate(value: Candidate | str) -> Candidate:
    return value if isinstance(value, Candidate) else Candidate.parse(value)


def _lookup(layer: Mapping[str, Any], candidate: Candidate) -> Mapping[str, Any] | None:
    table = layer["candidates"]
    entry = table.get(str(candidate))
    if entry is None:
        entry = table.get(str(Candidate(candidate.activations, candidate.activations)))
    return entry


def predicted_loss(sens: Mapping[str, Any], plan: Mapping[str, Candidate | str]) -> float:
    """The predicted loss increase of ``plan``: its layers' deltas plus the matching cross terms.

    Layers absent from the plan, or at ``fp32/fp32``, add nothing; a pair's cross term counts
    when both of its layers take exactly the pair's candidates (weightless layers match on
    their effective candidate). An input activation shared by several of the plan's layers
    (``activation_terms``) counts once, at the precision the simulation gives it (the fewest
    bits; the first layer in graph order on ties).

    Raises:
        PlanError: the plan gives a layer a candidate the analysis did not measure.
    """
    normalized = {name: _as_candidate(c) for name, c in plan.items()}
    total = 0.0
    effective: dict[str, str] = {}
    tensor_terms: dict[str, tuple[int, float]] = {}
    for row in sens["layers"]:  # graph order, like the simulation's choice of a shared tensor's bits
        name = row["name"]
        candidate = normalized.get(name)
        if candidate is None or candidate == FP32:
            continue
        entry = _lookup(row, candidate)
        if entry is None:
            raise PlanError(f"the sensitivity analysis has no {candidate} entry for layer {name!r}",
                            f"analysed candidates: {', '.join(row['candidates'])}")
        key = str(candidate) if str(candidate) in row["candidates"] else str(
            Candidate(candidate.activations, candidate.activations))
        effective[name] = key
        terms = entry.get("activation_terms")
        if not terms:
            total += float(entry["delta"])
            continue
        total += float(entry["delta"]) - float(sum(terms.values()))
        width = bits(Candidate.parse(key).activations)
        for tensor, term in terms.items():
            current = tensor_terms.get(tensor)
            if current is None or width < current[0]:
                tensor_terms[tensor] = (width, float(term))
    total += sum(term for _, term in tensor_terms.values())
    for pair in sens.get("pairs", ()):
        ca, cb = pair["candidates"]
        if effective.get(pair["a"]) == ca and effective.get(pair["b"]) == cb:
            total += float(pair["cross"])
    return total
