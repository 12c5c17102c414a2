"""Where Q/DQ go for a plan: which tensors are quantized, at which precision, for whom.

The layout is decided before calibration (calibration needs the tensors and their bit widths)
and applied by the rewrite pass. It encodes the patterns onnxruntime fuses into integer kernels
(../shared/ORT_FACTS.md): a quantized Conv/Gemm/MatMul gets a Q on its output; a following Relu
is folded into that Q when the zero point is the grid minimum; ops that keep values (MaxPool,
Reshape, Transpose…) between quantized layers share their input's scale, so the runtime can run
them on integers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxq.graph import GraphView, Layer
from onnxq.numerics import QParams, dequantize, qparams_from_range, quantize
from onnxq.placement import Grid, LayerForm, TensorWiring, activation_symmetric, layer_forms, operand_grids, wire_tensors
from onnxq.precision import Candidate, Precision, bits, is_integer
from onnxq.qdq_patterns import weight_form_problem
from onnxq.spec.model import HardwareSpec

__all__ = ["TensorQuant", "Layout", "plan_layout", "effective_candidate", "activation_symmetric",
           "gathers_on_integers", "LOOKUP_TABLE_PRECISIONS",
           "compressible_constants", "constant_int8_qparams", "layer_form_problem"]

logger = logging.getLogger(__name__)

#: Ops that only move or select values: their output can reuse their input's quantization.
SHARED_SCALE_DEFAULT = frozenset({
    "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice",
    "Split", "Gather", "Resize", "Expand", "Tile", "DepthToSpace", "SpaceToDepth",
})


#: Table precisions a Gather can look up directly (onnxruntime's CPU Gather has no 4-bit kernel).
LOOKUP_TABLE_PRECISIONS = frozenset({Precision.INT8, Precision.UINT8})


def gathers_on_integers(view: GraphView, name: str, candidate: Candidate) -> bool:
    """Whether an embedding Gather with a weight-only table (``int8/fp32``) gathers the integer
    codes and dequantizes only the rows it returns.

    ``DequantizeLinear(table) -> Gather`` dequantizes the whole table on every call (a 30522x384
    word embedding: 189x the fp32 Gather's time, measured on MiniLM-L6); ``Gather(codes) ->
    DequantizeLinear`` reads as many rows as there are ids, as quantize_dynamic writes it. The
    table then takes one per-tensor scale (row scales would have to be gathered too).
    """
    layer = view.layers.get(name)
    return (layer is not None and layer.op_type == "Gather" and layer.weight is not None
            and candidate.weights in LOOKUP_TABLE_PRECISIONS and not is_integer(candidate.activations)
            and not candidate.block_size)


def effective_candidate(layer_has_weight: bool, candidate: Candidate) -> Candidate:
    """A weightless layer (Add, activation×activation MatMul) uses the activation side on both.

    Dynamic and block-wise candidates describe a constant weight; a weightless layer planned
    with one stays float (as onnxruntime's ``quantize_dynamic`` leaves attention MatMuls).
    """
    if layer_has_weight:
        return candidate
    if candidate.dynamic or candidate.block_size:
        return Candidate(Precision.FP32, Precision.FP32)
    return Candidate(candidate.activations, candidate.activations)


def layer_form_problem(layer: Layer, node: onnx.NodeProto | None, candidate: Candidate) -> str | None:
    """Why the rewrite has no Q/DQ form for ``layer``'s weight at ``candidate`` (see
    :func:`onnxq.qdq_patterns.weight_form_problem`), or None. The search space and the uniform
    and explicit plans ask this before planning a layer so."""
    if layer.weight is None or node is None:
        return None
    return weight_form_problem(node, tuple(layer.weight.shape), candidate)


@dataclass
class TensorQuant:
    """Quantization of one tensor.

    Attributes:
        tensor: the tensor name (after Relu folding: the Relu's output).
        precision: the precision of its main Q.
        symmetric: symmetric quantizer or not.
        range_of: tensor whose calibrated range sets the qparams (itself, or the input of a
            shared-scale op).
        from_layer: True when the producer is a quantized layer (its output Q enables fusion).
        conversions: consumer node → other precision it needs (a DQ→Q conversion).
    """

    tensor: str
    precision: Precision
    symmetric: bool
    range_of: str
    from_layer: bool = False
    conversions: dict[str, Precision] = field(default_factory=dict)


@dataclass
class Layout:
    """The complete decision of a plan's Q/DQ layout: what is quantized at which precision, and
    how the rewrite writes it (``wiring``, ``layer_forms``, ``operand_grids``, from
    :mod:`onnxq.placement`). :func:`onnxq.rewrite.apply_layout` makes no choice of its own; it
    only computes the numbers (scales, zero points) from calibrated ranges and weights."""

    plan: dict[str, Candidate]
    tensors: dict[str, TensorQuant]
    folded_relus: dict[str, str]  # layer name → Relu node folded into its output Q
    float_layers: set[str]
    fp16_layers: set[str]
    #: integer-only targets: compute nodes outside the plan (a bias Add, a LayerNorm) that run on
    #: integers too, with the precision of their activations
    integer_nodes: dict[str, Precision] = field(default_factory=dict)
    #: weight-only Gather layers that look up integer codes, a DequantizeLinear after the Gather
    integer_lookups: set[str] = field(default_factory=set)
    #: float constants outside the plan stored as int8 + DequantizeLinear (size only; see
    #: :func:`compressible_constants`)
    compressed_constants: set[str] = field(default_factory=set)
    #: how each quantized tensor is written and read (:func:`onnxq.placement.wire_tensors`)
    wiring: dict[str, TensorWiring] = field(default_factory=dict)
    #: how each quantized or fp16 layer's weights and bias are written (:func:`onnxq.placement.layer_forms`)
    layer_forms: dict[str, LayerForm] = field(default_factory=dict)
    #: the grid of each integer-only node's constant operands
    operand_grids: dict[str, Grid] = field(default_factory=dict)

    def calibration_targets(self) -> dict[str, Precision]:
        """Tensors whose ranges calibration must provide, with the finest bit width needed."""
        targets: dict[str, Precision] = {}
        for quant in self.tensors.values():
            for precision in [quant.precision, *quant.conversions.values()]:
                current = targets.get(quant.range_of)
                if current is None or bits(precision) < bits(current):
                    targets[quant.range_of] = precision
        return targets


def _gets_output_q(view: GraphView, spec: HardwareSpec, tensor: str, keep_float: AbstractSet[str]) -> bool:
    """Whether a quantized layer's output ``tensor`` gets its Q.

    The final logits stay float where float runs (nothing downstream to fuse with); an
    integer-only target computes them in integers too, and a DQ hands the float out.
    """
    if tensor in keep_float:
        return False
    return spec.integer_only or not (tensor in view.graph_outputs and not view.consumers.get(tensor))


def plan_layout(view: GraphView, plan: Mapping[str, Candidate], spec: HardwareSpec,
                keep_float: AbstractSet[str] = frozenset()) -> Layout:
    """Decide the Q/DQ layout of ``plan`` on the graph of ``view``.

    ``keep_float`` names tensors that get no Q at all: calibration saw them take NaN/±Inf (an
    attention mask's ``-inf``), which a quantizer would turn into finite values.
    """
    effective: dict[str, Candidate] = {}
    for name, candidate in plan.items():
        layer = view.layers.get(name)
        if layer is None:
            continue
        effective[name] = effective_candidate(layer.weight is not None, candidate)
    int_layers = {n: c for n, c in effective.items() if is_integer(c.activations) or is_integer(c.weights)}
    fp16_layers = {n for n, c in effective.items() if c.weights in (Precision.FP16,) and c.activations in (Precision.FP16,)}
    float_layers = set(view.layers) - set(int_layers) - fp16_layers

    tensors: dict[str, TensorQuant] = {}
    folded: dict[str, str] = {}
    consumer_need: dict[str, dict[str, Precision]] = {}

    for name, candidate in int_layers.items():
        if not candidate.static_activations:
            continue  # weight-only or dynamic (quantized per call): no static Q on either side
        layer = view.layers[name]
        precision = candidate.activations
        for tensor in layer.activations:
            if tensor not in keep_float:
                consumer_need.setdefault(tensor, {})[name] = precision
        output = layer.output
        symmetric = activation_symmetric(spec, layer.op_type, precision)
        consumers = view.consumers.get(output, [])
        if (len(consumers) == 1 and view.nodes[consumers[0]].op_type == "Relu" and not symmetric
                and output not in view.graph_outputs
                and _gets_output_q(view, spec, view.nodes[consumers[0]].output[0], keep_float)):
            # the Relu is deleted and its clipping done by the Q: only where that Q exists
            relu = consumers[0]
            folded[name] = relu
            output = view.nodes[relu].output[0]
        if not _gets_output_q(view, spec, output, keep_float):
            continue
        tensors[output] = TensorQuant(output, precision, symmetric, output, from_layer=True)

    integer_nodes = _integer_only_nodes(view, spec, set(int_layers), tensors, consumer_need, keep_float)

    for tensor, needs in consumer_need.items():
        if tensor in tensors:
            main = tensors[tensor]
            for consumer, precision in needs.items():
                if precision != main.precision:
                    main.conversions[consumer] = precision
            continue
        ordered = sorted(needs.items(), key=lambda item: (bits(item[1]), item[0]))
        main_precision = ordered[0][1]
        first_consumer = ordered[0][0]
        symmetric = activation_symmetric(spec, view.nodes[first_consumer].op_type, main_precision)
        quant = TensorQuant(tensor, main_precision, symmetric, tensor)
        for consumer, precision in needs.items():
            if precision != main_precision:
                quant.conversions[consumer] = precision
        tensors[tensor] = quant

    shared_ops = spec.shared_scale_ops or SHARED_SCALE_DEFAULT
    changed = True
    while changed:
        changed = False
        for node in view.nodes.values():
            if node.op_type not in shared_ops or not node.input or not node.output:
                continue
            if node.op_type == "Concat":
                continue  # its inputs take its output's grid (below)
            source, target = node.input[0], node.output[0]
            if target not in tensors or tensors[target].range_of != target:
                continue
            if node.op_type == "Gather" and source in view.constants:
                continue
            quant = tensors[target]
            upstream = tensors.get(source)
            if upstream is None:
                if source in view.constants or not view.is_float(source) or source in keep_float:
                    continue
                upstream = TensorQuant(source, quant.precision, quant.symmetric, source)
                tensors[source] = upstream
            if upstream.precision != quant.precision or upstream.symmetric != quant.symmetric:
                # the op runs on its input's integers; consumers that need another precision
                # get a DQ→Q conversion after it instead of a second grid inside the shared op
                # the same holds for shared ops further down that already reuse this grid
                followers = [t for t, q in tensors.items() if t == target or (q.range_of == target and t != target)]
                for tensor in followers:
                    old = tensors[tensor]
                    needs = consumer_need.get(tensor, {})
                    conversions = {c: p for c, p in needs.items() if p != upstream.precision}
                    tensors[tensor] = TensorQuant(tensor, upstream.precision, upstream.symmetric, upstream.range_of,
                                                  from_layer=old.from_layer, conversions=conversions)
                changed = True
                continue
            quant.range_of = upstream.range_of
            changed = True
    _share_concat_grids(view, spec, shared_ops, tensors, keep_float)
    # a chain of shared-scale ops shares one grid: point every link at the chain's root
    for quant in tensors.values():
        root, seen = quant.range_of, {quant.tensor}
        while root in tensors and tensors[root].range_of != root and root not in seen:
            seen.add(root)
            root = tensors[root].range_of
        quant.range_of = root
    lookups = {name for name, candidate in effective.items() if gathers_on_integers(view, name, candidate)}
    compressed = compressible_constants(view) if any(is_integer(c.weights) for c in effective.values()) else set()
    layout = Layout(plan=dict(effective), tensors=tensors, folded_relus=folded, float_layers=float_layers,
                    fp16_layers=fp16_layers, integer_nodes=integer_nodes, integer_lookups=lookups,
                    compressed_constants=compressed)
    # the rest follows from the decisions above: how the rewrite writes them
    layout.wiring = wire_tensors(view, spec, layout)
    layout.layer_forms = layer_forms(view, spec, layout, layout.wiring)
    layout.operand_grids = operand_grids(view, spec, integer_nodes)
    return layout


def _share_concat_grids(view: GraphView, spec: HardwareSpec, shared_ops: AbstractSet[str],
                        tensors: dict[str, TensorQuant], keep_float: AbstractSet[str]) -> None:
    """A shared-scale Concat runs on its inputs' integers: every input takes the grid of the
    output, whose calibrated range covers all of them (a constant input too, where nothing may
    stay float)."""
    if "Concat" not in shared_ops:
        return
    for node in view.nodes.values():
        if node.op_type != "Concat" or not node.output or node.output[0] not in tensors:
            continue
        out = tensors[node.output[0]]
        for tensor in node.input:
            constant_ok = spec.integer_only or tensor not in view.constants
            if tensor and tensor not in tensors and constant_ok and view.is_float(tensor) and tensor not in keep_float:
                tensors[tensor] = TensorQuant(tensor, out.precision, out.symmetric, out.range_of)
            quant = tensors.get(tensor)
            if quant is not None and tensor != out.tensor and quant.precision == out.precision \
                    and quant.symmetric == out.symmetric:
                quant.range_of = out.range_of


def _integer_only_nodes(view: GraphView, spec: HardwareSpec, planned: AbstractSet[str], tensors: dict[str, TensorQuant],
                        consumer_need: dict[str, dict[str, Precision]], keep_float: AbstractSet[str]) -> dict[str, Precision]:
    """On an integer-only target, the compute nodes the plan does not cover (not layers: a bias
    Add, a LayerNorm, a Softmax) run on integers as well: their float inputs and outputs get Qs."""
    if not spec.integer_only:
        return {}
    nodes: dict[str, Precision] = {}
    for name, node in view.nodes.items():
        if name in planned or node.op_type not in spec.ops or not node.output:
            continue
        precisions = [c.activations for c in spec.candidates_for(node.op_type) if is_integer(c.activations)]
        if not precisions:
            continue
        nodes[name] = precision = precisions[0]
        for tensor in node.input:
            if tensor and tensor not in view.constants and view.is_float(tensor) and tensor not in keep_float:
                consumer_need.setdefault(tensor, {})[name] = precision
        output = node.output[0]
        if view.is_float(output) and output not in tensors and _gets_output_q(view, spec, output, keep_float):
            symmetric = activation_symmetric(spec, node.op_type, precision)
            tensors[output] = TensorQuant(output, precision, symmetric, output, from_layer=True)
    return nodes


#: Elementwise ops whose large constant operands (attention biases, scales) may be stored as int8
#: when the plan stores weights in integers. Add and Sub are not among them: a table added to the
#: activations (position or token-type embeddings, biases) carries its rounding error straight
#: into the residual stream (digits_transformer, int8/dyn-uint8: cosine to fp32 0.997 with its
#: position table in int8, 0.9998 with it float).
_COMPRESSIBLE_CONSUMERS = frozenset({"Mul", "Div", "Where", "Concat"})
_MIN_COMPRESSED_ELEMENTS = 1024
#: relative RMS round-trip error below which int8 storage is taken as lossless for the task
_MAX_RELATIVE_RMS_ERROR = 0.002


def constant_int8_qparams(value: np.ndarray) -> QParams:
    """Per-tensor symmetric narrow int8 grid of a float constant."""
    return qparams_from_range(np.asarray(value.min()), np.asarray(value.max()), Precision.INT8, True, narrow=True)


def compressible_constants(view: GraphView) -> set[str]:
    """Large float constants outside the plan that are stored as int8 + DequantizeLinear.

    They are not layers (no integer kernel reads them) and only count toward the model's size, so
    one is compressed only where that costs nothing measurable: every consumer is a
    multiplicative elementwise op (:data:`_COMPRESSIBLE_CONSUMERS`), the values are finite, and
    per-tensor int8 keeps the relative RMS error under 0.2%.
    """
    chosen: set[str] = set()
    for tensor, (location, _entry) in sorted(view.constants.items()):
        if location.value != "initializer" or tensor in view.graph_outputs:
            continue
        consumers = view.consumers.get(tensor, [])
        if not consumers or any(c not in view.nodes or view.nodes[c].op_type not in _COMPRESSIBLE_CONSUMERS
                                for c in consumers):
            continue
        value = view.weight_value(tensor)
        if value is None or value.dtype != np.float32 or value.size < _MIN_COMPRESSED_ELEMENTS:
            continue
        if not np.isfinite(value).all():
            continue  # an attention mask's -inf has no place on an integer grid
        q = constant_int8_qparams(value)
        rms = float(np.sqrt(np.mean(np.square(value.astype(np.float64)))))
        error = float(np.sqrt(np.mean(np.square(dequantize(quantize(value, q), q).astype(np.float64) - value))))
        if error <= _MAX_RELATIVE_RMS_ERROR * rms and rms > 0:  # written so that NaN refuses
            chosen.add(tensor)
    return chosen
