"""Calibrate the activation ranges the layouts need, in one onnxruntime sweep (cached).

Tensors inside control-flow subgraphs are threaded out to main-graph outputs first
(:func:`onnxq.subgraphs.expose`), so the same single sweep covers them.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxq.calibration import collect_ranges
from onnxq.layout import Layout
from onnxq.numerics import fake_quantize
from onnxq.pipeline import ALL, Pass, PassContext
from onnxq.precision import Precision, bits, is_integer
from onnxq.subgraphs import expose

__all__ = ["CalibratePass"]

logger = logging.getLogger(__name__)


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
    from onnxq.passes.rewrite import _weight_ranges

    from onnxq.model import model_opset
    from onnxq.rewrite import weight_qparams

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
        q = weight_qparams(w, view.nodes[name], candidate, spec, weight_ranges=_weight_ranges,
                           per_channel_ok=model_opset(ctx.model) >= 13)
        weights[layer.weight.tensor] = fake_quantize(w, q)
    return weights


class CalibratePass(Pass):
    name = "calibrate"
    requires = ("layout", "feeds")
    produces = ("ranges",)
    preserves = ALL

    def run(self, ctx: PassContext) -> bool:
        scoped = [layout for _, layout in ctx.artifacts.get("scope_layouts", [])]
        targets, symmetric = _targets([ctx.artifacts["layout"], *scoped])
        options = ctx.options
        if not targets:
            ctx.artifacts["ranges"] = {}
            return False
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
        ctx.artifacts["ranges"] = {inverse.get(name, name): value for name, value in ranges.items()}
        logger.info("calibrated %d tensors (%s)", len(targets), options.calibration)
        return False
