"""The mixed-precision assignment as a 0-1 integer linear program (``scipy.optimize.milp``).

Variables: one binary ``x[l, c]`` per layer × candidate (one-hot per layer); one binary
``y[p]`` per pair term, linearising the product ``x[a, ca] · x[b, cb]`` with
``y ≤ x_a, y ≤ x_b, y ≥ x_a + x_b − 1``; one continuous ``z[e] ∈ [0, 1]`` per edge, the
precision boundary, ``z ≥ X_a,d − X_b,d`` for every activation domain ``d`` (``X_l,d`` is the
sum of ``x[l, c]`` over candidates computing in ``d``), so that the cost model can charge each
conversion.

Predicted loss: ``Σ delta·x + Σ cross·y``. Cost: ``Σ cost·x + Σ boundary·z``. Either is the
objective, the other a constraint: :func:`solve` minimises loss under a budget or cost under a
loss bound.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxq.precision import Candidate

__all__ = ["Problem", "Solution", "solve"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """A mixed-precision assignment problem.

    Attributes:
        layers: layer names (the decisions), in graph order.
        candidates: per layer, its candidates.
        loss: per layer, the predicted loss increase of each candidate (same order).
        cost: per layer, the cost of each candidate on the budgeted axis (same order).
        pairs: ``(a, ca, b, cb, cross)`` cross terms of the predicted loss.
        edges: ``(a, b, seconds)`` the boundary cost charged when ``a`` and ``b`` compute in
            different activation domains.
        ties: layers that must take the same activation precision.
        forbidden: ``(a, ca, b, cb)`` combinations that may not be chosen together.
    """

    layers: tuple[str, ...]
    candidates: Mapping[str, tuple[Candidate, ...]]
    loss: Mapping[str, tuple[float, ...]]
    cost: Mapping[str, tuple[float, ...]]
    pairs: tuple[tuple[str, Candidate, str, Candidate, float], ...] = ()
    edges: tuple[tuple[str, str, float], ...] = ()
    ties: tuple[tuple[str, str], ...] = ()
    forbidden: tuple[tuple[str, Candidate, str, Candidate], ...] = ()

    def evaluate(self, plan: Mapping[str, Candidate]) -> tuple[float, float]:
        """(predicted loss, cost) of a plan under this problem's linear model."""
        loss = cost = 0.0
        for name in self.layers:
            i = self.candidates[name].index(plan[name])
            loss += self.loss[name][i]
            cost += self.cost[name][i]
        for a, ca, b, cb, cross in self.pairs:
            if plan.get(a) == ca and plan.get(b) == cb:
                loss += cross
        for a, b, seconds in self.edges:
            if a in plan and b in plan and plan[a].activations != plan[b].activations:
                cost += seconds
        return loss, cost


@dataclass(frozen=True)
class Solution:
    """The solver's answer.

    Attributes:
        plan: layer → candidate (None when infeasible).
        loss: predicted loss of the plan.
        cost: cost of the plan.
        seconds: solver wall time.
        status: scipy's status message.
    """

    plan: Mapping[str, Candidate] | None
    loss: float
    cost: float
    seconds: float
    status: str = ""
    meta: Mapping[str, float] = field(default_factory=dict)


class _Builder:
    def __init__(self, problem: Problem) -> None:
        self.p = problem
        self.index: dict[tuple[str, Candidate], int] = {}
        for name in problem.layers:
            for c in problem.candidates[name]:
                self.index[(name, c)] = len(self.index)
        self.n_x = len(self.index)
        self.pairs = [(a, ca, b, cb, cross) for a, ca, b, cb, cross in problem.pairs
                      if (a, ca) in self.index and (b, cb) in self.index and cross != 0.0]
        self.edges = [(a, b, s) for a, b, s in problem.edges if a in problem.candidates and b in problem.candidates and s > 0]
        self.n = self.n_x + len(self.pairs) + len(self.edges)
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.lb: list[float] = []
        self.ub: list[float] = []

    def row(self, entries: Sequence[tuple[int, float]], lo: float, hi: float) -> None:
        r = len(self.lb)
        for col, val in entries:
            self.rows.append(r)
            self.cols.append(col)
            self.vals.append(val)
        self.lb.append(lo)
        self.ub.append(hi)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        loss = np.zeros(self.n)
        cost = np.zeros(self.n)
        for name in self.p.layers:
            for i, c in enumerate(self.p.candidates[name]):
                loss[self.index[(name, c)]] = self.p.loss[name][i]
                cost[self.index[(name, c)]] = self.p.cost[name][i]
        for k, (_, _, _, _, cross) in enumerate(self.pairs):
            loss[self.n_x + k] = cross
        for k, (_, _, seconds) in enumerate(self.edges):
            cost[self.n_x + len(self.pairs) + k] = seconds
        return loss, cost

    def structure(self) -> None:
        p = self.p
        for name in p.layers:
            self.row([(self.index[(name, c)], 1.0) for c in p.candidates[name]], 1.0, 1.0)
        for k, (a, ca, b, cb, _) in enumerate(self.pairs):
            y, xa, xb = self.n_x + k, self.index[(a, ca)], self.index[(b, cb)]
            # the objective pushes y down for a positive cross term and up for a negative one:
            # only the bound it pushes against is needed (and the same holds under a loss bound)
            if self.pairs[k][4] < 0:
                self.row([(y, 1.0), (xa, -1.0)], -np.inf, 0.0)
                self.row([(y, 1.0), (xb, -1.0)], -np.inf, 0.0)
            else:
                self.row([(y, 1.0), (xa, -1.0), (xb, -1.0)], -1.0, np.inf)
        for k, (a, b, _) in enumerate(self.edges):
            z = self.n_x + len(self.pairs) + k
            domains = {c.activations for c in p.candidates[a]} | {c.activations for c in p.candidates[b]}
            for d in sorted(domains):
                entries = [(z, 1.0)]
                entries += [(self.index[(a, c)], -1.0) for c in p.candidates[a] if c.activations == d]
                entries += [(self.index[(b, c)], 1.0) for c in p.candidates[b] if c.activations == d]
                self.row(entries, 0.0, np.inf)
        for a, b in p.ties:
            if a not in p.candidates or b not in p.candidates:
                continue
            domains = {c.activations for c in p.candidates[a]} | {c.activations for c in p.candidates[b]}
            for d in sorted(domains):
                entries = [(self.index[(a, c)], 1.0) for c in p.candidates[a] if c.activations == d]
                entries += [(self.index[(b, c)], -1.0) for c in p.candidates[b] if c.activations == d]
                self.row(entries, 0.0, 0.0)
        for a, ca, b, cb in p.forbidden:
            if (a, ca) in self.index and (b, cb) in self.index:
                self.row([(self.index[(a, ca)], 1.0), (self.index[(b, cb)], 1.0)], -np.inf, 1.0)


def solve(
    problem: Problem,
    *,
    max_cost: float | None = None,
    max_loss: float | None = None,
    minimize: str = "loss",
    time_limit: float = 0.5,
    rel_gap: float = 1e-2,
) -> Solution:
    """Solve the assignment: minimise ``loss`` (or ``cost``) under the other's bound.

    Args:
        problem: the problem.
        max_cost: budget on the cost axis (None: unbounded).
        max_loss: bound on the predicted loss (None: unbounded).
        minimize: ``"loss"`` or ``"cost"``; ties are broken by a tiny weight on the other.
        time_limit: solver time limit in seconds.
        rel_gap: relative optimality gap at which the solver stops (the loss is a prediction:
            0.1% of it is well inside its error).

    Returns:
        The solution; ``plan`` is None when no plan satisfies the bounds.
    """
    started = time.perf_counter()
    b = _Builder(problem)
    b.structure()
    loss, cost = b.vectors()
    # budget rows are scaled to O(1) coefficients: latencies in seconds (1e-6) or losses (1e-5)
    # sit at the solver's feasibility tolerance otherwise, and branch-and-bound crawls
    if max_cost is not None:
        unit = float(np.abs(cost).max()) or 1.0
        b.row([(i, float(v) / unit) for i, v in enumerate(cost) if v != 0.0], -np.inf, float(max_cost) / unit)
    if max_loss is not None:
        unit = float(np.abs(loss).max()) or 1.0
        b.row([(i, float(v) / unit) for i, v in enumerate(loss) if v != 0.0], -np.inf, float(max_loss) / unit)
    main, other = (loss, cost) if minimize == "loss" else (cost, loss)
    scale_main = float(np.abs(main).sum()) or 1.0
    scale_other = float(np.abs(other).sum()) or 1.0
    objective = main / scale_main + 1e-6 * other / scale_other
    # a constant offset keeps the objective positive, so that the relative gap means something
    offset = float(-objective[objective < 0].sum()) + 1e-3
    objective = np.append(objective, offset)
    b.n += 1
    b.row([(b.n - 1, 1.0)], 1.0, 1.0)
    integrality = np.ones(b.n)
    integrality[b.n_x:] = 0  # pair products and boundaries take integral values once x is integral
    from scipy.optimize import Bounds, LinearConstraint, milp  # imported when a program is solved: CLI start-up
    from scipy.sparse import coo_array

    matrix = coo_array((b.vals, (b.rows, b.cols)), shape=(len(b.lb), b.n)).tocsr()
    result = milp(objective, integrality=integrality, bounds=Bounds(np.zeros(b.n), np.ones(b.n)),
                  constraints=LinearConstraint(matrix, np.asarray(b.lb), np.asarray(b.ub)),
                  options={"time_limit": time_limit, "disp": False, "mip_rel_gap": rel_gap})
    seconds = time.perf_counter() - started
    if result.x is None:  # infeasible, or the time limit hit before any incumbent
        return Solution(None, float("nan"), float("nan"), seconds, str(result.message))
    x = result.x
    plan: dict[str, Candidate] = {}
    for name in problem.layers:
        values = [x[b.index[(name, c)]] for c in problem.candidates[name]]
        plan[name] = problem.candidates[name][int(np.argmax(values))]
    pred_loss, pred_cost = problem.evaluate(plan)
    return Solution(plan, pred_loss, pred_cost, seconds, str(result.message))
