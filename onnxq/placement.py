"""How each decision of a layout is written: who reads a quantized tensor and how, which form a
layer's weights and bias take.

:func:`onnxq.layout.plan_layout` decides which tensors are quantized at which precision; the
functions here turn that into the complete set of choices the rewrite applies
(:func:`onnxq.rewrite.apply_layout` makes none of its own), computed on the planning view:

* a reader of a quantized tensor reads the integer codes (shape-only ops), a DequantizeLinear,
  or a per-axis "guard" DequantizeLinear (a float Conv/Gemm input), with a DQ→Q conversion when
  it needs another precision and an Identity boundary when it computes in float;
* a weight-only producer gets an Identity boundary before its output's Q;
* a layer's weights are written in fp16, a fused pattern (dynamic int8, block-wise), an integer
  table the Gather reads on its output's grid, an integer lookup (DQ after the Gather), or a
  plain DequantizeLinear; its bias as int32 at ``s_x·s_w``, exact int32, or float.

Numbers (scales, zero points) are not decided here: they come from calibration at rewrite time.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from onnxq.graph import GraphView, Layer
from onnxq.precision import Candidate, Precision, is_integer
from onnxq.spec.model import HardwareSpec

if TYPE_CHECKING:
    from onnxq.layout import Layout, TensorQuant

__all__ = ["CHANNEL_INPUT_OPS", "SHAPE_ONLY_OPS", "Grid", "ReadForm", "Reader", "TensorWiring",
           "WeightForm", "BiasMode", "LayerForm", "activation_symmetric", "wire_tensors", "layer_forms", "operand_grids"]

#: Layers whose input 0 carries channels on axis 1 and whose bias is added per output channel.
CHANNEL_INPUT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
#: Ops that read only their input's shape (any element type).
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
#: Activation precisions whose grid an int32 bias at ``s_x·s_w`` is stored on.
_INT32_BIAS_INPUTS = frozenset({Precision.UINT8, Precision.INT8})


@dataclass(frozen=True)
class Grid:
    """An integer grid's kind (its scale and zero point come from a range at rewrite time)."""

    precision: Precision
    symmetric: bool


class ReadForm(enum.StrEnum):
    CODES = "codes"  # the integer codes themselves (they have the tensor's shape)
    DQ = "dq"  # a DequantizeLinear with the tensor's scale
    GUARD = "guard"  # a per-axis DequantizeLinear, one equal scale per channel


@dataclass(frozen=True)
class Reader:
    """How one consumer node reads a quantized tensor.

    Attributes:
        node: the consumer.
        form: codes, DQ or guard DQ.
        suffix: name suffix of the nodes written for this reader (``_<i>`` among several).
        guard_axis / guard_channels: the guard DQ's axis and its number of channels.
        conversion: a DQ→Q→DQ to this other grid for a consumer that needs another precision.
        boundary: an Identity before a consumer that computes in float.
    """

    node: str
    form: ReadForm
    suffix: str = ""
    guard_axis: int = 0
    guard_channels: int = 0
    conversion: Grid | None = None
    boundary: bool = False


@dataclass(frozen=True)
class TensorWiring:
    """How one quantized tensor is written.

    Attributes:
        tensor: the tensor (after Relu folding).
        producer: the node that computes it (after Relu folding), or None for a graph input.
        graph_output: the tensor is a graph output: the producer writes ``<tensor>_float`` and a
            DQ writes the tensor back.
        boundary_out: an Identity between a weight-only producer (computing in float) and the Q.
        table_layer: an integer Gather layer that produces the tensor by reading the codes of
            its table, quantized on the table's grid (no Q after the Gather).
        readers: the consumers, sorted by name.
    """

    tensor: str
    producer: str | None
    graph_output: bool
    boundary_out: bool
    table_layer: str | None
    readers: tuple[Reader, ...]


class WeightForm(enum.StrEnum):
    FP16 = "fp16"  # Casts around the layer, its float constants stored in fp16
    FLOAT = "float"  # integer activations, float weights (or none): nothing to write here
    CONSTANTS = "constants"  # a weightless integer layer: constant operands on an activation grid
    DYNAMIC = "dynamic"  # the dynamic int8 pattern (onnxq.qdq_patterns)
    BLOCKWISE = "blockwise"  # block-wise weight-only DequantizeLinear (onnxq.qdq_patterns)
    TABLE = "table"  # a Gather reading table codes on its output's grid (written with the tensor)
    LOOKUP = "lookup"  # Gather(codes) -> DequantizeLinear, one per-tensor scale
    DQ = "dq"  # integer weights + DequantizeLinear (per channel where the spec says)


class BiasMode(enum.StrEnum):
    FLOAT = "float"
    INT32 = "int32"  # int32 codes at s_x·s_w, the weight scale made bias-safe
    EXACT = "exact"  # int32 codes at a scale fitted to the bias itself


@dataclass(frozen=True)
class LayerForm:
    """How the rewrite writes one quantized (or fp16) layer.

    Attributes:
        candidate: the layer's effective candidate.
        form: the weight form.
        weight / bias: the layer's constant weight and bias tensors.
        input: the activation whose reader grid pairs with the weights (int32 bias scale).
        bias_mode: how the bias is stored (DQ form only).
        block_size: the block size of a block-wise weight.
        operands: the grid of a weightless integer layer's constant operands.
    """

    candidate: Candidate
    form: WeightForm
    weight: str | None = None
    bias: str | None = None
    input: str | None = None
    bias_mode: BiasMode = BiasMode.FLOAT
    block_size: int = 0
    operands: Grid | None = None


def activation_symmetric(spec: HardwareSpec, op_type: str, precision: Precision) -> bool:
    """Whether ``op_type``'s activations at ``precision`` take a symmetric grid."""
    rule = spec.activation_rule(op_type, precision)
    if rule is not None:
        return rule.symmetric
    return not precision.value.startswith("u")


def _activation_grid(spec: HardwareSpec, op_type: str, precision: Precision) -> Grid:
    return Grid(precision, activation_symmetric(spec, op_type, precision))


def _reads_float(layout: Layout, spec: HardwareSpec, view: GraphView, node: str) -> bool:
    """True when ``node`` computes in float32: a float-planned layer, or a spec op left out of the plan."""
    if node in layout.fp16_layers or node in layout.integer_nodes:
        return False
    candidate = layout.plan.get(node)
    if candidate is None:
        return node in layout.float_layers or view.nodes[node].op_type in spec.ops
    return not is_integer(candidate.activations)


def _guard_channels(view: GraphView, layout: Layout, node: str, tensor: str) -> int:
    """Channels of a float Conv/Gemm input that must not look like a quantized layer's: a
    per-axis DQ keeps onnxruntime's WeightBiasQuantization from making the layer int8 (0: none)."""
    proto = view.nodes[node]
    if proto.op_type not in CHANNEL_INPUT_OPS or node not in layout.float_layers:
        return 0
    if not proto.input or proto.input[0] != tensor:
        return 0
    shape = view.shapes.get(tensor)
    if not shape or len(shape) < 2:
        return 0
    return shape[1] if shape[1] > 0 else 0


def _reader(view: GraphView, spec: HardwareSpec, layout: Layout, quant: TensorQuant, node: str, suffix: str) -> Reader:
    op_type = view.nodes[node].op_type
    if op_type in SHAPE_ONLY_OPS:
        # a DQ here would be computed for nothing and would keep onnxruntime from fusing the
        # DQ's other consumers
        return Reader(node, ReadForm.CODES)
    channels = _guard_channels(view, layout, node, quant.tensor)
    other = quant.conversions.get(node)
    return Reader(node, ReadForm.GUARD if channels else ReadForm.DQ, suffix,
                  guard_axis=1, guard_channels=channels,
                  conversion=None if other is None else _activation_grid(spec, op_type, other),
                  boundary=_reads_float(layout, spec, view, node))


def _table_layer(view: GraphView, layout: Layout, producer: str | None, precision: Precision) -> str | None:
    """``producer`` when it is a Gather layer planned with integer table and output of
    ``precision`` on a finite float table: its output then shares the table's grid."""
    candidate = layout.plan.get(producer or "")
    layer = view.layers.get(producer or "")
    if candidate is None or layer is None or layer.op_type != "Gather" or layer.weight is None:
        return None
    if candidate.weights != precision or candidate.activations != precision:
        return None
    return producer if view.finite_float_constant(layer.weight.tensor) else None


def wire_tensors(view: GraphView, spec: HardwareSpec, layout: Layout) -> dict[str, TensorWiring]:
    """The wiring of every quantized tensor that is read or is a graph output."""
    folded_by = {relu: layer for layer, relu in layout.folded_relus.items()}
    wiring: dict[str, TensorWiring] = {}
    for tensor in sorted(layout.tensors):
        quant = layout.tensors[tensor]
        consumers = sorted({c for c in view.consumers.get(tensor, []) if c not in folded_by})
        is_output = tensor in view.graph_outputs
        producer = view.producer.get(tensor)
        producer = folded_by.get(producer, producer) if producer is not None else None
        if (not consumers and not is_output) or (is_output and producer is None):
            continue
        producer_plan = layout.plan.get(producer or "")
        # a weight-only layer (int8 table Gather, int4 weight-only MatMul) computes in float:
        # its output is quantized for its consumers, not by it
        boundary_out = (producer_plan is not None and not is_integer(producer_plan.activations)
                        and producer not in layout.fp16_layers)
        readers = tuple(_reader(view, spec, layout, quant, node, f"_{i}" if len(consumers) > 1 else "")
                        for i, node in enumerate(consumers))
        wiring[tensor] = TensorWiring(tensor, producer, is_output, boundary_out,
                                      _table_layer(view, layout, producer, quant.precision), readers)
    return wiring


def _input_precision(wiring: Mapping[str, TensorWiring], layout: Layout, layer: Layer) -> Precision | None:
    """The precision ``layer`` reads its first activation at, when it reads it quantized."""
    if not layer.activations or layer.activations[0] not in wiring:
        return None
    reader = next((r for r in wiring[layer.activations[0]].readers if r.node == layer.name), None)
    if reader is None or reader.form == ReadForm.CODES:
        return None
    return reader.conversion.precision if reader.conversion else layout.tensors[layer.activations[0]].precision


def _bias_mode(layer: Layer, candidate: Candidate, x_precision: Precision | None) -> BiasMode:
    if layer.bias is None or x_precision is None or layer.op_type not in CHANNEL_INPUT_OPS:
        return BiasMode.FLOAT
    if candidate.weights == Precision.INT8 and x_precision in _INT32_BIAS_INPUTS:
        return BiasMode.INT32
    # a float bias initializer beside a quantized input makes onnxruntime's WeightBiasQuantization
    # requantize it to int32 at scale s_x·s_w, which overflows for 16-bit scales
    return BiasMode.EXACT


def _weight_form(spec: HardwareSpec, layout: Layout, wiring: Mapping[str, TensorWiring], tables: AbstractSet[str | None],
                 layer: Layer, candidate: Candidate) -> LayerForm:
    base = LayerForm(candidate, WeightForm.FLOAT, layer.weight.tensor if layer.weight else None, layer.bias,
                     layer.activations[0] if layer.activations else None)
    if layer.name in layout.fp16_layers:
        return replace(base, form=WeightForm.FP16)
    if layer.weight is None:
        if not is_integer(candidate.activations):
            return base
        return replace(base, form=WeightForm.CONSTANTS, operands=_activation_grid(spec, layer.op_type, candidate.activations))
    if not is_integer(candidate.weights):
        return base
    if candidate.dynamic:
        return replace(base, form=WeightForm.DYNAMIC)
    block = spec.weight_block_size(layer.op_type, candidate)
    if block:
        return replace(base, form=WeightForm.BLOCKWISE, block_size=block)
    if layer.name in tables:
        return replace(base, form=WeightForm.TABLE)
    if layer.name in layout.integer_lookups:
        return replace(base, form=WeightForm.LOOKUP)
    x_precision = _input_precision(wiring, layout, layer)
    return replace(base, form=WeightForm.DQ, bias_mode=_bias_mode(layer, candidate, x_precision))


def layer_forms(view: GraphView, spec: HardwareSpec, layout: Layout,
                wiring: Mapping[str, TensorWiring]) -> dict[str, LayerForm]:
    """The form of every layer the rewrite writes: fp16 layers and layers with an integer side."""
    tables = {w.table_layer for w in wiring.values()}
    forms: dict[str, LayerForm] = {}
    for name in sorted(layout.plan):
        candidate = layout.plan[name]
        layer = view.layers.get(name)
        if layer is None or (candidate.is_float and name not in layout.fp16_layers):
            continue
        forms[name] = _weight_form(spec, layout, wiring, tables, layer, candidate)
    return forms


def operand_grids(view: GraphView, spec: HardwareSpec, integer_nodes: Mapping[str, Precision]) -> dict[str, Grid]:
    """The grid of each integer-only node's constant operands."""
    return {name: _activation_grid(spec, view.nodes[name].op_type, precision)
            for name, precision in sorted(integer_nodes.items())}
