"""Apply a :class:`~onnxq.layout.Layout` to a model: weights, Q/DQ, int32 bias, fp16 islands.

Names of inserted tensors and nodes are derived from the tensors they quantize
(``<tensor>_QuantizeLinear``), so the output is deterministic and readable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.shape_inference
from onnx import helper

from onnxq.errors import PassError
from onnxq.graph import GraphView, constant_value
from onnxq.layout import Layout, TensorQuant, activation_symmetric, constant_int8_qparams
from onnxq.numerics import QParams, bias_safe_weight_scale, qparams_from_range, quantize
from onnxq.precision import Candidate, Precision, is_integer, numpy_dtype, onnx_dtype
from onnxq.qdq_patterns import (
    dynamic_weight_layout,
    emit_blockwise_weight,
    emit_dynamic_layer,
    make_tensor,
)
from onnxq.spec.model import Granularity, HardwareSpec
from onnxq.subgraphs import outer_references

__all__ = ["RangeLike", "RewriteResult", "weight_axis", "weight_qparams", "apply_layout", "toposort_nodes"]

logger = logging.getLogger(__name__)

_CHANNEL_INPUT_OPS = {"Conv", "ConvTranspose", "Gemm"}
#: Ops that read only their input's shape (any element type).
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


class RangeLike(Protocol):
    """Anything with ``min`` and ``max`` attributes (``onnxq.calibration.TensorRange``)."""

    min: float
    max: float


@dataclass(frozen=True)
class RewriteResult:
    model: onnx.ModelProto
    quantized_layers: dict[str, str]
    weight_bytes: int


def weight_axis(op_type: str, node: onnx.NodeProto, rank: int) -> int:
    """The output-channel axis of a layer's weight (what per-channel scales run along)."""
    if op_type == "Conv":
        return 0
    if op_type == "ConvTranspose":
        return 1
    if op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if op_type == "Gather":
        return 0
    return rank - 1  # MatMul: per output column


def weight_qparams(
    w: np.ndarray,
    node: onnx.NodeProto,
    candidate: Candidate,
    spec: HardwareSpec,
    *,
    weight_ranges: Callable[[np.ndarray, int | None, Precision, bool], tuple[np.ndarray, np.ndarray]] | None = None,
    per_channel_ok: bool = True,
) -> QParams:
    """The weight quantizer of a layer at ``candidate``: granularity, symmetry and narrow range
    from the spec's weight rule, per-channel along the output-channel axis when allowed."""
    rule = spec.weight_rule(node.op_type, candidate.weights)
    symmetric = True if rule is None else rule.symmetric
    narrow = False if rule is None else rule.narrow_range
    reduce_range = False if rule is None else rule.reduce_range
    per_channel = (per_channel_ok and w.ndim >= 2
                   and spec.weight_granularity(node.op_type, candidate) == Granularity.PER_CHANNEL)
    axis = weight_axis(node.op_type, node, w.ndim) if per_channel else None
    if weight_ranges is not None:
        lo, hi = weight_ranges(w, axis, candidate.weights, symmetric)
    elif axis is None:
        lo, hi = np.asarray(w.min()), np.asarray(w.max())
    else:
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        lo, hi = w.min(axis=reduce), w.max(axis=reduce)
    return qparams_from_range(lo, hi, candidate.weights, symmetric, narrow=narrow, axis=axis, reduce_range=reduce_range)


class _Builder:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.used = {t for n in self.graph.node for t in list(n.input) + list(n.output)}
        self.used |= {i.name for i in self.graph.initializer}
        self.used |= {v.name for v in list(self.graph.input) + list(self.graph.output)}
        self.new_nodes: list[onnx.NodeProto] = []

    def unique(self, base: str) -> str:
        name = base
        index = 1
        while name in self.used:
            name = f"{base}_{index}"
            index += 1
        self.used.add(name)
        return name

    def initializer(self, base: str, array: np.ndarray, dtype: int | None = None) -> str:
        name = self.unique(base)
        self.graph.initializer.append(make_tensor(name, array, dtype))  # int4/uint4 packed
        return name

    def node(self, op_type: str, inputs: list[str], base_output: str, name: str, **attrs: Any) -> str:
        output = self.unique(base_output)
        self.new_nodes.append(helper.make_node(op_type, inputs, [output], name=self.unique(name), **attrs))
        return output


def _qparam_initializers(b: _Builder, base: str, q: QParams) -> tuple[str, str]:
    scale = b.initializer(f"{base}_scale", np.asarray(q.scale, dtype=np.float32))
    zero = np.asarray(q.zero_point)
    zp = b.initializer(f"{base}_zero_point", zero.astype(numpy_dtype(q.precision)), onnx_dtype(q.precision))
    return scale, zp


def _activation_qparams(quant: TensorQuant, precision: Precision, ranges: Mapping[str, RangeLike], symmetric: bool) -> QParams:
    rng = ranges.get(quant.range_of)
    if rng is None:
        raise PassError(f"no calibrated range for tensor {quant.range_of!r}", "calibration must run before the rewrite")
    return qparams_from_range(float(rng.min), float(rng.max), precision, symmetric)


def toposort_nodes(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` topologically (stable for already ordered parts)."""
    available = {i.name for i in graph.initializer} | {v.name for v in graph.input} | {""}
    produced = {o for n in graph.node for o in n.output}
    available |= {t for n in graph.node for t in n.input if t not in produced}  # outer scope
    needs: list[set[str]] = []
    for node in graph.node:
        needed = set(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                needed |= outer_references(attr.g) & produced
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    needed |= outer_references(sub) & produced
        needs.append(needed)
    pending = list(zip(graph.node, needs, strict=True))
    ordered: list[onnx.NodeProto] = []
    while pending:
        progress = False
        remaining = []
        for node, needed in pending:
            if all(t in available for t in needed):
                ordered.append(node)
                available.update(node.output)
                progress = True
            else:
                remaining.append((node, needed))
        if not progress:
            missing = sorted({t for _, needed in remaining for t in needed if t not in available})[:3]
            raise PassError(f"rewritten graph has a cycle or dangling inputs ({', '.join(missing)})", "report this model to onnxq")
        pending = remaining
    del graph.node[:]
    graph.node.extend(ordered)


def _materialize_constant_weights(model: onnx.ModelProto, view: GraphView, layers: set[str]) -> None:
    """Turn Constant-node and graph-input weights of quantized layers into plain initializers."""
    graph = model.graph
    for name in sorted(layers):
        layer = view.layers[name]
        if layer.weight is None:
            continue
        tensor = layer.weight.tensor
        location, entry = view.constants[tensor]
        if location.value == "constant-node":
            value = constant_value(entry)
            if value is None:
                continue
            graph.initializer.append(onnx.numpy_helper.from_array(value, tensor))
            graph.node.remove(entry)  # type: ignore[arg-type]
        elif location.value == "graph-input":
            for value_info in list(graph.input):
                if value_info.name == tensor:
                    graph.input.remove(value_info)


def apply_layout(
    model: onnx.ModelProto,
    layout: Layout,
    ranges: Mapping[str, RangeLike],
    spec: HardwareSpec,
    *,
    weight_ranges: Callable[[np.ndarray, int | None, Precision, bool], tuple[np.ndarray, np.ndarray]] | None = None,
    per_channel_ok: bool = True,
) -> RewriteResult:
    """Rewrite ``model`` in place to carry the Q/DQ of ``layout``."""
    view = GraphView(model, layer_ops=_layer_ops(model, layout))
    quantized = {n for n, c in layout.plan.items() if not c.is_float or n in layout.fp16_layers}
    _materialize_constant_weights(model, view, quantized)
    view = GraphView(model, layer_ops=_layer_ops(model, layout))
    b = _Builder(model)
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    initializers = {i.name: i for i in graph.initializer}
    weight_bytes = 0

    # 1. fold Relus into the Q of the layer they follow
    for layer_name, relu_name in layout.folded_relus.items():
        layer_node, relu = nodes[layer_name], nodes[relu_name]
        if relu.output[0] not in layout.tensors:
            # the Q does the Relu's clipping; without one, deleting the Relu changes the model
            raise PassError(f"layout folds {relu_name!r} into {layer_name!r} but quantizes no output there",
                            "report this to onnxq: the layout must fold a Relu only into a Q")
        layer_node.output[0] = relu.output[0]
        graph.node.remove(relu)
        del nodes[relu_name]
    view = GraphView(model, layer_ops=_layer_ops(model, layout))

    # 2. activations
    input_qparams: dict[tuple[str, str], QParams] = {}  # (layer, tensor) → qparams seen by the layer
    table_grids: dict[str, QParams] = {}  # integer Gather layer → the grid of its table and output
    for tensor in sorted(layout.tensors):
        quant = layout.tensors[tensor]
        consumers = list(view.consumers.get(tensor, []))
        is_output = tensor in view.graph_outputs
        if not consumers and not is_output:
            continue
        source = tensor
        if is_output:
            producer = nodes.get(view.producer.get(tensor, ""))
            if producer is None:
                continue
            source = b.unique(f"{tensor}_float")
            producer.output[list(producer.output).index(tensor)] = source
        q = _activation_qparams(quant, quant.precision, ranges, quant.symmetric)
        producer_name = view.producer.get(tensor, "")
        table = _integer_lookup_table(view, layout, producer_name, quant.precision)
        if table is not None:
            # the table and the Gather's output share one grid, the table's (it covers every row
            # the lookup can return): the Gather reads the codes and its output is quantized as is
            q = qparams_from_range(np.asarray(table.min()), np.asarray(table.max()), quant.precision, quant.symmetric)
            table_grids[producer_name] = q
        scale, zp = _qparam_initializers(b, tensor, q)
        producer_plan = layout.plan.get(producer_name)
        if producer_plan is not None and not is_integer(producer_plan.activations) and producer_name not in layout.fp16_layers:
            # a weight-only layer (int8 table Gather, int4 weight-only MatMul) computes in float:
            # its output is quantized for its consumers, not by it
            source = b.node("Identity", [source], f"{tensor}_boundary_out", f"{tensor}_BoundaryOut")
        if table is not None:
            quantized_name = _gather_codes(b, nodes[producer_name], table, q, tensor)
        else:
            quantized_name = b.node("QuantizeLinear", [source, scale, zp], f"{tensor}_quantized", f"{tensor}_QuantizeLinear")
        if is_output:
            b.new_nodes.append(helper.make_node("DequantizeLinear", [quantized_name, scale, zp], [tensor],
                                                name=b.unique(f"{tensor}_DequantizeLinear")))
        for index, consumer in enumerate(sorted(set(consumers))):
            node = nodes[consumer]
            if node.op_type in _SHAPE_ONLY_OPS:
                # the integer codes have the tensor's shape: a DQ here would be computed for
                # nothing and would keep onnxruntime from fusing the DQ's other consumers
                node.input[:] = [quantized_name if name == tensor else name for name in node.input]
                continue
            suffix = f"_{index}" if len(set(consumers)) > 1 else ""
            guard_axis = _float_guard_axis(view, node, layout, tensor)
            if guard_axis is not None:
                channels = view.shapes.get(tensor) or ()
                count = channels[guard_axis] if len(channels) > guard_axis and channels[guard_axis] > 0 else 0
            if guard_axis is not None and count:
                # per-axis DQ (same scale everywhere) keeps onnxruntime's WeightBiasQuantization
                # from turning this float layer into an int8 one
                g_scale = b.initializer(f"{tensor}_guard_scale", np.full(count, q.scale, dtype=np.float32))
                g_zp = b.initializer(f"{tensor}_guard_zero_point", np.full(count, q.zero_point, dtype=numpy_dtype(q.precision)), onnx_dtype(q.precision))
                dq = b.node("DequantizeLinear", [quantized_name, g_scale, g_zp], f"{tensor}_dequantized{suffix}", f"{tensor}_DequantizeLinear{suffix}", axis=guard_axis)
            else:
                dq = b.node("DequantizeLinear", [quantized_name, scale, zp], f"{tensor}_dequantized{suffix}", f"{tensor}_DequantizeLinear{suffix}")
            feed = dq
            seen = q
            other = quant.conversions.get(consumer)
            if other is not None:
                symmetric = activation_symmetric(spec, node.op_type, other)
                q2 = _activation_qparams(quant, other, ranges, symmetric)
                scale2, zp2 = _qparam_initializers(b, f"{tensor}_{other.value}", q2)
                q_out = b.node("QuantizeLinear", [dq, scale2, zp2], f"{tensor}_{other.value}_quantized", f"{tensor}_{other.value}_QuantizeLinear")
                feed = b.node("DequantizeLinear", [q_out, scale2, zp2], f"{tensor}_{other.value}_dequantized", f"{tensor}_{other.value}_DequantizeLinear")
                seen = q2
            if _reads_float(layout, spec, node):
                # a float layer computes on the dequantized values; the Identity marks the
                # precision boundary so the layer reads a plain float tensor (validators, and
                # readers of the graph, see fp32 in, not a quantized input of a float kernel)
                feed = b.node("Identity", [feed], f"{tensor}_boundary{suffix}", f"{tensor}_Boundary{suffix}")
            for i, name in enumerate(node.input):
                if name == tensor:
                    node.input[i] = feed
            input_qparams[(consumer, tensor)] = seen

    # 3. weights and biases
    summary: dict[str, str] = {}
    for layer_name in sorted(layout.plan):
        candidate = layout.plan[layer_name]
        layer = view.layers.get(layer_name)
        if layer is None:
            continue
        node = nodes[layer_name]
        if layer_name in layout.fp16_layers:
            weight_bytes += _to_fp16(b, view, node, layer)
            summary[layer_name] = str(candidate)
            continue
        if not is_integer(candidate.weights) and not is_integer(candidate.activations):
            continue
        summary[layer_name] = str(candidate)
        if layer.weight is None and is_integer(candidate.activations):
            _quantize_constant_operands(b, view, node, candidate.activations,
                                        activation_symmetric(spec, node.op_type, candidate.activations))
        if layer.weight is None or not is_integer(candidate.weights):
            continue
        w = view.weight_value(layer.weight.tensor)
        if w is None:
            continue
        w = w.astype(np.float32)
        pattern_bytes = _fast_pattern(b, view, node, layer, w, candidate, spec)
        if pattern_bytes is not None:
            weight_bytes += pattern_bytes
            continue
        if layer_name in table_grids:
            weight_bytes += w.size  # the Gather reads the table's codes (step 2)
            continue
        wq = weight_qparams(w, node, candidate, spec, weight_ranges=weight_ranges, per_channel_ok=per_channel_ok)
        x_q = input_qparams.get((layer_name, layer.activations[0])) if layer.activations else None
        if _int32_bias(layer.bias, x_q, node, candidate):
            bias = view.weight_value(layer.bias or "")
            if bias is not None and bias.ndim == 1 and np.isfinite(bias).all() and x_q is not None:
                wq = replace(wq, scale=bias_safe_weight_scale(wq.scale, x_q.scale, bias))
        lookup = layer_name in layout.integer_lookups
        if lookup and wq.axis is not None:
            wq = weight_qparams(w, node, candidate, spec, weight_ranges=weight_ranges, per_channel_ok=False)
        axis = wq.axis
        codes = quantize(w, wq).astype(numpy_dtype(candidate.weights))
        base = layer.weight.tensor
        q_name = b.initializer(f"{base}_quantized", codes, onnx_dtype(candidate.weights))
        scale, zp = _qparam_initializers(b, base, wq)
        if lookup:
            _dequantize_after_gather(b, node, q_name, scale, zp)
            weight_bytes += codes.size * codes.itemsize
            continue
        attrs = {"axis": axis} if axis is not None else {}
        dq = b.node("DequantizeLinear", [q_name, scale, zp], f"{base}_dequantized", f"{base}_DequantizeLinear", **attrs)
        node.input[list(node.input).index(layer.weight.tensor)] = dq
        weight_bytes += (codes.size * (4 if candidate.weights in (Precision.INT4, Precision.UINT4) else 8 * codes.itemsize)) // 8
        if layer.bias is not None and x_q is not None and _int32_bias(layer.bias, x_q, node, candidate):
            bias = view.weight_value(layer.bias)
            bias_scale = (np.asarray(x_q.scale, np.float64) * np.asarray(wq.scale, np.float64)).astype(np.float32)
            if not np.all(np.isfinite(bias_scale) & (bias_scale > 0)):
                # degenerate activation ranges (e.g. calibration data near float limits): keep the
                # bias exact instead of dividing by a zero or infinite scale
                _exact_bias(b, view, node, layer.bias)
            elif bias is not None and bias.ndim == 1:
                bias_scale = np.broadcast_to(bias_scale, bias.shape).copy() if axis is not None else bias_scale
                # int32 saturates where the bias dwarfs s_x·s_w (degenerate ranges); computed in
                # float64 because float32 cannot hold the int32 bounds exactly
                ratio = bias.astype(np.float64) / bias_scale.astype(np.float64)
                codes_b = np.clip(np.rint(ratio), -(2**31) + 1, 2**31 - 1).astype(np.int32)
                b_name = b.initializer(f"{layer.bias}_quantized", codes_b)
                b_scale = b.initializer(f"{layer.bias}_scale", bias_scale)
                b_attrs = {"axis": 0} if bias_scale.ndim == 1 else {}
                b_dq = b.node("DequantizeLinear", [b_name, b_scale], f"{layer.bias}_dequantized", f"{layer.bias}_DequantizeLinear", **b_attrs)
                node.input[2] = b_dq
        elif layer.bias is not None and x_q is not None and node.op_type in _CHANNEL_INPUT_OPS:
            # a float bias initializer beside a quantized input makes onnxruntime's
            # WeightBiasQuantization requantize it to int32 at scale s_x·s_w, which overflows for
            # 16-bit scales; an int32 DQ at a scale fitted to the bias itself keeps it exact
            _exact_bias(b, view, node, layer.bias)

    for name, precision in sorted(layout.integer_nodes.items()):
        _quantize_constant_operands(b, view, nodes[name], precision, activation_symmetric(spec, nodes[name].op_type, precision))
    weight_bytes += _compress_constant_operands(b, view, nodes, layout.compressed_constants)
    graph.node.extend(b.new_nodes)
    _drop_unused_initializers(graph, initializers)
    toposort_nodes(graph)
    _infer_value_info(model)
    return RewriteResult(model=model, quantized_layers=summary, weight_bytes=weight_bytes)


def _compress_constant_operands(b: _Builder, view: GraphView, nodes: Mapping[str, onnx.NodeProto],
                                tensors: AbstractSet[str]) -> int:
    """Store the constants the layout chose (:func:`onnxq.layout.compressible_constants`) as
    int8 + DequantizeLinear; the bytes saved."""
    saved = 0
    for tensor in sorted(tensors):
        value = view.weight_value(tensor)
        if value is None:
            continue
        q = constant_int8_qparams(value)
        codes = quantize(value, q)
        q_name = b.initializer(f"{tensor}_quantized", codes.astype(np.int8))
        scale, zp = _qparam_initializers(b, tensor, q)
        dq = b.node("DequantizeLinear", [q_name, scale, zp], f"{tensor}_dequantized", f"{tensor}_DequantizeLinear")
        for consumer in view.consumers.get(tensor, []):
            node = nodes[consumer]
            for i, name in enumerate(node.input):
                if name == tensor:
                    node.input[i] = dq
        saved += codes.size
    return saved


def _integer_lookup_table(view: GraphView, layout: Layout, layer_name: str, precision: Precision) -> np.ndarray | None:
    """The float table of a Gather layer planned with integer table and output of ``precision``."""
    candidate = layout.plan.get(layer_name)
    layer = view.layers.get(layer_name)
    if candidate is None or layer is None or layer.op_type != "Gather" or layer.weight is None:
        return None
    if candidate.weights != precision or candidate.activations != precision:
        return None
    table = view.weight_value(layer.weight.tensor)
    return None if table is None or table.dtype.kind != "f" or not np.isfinite(table).all() else table.astype(np.float32)


def _infer_value_info(model: onnx.ModelProto) -> None:
    """Replace the graph's value_info with freshly inferred shapes.

    onnxruntime fuses Add + LayerNormalization into SkipLayerNormalization only where it knows
    both Add inputs are 3-D of one shape; dimensions it cannot name on its own differ for it,
    while onnx's inference names them (``unk__N``) consistently (MiniLM-L6: 6 of 12 LayerNorms
    fused with inferred value_info, none without, as after quantize_dynamic, which writes them
    too). Not with ``data_prop``: that fuses all 12 and measured 5% slower at batch 32. Models
    onnx cannot infer (over 2 GB, unknown domains) keep no value_info.
    """
    del model.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as error:
        logger.debug("no shape inference on the rewritten model: %s", error)
        return
    model.graph.value_info.extend(inferred.graph.value_info)


def _gather_codes(b: _Builder, node: onnx.NodeProto, table: np.ndarray, q: QParams, tensor: str) -> str:
    """Make Gather ``node`` look up the codes of ``table`` on grid ``q``; its output, named after
    ``tensor``, is then the quantized tensor itself (no QuantizeLinear after the Gather, no
    DequantizeLinear over the whole table before it, which onnxruntime does not drop)."""
    weight = node.input[0]
    codes = quantize(table, q).astype(numpy_dtype(q.precision))
    node.input[0] = b.initializer(f"{weight}_quantized", codes, onnx_dtype(q.precision))
    quantized_name = b.unique(f"{tensor}_quantized")
    node.output[0] = quantized_name
    return quantized_name


def _dequantize_after_gather(b: _Builder, node: onnx.NodeProto, codes: str, scale: str, zero_point: str) -> None:
    """``Gather(codes, ids) -> DequantizeLinear``: only the gathered rows are dequantized."""
    node.input[0] = codes
    output = node.output[0]
    gathered = b.unique(f"{output}_quantized")
    node.output[0] = gathered
    b.new_nodes.append(helper.make_node("DequantizeLinear", [gathered, scale, zero_point], [output],
                                        name=b.unique(f"{node.name or output}_DequantizeLinear")))


def _int32_bias(bias: str | None, x_q: QParams | None, node: onnx.NodeProto, candidate: Candidate) -> bool:
    """Whether the layer's bias is stored as int32 at scale ``s_x·s_w`` (8-bit integer layers)."""
    return (bias is not None and x_q is not None and node.op_type in _CHANNEL_INPUT_OPS
            and candidate.weights == Precision.INT8 and x_q.precision in (Precision.UINT8, Precision.INT8))


def _fast_pattern(b: _Builder, view: GraphView, node: onnx.NodeProto, layer: Any, w: np.ndarray,
                  candidate: Candidate, spec: HardwareSpec) -> int | None:
    """Emit a dynamic int8 or block-wise weight-only layer (:mod:`onnxq.qdq_patterns`); the
    stored bytes, or None when ``candidate`` is neither."""
    if candidate.dynamic:
        bias = view.weight_value(layer.bias) if layer.bias is not None else None
        weight = dynamic_weight_layout(node, w, None if bias is None else bias.astype(np.float32))
        consumers = [view.nodes[c] for c in view.consumers.get(node.output[0], []) if c in view.nodes]
        rule = spec.weight_rule(node.op_type, candidate.weights)
        reduce_range = rule is not None and rule.reduce_range
        return emit_dynamic_layer(b, node, weight, candidate, consumers, set(view.constants), reduce_range)
    block = spec.weight_block_size(node.op_type, candidate)
    if not block:
        return None
    rule = spec.weight_rule(node.op_type, candidate.weights)
    symmetric = True if rule is None else rule.symmetric
    narrow = False if rule is None else rule.narrow_range
    dq, size = emit_blockwise_weight(b, layer.weight.tensor, w, candidate.weights, block, symmetric, narrow)
    node.input[list(node.input).index(layer.weight.tensor)] = dq
    return size


def _exact_bias(b: _Builder, view: GraphView, node: onnx.NodeProto, bias_name: str) -> None:
    bias = view.weight_value(bias_name)
    if bias is None or bias.ndim != 1 or bias.dtype != np.float32:
        return
    bound = float(np.max(np.abs(bias))) if bias.size else 0.0
    scale = np.float32(max(bound, 1e-30) / (2**30))
    codes = np.clip(np.rint(bias / scale), -(2**31) + 1, 2**31 - 1).astype(np.int32)
    b_name = b.initializer(f"{bias_name}_quantized", codes)
    b_scale = b.initializer(f"{bias_name}_scale", np.asarray(scale, dtype=np.float32))
    node.input[2] = b.node("DequantizeLinear", [b_name, b_scale], f"{bias_name}_dequantized", f"{bias_name}_DequantizeLinear")


def _layer_ops(model: onnx.ModelProto, layout: Layout) -> set[str]:
    ops = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"}
    names = set(layout.plan)
    ops |= {n.op_type for n in model.graph.node if n.name in names}
    return ops


def _quantize_constant_operands(b: _Builder, view: GraphView, node: onnx.NodeProto, precision: Precision,
                                symmetric: bool) -> None:
    """Give a weightless integer layer (Add/Mul with a constant operand) a quantized constant.

    onnxruntime fuses Add/Mul only when every input comes from a DequantizeLinear, and a spec
    reads a float constant next to a quantized activation as mixed precision.
    """
    for i, tensor in enumerate(list(node.input)):
        if not tensor or tensor not in view.constants or (node.op_type == "Gather" and i == 1):
            continue
        value = view.weight_value(tensor)
        if value is None or value.dtype.kind != "f" or not np.isfinite(value).all():
            continue  # a mask's -inf stays float (the layer's output then takes -inf: left float too)
        value = value.astype(np.float32)
        q = qparams_from_range(np.asarray(min(float(value.min()), 0.0)), np.asarray(max(float(value.max()), 0.0)),
                               precision, symmetric)
        codes = quantize(value, q).astype(numpy_dtype(precision))
        q_name = b.initializer(f"{tensor}_quantized", codes, onnx_dtype(precision))
        scale, zp = _qparam_initializers(b, tensor, q)
        node.input[i] = b.node("DequantizeLinear", [q_name, scale, zp], f"{tensor}_dequantized",
                               f"{tensor}_DequantizeLinear")


def _reads_float(layout: Layout, spec: HardwareSpec, node: onnx.NodeProto) -> bool:
    """True when ``node`` computes in float32: a float-planned layer, or a spec op left out of the plan."""
    if node.name in layout.fp16_layers or node.name in layout.integer_nodes:
        return False
    candidate = layout.plan.get(node.name)
    if candidate is None:
        return node.name in layout.float_layers or node.op_type in spec.ops
    return not is_integer(candidate.activations)


def _float_guard_axis(view: GraphView, node: onnx.NodeProto, layout: Layout, tensor: str) -> int | None:
    """Channel axis for a float Conv/Gemm input that must not look like a quantized layer."""
    if node.op_type not in _CHANNEL_INPUT_OPS or node.name not in layout.float_layers:
        return None
    if not node.input or node.input[0] != tensor:
        return None
    shape = view.shapes.get(tensor)
    if not shape or len(shape) < 2:
        return None
    return 1


def _to_fp16(b: _Builder, view: GraphView, node: onnx.NodeProto, layer: object) -> int:
    """Run ``node`` in fp16: Cast its float inputs down, its constants stored as fp16, output Cast up."""
    weight_bytes = 0
    for i, tensor in enumerate(list(node.input)):
        if not tensor:
            continue
        if node.op_type == "Gather" and i == 1:
            continue
        if tensor in view.constants:
            value = view.weight_value(tensor)
            if value is None or value.dtype != np.float32:
                continue
            half = value.astype(np.float16)
            node.input[i] = b.initializer(f"{tensor}_fp16", half)
            weight_bytes += half.nbytes
        elif view.is_float(tensor):
            node.input[i] = b.node("Cast", [tensor], f"{tensor}_fp16", f"{node.name}_{tensor}_CastToFp16", to=onnx.TensorProto.FLOAT16)
    output = node.output[0]
    half_out = b.unique(f"{output}_fp16")
    node.output[0] = half_out
    b.new_nodes.append(helper.make_node("Cast", [half_out], [output], name=b.unique(f"{output}_CastToFp32"), to=onnx.TensorProto.FLOAT))
    return weight_bytes


def _drop_unused_initializers(graph: onnx.GraphProto, originals: Mapping[str, onnx.TensorProto]) -> None:
    used = {t for n in graph.node for t in n.input} | {o.name for o in graph.output}
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                used |= outer_references(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    used |= outer_references(sub)
    keep = [i for i in graph.initializer if i.name in used or i.name not in originals]
    keep = [i for i in keep if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [v for v in graph.input if v.name in used or v.name not in originals]
    del graph.input[:]
    graph.input.extend(inputs)


def plan_summary(plan: Mapping[str, Candidate]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for candidate in plan.values():
        counts[str(candidate)] = counts.get(str(candidate), 0) + 1
    return dict(sorted(counts.items()))
