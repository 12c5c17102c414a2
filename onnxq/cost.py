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

Measured on onnxruntime's CPU provider, a constant MAC rate per precision is not enough: small
integer layers pay a fixed cost per call (requantization, NHWC reorders, kernel set-up) that
hides their 3.5x faster MACs. Each layer therefore also pays
``CostParams.candidate_overhead_seconds`` (per call) and ``candidate_ns_per_element`` (per
activation element read and written) of its candidate; together with the MAC rate this is the
efficiency curve ``macs / (macs + overhead · rate)``: large layers run at the full rate, tiny
ones are dominated by the fixed cost.

Precision boundaries are where the rewrite inserts standalone Q, DQ or Cast nodes. Two ways
to price them:

* ``estimate(..., view=GraphView)`` derives them exactly from the plan's Q/DQ layout
  (:func:`boundaries`): a quantized layer's input that comes from a float op (a Q), a quantized
  layer's output that a float op reads (a DQ per such consumer), re-quantizations between two
  integer formats, and the Casts around fp16 layers. Ops that run on integer data (the spec's
  ``shared_scale_ops``, Relu absorbed into the Q before it) are looked through. Whole-model
  estimates also charge the per-inference ``run_overhead_seconds`` and the float ops that are
  not layers (``op_overhead_seconds`` each plus ``nonlayer_ns_per_element`` per output element),
  reported separately as ``fixed_seconds``: they are the same under every plan.
* ``edges``: ``(producer, consumer, elements)`` pairs whose ends are charged when their
  activation formats differ; names that are not layers count as fp32. :func:`boundary_edges`
  builds them from a GraphView for a search that prices layers independently (the ILP): layer
  to layer through integer-capable ops, and layer to/from the float ops around it.

Dynamic int8 layers (``int8/dyn-uint8``) exchange float with their neighbours (they quantize their
input per call, which their per-element cost prices) and compute at the uint8 rate; block-wise
weight-only layers (``int4b32/fp32``, onnxruntime's MatMulNBits) compute at their candidate's
rate and read packed weights with one scale per block, so the roofline's memory term makes them
cheap for few rows and not for many.

``batch`` multiplies MACs, activation and boundary elements (the inputs are per sample);
weights and fixed costs stay.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from onnxq.layout import SHARED_SCALE_DEFAULT, plan_layout
from onnxq.precision import FP32, Candidate, Precision, bits, is_integer
from onnxq.rewrite import per_channel_shape, weight_axis
from onnxq.spec.model import Granularity, HardwareSpec

if TYPE_CHECKING:
    from onnxq.graph import GraphView

__all__ = [
    "Boundary",
    "CostEstimate",
    "LayerCost",
    "boundaries",
    "boundary",
    "boundary_edges",
    "estimate",
    "layer_costs",
    "nonlayer_work",
    "weight_bytes",
]

logger = logging.getLogger(__name__)

_SCALE_BYTES = 4  # fp32 scales
_DEFAULT_BLOCK = 32
#: Ops onnxruntime runs on the integer data around a quantized layer (besides the spec's
#: shared-scale ops): a Relu right after a Q with zero point at the type minimum is dropped.
_INTEGER_TRANSPARENT = frozenset({"Relu", "Identity", "Dropout"})
#: Nodes that cost nothing at run time (folded or pure metadata).
_FREE_OPS = frozenset({"Constant", "Identity"})


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
    fixed_seconds: float = 0.0
    boundaries: tuple[Boundary, ...] = ()


@dataclass(frozen=True)
class Boundary:
    """One standalone conversion node the rewrite creates for a plan.

    Attributes:
        tensor: the tensor converted.
        producer: node (or graph input) that writes the tensor.
        consumer: node that reads the converted tensor; empty for the Q right after a float
            producer (it serves every quantized consumer) and for graph outputs.
        elements: per-sample elements converted.
        kind: ``quantize`` (float → integer), ``dequantize`` (integer → float), ``requantize``
            (DQ → Q between two integer formats: twice the elements) or ``cast`` (fp16).
    """

    tensor: str
    producer: str
    consumer: str
    elements: int
    kind: str


def _domain(candidate: Candidate) -> Precision:
    """The format of the activations a layer exchanges with its neighbours (a dynamic layer
    quantizes its float input itself and writes float)."""
    return Precision.FP32 if candidate.dynamic else candidate.activations


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
    granularity = spec.weight_granularity(layer.op_type, candidate) if rule is not None else Granularity.PER_TENSOR
    if granularity == Granularity.PER_CHANNEL:
        groups = max(1, layer.weight_channels)
    elif granularity == Granularity.PER_BLOCK:
        groups = math.ceil(n / (spec.weight_block_size(layer.op_type, candidate) or _DEFAULT_BLOCK))
    else:
        groups = 1
    # symmetric block-wise weights are written without zero points (onnxq.qdq_patterns)
    symmetric_blocks = granularity == Granularity.PER_BLOCK and rule is not None and rule.symmetric
    zero_point_bytes = 0 if symmetric_blocks else math.ceil(groups * w_bits / 8)
    return data + groups * _SCALE_BYTES + zero_point_bytes


def _candidate(value: Candidate | str) -> Candidate:
    return value if isinstance(value, Candidate) else Candidate.parse(value)


def _layer_seconds(layer: LayerCost, candidate: Candidate, spec: HardwareSpec, batch: int = 1) -> float:
    """One layer's latency for ``batch`` samples: measured table entry, else the roofline plus
    the candidate's fixed and per-element costs."""
    cost = spec.cost
    for key in (layer.name, layer.op_type):
        row = cost.latency_table.get(key)
        if row is not None and str(candidate) in row:
            return float(row[str(candidate)]) * batch
    macs = layer.macs * batch
    elements = (layer.input_elements + layer.output_elements) * batch
    compute = macs / cost.throughput(candidate) if macs > 0 else 0.0
    # a dynamic layer reads and writes float; quantizing its input per call is in its per-element
    # cost; half precision without its own arithmetic is computed on fp32 copies
    act_bytes = (32 if candidate.dynamic or _widened_half(candidate, spec) else bits(candidate.activations)) / 8
    moved = _weight_read_bytes(layer, candidate, spec) + elements * act_bytes
    memory = moved / cost.bytes_per_second
    fixed = cost.op_overhead_seconds + cost.candidate_value(cost.candidate_overhead_seconds, candidate)
    per_element = cost.candidate_value(cost.candidate_ns_per_element, candidate) * 1e-9
    return max(compute, memory) + fixed + elements * per_element


def _weight_read_bytes(layer: LayerCost, candidate: Candidate, spec: HardwareSpec) -> int:
    """Bytes of weight a call reads. Where the target has no faster fp16/bf16 arithmetic than
    fp32 (an x86 CPU: onnxruntime widens the half-precision weights to fp32 for its GEMM), half
    precision saves storage, not bandwidth: measured 0.92x fp32 for one row of a 2048x2048 fp16
    MatMul, where halving the bytes read would give 0.5x."""
    stored = weight_bytes(layer, candidate, spec)
    return max(stored, layer.weight_elements * 4) if _widened_half(candidate, spec) else stored


def _widened_half(candidate: Candidate, spec: HardwareSpec) -> bool:
    """fp16/bf16 on a target whose half-precision MAC rate is not above fp32's."""
    half = candidate.activations in (Precision.FP16, Precision.BF16)
    return half and spec.cost.throughput(candidate) <= spec.cost.throughput(FP32)


def _elements(view: GraphView, tensor: str) -> int:
    """Per-sample elements of ``tensor`` (a symbolic or unknown batch dimension counts as 1)."""
    shape = view.shapes.get(tensor)
    if not shape:
        return 0
    dims = [d if d > 0 else 1 for d in shape]
    return int(np.prod(dims[1:] if len(dims) > 1 and shape[0] in (-1, 1) else dims))


def _integer_layers(plan: Mapping[str, Candidate]) -> set[str]:
    return {name for name, c in plan.items() if c.static_activations}


def boundaries(view: GraphView, plan: Mapping[str, Candidate | str], spec: HardwareSpec) -> tuple[Boundary, ...]:
    """Every standalone conversion the rewrite of ``plan`` leaves for onnxruntime to run.

    Follows the plan's Q/DQ layout (:func:`onnxq.layout.plan_layout`): every quantized tensor
    gets one Q, fused into its producer when that is a layer with integer activations (or an
    integer-capable op on quantized data), standalone otherwise; and one DQ per consumer, fused
    into consumers that compute on integers, standalone before float ops. Consumers needing
    another integer format get a DQ → Q (``requantize``); fp16 layers get a Cast on each
    activation input and on the output.

    Args:
        view: the model's graph (shape-inferred, so tensors have element counts).
        plan: candidate per layer (``Candidate`` or text); missing layers are fp32.
        spec: the target (its shared-scale ops and activation quantizers).

    Returns:
        The boundaries in a deterministic order, with per-sample element counts.
    """
    chosen = {name: _candidate(c) for name, c in plan.items() if name in view.layers}
    layout = plan_layout(view, chosen, spec)
    integer = _integer_layers(layout.plan) - layout.fp16_layers
    shared = (spec.shared_scale_ops or SHARED_SCALE_DEFAULT) | _INTEGER_TRANSPARENT
    folded = {view.nodes[relu].output[0] for relu in layout.folded_relus.values()}
    folded_nodes = set(layout.folded_relus.values())

    def integer_source(tensor: str) -> bool:
        if tensor in folded:
            return True
        producer = view.producer.get(tensor)
        if producer is None:
            return False
        if producer in integer:
            return True
        node = view.nodes[producer]
        return node.op_type in shared and bool(node.input) and node.input[0] in layout.tensors

    def integer_sink(consumer: str) -> bool:
        if consumer in integer or consumer in folded_nodes:
            return True
        node = view.nodes[consumer]
        return (node.op_type in shared and node.op_type not in view.layer_ops and bool(node.output)
                and node.output[0] in layout.tensors)

    found: list[Boundary] = []
    for tensor in sorted(layout.tensors):
        quant = layout.tensors[tensor]
        consumers = sorted(set(view.consumers.get(tensor, [])))
        is_output = tensor in view.graph_outputs
        if not consumers and not is_output:
            continue
        elements = _elements(view, tensor)
        producer = view.producer.get(tensor, tensor)
        if not integer_source(tensor):
            found.append(Boundary(tensor, producer, "", elements, "quantize"))
        for consumer in consumers:
            if not integer_sink(consumer):
                found.append(Boundary(tensor, producer, consumer, elements, "dequantize"))
            if consumer in quant.conversions:
                found.append(Boundary(tensor, producer, consumer, 2 * elements, "requantize"))
        if is_output:
            found.append(Boundary(tensor, producer, "", elements, "dequantize"))
    for name in sorted(layout.fp16_layers):
        layer = view.layers[name]
        for tensor in layer.activations:
            found.append(Boundary(tensor, view.producer.get(tensor, tensor), name, _elements(view, tensor), "cast"))
        found.append(Boundary(layer.output, name, "", layer.output_elements, "cast"))
    return tuple(found)


def boundary_edges(view: GraphView, spec: HardwareSpec | None = None) -> list[tuple[str, str, int]]:
    """Plan-independent ``(producer, consumer, elements)`` pairs for :func:`estimate`'s ``edges``.

    Unlike ``GraphView.edges_between_layers()`` (which walks through every non-layer op and so
    never sees the float ops between layers), the walk from a layer stops at the first node that
    is a layer or a float op; it only passes through ops that run on integer data (shared-scale
    ops, Relu). A float op at the end is an endpoint: it is not a layer, so it counts as fp32 and
    the edge is charged whenever the layer is quantized. Graph inputs and outputs are endpoints
    too. Where one tensor feeds several endpoints the elements are shared among them (one Q
    serves every quantized consumer). Exact per-plan boundaries: :func:`boundaries`.

    Args:
        view: the model's graph.
        spec: the target (its ``shared_scale_ops``); ``None`` takes onnxq's defaults.

    Returns:
        Edges in a deterministic order, per-sample elements.
    """
    through = ((spec.shared_scale_ops if spec is not None else frozenset()) or SHARED_SCALE_DEFAULT) | _INTEGER_TRANSPARENT

    def passes(node_name: str) -> bool:
        node = view.nodes[node_name]
        return node_name not in view.layers and node.op_type in through

    def ends_forward(tensor: str) -> list[str]:
        """Endpoints reading ``tensor`` through integer-capable ops."""
        out: set[str] = set()
        stack = [tensor]
        seen: set[str] = set()
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if current in view.graph_outputs and current != tensor:
                out.add(current)  # a layer's own float output stays float (no Q to fuse with)
            for consumer in view.consumers.get(current, []):
                node = view.nodes[consumer]
                if node.op_type == "Shape":
                    continue  # reads metadata only
                if passes(consumer) and node.input and node.input[0] == current:
                    stack.extend(t for t in node.output if t)
                else:
                    out.add(consumer)
        return sorted(out)

    def float_data(node_name: str) -> bool:
        node = view.nodes[node_name]
        return node.op_type not in _FREE_OPS and any(view.is_float(t) for t in node.output if t)

    edges: dict[tuple[str, str], int] = {}

    def add(a: str, b: str, elements: int) -> None:
        if a != b and elements > 0:
            edges[(a, b)] = edges.get((a, b), 0) + elements

    for name, layer in view.layers.items():
        # outputs: to every endpoint (float op, layer, graph output)
        ends = ends_forward(layer.output)
        for end in ends:
            add(name, end, max(1, layer.output_elements // len(ends)))
        # inputs coming from a float op or a graph input (layer producers are covered above)
        for tensor in layer.activations:
            source = tensor
            while source in view.producer and passes(view.producer[source]):
                source = view.nodes[view.producer[source]].input[0]
            producer = view.producer.get(source)
            if producer is not None and (producer in view.layers or not float_data(producer)):
                continue
            if producer is None and (source in view.constants or not view.is_float(source)):
                continue
            readers = [e for e in ends_forward(source) if e in view.layers]
            add(producer or source, name, max(1, _elements(view, source) // max(1, len(readers))))
    order = {name: i for i, name in enumerate(view.nodes)}
    return sorted(((a, b, n) for (a, b), n in edges.items()),
                  key=lambda e: (order.get(e[0], -1), order.get(e[1], len(order)), e[0], e[1]))


def layer_costs(view: GraphView) -> list[LayerCost]:
    """The :class:`LayerCost` of every layer of ``view`` (per sample), in graph order."""
    rows = []
    for layer in view.layers.values():
        channels = 1
        weight_elements = layer.weight.elements if layer.weight is not None else 0
        if layer.weight is not None and per_channel_shape(layer.op_type, len(layer.weight.shape)):
            axis = weight_axis(layer.op_type, view.nodes[layer.name], len(layer.weight.shape))
            channels = max(1, layer.weight.shape[axis])
        rows.append(LayerCost(layer.name, layer.op_type, layer.macs, weight_elements, layer.input_elements,
                              layer.output_elements, weight_channels=channels))
    return rows


def nonlayer_work(view: GraphView) -> tuple[int, int]:
    """``(ops, float output elements per sample)`` of the nodes that are not layers.

    They run in fp32 under every plan (Constant and Identity nodes are not counted).
    """
    ops = 0
    elements = 0
    for name, node in view.nodes.items():
        if name in view.layers or node.op_type in _FREE_OPS:
            continue
        ops += 1
        elements += sum(_elements(view, t) for t in node.output if t and view.is_float(t))
    return ops, elements


def _nonlayer_seconds(view: GraphView, spec: HardwareSpec, batch: int) -> float:
    """The float ops that are not layers: the same under every plan."""
    ops, elements = nonlayer_work(view)
    cost = spec.cost
    return ops * cost.op_overhead_seconds + elements * batch * cost.nonlayer_ns_per_element * 1e-9


def estimate(
    layers: Sequence[LayerCost],
    plan: Mapping[str, Candidate],
    spec: HardwareSpec,
    edges: Sequence[tuple[str, str, int]] = (),
    *,
    batch: int = 1,
    view: GraphView | None = None,
) -> CostEstimate:
    """Latency, size and BitOps of ``plan`` on ``spec``.

    Args:
        layers: the model's layers (MACs and activation elements per sample).
        plan: candidate per layer name (``Candidate`` or its text); missing layers are fp32.
        spec: the target; its ``cost`` parameters price the plan.
        edges: ``(producer, consumer, elements)`` per sample; charged when the two ends'
            activation formats differ; names that are not layers (float ops, graph inputs)
            count as fp32 (see :func:`boundary_edges`). Ignored when ``view`` is given.
        batch: samples per inference: scales MACs, activation and boundary elements.
        view: the model's graph: boundaries come from the plan's exact Q/DQ layout
            (:func:`boundaries`), and the run overhead and the float non-layer ops are added
            (``fixed_seconds``), so that the latency is the whole model's.

    Returns:
        The estimate; deterministic for equal inputs.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    names = {layer.name for layer in layers}
    unknown = sorted(set(plan) - names)
    if unknown:
        logger.debug("plan names %d layers the cost model was not given: %s", len(unknown),
                     ", ".join(unknown[:5]))
    chosen = {layer.name: _candidate(plan.get(layer.name, FP32)) for layer in layers}
    cost = spec.cost
    per_layer: dict[str, float] = {}
    size = 0
    bitops = 0
    for layer in layers:
        candidate = chosen[layer.name]
        per_layer[layer.name] = _layer_seconds(layer, candidate, spec, batch)
        size += weight_bytes(layer, candidate, spec)
        bitops += layer.macs * batch * bits(candidate.weights) * bits(candidate.activations)
    conversion = 0.0
    unattributed = 0.0
    ns = cost.conversion_ns_per_element * 1e-9

    def charge(producer: str, consumer: str, seconds: float) -> None:
        nonlocal conversion, unattributed
        conversion += seconds
        if consumer in per_layer:
            per_layer[consumer] += seconds
        elif producer in per_layer:
            per_layer[producer] += seconds
        else:  # between non-layers (a graph input's Q feeding several layers)
            unattributed += seconds

    found: tuple[Boundary, ...] = ()
    fixed = 0.0
    if view is not None:
        found = boundaries(view, {k: v for k, v in chosen.items() if k in view.layers}, spec)
        for item in found:
            charge(item.producer, item.consumer, cost.conversion_op_seconds + item.elements * batch * ns)
        fixed = cost.run_overhead_seconds + _nonlayer_seconds(view, spec, batch)
    else:
        for producer, consumer, elements in edges:
            a = chosen.get(producer, FP32)
            b = chosen.get(consumer, FP32)
            if boundary(a, b):
                charge(producer, consumer, elements * batch * ns)
    latency = sum(per_layer[layer.name] for layer in layers) + unattributed + fixed
    return CostEstimate(
        latency_seconds=latency,
        size_bytes=int(size),
        bitops=int(bitops),
        per_layer=MappingProxyType(per_layer),
        conversion_seconds=conversion,
        fixed_seconds=fixed,
        boundaries=found,
    )
