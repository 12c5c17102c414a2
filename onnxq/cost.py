"""Roofline cost model: latency, size and BitOps of a precision plan on a hardware spec.

Per layer, latency is ``max(macs / throughput, bytes moved / bandwidth) + op overhead``, where
the throughput is the spec's for the layer's candidate (``CostParams.throughput``) and the
bytes moved are the weights at their storage precision plus the input and output activations
at theirs. A measured ``latency_table`` entry (by layer name, then op type) replaces the
roofline for that layer.

Every edge between two layers whose tensors live in different formats (integer on one side and
float on the other, two different integer formats, or fp16 against fp32) pays
``conversion_ns_per_element`` per element of the tensor: that is what makes alternating
int8/fp32 plans no faster than fp32 on CPUs. The conversion cost is charged to the consumer.

Size counts the weights at their precision's bits (4-bit formats pack two per byte) plus one
scale (fp32) and zero point per tensor, per channel or per block, following the preferred
granularity of the spec's weight quantizer. BitOps are ``macs × weight bits × activation
bits``. Layers missing from the plan are fp32/fp32.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from onnxq.precision import FP32, Candidate, Precision, bits, is_integer
from onnxq.spec.model import Granularity, HardwareSpec

__all__ = ["CostEstimate", "LayerCost", "boundary", "estimate", "weight_bytes"]

logger = logging.getLogger(__name__)

_SCALE_BYTES = 4  # fp32 scales
_DEFAULT_BLOCK = 32


@dataclass(frozen=True)
class LayerCost:
    """What the cost model needs to know about one layer.

    Attributes:
        name: layer (node) name, as in the plan.
        op_type: ONNX op type.
        macs: multiply-accumulates of one inference.
        weight_elements: elements of the layer's weights (0 for layers without weights).
        input_elements: activation elements read (all activation inputs).
        output_elements: activation elements written.
        weight_channels: scale/zero-point pairs of per-channel weight quantization (output
            channels); 1 when unknown.
    """

    name: str
    op_type: str
    macs: int
    weight_elements: int
    input_elements: int
    output_elements: int
    weight_channels: int = 1


@dataclass(frozen=True)
class CostEstimate:
    """Estimated cost of a plan.

    Attributes:
        latency_seconds: sum of the per-layer latencies, boundary conversions included.
        size_bytes: weight storage, quantization parameters included.
        bitops: sum of ``macs × weight bits × activation bits``.
        per_layer: latency per layer (seconds), boundary conversions included.
        conversion_seconds: the part of the latency spent converting at precision boundaries.
    """

    latency_seconds: float
    size_bytes: int
    bitops: int
    per_layer: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    conversion_seconds: float = 0.0


def _domain(candidate: Candidate) -> Precision:
    """The format of the activations a layer exchanges with its neighbours."""
    return candidate.activations


def boundary(producer: Candidate, consumer: Candidate) -> bool:
    """True when the tensor between two layers must be converted (Q, DQ, Cast or requantize)."""
    return _domain(producer) != _domain(consumer)


def weight_bytes(layer: LayerCost, candidate: Candidate, spec: HardwareSpec) -> int:
    """Storage of a layer's weights under ``candidate``, scales and zero points included."""
    n = layer.weight_elements
    if n <= 0:
        return 0
    precision = candidate.weights
    w_bits = bits(precision)
    data = math.ceil(n * w_bits / 8)
    if not is_integer(precision) and precision != Precision.FP8E4M3:
        return data
    rule = spec.weight_rule(layer.op_type, precision)
    granularity = rule.preferred_granularity if rule is not None else Granularity.PER_TENSOR
    if granularity == Granularity.PER_CHANNEL:
        groups = max(1, layer.weight_channels)
    elif granularity == Granularity.PER_BLOCK:
        block = rule.block_sizes[0] if rule is not None and rule.block_sizes else _DEFAULT_BLOCK
        groups = math.ceil(n / block)
    else:
        groups = 1
    zero_point_bytes = math.ceil(groups * w_bits / 8)
    return data + groups * _SCALE_BYTES + zero_point_bytes


def _candidate(value: Candidate | str) -> Candidate:
    return value if isinstance(value, Candidate) else Candidate.parse(value)


def _layer_seconds(layer: LayerCost, candidate: Candidate, spec: HardwareSpec) -> float:
    cost = spec.cost
    for key in (layer.name, layer.op_type):
        row = cost.latency_table.get(key)
        if row is not None and str(candidate) in row:
            return float(row[str(candidate)])
    compute = layer.macs / cost.throughput(candidate) if layer.macs > 0 else 0.0
    act_bytes = bits(candidate.activations) / 8
    moved = weight_bytes(layer, candidate, spec) + (
        layer.input_elements + layer.output_elements) * act_bytes
    memory = moved / cost.bytes_per_second
    return max(compute, memory) + cost.op_overhead_seconds


def estimate(
    layers: Sequence[LayerCost],
    plan: Mapping[str, Candidate],
    spec: HardwareSpec,
    edges: Sequence[tuple[str, str, int]] = (),
) -> CostEstimate:
    """Latency, size and BitOps of ``plan`` on ``spec``.

    Args:
        layers: the model's layers.
        plan: candidate per layer name (``Candidate`` or its text); missing layers are fp32.
        spec: the target; its ``cost`` parameters price the plan.
        edges: ``(producer, consumer, elements)`` for every tensor between two layers; names
            that are not layers (graph inputs) count as fp32 producers.

    Returns:
        The estimate; deterministic for equal inputs.
    """
    names = {layer.name for layer in layers}
    unknown = sorted(set(plan) - names)
    if unknown:
        logger.debug("plan names %d layers the cost model was not given: %s", len(unknown),
                     ", ".join(unknown[:5]))
    chosen = {layer.name: _candidate(plan.get(layer.name, FP32)) for layer in layers}
    per_layer: dict[str, float] = {}
    size = 0
    bitops = 0
    for layer in layers:
        candidate = chosen[layer.name]
        per_layer[layer.name] = _layer_seconds(layer, candidate, spec)
        size += weight_bytes(layer, candidate, spec)
        bitops += layer.macs * bits(candidate.weights) * bits(candidate.activations)
    conversion = 0.0
    unattributed = 0.0
    ns = spec.cost.conversion_ns_per_element
    for producer, consumer, elements in edges:
        a = chosen.get(producer, FP32)
        b = chosen.get(consumer, FP32)
        if boundary(a, b):
            seconds = elements * ns * 1e-9
            conversion += seconds
            if consumer in per_layer:
                per_layer[consumer] += seconds
            else:  # a graph output or a non-layer consumer
                unattributed += seconds
    latency = sum(per_layer[layer.name] for layer in layers) + unattributed
    return CostEstimate(
        latency_seconds=latency,
        size_bytes=int(size),
        bitops=int(bitops),
        per_layer=MappingProxyType(per_layer),
        conversion_seconds=conversion,
    )
