"""The roofline cost model: sizes, BitOps, boundaries, measured latencies."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from onnxq.cost import CostEstimate, LayerCost, boundary, estimate, weight_bytes
from onnxq.precision import Candidate
from onnxq.spec import load_spec

C = Candidate.parse
INT8 = C("int8/uint8")
FP32 = C("fp32/fp32")


def _chain(n: int = 6) -> tuple[list[LayerCost], list[tuple[str, str, int]]]:
    """A chain of equal 3x3 convs, 64 channels on 28x28 (compute-bound on a CPU)."""
    elements = 64 * 28 * 28
    layers = [
        LayerCost(f"conv{i}", "Conv", macs=64 * 64 * 9 * 28 * 28, weight_elements=64 * 64 * 9,
                  input_elements=elements, output_elements=elements, weight_channels=64)
        for i in range(n)
    ]
    edges = [(f"conv{i}", f"conv{i + 1}", elements) for i in range(n - 1)]
    return layers, edges


def test_int8_weights_about_four_times_smaller() -> None:
    spec = load_spec("ort-cpu-x86")
    layers, edges = _chain()
    fp32 = estimate(layers, {}, spec, edges)
    int8 = estimate(layers, {layer.name: INT8 for layer in layers}, spec, edges)
    assert isinstance(fp32, CostEstimate)
    assert fp32.size_bytes == sum(4 * layer.weight_elements for layer in layers)
    ratio = fp32.size_bytes / int8.size_bytes
    assert 3.8 < ratio <= 4.0  # per-channel scales and zero points cost a little
    assert int8.latency_seconds < fp32.latency_seconds  # contiguous int8 pays off on x86
    assert int8.bitops * 16 == fp32.bitops  # 8x8 vs 32x32
    assert set(int8.per_layer) == {layer.name for layer in layers}


def test_int4_packs_two_per_byte() -> None:
    spec = load_spec("ort-cpu-x86")
    layer = LayerCost("mm", "MatMul", macs=0, weight_elements=4096, input_elements=0,
                      output_elements=0, weight_channels=64)
    assert weight_bytes(layer, C("fp32/fp32"), spec) == 4 * 4096
    # MatMul int4 prefers per-block quantization (block 16): 256 blocks of scale + 4-bit zp
    assert weight_bytes(layer, C("int4/fp32"), spec) == 2048 + 256 * 4 + 128
    # Conv int4 is per-channel: 64 scales + 64 zero points packed in 32 bytes
    conv = LayerCost("c", "Conv", 0, 4096, 0, 0, weight_channels=64)
    assert weight_bytes(conv, C("int4/uint8"), spec) == 2048 + 64 * 4 + 32


def test_alternating_plan_pays_boundaries() -> None:
    spec = load_spec("ort-cpu-x86")
    layers, edges = _chain()
    contiguous = {layer.name: INT8 for layer in layers}
    alternating = {layer.name: (INT8 if i % 2 == 0 else FP32) for i, layer in enumerate(layers)}
    a = estimate(layers, contiguous, spec, edges)
    b = estimate(layers, alternating, spec, edges)
    assert a.conversion_seconds == 0.0
    assert b.conversion_seconds == pytest.approx(len(edges) * edges[0][2] * spec.cost.conversion_ns_per_element * 1e-9)
    assert b.latency_seconds > a.latency_seconds
    # the conversion is charged to the consumer layer
    no_edges = estimate(layers, alternating, spec)
    assert b.per_layer["conv1"] > no_edges.per_layer["conv1"]
    assert b.latency_seconds == pytest.approx(no_edges.latency_seconds + b.conversion_seconds)


def test_slow_formats_on_x86_are_not_faster_than_fp32() -> None:
    spec = load_spec("ort-cpu-x86")
    layers, edges = _chain()
    fp32 = estimate(layers, {}, spec, edges).latency_seconds
    for cand in ("int16/int16", "int4/uint8", "int8/int8"):
        plan = {layer.name: C(cand) for layer in layers}
        assert estimate(layers, plan, spec, edges).latency_seconds > fp32, cand


def test_boundary_rules() -> None:
    assert not boundary(INT8, C("int4/uint8"))  # same activation format: no conversion
    assert boundary(INT8, FP32)
    assert boundary(C("int8/int8"), INT8)  # different integer formats: requantize
    assert boundary(C("fp16/fp16"), FP32)  # Cast
    assert not boundary(C("int4/fp32"), FP32)  # weight-only layers exchange fp32


def test_plan_accepts_text_and_missing_layers_are_fp32() -> None:
    spec = load_spec("tensorrt-gpu")
    layers, edges = _chain(2)
    text = estimate(layers, {"conv0": "int8/int8"}, spec, edges)  # type: ignore[dict-item]
    typed = estimate(layers, {"conv0": C("int8/int8")}, spec, edges)
    assert text == typed
    assert typed.conversion_seconds > 0  # conv1 stayed fp32


def test_latency_table_overrides_roofline(tmp_path: Path) -> None:
    data = json.loads(
        (resources.files("onnxq.hardware_specs") / "ort-cpu-x86.json").read_text("utf-8"))
    data["name"] = "ort-measured"
    data["cost"]["latency_table"] = {"conv0": {"int8/uint8": 0.5}, "Conv": {"fp32/fp32": 0.25}}
    path = tmp_path / "ort-measured.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    spec = load_spec(path)
    layers, _ = _chain(2)
    result = estimate(layers, {"conv0": INT8}, spec)
    assert result.per_layer == {"conv0": 0.5, "conv1": 0.25}
    assert result.latency_seconds == pytest.approx(0.75)


def test_memory_bound_layer_uses_bandwidth() -> None:
    spec = load_spec("ort-cpu-x86")
    layer = LayerCost("add", "Add", macs=0, weight_elements=0, input_elements=2_000_000,
                      output_elements=1_000_000)
    fp32 = estimate([layer], {}, spec)
    uint8 = estimate([layer], {"add": C("uint8/uint8")}, spec)
    bw = spec.cost.bytes_per_second
    overhead = spec.cost.op_overhead_seconds
    assert fp32.latency_seconds == pytest.approx(12_000_000 / bw + overhead)
    assert uint8.latency_seconds == pytest.approx(3_000_000 / bw + overhead)
    assert fp32.size_bytes == 0 and fp32.bitops == 0
