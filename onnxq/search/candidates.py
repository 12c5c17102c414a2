"""The search space: which candidates each layer may take, and the constraints between layers.

Following HAGO's op descriptions, a layer's candidates are what the spec runs for its op type
(weightless layers use the activation side on both, :func:`onnxq.layout.effective_candidate`),
without float on integer-only targets. Between layers:

- **fusion groups** (``spec.fusion_groups``, e.g. ``Conv, Add`` on TensorRT) are decided as one:
  the layers of a matched chain take the same activation precision;
- **producer/consumer compatibility**: an edge's precision is limited by what its producer
  emits and its consumer accepts. On a target with float, any two candidates meet through a
  DQ→Q conversion; on an integer-only target there is no float to convert through, so both ends
  of an edge must use the same activation precision.

Candidates that can never be the right choice for the search's objective are pruned before the
(expensive) sensitivity analysis: a candidate is dominated when another one of the same layer
is at least as precise on both sides and no more expensive on the objective's cost axis.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from onnxq.graph import GraphView
from onnxq.layout import effective_candidate, layer_form_problem
from onnxq.precision import FP32, Candidate, Precision, bits, is_integer
from onnxq.spec.model import HardwareSpec

__all__ = ["SearchSpace", "build_space", "precision_rank", "prune_dominated", "fusion_chains"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSpace:
    """Candidates per layer and the constraints the search must respect.

    Attributes:
        layers: layer name → allowed candidates (graph order; fp32 first when allowed).
        ties: pairs of layers that must take the same activation precision (fusion groups).
        forbidden: ``(a, candidate_a, b, candidate_b)`` combinations an edge cannot carry.
    """

    layers: Mapping[str, tuple[Candidate, ...]]
    ties: tuple[tuple[str, str], ...] = ()
    forbidden: tuple[tuple[str, Candidate, str, Candidate], ...] = ()

    def quantized(self, name: str) -> tuple[Candidate, ...]:
        """The non-fp32 candidates of a layer (what sensitivity measures)."""
        return tuple(c for c in self.layers[name] if c != FP32)


def precision_rank(precision: Precision) -> int:
    """An order of formats by fidelity: float beats integer, wider beats narrower."""
    if not is_integer(precision):
        return 100 + bits(precision)
    return bits(precision)


def _at_least_as_precise(a: Candidate, b: Candidate) -> bool:
    # per-call activation ranges beat calibrated ones, finer weight blocks beat coarser ones and
    # per-channel scales, at the same bits
    def weight_key(c: Candidate) -> tuple[int, float]:
        return precision_rank(c.weights), 1.0 / c.block_size if c.block_size else 0.0

    return (weight_key(a) >= weight_key(b) if precision_rank(a.weights) == precision_rank(b.weights)
            else precision_rank(a.weights) > precision_rank(b.weights)) and (
        (precision_rank(a.activations), a.dynamic) >= (precision_rank(b.activations), b.dynamic))


def prune_dominated(candidates: Sequence[Candidate], cost: Mapping[Candidate, float]) -> tuple[Candidate, ...]:
    """Drop candidates that another candidate beats on precision without costing more.

    Ties (same precision ranks, same cost) keep the first candidate in ``candidates`` order.
    """
    kept: list[Candidate] = []
    for i, c in enumerate(candidates):
        dominated = False
        for j, other in enumerate(candidates):
            if i == j or not _at_least_as_precise(other, c) or cost[other] > cost[c] * (1 + 1e-9):
                continue
            strictly = (not _at_least_as_precise(c, other)) or cost[other] < cost[c] * (1 - 1e-9)
            if strictly or j < i:
                dominated = True
                break
        if not dominated:
            kept.append(c)
    return tuple(kept)


def fusion_chains(view: GraphView, spec: HardwareSpec) -> list[tuple[str, ...]]:
    """Chains of nodes matching a fusion group (single-consumer links), longest groups first."""
    chains: list[tuple[str, ...]] = []
    claimed: set[str] = set()
    for group in sorted(spec.fusion_groups, key=len, reverse=True):
        for name, node in view.nodes.items():
            if node.op_type != group[0] or name in claimed:
                continue
            chain = [name]
            for op_type in group[1:]:
                last = view.nodes[chain[-1]]
                if not last.output or last.output[0] in view.graph_outputs:
                    break
                consumers = view.consumers.get(last.output[0], [])
                if len(consumers) != 1 or view.nodes[consumers[0]].op_type != op_type:
                    break
                chain.append(consumers[0])
            if len(chain) == len(group):
                chains.append(tuple(chain))
                claimed.update(chain)
    return chains


def build_space(
    view: GraphView,
    spec: HardwareSpec,
    *,
    allowed: Iterable[Candidate] | None = None,
    cost: Mapping[str, Mapping[Candidate, float]] | None = None,
    keep_float: Collection[str] = (),
) -> SearchSpace:
    """The search space of ``view``'s layers on ``spec``.

    Args:
        view: the graph view (its layers are the decisions).
        spec: the target.
        allowed: restrict every layer to these candidates (as written; weightless layers
            map them to their effective form). ``None``: all the spec allows.
        cost: per layer, the cost of each candidate on the search's objective; when given,
            dominated candidates are pruned (:func:`prune_dominated`).
        keep_float: layers the user keeps in fp32 (``--exclude``): fp32 is their only candidate.
    """
    restrict = None if allowed is None else set(allowed)
    layers: dict[str, tuple[Candidate, ...]] = {}
    for name, layer in view.layers.items():
        has_weight = layer.weight is not None
        options: list[Candidate] = []
        for raw in spec.candidates_for(layer.op_type):
            if restrict is not None and raw not in restrict and raw != FP32:
                continue
            candidate = effective_candidate(has_weight, raw)
            if not spec.allows(layer.op_type, candidate) or candidate in options:
                continue  # the spec lists it only in a form this layer cannot take
            if spec.integer_only and candidate.is_float:
                continue
            if layer_form_problem(layer, view.nodes[name], candidate):
                continue  # no Q/DQ form for it (a batched weight at dynamic int8 or block-wise)
            options.append(candidate)
        if not spec.integer_only and FP32 not in options:
            options.insert(0, FP32)
        if name in keep_float:
            options = [FP32]
        options.sort(key=lambda c: (c != FP32,))
        if cost is not None and name in cost:
            options = list(prune_dominated(options, cost[name]))
        if options:
            layers[name] = tuple(options)
    ties: list[tuple[str, str]] = []
    for chain in fusion_chains(view, spec):
        members = [n for n in chain if n in layers]
        for a, b in zip(members, members[1:], strict=False):
            ties.append((a, b))
    forbidden: list[tuple[str, Candidate, str, Candidate]] = []
    if spec.integer_only:
        for a, b, _ in view.edges_between_layers():
            if a not in layers or b not in layers:
                continue
            for ca in layers[a]:
                for cb in layers[b]:
                    if ca.activations != cb.activations:
                        forbidden.append((a, ca, b, cb))
    logger.debug("search space: %d layers, %d ties, %d forbidden edge combinations", len(layers), len(ties), len(forbidden))
    return SearchSpace(layers=layers, ties=tuple(ties), forbidden=tuple(forbidden))
