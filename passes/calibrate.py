"""Calibrate the activation ranges the layouts need, in one onnxruntime sweep (cached).

Tensors inside control-flow subgraphs are threaded out to main-graph outputs first
(:func:`onnxq.subgraphs.expose`), so the same single sweep covers them.
"""

from __future__ import annotations

import logging

import numpy as np
from onnxq.passes.layout import plan_layouts

from onnxq.calibration import TensorRange, collect_range_variants, collect_ranges
from onnxq.calibration.weights import written_weight_ranges
from onnxq.layout import Layout
from onnxq.model import fill_stubs, model_opset
from onnxq.numerics import fake_quantize
from onnxq.pipeline import ALL, Pass, PassContext
from onnxq.precision import Precision, bits, is_integer
from onnxq.rewrite import weight_qparams
from onnxq.subgraphs import expose

__all__ = ["CalibratePass"]

logger = logging.getLogger(__name__)

#: Layout decisions after the first at most (each leaves more NaN/Inf tensors in float).
_MAX_RELAYOUTS = 4


def _targets(layouts: list[Layout]) -> tuple[dict[str, Precision], dict[str, bool]]:
    targets: dict[str, Precision] = {}
    symmetric: dict[str, bool] = {}
    for layout in layouts:
        for tensor, precision in layout.calibration_targets().items():
            if tensor not in targets or bits(precision) < bits(targets[tensor]):
                targets[tensor] = precision
        for quant in layout.tensors.values():
            symmetric[quant.range_of] = symmetric.get(quant.range_of, False) or quant.symmetric
    return targets, symmetric


def _quantized_weights(ctx: PassContext) -> dict[str, np.ndarray]:
    """The dequantized integer weights the rewrite will write, for LAPQ's loss."""
    view = ctx.analysis("graph_view")
    spec = ctx.artifacts["spec"]
    weights: dict[str, np.ndarray] = {}
    for name, candidate in ctx.artifacts["plan"].items():
        layer = view.layers.get(name)
        if layer is None or layer.weight is None or not is_integer(candidate.weights):
            continue
        if layer.weight.location.value != "initializer":
            continue  # Constant-node weights become initializers only in the rewrite
        value = view.weight_value(layer.weight.tensor)
        if value is None:
            continue
        w = value.astype(np.float32)
        q = weight_qparams(w, view.nodes[name], candidate, spec, weight_ranges=written_weight_ranges,
                           per_channel_ok=model_opset(ctx.model) >= 13)
        weights[layer.weight.tensor] = fake_quantize(w, q)
    return weights


def _range_memo(ctx: PassContext) -> dict[tuple[str, str, bool, str], TensorRange] | None:
    """The run's shared range memo, or None: outside a search, and for LAPQ (its ranges are fitted
    jointly with the quantized weights of one plan)."""
    if ctx.options.calibration == "lapq":
        return None
    return ctx.artifacts.get("range_memo")


class CalibratePass(Pass):
    name = "calibrate"
    requires = ("layout", "feeds")
    produces = ("ranges",)
    preserves = ALL

    def run(self, ctx: PassContext) -> bool:
        ranges: dict[str, TensorRange] = {}
        keep_float: set[str] = set()
        # a tensor that takes NaN/Inf gets no Q: the layout is decided again without it, which
        # can make other tensors (that shared its grid) calibration targets of their own
        for attempt in range(_MAX_RELAYOUTS + 1):
            scoped = [layout for _, layout in ctx.artifacts.get("scope_layouts", [])]
            targets, symmetric = _targets([ctx.artifacts["layout"], *scoped])
            missing = {t: p for t, p in targets.items() if t not in ranges}
            if missing:
                ranges.update(self._ranges(ctx, missing, symmetric, bool(scoped)))
            non_finite = {t for t in targets if ranges[t].non_finite}
            if not non_finite - keep_float or attempt == _MAX_RELAYOUTS:
                break
            keep_float |= non_finite
            logger.warning("left in float (they take NaN/Inf values): %s", ", ".join(sorted(non_finite)))
            ctx.artifacts["layout"], ctx.artifacts["scope_layouts"] = plan_layouts(ctx, frozenset(keep_float))
        ctx.artifacts["ranges"] = ranges
        return False

    def prime(self, ctx: PassContext, layouts: list[Layout], scoped: bool) -> None:
        """Collect, in one sweep, the ranges of every tensor ``layouts`` quantize into the run's
        ``range_memo``: the search knows the plans it will build, and one sweep over the
        calibration feeds costs as much for one tensor as for all of them. A tensor gets a range
        per quantizer the layouts give it (``int8`` in one plan, ``uint8`` in another): a build
        that found only the other one would sweep the feeds again for it."""
        memo = _range_memo(ctx)
        if memo is None:
            return
        method = ctx.options.calibration
        variants: dict[str, list[tuple[Precision, bool]]] = {}
        for layout in layouts:
            targets, symmetric = _targets([layout])
            for tensor, precision in targets.items():
                variant = (precision, symmetric.get(tensor, False))
                if (tensor, precision.value, variant[1], method) not in memo and variant not in variants.get(tensor, []):
                    variants.setdefault(tensor, []).append(variant)
        if not variants:
            return
        model, mapping = expose(ctx.model, sorted(variants)) if scoped else (ctx.model, {t: t for t in variants})
        ranges = collect_range_variants(model, list(ctx.artifacts["feeds"].calibration),
                                        {mapping[t]: v for t, v in variants.items()}, method=method,
                                        cache_dir=ctx.options.cache_path(), progress=ctx.options.progress,
                                        seed=ctx.options.seed)
        inverse = {exposed: original for original, exposed in mapping.items()}
        for (tensor, precision, symmetric), value in ranges.items():
            memo[(inverse.get(tensor, tensor), precision.value, symmetric, method)] = value
        logger.info("calibrated %d tensors (%s) for the search's plans", len(variants), method)

    def _ranges(self, ctx: PassContext, targets: dict[str, Precision], symmetric: dict[str, bool],
                scoped: bool) -> dict[str, TensorRange]:
        """The ranges of ``targets``: those an earlier plan build of this run collected (the
        ``range_memo`` the search's evaluator shares; a tensor's range on the fp32 model does not
        depend on the plan), the rest collected now and remembered."""
        memo = _range_memo(ctx)
        if memo is None:
            return self._collect(ctx, targets, symmetric, scoped)
        keys = {t: (t, p.value, symmetric.get(t, False), ctx.options.calibration) for t, p in targets.items()}
        missing = {t: p for t, p in targets.items() if keys[t] not in memo}
        if missing:
            for tensor, value in self._collect(ctx, missing, symmetric, scoped).items():
                if tensor in keys:
                    memo[keys[tensor]] = value
        return {t: memo[key] for t, key in keys.items() if key in memo}

    def _collect(self, ctx: PassContext, targets: dict[str, Precision], symmetric: dict[str, bool],
                 scoped: bool) -> dict[str, TensorRange]:
        options = ctx.options
        if "weight_source" in ctx.artifacts:  # a sweep runs the model: a skeleton build takes its weights now
            fill_stubs(ctx.model, ctx.artifacts.pop("weight_source"))
        model = ctx.model
        mapping = {t: t for t in targets}
        if scoped:
            model, mapping = expose(ctx.model, sorted(targets))
        ranges = collect_ranges(
            model,
            list(ctx.artifacts["feeds"].calibration),
            sorted(mapping[t] for t in targets),
            method=options.calibration,
            precision_for={mapping[t]: p for t, p in targets.items()},
            symmetric_for={mapping[t]: s for t, s in symmetric.items() if t in mapping},
            cache_dir=options.cache_path(),
            progress=options.progress,
            seed=options.seed,
            weights=_quantized_weights(ctx) if options.calibration == "lapq" and not scoped else None,
        )
        inverse = {exposed: original for original, exposed in mapping.items()}
        logger.info("calibrated %d tensors (%s)", len(targets), options.calibration)
        return {inverse.get(name, name): value for name, value in ranges.items()}
