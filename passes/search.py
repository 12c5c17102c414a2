"""The mixed-precision search: sensitivity → predicted Pareto front / ILP → measured choice.

Budget modes (``--target-size MB``, ``--target-latency-ratio R``, ``--target-bits B``) minimise
the predicted loss (sensitivity deltas plus pair cross terms) under the budget with an integer
linear program (:mod:`onnxq.search.ilp`). The accuracy-range mode (``--max-drop X``, the
default) builds the predicted Pareto front of loss against cost (estimated latency and weight size,
each relative to fp32, weighed equally), orders its plans
by cost, and bisects over them with real onnxruntime evaluations (:mod:`onnxq.evaluate`) for
the cheapest plan whose measured drop is at most X: a logarithmic number of evaluations.

The search never edits the model: it produces ``ctx.artifacts["plan"]`` and reports how it got
there in ``search``, ``pareto_front`` and ``cost``. When the target cannot be met it still
returns the best plan found, with ``target_met = False`` and a ``shortfall`` sentence.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from onnxq.graph import GraphView
from onnxq.pipeline import ALL, Pass, PassContext
from onnxq.precision import FP32, Candidate, bits
from onnxq.rewrite import plan_summary
from onnxq.search.candidates import SearchSpace, build_space
from onnxq.search.ilp import Problem, Solution, solve
from onnxq.spec.model import HardwareSpec

__all__ = ["SearchPass", "SENSITIVITY_SAMPLES", "FRONT_POINTS", "USE_PAIRS"]

logger = logging.getLogger(__name__)

#: Calibration samples the sensitivity analysis runs on (the first batches).
SENSITIVITY_SAMPLES = 32
#: Budgets swept to build the predicted Pareto front in the accuracy-range mode.
FRONT_POINTS = 8
#: Use the sensitivity pair cross terms in the predicted loss (benchmarks turn it off to compare).
USE_PAIRS = True


class _Costs:
    """Per layer × candidate costs on the three budget axes, and the full-plan estimate."""

    def __init__(self, view: GraphView, spec: HardwareSpec) -> None:
        from onnxq.cost import boundary_edges, estimate, layer_costs, weight_bytes

        self.spec = spec
        self.layers = layer_costs(view)
        self.by_name = {row.name: row for row in self.layers}
        # precision boundaries, float non-layer neighbours included: an edge to a float op is a
        # unary cost of the layer (the ILP only couples layer pairs)
        self.edges = boundary_edges(view, spec)
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


def _problem(space: SearchSpace, sens: Mapping[str, Any], costs: _Costs, axis: str) -> Problem:
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
    pairs = () if not USE_PAIRS else tuple((p["a"], Candidate.parse(p["candidates"][0]), p["b"], Candidate.parse(p["candidates"][1]), float(p["cross"]))
                  for p in sens.get("pairs", []) if math.isfinite(float(p["cross"])))
    return Problem(layers=tuple(candidates), candidates=candidates, loss=loss, cost=cost, pairs=pairs,
                   edges=costs.boundary_edges(axis), ties=space.ties, forbidden=space.forbidden)


def _fixed_cost(problem: Problem, costs: _Costs, axis: str) -> float:
    """Cost of the layers the problem does not decide (they stay fp32)."""
    return sum(costs.axis(row.name, FP32, axis) for row in costs.layers if row.name not in problem.candidates)


class SearchPass(Pass):
    """Choose a mixed-precision plan for the options' target (budget or accuracy range)."""

    name = "search"
    requires = ("spec", "feeds")
    produces = ("plan",)
    preserves = ALL

    def run(self, ctx: PassContext) -> bool:
        from onnxq.sensitivity import analyze

        options = ctx.options
        spec: HardwareSpec = ctx.artifacts["spec"]
        view: GraphView = ctx.analysis("graph_view")
        costs = _Costs(view, spec)
        mode = options.mode
        axis = "balanced" if mode == "max-drop" else "latency"
        if options.target_size_mb is not None:
            axis = "size"
        elif options.target_bits is not None:
            axis = "bits"
        # prune candidates that lose on both precision and the cost axis of this search
        axis_cost = {name: {c: costs.axis(name, c, axis) for c in spec.all_candidates() + (FP32,)
                            if name in costs.by_name}
                     for name in view.layers}
        full = build_space(view, spec)
        pruned = {name: {c: axis_cost[name].get(c) or costs.axis(name, c, axis) for c in cands}
                  for name, cands in full.layers.items()}
        space = build_space(view, spec, cost=pruned)
        started = time.perf_counter()
        feeds = list(ctx.artifacts["feeds"].calibration)
        chosen_feeds, samples = [], 0
        for feed in feeds:
            chosen_feeds.append(feed)
            samples += len(next(iter(feed.values())))
            if samples >= SENSITIVITY_SAMPLES:
                break
        candidates = {name: list(space.quantized(name)) for name in space.layers if space.quantized(name)}
        sens = analyze(ctx.model, chosen_feeds, spec, candidates, pairs=True, workers=options.workers,
                       executor=options.executor, cache_dir=options.cache_path(), progress=options.progress, seed=options.seed,
                       memory_budget_mb=options.memory_budget_mb)
        ctx.add_time("search:sensitivity", time.perf_counter() - started)
        ctx.artifacts["sensitivity"] = sens
        problem = _problem(space, sens, costs, axis)
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
        solution = solve(problem, max_cost=budget - fixed, minimize="loss")
        solver_seconds = solution.seconds
        target_met = solution.plan is not None
        shortfall = None
        if solution.plan is None:
            cheapest = solve(problem, minimize="cost")
            solver_seconds += cheapest.seconds
            solution = cheapest
            shortfall = (f"no plan the spec allows meets the {unit} target of {describe(budget)}: the cheapest plan reaches "
                         f"{describe(cheapest.cost + fixed)}, {describe(cheapest.cost + fixed - budget)} over it")
        plan = dict(solution.plan or {})
        from onnxq.evaluate import PlanEvaluator

        evaluator = PlanEvaluator(ctx)
        measured = evaluator.measure(plan)
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
            "sensitivity_memory": ctx.artifacts["sensitivity"].get("memory"),
        }
        if shortfall:
            search["shortfall"] = shortfall
            logger.warning("target not met: %s", shortfall)
        ctx.artifacts["search"] = search

    # -- accuracy range ---------------------------------------------------------------------

    def _front(self, problem: Problem) -> tuple[list[tuple[dict[str, Candidate], float, float]], float]:
        """Predicted Pareto front (plan, loss, cost) ordered by cost, and the solver time."""
        seconds = 0.0
        if not problem.layers:
            return [({}, 0.0, 0.0)], seconds  # nothing to decide in the main graph
        cheapest = solve(problem, minimize="cost")
        seconds += cheapest.seconds
        best = solve(problem, max_loss=0.0, minimize="cost") if problem.layers else cheapest
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

    def _max_drop(self, ctx: PassContext, problem: Problem, costs: _Costs, fixed: float) -> None:
        from onnxq.evaluate import PlanEvaluator

        options = ctx.options
        front, solver_seconds = self._front(problem)
        fp32_plan: dict[str, Candidate] = {}
        if not ctx.artifacts["spec"].integer_only:
            front.append((fp32_plan, 0.0, float("inf")))  # measured drop 0 by definition
        evaluator = PlanEvaluator(ctx)
        measured: dict[int, float] = {}
        if ctx.artifacts["spec"].integer_only:
            lo, hi = 0, len(front) - 1
            measured[hi] = evaluator.measure(front[hi][0]).drop
            passing = hi if measured[hi] <= options.max_drop else None
        else:
            lo, hi = 0, len(front) - 1
            measured[hi] = 0.0
            passing = hi
        from tqdm import tqdm

        bar = tqdm(total=max(1, math.ceil(math.log2(max(2, hi - lo + 1)))), desc="search (real evaluations)",
                   unit="plan", disable=not options.progress, leave=False)
        while lo < hi:
            mid = (lo + hi) // 2
            drop = evaluator.measure(front[mid][0]).drop
            bar.update(1)
            measured[mid] = drop
            if drop <= options.max_drop:
                hi = mid
                passing = mid
            else:
                lo = mid + 1
        bar.close()
        target_met = passing is not None
        chosen = passing if passing is not None else min(measured, key=lambda i: (measured[i], i))
        plan, loss, _ = front[chosen]
        plan = self._with_subgraph_layers(ctx, plan, evaluator, measured.get(chosen, 0.0))
        entries = [self._entry(p, l_, costs, measured.get(i)) for i, (p, l_, _) in enumerate(front)]
        ctx.artifacts["plan"] = dict(plan)
        ctx.artifacts["target_met"] = target_met
        ctx.artifacts["pareto_front"] = entries
        ctx.artifacts["cost"] = {"fp32": costs.estimate({}), "chosen": costs.estimate(plan),
                                 "placeholder_cost_model": bool(ctx.artifacts["spec"].cost.placeholder)}
        search: dict[str, Any] = {
            "mode": "max-drop", "max_drop": options.max_drop, "evaluations": evaluator.evaluations,
            "plans_considered": len(front), "chosen_index": chosen, "predicted_loss": loss,
            "measured_drop": measured[chosen], "metric": evaluator.metric_name or options.metric,
            "solver_seconds": round(solver_seconds, 4),
            "sensitivity_evaluations": ctx.artifacts["sensitivity"].get("evaluations"),
            "sensitivity_memory": ctx.artifacts["sensitivity"].get("memory"),
        }
        if not target_met:
            search["shortfall"] = (f"no plan met --max-drop {options.max_drop}: the best measured drop is "
                                   f"{measured[chosen]:.4f}, {measured[chosen] - options.max_drop:.4f} over the range")
            logger.warning("target not met: %s", search["shortfall"])
        logger.info("search: %d plans on the predicted front, %d real evaluations, chose #%d (drop %.4f)",
                    len(front), evaluator.evaluations, chosen, measured[chosen])
        ctx.artifacts["search"] = search

    @staticmethod
    def _with_subgraph_layers(ctx: PassContext, plan: dict[str, Candidate], evaluator: Any, drop: float) -> dict[str, Candidate]:
        """Add the layers inside If/Loop/Scan bodies at the target's 8-bit candidate, kept only
        if a real evaluation stays inside the range (the sensitivity analysis does not reach
        into subgraphs; a model whose whole network sits in an If must not stay fp32)."""
        from onnxq.passes.plan import closest_candidate

        spec: HardwareSpec = ctx.artifacts["spec"]
        scoped: dict[str, Candidate] = {}
        for view in ctx.analysis("scope_views"):
            for name, layer in view.view.layers.items():
                choice = closest_candidate(layer, Candidate.parse("int8/uint8"), spec)
                if choice is None:
                    allowed = [c for c in spec.candidates_for(layer.op_type) if not c.is_float and c.weight_bits == 8]
                    choice = allowed[0] if allowed else None
                if choice is not None:
                    scoped[name] = choice
        if not scoped:
            return plan
        candidate = {**plan, **scoped}
        measured = evaluator.measure(candidate).drop
        if measured <= ctx.options.max_drop:
            logger.info("quantized %d layers inside control-flow subgraphs (drop %.4f)", len(scoped), measured)
            return candidate
        logger.info("control-flow subgraph layers stay fp32: 8-bit there drops %.4f > %.4f", measured, ctx.options.max_drop)
        return plan

    @staticmethod
    def _entry(plan: Mapping[str, Candidate], loss: float, costs: _Costs, drop: float | None) -> dict[str, Any]:
        estimate = costs.estimate(plan)
        balanced = estimate["latency_seconds"] / costs.fp32_latency + estimate["size_bytes"] / max(1.0, costs.estimate({})["size_bytes"])
        entry: dict[str, Any] = {"cost": round(balanced, 6), **estimate, "predicted_loss": loss,
                                 "plan": plan_summary({k: v for k, v in plan.items() if v != FP32})}
        if drop is not None:
            entry["measured_drop"] = drop
        return entry
