"""Calibrate the activation ranges the layouts need, in one onnxruntime sweep (cached).

Tensors inside control-flow subgraphs are threaded out to main-graph outputs first
(:func:`onnxq.subgraphs.expose`), so the same single sweep covers them.
"""

from __future__ import annotations

import logging

import numpy as np
from onnxq.passes.layout import plan_layouts

from onnxq.calibration import TensorRange, collect_ranges
from onnxq.calibration.weights import written_weight_ranges
from onnxq.layout import Layout
from onnxq.model import model_opset
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
            ranges.update(self._remembered(ctx, missing, symmetric))
            missing = {t: p for t, p in missing.items() if t not in ranges}
            if missing:
                collected = self._collect(ctx, missing, symmetric, bool(scoped))
                ranges.update(collected)
                self._remember(ctx, collected, missing, symmetric)
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
        calibration feeds costs as much for one tensor as for all of them."""
        if ctx.artifacts.get("range_memo") is None or ctx.options.calibration == "lapq":
            return
        targets, symmetric = _targets(layouts)
        missing = {t: p for t, p in targets.items() if t not in self._remembered(ctx, {t: p}, symmetric)}
        if missing:
            self._remember(ctx, self._collect(ctx, missing, symmetric, scoped), missing, symmetric)

    @staticmethod
    def _memo_key(ctx: PassContext, tensor: str, precision: Precision, symmetric: bool) -> tuple[str, str, bool, str]:
        return tensor, precision.value, symmetric, ctx.options.calibration

    def _remembered(self, ctx: PassContext, targets: dict[str, Precision],
                    symmetric: dict[str, bool]) -> dict[str, TensorRange]:
        """Ranges an earlier plan build of this run already collected (``range_memo``, shared by
        the search's evaluator): a tensor's range on the fp32 model does not depend on the plan.
        LAPQ is the exception (its ranges are fitted jointly with the quantized weights)."""
        memo = ctx.artifacts.get("range_memo")
        if memo is None or ctx.options.calibration == "lapq":
            return {}
        found = {t: memo.get(self._memo_key(ctx, t, p, symmetric.get(t, False))) for t, p in targets.items()}
        return {t: r for t, r in found.items() if r is not None}

    def _remember(self, ctx: PassContext, collected: dict[str, TensorRange], targets: dict[str, Precision],
                  symmetric: dict[str, bool]) -> None:
        memo = ctx.artifacts.get("range_memo")
        if memo is None or ctx.options.calibration == "lapq":
            return
        for tensor, value in collected.items():
            if tensor in targets:
                memo[self._memo_key(ctx, tensor, targets[tensor], symmetric.get(tensor, False))] = value

    def _collect(self, ctx: PassContext, targets: dict[str, Precision], symmetric: dict[str, bool],
                 scoped: bool) -> dict[str, TensorRange]:
        options = ctx.options
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
