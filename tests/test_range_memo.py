"""The search's plan builds find every activation range in the run's memo after one priming sweep.

A detector's plans quantize the same tensor at ``int8`` in one plan (an ``int8/int8`` Conv's
input) and at ``uint8`` in another; the priming sweep kept one of the two, and every build that
needed the other swept the twelve 640×640 calibration pages again (seven extra sweeps, 40 s).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxq.passes.evaluate import PlanEvaluator
from onnxq.passes.plan import all_layers

from onnxq.api import graph_view_for, scope_views_for
from onnxq.calibration import collect_range_variants, collect_ranges
from onnxq.data import load_feeds
from onnxq.options import QuantizeOptions
from onnxq.pipeline import PassContext
from onnxq.precision import Candidate, Precision
from onnxq.runtime import make_session, run_all
from onnxq.spec import load_spec

MODELS = Path(__file__).resolve().parent.parent / "models"


def _context(model: onnx.ModelProto) -> PassContext:
    spec = load_spec("ort-cpu-x86")
    with np.load(MODELS / "digits_cnn.calib.npz") as data:
        calib = {"input": data["input"][:64]}
    ctx = PassContext(model=model, options=QuantizeOptions(progress=False))
    ctx.artifacts.update({"spec": spec, "feeds": load_feeds(calib, model, batch_size=16), "fp32_model": model})
    ctx.analyses.register("graph_view", lambda c: graph_view_for(c.model, spec))
    ctx.analyses.register("scope_views", lambda c: scope_views_for(c.model, spec))
    return ctx


def test_builds_of_int8_and_uint8_plans_find_their_ranges_primed() -> None:
    model = onnx.load(str(MODELS / "digits_cnn.onnx"))
    ctx = _context(model)
    convs = [name for name, layer in all_layers(ctx).items() if layer.op_type == "Conv"]
    plans = [{name: Candidate.parse(word) for name in convs} for word in ("int8/uint8", "int8/int8")]
    evaluator = PlanEvaluator(ctx)
    evaluator.prime(plans)
    memo = ctx.artifacts["range_memo"]
    primed = dict(memo)
    assert {key[1] for key in primed} == {"int8", "uint8"}
    reference = run_all(make_session(model), list(ctx.artifacts["feeds"].held_back))
    for plan in plans:
        built = evaluator.build(plan)
        assert memo == primed, f"the build swept again for {sorted(set(memo) - set(primed))[:3]}"
        outputs = run_all(make_session(built), list(ctx.artifacts["feeds"].held_back))
        agreement = np.mean(outputs[0][0].argmax(1) == reference[0][0].argmax(1))
        assert agreement > 0.9


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_range_variants_equal_one_collect_per_variant(method: str) -> None:
    model = onnx.load(str(MODELS / "digits_cnn.onnx"))
    with np.load(MODELS / "digits_cnn.calib.npz") as data:
        feeds = [{"input": data["input"][i:i + 16]} for i in range(0, 48, 16)]
    tensors = [node.output[0] for node in model.graph.node if node.op_type == "Conv"][:3]
    variants = [(Precision.INT8, True), (Precision.UINT8, False), (Precision.INT4, True)]
    ranges = collect_range_variants(model, feeds, {t: variants for t in tensors}, method=method)
    for precision, symmetric in variants:
        alone = collect_ranges(model, feeds, tensors, method=method, precision_for=dict.fromkeys(tensors, precision),
                               symmetric_for=dict.fromkeys(tensors, symmetric))
        for tensor in tensors:
            assert ranges[(tensor, precision, symmetric)] == alone[tensor]
