"""Per-layer × candidate sensitivity, inter-layer pair terms, and their validation.

Conventions (also written into the JSON under ``"conventions"``):

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
    Rademacher directions ``v``: ``vᵀHv ≈ (L(W+εv) + L(W−εv) − 2L(W)) / ε²``; ``ε`` is the RMS of
    the layer's coarsest integer weight noise, so the curvature is probed at the scale that
    matters. One trace per layer serves all its weight precisions.
  - activation term: ``L(x̃) − L(0)`` with the layer's float input activations fake-quantized at
    the candidate's activation precision (calibrated min/max ranges, symmetric as the spec
    says). Float activation precisions (fp16…) add 0.
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
  the pairs (the search's ILP) sees the scaled terms.
* The predicted loss of a plan is the sum of its layers' deltas plus the cross terms of the
  pairs whose two layers both take the pair's candidates (:func:`predicted_loss`).
* The loss is measured on the first ``max_samples`` (64) samples, concatenated into batches of
  up to 256 when the batch dimension is dynamic.

How evaluations run (:mod:`onnxq.sensitivity.engine`): one fp32 run per chunk of feeds caches
every tensor where a layer's suffix of the graph is cut off (chunks sized to the memory budget);
a single-layer evaluation then runs only the nodes downstream of that layer, with its input
activations fake-quantized in numpy (no fake-quant nodes in the graph); a pair chains its two
layers' cut sessions. All sessions share one copy of the weights. Validation plans run in a
model built for the plan. When the model has control flow, evaluations go through one
:class:`~onnxq.simulate.FakeQuantModel` session instead (logged as a warning).
* When one activation tensor feeds layers at different precisions (a plan, a pair), the
  simulation quantizes it once at the lowest bit width among them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.calibration import cache as _cache
from onnxq.calibration import collect_ranges
from onnxq.errors import CalibrationError, PlanError, UsageError
from onnxq.graph import GraphView, Layer
from onnxq.layout import activation_symmetric, effective_candidate
from onnxq.precision import FP32, Candidate, Precision, bits, is_integer
from onnxq.rewrite import weight_axis
from onnxq.sensitivity.engine import (
    ActivationQuant,
    EvalContext,
    Evaluator,
    Job,
    Segment,
    WeightPerturbation,
    WeightQuantizer,
    default_memory_budget,
    peak_rss_mib,
    weight_noise,
)
from onnxq.sensitivity.executors import require_executor, run_jobs
from onnxq.spec.model import Granularity, HardwareSpec

__all__ = ["SENSITIVITY_FORMAT", "METHODS", "analyze", "predicted_loss", "EVALUATION_COUNTER"]

logger = logging.getLogger(__name__)

SENSITIVITY_FORMAT = "onnxq-sensitivity/1"
METHODS = ("onesided", "central", "hutchinson")
#: Rademacher directions per layer for ``method="hutchinson"``.
HUTCHINSON_DIRECTIONS = 4
#: Bumped whenever the numbers this module computes change (part of the cache key).
_ALGORITHM_VERSION = 3
#: Calibration samples the analysis uses by default (the first ones; ``max_samples``).
DEFAULT_SAMPLES = 64
#: Feeds are concatenated into batches of up to this many samples when the model's inputs have
#: a dynamic leading (batch) dimension: one run of a batch of 64 is far cheaper than 64 runs.
MAX_BATCH = 256


@dataclass
class _Counter:
    """Evaluations actually run by :func:`analyze` in this process (cache hits add 0)."""

    total: int = 0


EVALUATION_COUNTER = _Counter()


def _layer_ops(spec: HardwareSpec) -> set[str]:
    from onnxq.api import layer_ops_for  # noqa: PLC0415 - api imports the passes; keep it lazy

    return set(layer_ops_for(spec))


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


def _weight_quantizer(layer: Layer, node: onnx.NodeProto, precision: Precision, spec: HardwareSpec,
                      per_channel_ok: bool) -> WeightQuantizer:
    assert layer.weight is not None
    rank = len(layer.weight.shape)
    rule = spec.weight_rule(layer.op_type, precision)
    symmetric = True if rule is None else rule.symmetric
    narrow = False if rule is None else rule.narrow_range
    per_channel = (is_integer(precision) and per_channel_ok and rank >= 2
                   and (rule is None or rule.preferred_granularity == Granularity.PER_CHANNEL))
    axis = weight_axis(layer.op_type, node, rank) if per_channel else None
    method = "mse" if is_integer(precision) and bits(precision) <= 4 else "minmax"
    return WeightQuantizer(layer.weight.tensor, precision, axis, symmetric, narrow, method)


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


class _Planner:
    """Turns (layer, candidate) choices into :class:`Job` s."""

    def __init__(self, view: GraphView, spec: HardwareSpec, quantizers: Mapping[tuple[str, Precision], WeightQuantizer],
                 ranges: Mapping[str, tuple[float, float]]) -> None:
        self.view = view
        self.spec = spec
        self.quantizers = quantizers
        self.ranges = ranges

    def activation_quants(self, layer: Layer, precision: Precision) -> list[ActivationQuant]:
        if not is_integer(precision):
            return []
        sym = activation_symmetric(self.spec, layer.op_type, precision)
        return [ActivationQuant(t, precision, sym) for t in layer.activations if t in self.ranges]

    def weight_perturbation(self, layer: Layer, precision: Precision, sign: float = 1.0) -> list[WeightPerturbation]:
        quantizer = self.quantizers.get((layer.name, precision))
        if quantizer is None:
            return []
        return [WeightPerturbation(quantizer.tensor, sign, quantizer)]

    def plan_job(self, plan: Mapping[str, Candidate]) -> Job:
        """All of ``plan``'s layers quantized at once (weights and input activations)."""
        weights: list[WeightPerturbation] = []
        acts: dict[str, ActivationQuant] = {}
        seen_weights: set[str] = set()
        for name in self.view.layer_names:
            candidate = plan.get(name)
            if candidate is None or candidate == FP32:
                continue
            layer = self.view.layers[name]
            for p in self.weight_perturbation(layer, candidate.weights):
                if p.tensor not in seen_weights:  # a shared weight is quantized once
                    seen_weights.add(p.tensor)
                    weights.append(p)
            for a in self.activation_quants(layer, candidate.activations):
                current = acts.get(a.tensor)
                if current is None or bits(a.precision) < bits(current.precision):
                    acts[a.tensor] = a
        return Job(tuple(weights), tuple(acts[t] for t in sorted(acts)))


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
        from onnxq.model import atomic_write_text  # noqa: PLC0415

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


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    from scipy.stats import spearmanr  # noqa: PLC0415

    value = float(spearmanr(x, y).statistic)
    return None if not np.isfinite(value) else value


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


def _expand_pair(a: str, b: str, kind: str, ca: Candidate, cb: Candidate, cross: float,
                 chosen: Mapping[str, Sequence[Candidate]],
                 deltas: Mapping[tuple[str, Candidate], float]) -> list[dict[str, Any]]:
    """One pair entry per candidate combination of ``(a, b)``.

    The measured combination keeps its cross term (``"scaling": "measured"``); every other one
    gets ``cross · sqrt(δa(c)·δb(d) / (δa(ca)·δb(cb)))`` (``"scaling": "sqrt-delta"``, with
    ``"measured_at"`` the measured candidates): for weight noise the cross term is
    ``ΔW_aᵀ H_ab ΔW_b``, bilinear in the two noises, whose sizes scale as ``sqrt(δ)`` since
    ``δ ≈ ½ ΔWᵀHΔW``. A combination whose delta (or the measured one's) is not positive gets 0.
    """
    da0, db0 = deltas.get((a, ca), 0.0), deltas.get((b, cb), 0.0)
    out: list[dict[str, Any]] = []
    for c in chosen[a]:
        for d in chosen[b]:
            entry: dict[str, Any] = {"a": a, "b": b, "kind": kind, "candidates": [str(c), str(d)]}
            if (c, d) == (ca, cb):
                entry.update(cross=cross, scaling="measured")
            else:
                da, db = deltas.get((a, c), 0.0), deltas.get((b, d), 0.0)
                ratio = da * db / (da0 * db0) if da0 > 0 and db0 > 0 and da > 0 and db > 0 else 0.0
                entry.update(cross=float(cross * np.sqrt(ratio)), scaling="sqrt-delta",
                             measured_at=[str(ca), str(cb)])
            out.append(entry)
    return out


def _rebatch(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
             max_samples: int | None) -> list[dict[str, np.ndarray]]:
    """The first ``max_samples`` samples, in batches of up to :data:`MAX_BATCH` when possible.

    Feeds are only cut or merged when every input of every feed has the same leading dimension
    and every graph input declares a dynamic first dimension; otherwise they are kept as given.
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
    if not dynamic:
        if max_samples is None:
            return feeds
        kept, total = [], 0
        for feed, size in zip(feeds, sizes, strict=True):
            if total >= max_samples:
                break
            kept.append(feed)
            total += size
        return kept
    total = sum(sizes) if max_samples is None else min(sum(sizes), max(1, int(max_samples)))
    merged = {k: np.concatenate([np.asarray(f[k]) for f in feeds])[:total] for k in feeds[0]}
    return [{k: v[i:i + MAX_BATCH] for k, v in merged.items()} for i in range(0, total, MAX_BATCH)]


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
    memory_budget_mb: float | None = None,
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
            the model's batch dimension is dynamic.
        memory_budget_mb: bound on the activations cached between evaluations (the feeds are
            processed in chunks that fit); ``None``: a quarter of the available memory.

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

    work = onnx.ModelProto()
    work.CopyFrom(model)
    model_sha = _cache.model_digest(model)
    try:
        work = onnx.shape_inference.infer_shapes(work, strict_mode=False)
    except Exception as exc:  # noqa: BLE001 - shapes only feed MACs
        logger.debug("shape inference failed (%s)", exc)
    view = GraphView(work, _layer_ops(spec))

    chosen: dict[str, list[Candidate]] = {}
    for name, layer in view.layers.items():
        if candidates is None:
            options = _default_candidates(layer, spec)
        elif name in candidates:
            options = []
            for c in candidates[name]:
                eff = effective_candidate(layer.weight is not None, c if isinstance(c, Candidate) else Candidate.parse(c))
                if eff != FP32 and eff not in options:
                    options.append(eff)
        else:
            continue
        if options:
            chosen[name] = options
    if candidates is not None:
        unknown = sorted(set(candidates) - set(view.layers))
        if unknown:
            raise PlanError(f"sensitivity candidates name unknown layers: {', '.join(unknown[:5])}",
                            "use the layer names `onnxq inspect` shows")
    layer_names = [n for n in view.layer_names if n in chosen]

    options_key: dict[str, Any] = {
        "format": SENSITIVITY_FORMAT, "algorithm": _ALGORITHM_VERSION, "spec": spec.name,
        "spec_ops": sorted(view.layer_ops),
        "candidates": {n: [str(c) for c in chosen[n]] for n in layer_names},
        "method": method, "radius": int(radius), "pairs": bool(pairs), "random_plans": int(random_plans),
        "seed": int(seed), "loss": loss, "max_samples": max_samples,
    }
    key = _cache.cache_key(model_sha, _cache.feeds_digest(feed_list), options_key)
    hit = _load_cached(cache_dir, key)
    if hit is not None:
        return hit

    # -- the one session: every analysed weight exposed, every input activation fake-quantizable
    per_channel_ok = _opset(work) >= 13
    quantizers: dict[tuple[str, Precision], WeightQuantizer] = {}
    weight_tensors: list[str] = []
    act_tensors: list[str] = []
    for name in layer_names:
        layer = view.layers[name]
        node = view.nodes[name]
        if layer.weight is not None:
            for c in chosen[name]:
                if c.weights is not Precision.FP32 and (name, c.weights) not in quantizers:
                    quantizers[(name, c.weights)] = _weight_quantizer(layer, node, c.weights, spec, per_channel_ok)
            if any((name, c.weights) in quantizers for c in chosen[name]):
                weight_tensors.append(layer.weight.tensor)
        if any(is_integer(c.activations) for c in chosen[name]):
            act_tensors.extend(t for t in layer.activations if t not in act_tensors)
    weight_tensors = list(dict.fromkeys(weight_tensors))
    ranges: dict[str, tuple[float, float]] = {}
    if act_tensors:
        collected = collect_ranges(work, feed_list, act_tensors, "minmax", cache_dir=cache_dir)
        ranges = {t: (float(r.min), float(r.max)) for t, r in collected.items()}

    pair_list = _pair_list(view, layer_names, chosen, radius) if pairs else []
    partners: dict[str, list[str]] = {n: [] for n in layer_names}
    for a, b, _, _, _ in pair_list:
        partners[a].append(b)
        partners[b].append(a)
    segments = []
    for name in layer_names:
        layer = view.layers[name]
        w = (layer.weight.tensor,) if layer.weight is not None and layer.weight.tensor in weight_tensors else ()
        segments.append(Segment(name, w, tuple(t for t in layer.activations if t in ranges),
                                tuple(dict.fromkeys(partners[name]))))
    segments.extend(Segment(f"tensor:{t}", (), (t,)) for t in act_tensors if t in ranges)
    context = EvalContext(
        model_bytes=work.SerializeToString(), feeds=tuple(feed_list), activation_tensors=tuple(act_tensors),
        weight_tensors=tuple(weight_tensors), ranges=ranges, loss="mse", segments=tuple(segments),
        cache_bytes=int(memory_budget_mb * 2**20) if memory_budget_mb else default_memory_budget(),
    )
    local = Evaluator(context)
    reference = local.fp32_outputs()
    loss_kind = _resolve_loss(loss, reference)
    context = replace(context, loss=loss_kind, reference=reference)
    local.context = context
    local.set_reference(reference)
    loss0 = local.loss(Job())
    planner = _Planner(view, spec, quantizers, ranges)

    # -- jobs, in a fixed order ---------------------------------------------------------------
    jobs: list[Job] = []
    index: dict[tuple, int] = {}

    by_job: dict[Job, int] = {}

    def add(tag: tuple, job: Job) -> None:
        if tag not in index:  # an identical job (a pair's single at a float activation) runs once
            index[tag] = by_job.setdefault(job, len(jobs))
            if index[tag] == len(jobs):
                jobs.append(job)

    weights_cache: dict[str, np.ndarray] = {}
    eps: dict[str, float] = {}
    noise_sq: dict[tuple[str, Precision], float] = {}
    for name in layer_names:
        layer = view.layers[name]
        wprecs = [p for p in dict.fromkeys(c.weights for c in chosen[name]) if (name, p) in quantizers]
        if method in ("central", "onesided"):
            for p in wprecs:
                q = quantizers[(name, p)]
                add(("w", name, p, +1), Job((WeightPerturbation(q.tensor, 1.0, q),), segments=(name,)))
                if method == "central":
                    add(("w", name, p, -1), Job((WeightPerturbation(q.tensor, -1.0, q),), segments=(name,)))
        elif wprecs and layer.weight is not None:
            w = view.weight_value(layer.weight.tensor)
            assert w is not None
            weights_cache[name] = w.astype(np.float32)
            for p in wprecs:
                noise = weight_noise(weights_cache[name], quantizers[(name, p)])
                noise_sq[(name, p)] = float(np.sum(noise.astype(np.float64) ** 2))
            coarsest = min(wprecs, key=lambda p: (bits(p), p.value))
            n = max(weights_cache[name].size, 1)
            eps[name] = max(float(np.sqrt(noise_sq[(name, coarsest)] / n)), 1e-6)
            for d in range(HUTCHINSON_DIRECTIONS):
                for sign in (1.0, -1.0):
                    add(("h", name, d, sign), Job((WeightPerturbation(layer.weight.tensor, sign, None, d, eps[name],
                                                                      seed * 1_000_003 + layer.index),),
                                                  segments=(name,)))
        for p in dict.fromkeys(c.activations for c in chosen[name]):
            for a in planner.activation_quants(layer, p):  # one term per tensor: shared ones once
                add(("t", a.tensor, a.precision, a.symmetric), Job((), (a,), segments=(f"tensor:{a.tensor}",)))

    for a, b, _, ca, cb in pair_list:
        add(("single", a, ca), replace(planner.plan_job({a: ca}), segments=(a,)))
        add(("single", b, cb), replace(planner.plan_job({b: cb}), segments=(b,)))
        add(("pair", a, b), replace(planner.plan_job({a: ca, b: cb}), segments=(a, b)))

    plans = _random_plans(layer_names, chosen, random_plans, seed)
    for i, plan in enumerate(plans):
        add(("plan", i), planner.plan_job(plan))

    logger.info("sensitivity: %d layers, %d pairs, %d evaluations (%s, workers=%d, %s)",
                len(layer_names), len(pair_list), len(jobs), method, workers, executor)
    losses = run_jobs(context, jobs, workers=workers, executor=executor, progress=progress, local=local)
    EVALUATION_COUNTER.total += len(jobs) + 1

    def measured(tag: tuple) -> float:
        return losses[index[tag]] - loss0

    # -- assemble ------------------------------------------------------------------------------
    deltas: dict[tuple[str, Candidate], float] = {}
    layers_json = []
    for name in layer_names:
        layer = view.layers[name]
        trace = None
        if method == "hutchinson" and name in eps:
            curv = [(measured(("h", name, d, 1.0)) + measured(("h", name, d, -1.0))) / eps[name] ** 2
                    for d in range(HUTCHINSON_DIRECTIONS)]
            trace = float(np.mean(curv)) * weights_cache[name].size
        entry: dict[str, Any] = {}
        for c in chosen[name]:
            w_term = 0.0
            if (name, c.weights) in quantizers:
                if method == "central":
                    w_term = 0.5 * (measured(("w", name, c.weights, +1)) + measured(("w", name, c.weights, -1)))
                elif method == "onesided":
                    w_term = measured(("w", name, c.weights, +1))
                elif trace is not None:
                    w_term = 0.5 * trace / weights_cache[name].size * noise_sq[(name, c.weights)]
            a_terms = {a.tensor: measured(("t", a.tensor, a.precision, a.symmetric))
                       for a in planner.activation_quants(layer, c.activations)}
            a_term = float(sum(a_terms.values()))
            deltas[(name, c)] = w_term + a_term
            item: dict[str, Any] = {"delta": w_term + a_term, "weight": w_term, "activation": a_term}
            if a_terms:
                item["activation_terms"] = a_terms
            if ("single", name, c) in index:
                item["measured"] = measured(("single", name, c))
            entry[str(c)] = item
        row: dict[str, Any] = {"name": name, "op_type": layer.op_type, "params": int(layer.params),
                               "macs": int(layer.macs), "candidates": entry}
        if trace is not None:
            row["hessian_trace"] = trace
        layers_json.append(row)

    pairs_json = []
    alone = {"layers": layers_json, "pairs": []}
    for a, b, kind, ca, cb in pair_list:
        # what the pair-free prediction already knows (an input tensor the two layers share is
        # counted once) is not part of the cross term
        shared = (predicted_loss(alone, {a: ca}) + predicted_loss(alone, {b: cb})
                  - predicted_loss(alone, {a: ca, b: cb}))
        cross = measured(("pair", a, b)) - measured(("single", a, ca)) - measured(("single", b, cb)) + shared
        pairs_json.extend(_expand_pair(a, b, kind, ca, cb, cross, chosen, deltas))

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
        "options": {k: v for k, v in options_key.items() if k in ("method", "radius", "pairs", "random_plans", "seed")},
        "conventions": ("delta = predicted loss increase when only that layer takes the candidate: "
                        "weight term 1/2 dWᵀH dW (onesided: L(W+dW)-L(W), second order since L is minimal at the "
                        "fp32 W; central: 1/2(L(W+dW)+L(W-dW)-2L(W)); hutchinson: "
                        "1/2 Tr(H)/n |dW|²) + measured loss change with the layer's input activations "
                        "fake-quantized; cross = L(a+b) - L(a) - L(b) + L(0) measured at the pair's "
                        "most aggressive candidates (scaling 'measured') and, for every other candidate "
                        "combination, scaled as cross* sqrt(delta_a(c) delta_b(d) / (delta_a* delta_b*)) "
                        "(scaling 'sqrt-delta', the second-order form of dW_a'H_ab dW_b); predicted loss "
                        "of a plan = sum of deltas + matching crosses"),
    }
    if plans:
        base = {"layers": layers_json, "pairs": []}
        predicted_with = [predicted_loss(result, plan) for plan in plans]
        predicted_without = [predicted_loss(base, plan) for plan in plans]
        real = [measured(("plan", i)) for i in range(len(plans))]
        result["validation"] = {
            "plans": len(plans),
            "spearman_with_pairs": _spearman(predicted_with, real),
            "spearman_without_pairs": _spearman(predicted_without, real),
            "measured": real,
            "predicted_with_pairs": predicted_with,
            "predicted_without_pairs": predicted_without,
        }
    result["seconds"] = round(time.perf_counter() - start, 3)
    result["memory"] = {"peak_rss_mib": round(peak_rss_mib(), 1), "budget_mib": round(context.cache_bytes / 2**20, 1),
                        "chunks": local.planned_chunks, "cached_mib": round(local.cached_bytes / 2**20, 1)}
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
