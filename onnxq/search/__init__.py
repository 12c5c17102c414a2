"""The mixed-precision search: search space, integer linear program, Pareto front."""

from __future__ import annotations

from onnxq.search.candidates import SearchSpace, build_space, fusion_chains, prune_dominated
from onnxq.search.ilp import Problem, Solution, solve

__all__ = ["Problem", "SearchSpace", "Solution", "build_space", "fusion_chains", "prune_dominated", "solve"]
