"""The mixed-precision search: sensitivity → predicted Pareto front / ILP → measured choice.

Budget modes (``--target-size MB``, ``--target-latency-ratio R``, ``--target-bits B``) minimise
the predicted loss (sensitivity deltas plus pair cross terms) under the budget with an integer
linear program (:mod:`onnxq.search.ilp`). The accuracy-range mode (``--max-drop X``, the
default) builds the predicted Pareto front of loss against cost (estimated latency and weight size,
each relative to fp32, weighed equally), orders its plans
by cost, and bisects over them with real onnxruntime evaluations (:mod:`onnxq.passes.evaluate`) for
the cheapest plan whose measured drop is at most X: a logarithmic number of evaluations.

Every plan built there is also weighed as the user will run it: bytes of its written model and,
when the target's runtime is this machine (``spec.runtime``, :func:`onnxq.latency.runs_here`),
latency measured in real onnxruntime sessions interleaved with fp32 at the deploy batch
(``--deploy-batch``). A few more plans between the bisection's answer and fp32 are measured
the same way, and :mod:`onnxq.search.objective` picks the one to write for ``--objective``
(latency first, then size, by default) with fp32 as a contender: a model slower than fp32 is
never written as the latency-optimal answer.

The search never edits the model: it produces ``ctx.artifacts["plan"]`` and reports how it got
there in ``search``, ``pareto_front`` and ``cost``. When the target cannot be met it still
returns the best plan found, with ``target_met = False`` and a ``shortfall`` sentence.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx.shape_inference
from onnxq.passes.evaluate import PlanEvaluator
from onnxq.passes.plan import all_layers, all_nodes, closest_candidate

from onnxq.cost import boundary_edges, estimate, layer_costs, weight_bytes
from onnxq.data import feed_samples
from onnxq.graph import GraphView
from onnxq.latency import LatencyRatio, deploy_feeds, measure_latency, runs_here
from onnxq.model import byte_size, shape_skeleton
from onnxq.pipeline import ALL, Pass, PassContext
from onnxq.precision import FP32, Candidate, bits
from onnxq.progress import Progress
from onnxq.rewrite import plan_summary
from onnxq.runtime import make_session
from onnxq.search.candidates import SearchSpace, build_space
from onnxq.search.ilp import Problem, Solution, solve
from onnxq.search.objective import Choice, MeasuredPlan, Objective, choose
from onnxq.sensitivity import analyze, bounded_cross
from onnxq.spec.model import HardwareSpec

__all__ = ["SearchPass", "SENSITIVITY_SAMPLES", "SENSITIVITY_INPUT_ELEMENTS", "FRONT_POINTS", "USE_PAIRS", "build_problem",
           "predicted_front", "sensitivity_samples", "input_sample_limit"]

logger = logging.getLogger(__name__)

#: Calibration samples the sensitivity analysis runs on (the first batches), at most ...
SENSITIVITY_SAMPLES = 32
#: ... and at least, when the budget below allows fewer.
MIN_SENSITIVITY_SAMPLES = 8
#: Layer multiply-accumulates the analysis may spend before it runs on fewer samples: about
#: half a minute on a 2-core AVX2 CPU, where the analysis of the 22M encoder ran at 22 GMAC/s
#: of layer MACs (its non-layer ops, attention softmax, GELU and LayerNorm, are the rest). The
#: 22M encoder gets 17 samples, a 110M one the minimum. Layer rankings need far fewer samples
#: than accuracy does, and every plan the search keeps is checked by a real evaluation on the
#: held-back feeds.
SENSITIVITY_MAC_BUDGET = 6 * 10**11
#: Evaluations per layer × candidate entry (pairs, activation terms), measured over depths.
_EVALUATIONS_PER_ENTRY = 1.3
#: Mean fraction of the graph a cut session re-runs (the layers downstream of the perturbed one).
_MEAN_SUFFIX = 0.5
#: Whatever the MAC budget allows, at most as many samples as hold this many input elements
#: together (at least one). MACs undercount large activations: a DBNet detector's 640×640 page
#: (2.3 GMAC, 1.2M input elements) runs at a fifth of an encoder's MAC rate, and its analysis on
#: twelve pages took 15 minutes; one page, analysed alone, is 410k output positions the loss
#: averages over. Digits (256 elements), sentences and 224×224 images (150k: 13 samples) keep more.
SENSITIVITY_INPUT_ELEMENTS = 1 << 21
#: Budgets swept to build the predicted Pareto front in the accuracy-range mode.
FRONT_POINTS = 8
#: Use the sensitivity pair cross terms in the predicted loss (benchmarks turn it off to compare).
USE_PAIRS = True
#: Rounds of building a size-budget plan's model and shrinking the layers' share by its excess.
SIZE_BUDGET_ROUNDS = 4
#: Plans measured beyond the bisection, spread between its answer and fp32 (latency may order
#: them differently from the cost model).
EXTRA_MEASURED_PLANS = 2
#: Deploy-shape feeds timed per latency measurement, and the time budget of one measurement.
LATENCY_FEEDS = 4
LATENCY_BUDGET_SECONDS = 1.5
#: Uniform plans measured beside the front (the one-precision models users would otherwise make
#: with onnxruntime's quantize_static / quantize_dynamic): a mixed plan must beat them to win.
ANCHOR_CANDIDATES = ("int8/dyn-uint8", "int8/uint8")
#: The predicted-cost axis the front is built on, per objective.
OBJECTIVE_AXIS = {Objective.LATENCY: "latency", Objective.SIZE: "size", Objective.BALANCED: "balanced"}


def _latency_feeds(feeds: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The first :data:`LATENCY_FEEDS` deploy feeds, fewer when they are large: each is run about
    15 times per timed plan (warm-up, five interleaved rounds of the plan and fp32), and one
    640×640 page already takes a fifth of a second, long enough to time on its own."""
    chosen, elements = [], 0
    for feed in feeds[:LATENCY_FEEDS]:
        size = sum(int(np.asarray(v).size) for v in feed.values())
        if chosen and elements + size > SENSITIVITY_INPUT_ELEMENTS:
            break
        chosen.append(feed)
        elements += size
    return chosen


class _PlanMeter:
    """Builds plans' models once and measures them: drop, written size and, on a present target,
    latency interleaved with fp32 at the deploy batch."""

    def __init__(self, ctx: PassContext, evaluator: PlanEvaluator) -> None:
        self.evaluator = evaluator
        self.max_drop = ctx.options.max_drop
        self.fp32_model = ctx.artifacts["fp32_model"]
        self.fp32_path = ctx.artifacts.get("fp32_path")
        self.fp32_bytes = max(1, byte_size(self.fp32_model))
        spec: HardwareSpec = ctx.artifacts["spec"]
        # the size objective never reads a plan's latency: the written model's is measured once
        objective = Objective(getattr(ctx.options, "objective", Objective.LATENCY.value))
        self.timed = runs_here(spec.runtime) and objective is not Objective.SIZE
        self.batch = int(getattr(ctx.options, "deploy_batch", 1) or 1)
        self.feeds = _latency_feeds(deploy_feeds(list(ctx.artifacts["feeds"].held_back), self.batch)) if self.timed else []
        self.timed = self.timed and bool(self.feeds)
        self.results: dict[int, MeasuredPlan] = {}
        self.latency: dict[int, LatencyRatio] = {}
        self._fp32_session: Any = None  # built at the first timing, reused by every later one

    def fp32(self, index: int) -> MeasuredPlan:
        result = MeasuredPlan(index, 0.0, 1.0, 1.0 if self.timed else None, 0.0, is_fp32=True)
        self.results[index] = result
        return result

    def measure(self, index: int, plan: Mapping[str, Candidate]) -> MeasuredPlan:
        if index in self.results:
            return self.results[index]
        if all(c == FP32 for c in plan.values()):
            return self.fp32(index)
        model = self.evaluator.build(plan)
        drop = self.evaluator.measure_model(model).drop
        ratio: float | None = None
        spread = 0.0
        if self.timed and drop <= self.max_drop:  # latency only matters inside the range
            try:
                if self._fp32_session is None:
                    self._fp32_session = make_session(self.fp32_model, path=self.fp32_path)
                latency = measure_latency(model, self._fp32_session, self.feeds, budget_seconds=LATENCY_BUDGET_SECONDS)
            except Exception as error:  # noqa: BLE001 - a plan that ran above must not fail on timing
                logger.warning("latency of plan #%d not measured: %s", index, error)
            else:
                self.latency[index] = latency
                ratio, spread = latency.ratio, latency.spread
        result = MeasuredPlan(index, drop, byte_size(model) / self.fp32_bytes, ratio, spread)
        self.results[index] = result
        logger.info("plan #%d: drop %.5f, size %.1f%% of fp32%s", index, drop, 100 * result.size_ratio,
                    "" if ratio is None else f", latency {ratio:.2f}x fp32 (batch {self.batch})")
        return result


class _Costs:
    """Per layer × candidate costs on the three budget axes, and the full-plan estimate.

    ``views``: the main graph's and every control-flow subgraph's (their layers are decisions
    like any other; a subgraph's edges stay inside it).
    """

    def __init__(self, views: Sequence[GraphView], spec: HardwareSpec) -> None:
        self.spec = spec
        self.layers = [row for view in views for row in layer_costs(view)]
        self.by_name = {row.name: row for row in self.layers}
        # precision boundaries, float non-layer neighbours included: an edge to a float op is a
        # unary cost of the layer (the ILP only couples layer pairs)
        self.edges = [edge for view in views for edge in boundary_edges(view, spec)]
        self.unary: dict[str, list[tuple[str, str, int]]] = {}
        for a, b, n in self.edges:
            if (a in self.by_name) != (b in self.by_name):
                self.unary.setdefault(a if a in self.by_name else b, []).append((a, b, n))
        self._estimate = estimate
        self._weight_bytes = weight_bytes
        self.weight_elements = sum(row.weight_elements for row in self.layers)
        fp32 = estimate(self.layers, {}, spec, self.edges)
        self.fp32_latency = max(fp32.latency_seconds, 1e-12)
        self.fp32_size = float(max(sum(weight_bytes(row, FP32, spec) for row in self.layers), 1))

    def axis(self, name: str, candidate: Candidate, axis: str) -> float:
        row = self.by_name[name]
        if axis == "size":
            return float(self._weight_bytes(row, candidate, self.spec))
        if axis == "bits":
            return float(row.weight_elements * bits(candidate.weights))
        latency = float(self._estimate([row], {name: candidate}, self.spec, self.unary.get(name, ())).latency_seconds)
        if axis == "balanced":
            # "as small and as fast as the hardware allows": latency and weight size, each as a
            # fraction of the fp32 model's, weigh the same
            return latency / self.fp32_latency + float(self._weight_bytes(row, candidate, self.spec)) / self.fp32_size
        return latency

    def boundary_edges(self, axis: str) -> tuple[tuple[str, str, float], ...]:
        if axis not in ("latency", "balanced"):
            return ()
        ns = self.spec.cost.conversion_ns_per_element
        scale = 1.0 / self.fp32_latency if axis == "balanced" else 1.0
        return tuple((a, b, elements * ns * 1e-9 * scale) for a, b, elements in self.edges)

    def estimate(self, plan: Mapping[str, Candidate]) -> dict[str, float]:
        result = self._estimate(self.layers, plan, self.spec, self.edges)
        weighted = sum(row.weight_elements * bits(plan.get(row.name, FP32).weights) for row in self.layers)
        return {"latency_seconds": result.latency_seconds, "size_bytes": result.size_bytes, "bitops": result.bitops,
                "bits": weighted / max(1, self.weight_elements)}


def _sens_entry(row: Mapping[str, Any] | None, candidate: Candidate) -> float | None:
    if candidate == FP32:
        return 0.0
    if row is None:
        return None
    entry = row["candidates"].get(str(candidate))
    return None if entry is None else float(entry["delta"])


def build_problem(space: SearchSpace, sens: Mapping[str, Any], costs: _Costs, axis: str) -> Problem:
    """The ILP of ``space`` with the sensitivity's losses: deltas clamped at 0, cross terms
    bounded as :func:`onnxq.sensitivity.bounded_cross` says (whatever the JSON holds: an older
    cache or a hand-edited file), so no plan's predicted loss can go negative."""
    rows = {row["name"]: row for row in sens.get("layers", [])}
    candidates: dict[str, tuple[Candidate, ...]] = {}
    loss: dict[str, tuple[float, ...]] = {}
    cost: dict[str, tuple[float, ...]] = {}
    for name, options in space.layers.items():
        kept = [(c, d) for c in options if (d := _sens_entry(rows.get(name), c)) is not None]
        if not kept:
            continue
        candidates[name] = tuple(c for c, _ in kept)
        loss[name] = tuple(max(d, 0.0) if math.isfinite(d) else 1e9 for _, d in kept)
        cost[name] = tuple(costs.axis(name, c, axis) for c, _ in kept)
    pairs = []
    for p in sens.get("pairs", []) if USE_PAIRS else ():
        a, b = p["a"], p["b"]
        ca, cb = Candidate.parse(p["candidates"][0]), Candidate.parse(p["candidates"][1])
        if ca not in candidates.get(a, ()) or cb not in candidates.get(b, ()):
            continue
        da, db = loss[a][candidates[a].index(ca)], loss[b][candidates[b].index(cb)]
        pairs.append((a, ca, b, cb, bounded_cross(float(p["cross"]), da, db)))
    return Problem(layers=tuple(candidates), candidates=candidates, loss=loss, cost=cost, pairs=tuple(pairs),
                   edges=costs.boundary_edges(axis), ties=space.ties, forbidden=space.forbidden)


def _fixed_cost(problem: Problem, costs: _Costs, axis: str) -> float:
    """Cost of the layers the problem does not decide (they stay fp32)."""
    return sum(costs.axis(row.name, FP32, axis) for row in costs.layers if row.name not in problem.candidates)


def _search_space(views: Sequence[GraphView], spec: HardwareSpec, costs: _Costs, axis: str,
                  keep_float: Collection[str] = ()) -> SearchSpace:
    """Every scope's space, candidates that lose on both precision and this search's cost axis
    pruned; the layers the user keeps float (``--exclude``) get fp32 only."""
    layers: dict[str, tuple[Candidate, ...]] = {}
    ties: list[tuple[str, str]] = []
    forbidden: list[tuple[str, Candidate, str, Candidate]] = []
    for view in views:
        full = build_space(view, spec, keep_float=keep_float)
        pruned = {name: {c: costs.axis(name, c, axis) for c in cands} for name, cands in full.layers.items()}
        space = build_space(view, spec, cost=pruned, keep_float=keep_float)
        for name, options in space.layers.items():
            layers.setdefault(name, options)
        ties.extend(space.ties)
        forbidden.extend(space.forbidden)
    return SearchSpace(layers=layers, ties=tuple(ties), forbidden=tuple(forbidden))


def sensitivity_samples(macs_per_sample: float, entries: int) -> int:
    """Samples the analysis of ``entries`` layer × candidate pairs runs on: as many as
    :data:`SENSITIVITY_MAC_BUDGET` pays for, between :data:`MIN_SENSITIVITY_SAMPLES` and
    :data:`SENSITIVITY_SAMPLES` (a function of the graph only, so runs are reproducible)."""
    per_sample = max(macs_per_sample, 1.0) * max(entries, 1) * _EVALUATIONS_PER_ENTRY * _MEAN_SUFFIX
    return int(min(SENSITIVITY_SAMPLES, max(MIN_SENSITIVITY_SAMPLES, SENSITIVITY_MAC_BUDGET // per_sample)))


def input_sample_limit(feeds: Sequence[Mapping[str, np.ndarray]]) -> int:
    """At most as many samples as hold :data:`SENSITIVITY_INPUT_ELEMENTS` input elements together,
    never fewer than one: large inputs (a 640×640 page) make every evaluation expensive."""
    if not feeds:
        return SENSITIVITY_SAMPLES
    per_sample = sum(int(np.asarray(v).size) for v in feeds[0].values()) / max(1, feed_samples(feeds[0]))
    return int(max(1, SENSITIVITY_INPUT_ELEMENTS // max(per_sample, 1.0)))


def _sensitivity_feeds(feeds: Sequence[dict[str, np.ndarray]], limit: int) -> list[dict[str, np.ndarray]]:
    """The first calibration feeds, up to ``limit`` samples (the analysis cuts the last feed to
    exactly ``limit`` where the batch axis allows)."""
    chosen, samples = [], 0
    for feed in feeds:
        chosen.append(feed)
        samples += feed_samples(feed)
        if samples >= limit:
            break
    return chosen


def predicted_front(problem: Problem) -> tuple[list[tuple[dict[str, Candidate], float, float]], float]:
    """Predicted Pareto front (plan, loss, cost) ordered by cost, and the solver time.

    The front spans the cheapest plan and the least lossy one: the cheapest plan predicted
    lossless where one exists (fp32 where the target allows it), else — on an integer-only
    target, where every layer must take an integer candidate — the plan of least predicted
    loss; budgets in between are swept (:data:`FRONT_POINTS`).
    """
    if not problem.layers:
        return [({}, 0.0, 0.0)], 0.0  # nothing to decide
    cheapest = solve(problem, minimize="cost")
    best = solve(problem, max_loss=0.0, minimize="cost")
    seconds = cheapest.seconds + best.seconds
    if best.plan is None:
        best = solve(problem, minimize="loss")
        seconds += best.seconds
    plans: dict[tuple[tuple[str, str], ...], tuple[dict[str, Candidate], float, float]] = {}

    def add(solution: Solution) -> None:
        if solution.plan is None:
            return
        key = tuple(sorted((k, str(v)) for k, v in solution.plan.items()))
        plans.setdefault(key, (dict(solution.plan), solution.loss, solution.cost))

    add(cheapest)
    add(best)
    low = cheapest.cost if cheapest.plan else 0.0
    high = best.cost if best.plan else low
    for k in range(1, FRONT_POINTS):
        budget = low + (high - low) * k / FRONT_POINTS
        solution = solve(problem, max_cost=budget * (1 + 1e-9), minimize="loss", time_limit=0.25)
        seconds += solution.seconds
        add(solution)
    ordered = sorted(plans.values(), key=lambda item: (item[2], item[1]))
    front: list[tuple[dict[str, Candidate], float, float]] = []
    for item in ordered:
        if front and item[1] >= front[-1][1] - 1e-15:
            continue  # costs more without predicting less loss
        front.append(item)
    return front, seconds


def _deploy_shaped(view: GraphView, ctx: PassContext) -> GraphView:
    """``view`` with every tensor shape inferred at the deploy shape (batch ``--deploy-batch``,
    sequence lengths of the first held-back feed), so the cost model counts the real MACs of
    layers whose shapes are symbolic (a transformer's sequence axis); ``view`` itself when the
    shapes cannot be inferred."""
    feeds = deploy_feeds(list(ctx.artifacts["feeds"].held_back)[:1], int(getattr(ctx.options, "deploy_batch", 1) or 1))
    if not feeds:
        return view
    model = shape_skeleton(ctx.model)
    for value in model.graph.input:
        array = feeds[0].get(value.name)
        if array is None or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != array.ndim:
            continue
        for dim, size in zip(dims, array.shape, strict=True):
            dim.Clear()
            dim.dim_value = int(size)
    del model.graph.value_info[:]
    try:
        shaped = onnx.shape_inference.infer_shapes(model)
    except Exception as error:  # noqa: BLE001 - the symbolic shapes still give a cost estimate
        logger.info("cost model keeps the symbolic shapes: %s", error)
        return view
    return GraphView(shaped, view.layer_ops, view.weight_slots)


class SearchPass(Pass):
    """Choose a mixed-precision plan for the options' target (budget or accuracy range)."""

    name = "search"
    requires = ("spec", "feeds")
    produces = ("plan",)
    preserves = ALL

    def run(self, ctx: PassContext) -> bool:
        options = ctx.options
        spec: HardwareSpec = ctx.artifacts["spec"]
        views: list[GraphView] = [ctx.analysis("graph_view"), *(sv.view for sv in ctx.analysis("scope_views"))]
        costs = _Costs([_deploy_shaped(views[0], ctx), *views[1:]], spec)
        mode = options.mode
        objective = Objective(getattr(options, "objective", Objective.LATENCY.value))
        axis = OBJECTIVE_AXIS[objective] if mode == "max-drop" else "latency"
        if options.target_size_mb is not None:
            axis = "size"
        elif options.target_bits is not None:
            axis = "bits"
        space = _search_space(views, spec, costs, axis, keep_float=ctx.artifacts.get("keep_float", frozenset()))
        started = time.perf_counter()
        candidates = {name: list(space.quantized(name)) for name in space.layers if space.quantized(name)}
        calibration = ctx.artifacts["feeds"].calibration
        by_macs = sensitivity_samples(sum(row.macs for row in costs.layers), sum(map(len, candidates.values())))
        samples = min(by_macs, input_sample_limit(calibration))
        if samples < SENSITIVITY_SAMPLES:
            logger.info("sensitivity on %d samples (a %.1f GMAC model × %d layer candidates%s)", samples,
                        sum(row.macs for row in costs.layers) / 1e9, sum(map(len, candidates.values())),
                        "" if samples == by_macs else "; large inputs")
        sens = analyze(ctx.model, _sensitivity_feeds(calibration, samples), spec, candidates,
                       max_samples=samples, pairs=True,
                       workers=options.workers, executor=options.executor, cache_dir=options.cache_path(),
                       progress=options.progress, seed=options.seed, calibration=options.calibration,
                       memory_budget_mb=options.memory_budget_mb)
        ctx.add_time("search:sensitivity", time.perf_counter() - started)
        ctx.artifacts["sensitivity"] = sens
        problem = build_problem(space, sens, costs, axis)
        fixed = _fixed_cost(problem, costs, axis)
        if mode == "budget":
            self._budget(ctx, problem, costs, axis, fixed)
        else:
            self._max_drop(ctx, problem, costs, fixed)
        return False

    # -- budget modes -----------------------------------------------------------------------

    def _budget(self, ctx: PassContext, problem: Problem, costs: _Costs, axis: str, fixed: float) -> None:
        options = ctx.options
        fp32 = costs.estimate({})
        if axis == "size":
            budget, unit = options.target_size_mb * 1e6, "size"
            describe = lambda v: f"{v / 1e6:.4f} MB"  # noqa: E731
        elif axis == "bits":
            budget, unit = options.target_bits * costs.weight_elements, "average weight bits"
            describe = lambda v: f"{v / max(1, costs.weight_elements):.2f} bits"  # noqa: E731
        else:
            budget, unit = options.target_latency_ratio * fp32["latency_seconds"], "estimated latency"
            describe = lambda v: f"{v / fp32['latency_seconds']:.3f}× fp32"  # noqa: E731
        evaluator = PlanEvaluator(ctx)
        layer_budget = budget - fixed
        if axis == "size":  # the file also holds what is not a layer weight: graph, biases, other constants
            layer_budget -= max(0.0, byte_size(ctx.artifacts["fp32_model"]) - costs.fp32_size)
        solution, solver_seconds, model = self._solve_within(problem, layer_budget, budget, axis, evaluator)
        target_met = solution.plan is not None
        shortfall = None
        if solution.plan is None:
            cheapest = solve(problem, minimize="cost")
            solver_seconds += cheapest.seconds
            solution = cheapest
            model = evaluator.build(dict(cheapest.plan or {}))
            reached = byte_size(model) if axis == "size" else cheapest.cost + fixed
            if axis == "size" and reached <= budget:  # the smallest plan fits once written
                target_met, shortfall = True, None
            what = "the smallest written model is" if axis == "size" else "the cheapest plan reaches"
            if not target_met:
                shortfall = (f"no plan the spec allows meets the {unit} target of {describe(budget)}: {what} "
                             f"{describe(reached)}, {describe(reached - budget)} over it")
        plan = dict(solution.plan or {})
        measured = evaluator.measure_model(model if model is not None else evaluator.build(plan))
        estimate = costs.estimate(plan)
        front_entry = self._entry(plan, solution.loss, costs, measured.drop)
        ctx.artifacts["plan"] = plan
        ctx.artifacts["target_met"] = target_met
        ctx.artifacts["pareto_front"] = [front_entry]
        ctx.artifacts["cost"] = {"fp32": fp32, "chosen": estimate, "placeholder_cost_model": bool(ctx.artifacts["spec"].cost.placeholder)}
        search: dict[str, Any] = {
            "mode": f"budget:{axis}", "budget": budget, "budget_described": describe(budget),
            "evaluations": evaluator.evaluations, "plans_considered": 1, "chosen_index": 0,
            "predicted_loss": solution.loss, "measured_drop": measured.drop, "metric": evaluator.metric_name,
            "solver_seconds": round(solver_seconds, 4), "solver_status": solution.status,
            "sensitivity_evaluations": ctx.artifacts["sensitivity"].get("evaluations"),
            "sensitivity_samples": ctx.artifacts["sensitivity"].get("samples"),
            "sensitivity_memory": ctx.artifacts["sensitivity"].get("memory"),
        }
        if shortfall:
            search["shortfall"] = shortfall
            logger.warning("target not met: %s", shortfall)
        ctx.artifacts["search"] = search

    @staticmethod
    def _solve_within(problem: Problem, layer_budget: float, budget: float, axis: str,
                      evaluator: PlanEvaluator) -> tuple[Solution, float, Any]:
        """The least-loss plan under ``layer_budget``; for a size budget the plan's model is built
        and, while the written bytes exceed ``budget``, the layers' share shrinks by the excess
        (Q/DQ parameters and compressed constants are not in the per-layer costs)."""
        solution = solve(problem, max_cost=layer_budget, minimize="loss")
        seconds = solution.seconds
        if axis != "size":
            return solution, seconds, None
        for attempt in range(1, SIZE_BUDGET_ROUNDS + 1):
            if solution.plan is None:
                return solution, seconds, None
            model = evaluator.build(solution.plan)
            excess = byte_size(model) - budget
            if excess <= 0:
                return solution, seconds, model
            logger.info("the planned model is %d bytes over the size target: shrinking the layers' share", excess)
            layer_budget -= excess * (1.0 + 0.25 * attempt)
            solution = solve(problem, max_cost=layer_budget, minimize="loss")
            seconds += solution.seconds
        failed = Solution(None, math.inf, math.inf, solution.seconds, "infeasible: over the size target once written")
        return failed, seconds, None

    # -- accuracy range ---------------------------------------------------------------------

    def _max_drop(self, ctx: PassContext, problem: Problem, costs: _Costs, fixed: float) -> None:
        options = ctx.options
        spec: HardwareSpec = ctx.artifacts["spec"]
        objective = Objective(getattr(options, "objective", Objective.LATENCY.value))
        front, solver_seconds = predicted_front(problem)
        if not spec.integer_only:
            front.append(({}, 0.0, float("inf")))  # fp32: measured drop 0 by definition
        evaluator = PlanEvaluator(ctx)
        meter = _PlanMeter(ctx, evaluator)
        anchors = self._anchor_plans(ctx, front)
        evaluator.prime([plan for plan, _, _ in front] + anchors)
        passing = self._bisect(front, meter, options.max_drop, options.progress, spec.integer_only)
        self._measure_extra(front, meter, passing)
        self._measure_anchors(anchors, front, meter)
        choice = choose(list(meter.results.values()), options.max_drop, objective)
        target_met = choice is not None
        if choice is None:
            chosen = min(meter.results, key=lambda i: (meter.results[i].drop, i))
            choice = Choice(meter.results[chosen])
        chosen = choice.plan.index
        plan, loss, _ = front[chosen]
        entries = [self._entry(p, l_, costs, meter.results.get(i)) for i, (p, l_, _) in enumerate(front)]
        ctx.artifacts["plan"] = dict(plan)
        ctx.artifacts["target_met"] = target_met
        ctx.artifacts["pareto_front"] = entries
        ctx.artifacts["cost"] = {"fp32": costs.estimate({}), "chosen": costs.estimate(plan),
                                 "placeholder_cost_model": bool(spec.cost.placeholder)}
        drop = meter.results[chosen].drop
        search: dict[str, Any] = {
            "mode": "max-drop", "max_drop": options.max_drop, "objective": objective.value,
            "evaluations": evaluator.evaluations, "plans_considered": len(front), "chosen_index": chosen,
            "predicted_loss": loss if math.isfinite(loss) else None, "measured_drop": drop,
            "metric": evaluator.metric_name or options.metric,
            "latency_measured": meter.timed, "deploy_batch": meter.batch,
            "solver_seconds": round(solver_seconds, 4),
            "sensitivity_evaluations": ctx.artifacts["sensitivity"].get("evaluations"),
            "sensitivity_samples": ctx.artifacts["sensitivity"].get("samples"),
            "sensitivity_memory": ctx.artifacts["sensitivity"].get("memory"),
        }
        if choice.notice:
            search["notice"] = choice.notice
            logger.warning("%s", choice.notice)
        if not target_met:
            search["shortfall"] = (f"no plan met --max-drop {options.max_drop}: the best measured drop is "
                                   f"{drop:.4f}, {drop - options.max_drop:.4f} over the range")
            if spec.integer_only:  # no fp32 to fall back on: only better ranges or a wider range help
                others = [m for m in ("mse", "percentile") if m != options.calibration]
                search["shortfall"] += (f" ({spec.name} has no float fallback; try --calibration {' or '.join(others)}"
                                        f", or a wider --max-drop)")
            logger.warning("target not met: %s", search["shortfall"])
        logger.info("search: %d plans on the predicted front, %d real evaluations, chose #%d (drop %.4f)",
                    len(front), evaluator.evaluations, chosen, drop)
        ctx.artifacts["search"] = search

    @staticmethod
    def _bisect(front: Sequence[tuple[dict[str, Candidate], float, float]], meter: _PlanMeter, max_drop: float,
                progress: bool, integer_only: bool) -> int | None:
        """The cheapest plan of the front whose measured drop is inside the range (log₂ of the
        front in real evaluations; fp32, last, passes by definition unless integer-only).

        The cheapest plan is measured first: on a model that tolerates everything the front
        quantizes (a detector whose every candidate plan is inside the range) it is the answer
        after one evaluation instead of log₂ of the front, each a model build, a run over the
        held-back feeds and a latency measurement."""
        lo, hi = 0, len(front) - 1
        last = meter.measure(hi, front[hi][0]) if integer_only else meter.fp32(hi)
        passing = hi if last.drop <= max_drop else None
        if lo < hi:
            if meter.measure(lo, front[lo][0]).drop <= max_drop:
                return lo
            lo += 1
        bar = Progress(max(1, math.ceil(math.log2(max(2, hi - lo + 1)))), "search (real evaluations)", "plan",
                       progress)
        while lo < hi:
            mid = (lo + hi) // 2
            result = meter.measure(mid, front[mid][0])
            bar.update(1)
            if result.drop <= max_drop:
                hi = passing = mid
            else:
                lo = mid + 1
        bar.close()
        return passing

    @staticmethod
    def _measure_anchors(anchors: Sequence[dict[str, Candidate]], front: list[tuple[dict[str, Candidate], float, float]],
                         meter: _PlanMeter) -> None:
        """Append the uniform ``anchors`` (:meth:`_anchor_plans`) to the front and measure them:
        the cost model may not see that one precision everywhere is the fastest."""
        for plan in anchors:
            front.append((plan, math.nan, math.nan))
            meter.measure(len(front) - 1, plan)

    @staticmethod
    def _anchor_plans(ctx: PassContext, front: Sequence[tuple[dict[str, Candidate], float, float]]) -> list[dict[str, Candidate]]:
        """The uniform plans of :data:`ANCHOR_CANDIDATES` the spec runs that the front lacks."""
        spec: HardwareSpec = ctx.artifacts["spec"]
        keep_float = ctx.artifacts.get("keep_float", frozenset())
        layers, nodes = all_layers(ctx), all_nodes(ctx)
        known = {tuple(sorted((k, str(v)) for k, v in p.items() if v != FP32)) for p, _, _ in front}
        plans = []
        for word in ANCHOR_CANDIDATES:
            candidate = Candidate.parse(word)
            plan = {name: chosen for name, layer in layers.items() if name not in keep_float
                    and (chosen := closest_candidate(layer, candidate, spec, nodes.get(name))) is not None}
            key = tuple(sorted((k, str(v)) for k, v in plan.items()))
            if plan and key not in known:
                known.add(key)
                plans.append(plan)
        return plans

    @staticmethod
    def _measure_extra(front: Sequence[tuple[dict[str, Candidate], float, float]], meter: _PlanMeter,
                       passing: int | None) -> None:
        """Measure a few more plans between the bisection's answer and the end of the front:
        the cost model ordered them, the machine may not agree."""
        if passing is None or not meter.timed:
            return
        unmeasured = [i for i in range(passing + 1, len(front)) if i not in meter.results]
        if not unmeasured:
            return
        picks = sorted({unmeasured[round(k * (len(unmeasured) - 1) / max(1, EXTRA_MEASURED_PLANS - 1))]
                        for k in range(min(EXTRA_MEASURED_PLANS, len(unmeasured)))})
        for index in picks:
            meter.measure(index, front[index][0])

    @staticmethod
    def _entry(plan: Mapping[str, Candidate], loss: float, costs: _Costs,
               measured: MeasuredPlan | float | None) -> dict[str, Any]:
        estimate = costs.estimate(plan)
        balanced = estimate["latency_seconds"] / costs.fp32_latency + estimate["size_bytes"] / max(1.0, costs.estimate({})["size_bytes"])
        predicted = loss if math.isfinite(loss) else None  # uniform anchors are measured, not predicted
        entry: dict[str, Any] = {"cost": round(balanced, 6), **estimate, "predicted_loss": predicted,
                                 "plan": plan_summary({k: v for k, v in plan.items() if v != FP32})}
        if isinstance(measured, MeasuredPlan):
            entry["measured_drop"] = measured.drop
            entry["measured_size_ratio"] = round(measured.size_ratio, 4)
            if measured.latency_ratio is not None:
                entry["measured_latency_ratio"] = round(measured.latency_ratio, 4)
                entry["measured_latency_spread"] = round(measured.latency_spread, 4)
        elif measured is not None:
            entry["measured_drop"] = measured
        return entry
