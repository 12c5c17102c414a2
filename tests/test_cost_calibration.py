"""Fast checks of benchmarks/calibrate_cost_model.py and of the calibrated ort-cpu-x86 cost block."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest

from onnxq.api import layer_ops_for
from onnxq.graph import GraphView
from onnxq.precision import Candidate
from onnxq.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def _module() -> ModuleType:
    path = ROOT / "benchmarks" / "calibrate_cost_model.py"
    spec = importlib.util.spec_from_file_location("calibrate_cost_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cal = _module()


def test_spearman() -> None:
    assert cal.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert cal.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert cal.spearman([1, 2, 2, 4], [1, 3, 3, 4]) == pytest.approx(1.0)


def test_layer_costs_scale_with_batch() -> None:
    spec = load_spec("ort-cpu-x86")
    model = onnx.load(ROOT / "models" / "digits_cnn.onnx")
    view = GraphView(cal.static_shapes(model), layer_ops_for(spec))
    one, edges1 = cal.layer_costs(view, 1)
    many, edges32 = cal.layer_costs(view, 32)
    for a, b in zip(one, many, strict=True):
        assert b.macs == 32 * a.macs and b.output_elements == 32 * a.output_elements
        assert b.weight_elements == a.weight_elements  # weights do not scale with the batch
    assert [e[2] * 32 for e in edges1] == [e[2] for e in edges32]
    conv = next(c for c in one if c.op_type == "Conv")
    assert conv.weight_channels == view.layers[conv.name].weight.shape[0]


def test_static_shapes_give_attention_macs() -> None:
    spec = load_spec("ort-cpu-x86")
    model = onnx.load(ROOT / "models" / "digits_transformer.onnx")
    view = GraphView(cal.static_shapes(model), layer_ops_for(spec))
    attention = [layer for layer in view.layers.values() if layer.op_type == "MatMul" and layer.weight is None]
    assert attention and all(layer.macs > 0 for layer in attention)


@pytest.mark.parametrize("candidate", ["fp32/fp32", "fp16/fp16", "int8/uint8", "int4/uint8", "int16/int16"])
def test_micro_models_run(candidate: str) -> None:
    shape = cal.LinearShape("Conv", (1, 8, 8, 8), (8, 8, 3, 3))
    model = cal.build_linear(shape, candidate, np.random.default_rng(0))
    onnx.checker.check_model(model)
    timer = cal.Timer(threads=1, repeats=1, warmup=0, min_seconds=0.0)
    x = np.random.default_rng(1).uniform(-1, 1, shape.x).astype(np.float32)
    y = timer.session(model).run(None, {"x": x})[0]
    ref = timer.session(cal.build_linear(shape, "fp32/fp32", np.random.default_rng(0))).run(None, {"x": x})[0]
    assert y.shape == ref.shape
    assert np.abs(y - ref).max() < (0.5 if candidate != "int4/uint8" else 2.0)


def test_weight_only_int4_matmul_is_blockwise() -> None:
    shape = cal.LinearShape("MatMul", (4, 64), (64, 16))
    model = cal.build_linear(shape, "int4/fp32", np.random.default_rng(0))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    assert {a.name: a.i for a in dq.attribute}.get("block_size") == 32


def test_fit_params_recovers_corrections() -> None:
    truth = cal.Fit(float_scale=1.0, int_scale=1.0, conversion_ns=0.8, run_seconds=4e-6, nonlayer_ns=0.3)
    op = 2.5e-7
    rows = [(1e-4, 0.0, 0.0, 10, 5e4), (2e-5, 5e-5, 5e4, 10, 5e4), (3e-4, 1e-4, 2e5, 40, 4e5),
            (5e-5, 2e-4, 1e5, 40, 4e5), (2e-3, 1e-3, 3e6, 12, 1e6), (1e-3, 0.0, 0.0, 12, 1e6)]
    cases = [cal.Case("m", f"p{i}", 1, measured=truth.float_scale * f + truth.int_scale * n + e * truth.conversion_ns * 1e-9
                      + truth.run_seconds + ops * op + el * truth.nonlayer_ns * 1e-9,
                      roofline=0.0, layers=1, plan_map={}, boundary_elements=e, float_seconds=f, int_seconds=n,
                      nonlayer_ops=ops, nonlayer_elements=int(el))
             for i, (f, n, e, ops, el) in enumerate(rows)]
    fit = cal.fit_params(cases, op)
    for name in ("float_scale", "int_scale", "conversion_ns", "run_seconds", "nonlayer_ns"):
        assert getattr(fit, name) == pytest.approx(getattr(truth, name), rel=1e-6), name


def test_fit_sweep_recovers_fixed_and_per_element_costs() -> None:
    m = cal.Measured(run_seconds=3e-6, conversion_op_seconds=1e-7, conversion_ns_fit=0.1)
    rate = 1e11
    for shape in cal.SWEEP:
        elements = shape.in_elements + shape.out_elements
        m.sweep_seconds[(shape.label, "fp32/fp32")] = 3e-6 + shape.macs / rate + 1e-6 + 0.2e-9 * elements
    fitted = cal.fit_sweep(m, {"fp32/fp32": rate})
    assert fitted["fp32/fp32"] == pytest.approx((1e-6, 0.2), rel=1e-6)


def test_write_spec_cost_keeps_spec_valid(tmp_path: Path) -> None:
    path = tmp_path / "ort-cpu-x86.json"
    shutil.copy(ROOT / "hardware_specs" / "ort-cpu-x86.json", path)
    block = json.loads(path.read_text())["cost"]
    block["placeholder"] = False
    info = {"cpu": "Test CPU", "logical_cores": "2", "onnxruntime": "x", "date": "2000-01-01"}
    cal.write_spec_cost(path, block, info)
    spec = load_spec(path)
    assert not spec.cost.placeholder
    assert "Test CPU" in spec.description and "PLACEHOLDERS" not in spec.description
    cal.write_spec_cost(path, block, info)  # idempotent: the note is replaced, not appended
    assert load_spec(path).description.count("Test CPU") == 1


def test_calibrated_ort_cpu_x86_orders_candidates() -> None:
    cost = load_spec("ort-cpu-x86").cost
    fp32 = cost.throughput(Candidate.parse("fp32/fp32"))
    assert cost.throughput(Candidate.parse("int8/uint8")) > fp32
    for slow in ("int8/int8", "int4/int8"):
        assert cost.throughput(Candidate.parse(slow)) < fp32, slow
    assert cost.bytes_per_second > 1e9 and 0 < cost.conversion_ns_per_element < 10
