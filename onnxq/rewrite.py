"""Apply a :class:`~onnxq.layout.Layout` to a model: weights, Q/DQ, int32 bias, fp16 islands.

The layout holds every choice (:mod:`onnxq.placement`); this module only writes them, computing
the numbers (scales, zero points, codes) from calibrated ranges and weight values.

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
from onnxq.graph import GraphView, constant_tensors, constant_value, ensure_node_names
from onnxq.layout import Layout, TensorQuant, constant_int8_qparams
from onnxq.model import shape_skeleton
from onnxq.numerics import QParams, bias_safe_weight_scale, qparams_from_range, quantize
from onnxq.placement import BiasMode, Grid, LayerForm, Reader, ReadForm, TensorWiring, WeightForm
from onnxq.precision import Candidate, Precision, numpy_dtype, onnx_dtype
from onnxq.qdq_patterns import (
    dynamic_weight_layout,
    emit_blockwise_weight,
    emit_dynamic_layer,
    make_tensor,
)
from onnxq.spec.model import Granularity, HardwareSpec
from onnxq.subgraphs import outer_references

__all__ = ["RangeLike", "RewriteResult", "per_channel_shape", "weight_axis", "weight_qparams", "apply_layout", "toposort_nodes"]

logger = logging.getLogger(__name__)


class RangeLike(Protocol):
    """Anything with ``min`` and ``max`` attributes (``onnxq.calibration.TensorRange``)."""

    min: float
    max: float


@dataclass(frozen=True)
class RewriteResult:
    model: onnx.ModelProto
    quantized_layers: dict[str, str]
    weight_bytes: int


def per_channel_shape(op_type: str, rank: int) -> bool:
    """Whether a weight of this rank can carry per-channel scales. A MatMul's must be 2-D:
    onnxruntime fuses the per-axis DQ of a batched weight into MatMulInteger kernels that take
    per-column parameters only for a 2-D B, and fail at run time."""
    return rank == 2 if op_type == "MatMul" else rank >= 2


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
    per_channel = (per_channel_ok and per_channel_shape(node.op_type, w.ndim)
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


def _materialize_constant_weights(graph: onnx.GraphProto, layout: Layout) -> None:
    """Turn Constant-node and graph-input weights of the layers the layout writes into plain initializers."""
    constants = constant_tensors(graph)
    for name in sorted(layout.layer_forms):
        tensor = layout.layer_forms[name].weight
        if tensor is None:
            continue
        location, entry = constants[tensor]
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


def _fold_relus(graph: onnx.GraphProto, layout: Layout) -> None:
    """Delete the Relus the layout folds into the Q of the layer they follow."""
    nodes = {n.name: n for n in graph.node}
    for layer_name, relu_name in layout.folded_relus.items():
        layer_node, relu = nodes[layer_name], nodes[relu_name]
        if relu.output[0] not in layout.tensors:
            # the Q does the Relu's clipping; without one, deleting the Relu changes the model
            raise PassError(f"layout folds {relu_name!r} into {layer_name!r} but quantizes no output there",
                            "report this to onnxq: the layout must fold a Relu only into a Q")
        layer_node.output[0] = relu.output[0]
        graph.node.remove(relu)


@dataclass(frozen=True)
class _WeightNumbers:
    """Where the numbers of the weight quantizers come from."""

    spec: HardwareSpec
    weight_ranges: Callable[[np.ndarray, int | None, Precision, bool], tuple[np.ndarray, np.ndarray]] | None
    per_channel_ok: bool


def apply_layout(
    model: onnx.ModelProto,
    layout: Layout,
    ranges: Mapping[str, RangeLike],
    spec: HardwareSpec,
    *,
    weight_ranges: Callable[[np.ndarray, int | None, Precision, bool], tuple[np.ndarray, np.ndarray]] | None = None,
    per_channel_ok: bool = True,
    weights: Mapping[str, onnx.TensorProto] | None = None,
) -> RewriteResult:
    """Rewrite ``model`` in place to carry the Q/DQ of ``layout`` (``weights``: the values of
    its stub initializers, see :class:`~onnxq.graph.GraphView`).

    Every choice is the layout's (:mod:`onnxq.placement`): which tensor is quantized, who reads it
    how, which form each layer's weights and bias take. Only the numbers are computed here: scales
    and zero points from the calibrated ``ranges`` and from the weights.
    """
    ensure_node_names(model)
    used_before = _used_names(model.graph)
    _materialize_constant_weights(model.graph, layout)
    b = _Builder(model)
    initializers = {i.name: i for i in model.graph.initializer}
    _fold_relus(model.graph, layout)
    view = GraphView(model, weights=weights)
    seen = _quantize_activations(b, view, layout, ranges)
    numbers = _WeightNumbers(spec, weight_ranges, per_channel_ok)
    weight_bytes = sum(_write_layer(b, view, view.nodes[name], form, seen, numbers)
                       for name, form in sorted(layout.layer_forms.items()))
    weight_bytes += _quantize_constants(b, view, layout)
    model.graph.node.extend(b.new_nodes)
    _drop_unused_initializers(model.graph, initializers)
    _drop_replaced_constants(model.graph, used_before)
    toposort_nodes(model.graph)
    _infer_value_info(model)
    summary = {name: str(form.candidate) for name, form in sorted(layout.layer_forms.items())}
    return RewriteResult(model=model, quantized_layers=summary, weight_bytes=weight_bytes)


def _quantize_activations(b: _Builder, view: GraphView, layout: Layout,
                          ranges: Mapping[str, RangeLike]) -> dict[tuple[str, str], QParams]:
    """Write the Q and the readers of every wired tensor; the grid each (reader, tensor) sees."""
    seen: dict[tuple[str, str], QParams] = {}
    for tensor in sorted(layout.wiring):
        seen.update(_quantize_tensor(b, view, layout.tensors[tensor], layout.wiring[tensor], ranges))
    return seen


def _quantize_tensor(b: _Builder, view: GraphView, quant: TensorQuant, wiring: TensorWiring,
                     ranges: Mapping[str, RangeLike]) -> dict[tuple[str, str], QParams]:
    tensor = source = quant.tensor
    if wiring.graph_output:
        producer = view.nodes[wiring.producer or ""]
        source = b.unique(f"{tensor}_float")
        producer.output[list(producer.output).index(tensor)] = source
    q = _activation_qparams(quant, quant.precision, ranges, quant.symmetric)
    table = None
    if wiring.table_layer is not None:
        # the table and the Gather's output share one grid, the table's (it covers every row
        # the lookup can return): the Gather reads the codes and its output is quantized as is
        table = np.asarray(view.weight_value(view.nodes[wiring.table_layer].input[0]), dtype=np.float32)
        q = qparams_from_range(np.asarray(table.min()), np.asarray(table.max()), quant.precision, quant.symmetric)
    scale, zp = _qparam_initializers(b, tensor, q)
    if wiring.boundary_out:
        source = b.node("Identity", [source], f"{tensor}_boundary_out", f"{tensor}_BoundaryOut")
    if table is not None:
        codes = _gather_codes(b, view.nodes[wiring.table_layer or ""], table, q, tensor)
    else:
        codes = b.node("QuantizeLinear", [source, scale, zp], f"{tensor}_quantized", f"{tensor}_QuantizeLinear")
    if wiring.graph_output:
        b.new_nodes.append(helper.make_node("DequantizeLinear", [codes, scale, zp], [tensor],
                                            name=b.unique(f"{tensor}_DequantizeLinear")))
    quantized = _Codes(codes, q, scale, zp)
    seen: dict[tuple[str, str], QParams] = {}
    for reader in wiring.readers:
        grid = _read(b, view.nodes[reader.node], reader, quant, quantized, ranges)
        if grid is not None:
            seen[(reader.node, tensor)] = grid
    return seen


@dataclass(frozen=True)
class _Codes:
    """A quantized tensor as written: its codes and their grid."""

    name: str
    q: QParams
    scale: str
    zero_point: str


def _read(b: _Builder, node: onnx.NodeProto, reader: Reader, quant: TensorQuant, codes: _Codes,
          ranges: Mapping[str, RangeLike]) -> QParams | None:
    """Feed ``node`` the way ``reader`` says; the grid it sees (None: it reads the codes)."""
    tensor, suffix, q = quant.tensor, reader.suffix, codes.q
    if reader.form == ReadForm.CODES:
        node.input[:] = [codes.name if name == tensor else name for name in node.input]
        return None
    if reader.form == ReadForm.GUARD:
        count = reader.guard_channels
        scale = b.initializer(f"{tensor}_guard_scale", np.full(count, q.scale, dtype=np.float32))
        zp = b.initializer(f"{tensor}_guard_zero_point", np.full(count, q.zero_point, dtype=numpy_dtype(q.precision)),
                           onnx_dtype(q.precision))
        feed = b.node("DequantizeLinear", [codes.name, scale, zp], f"{tensor}_dequantized{suffix}",
                      f"{tensor}_DequantizeLinear{suffix}", axis=reader.guard_axis)
    else:
        feed = b.node("DequantizeLinear", [codes.name, codes.scale, codes.zero_point], f"{tensor}_dequantized{suffix}",
                      f"{tensor}_DequantizeLinear{suffix}")
    seen = q
    if reader.conversion is not None:
        other = reader.conversion.precision
        seen = _activation_qparams(quant, other, ranges, reader.conversion.symmetric)
        scale2, zp2 = _qparam_initializers(b, f"{tensor}_{other.value}", seen)
        q_out = b.node("QuantizeLinear", [feed, scale2, zp2], f"{tensor}_{other.value}_quantized",
                       f"{tensor}_{other.value}_QuantizeLinear")
        feed = b.node("DequantizeLinear", [q_out, scale2, zp2], f"{tensor}_{other.value}_dequantized",
                      f"{tensor}_{other.value}_DequantizeLinear")
    if reader.boundary:
        # the Identity marks the precision boundary: the float layer reads a plain float tensor
        feed = b.node("Identity", [feed], f"{tensor}_boundary{suffix}", f"{tensor}_Boundary{suffix}")
    for i, name in enumerate(node.input):
        if name == tensor:
            node.input[i] = feed
    return seen


def _write_layer(b: _Builder, view: GraphView, node: onnx.NodeProto, form: LayerForm,
                 seen: Mapping[tuple[str, str], QParams], numbers: _WeightNumbers) -> int:
    """Write one layer's weights (and bias) in the layout's form; the bytes they take."""
    if form.form == WeightForm.FP16:
        return _to_fp16(b, view, node)
    if form.form == WeightForm.CONSTANTS and form.operands is not None:
        _quantize_constant_operands(b, view, node, form.operands)
    if form.weight is None or form.form in (WeightForm.FLOAT, WeightForm.CONSTANTS):
        return 0
    w = view.weight_value(form.weight)
    if w is None:
        return 0
    w = w.astype(np.float32)
    if form.form == WeightForm.DYNAMIC:
        return _dynamic_weight(b, view, node, form, w, numbers.spec)
    if form.form == WeightForm.BLOCKWISE:
        return _blockwise_weight(b, node, form, w, numbers.spec)
    if form.form == WeightForm.TABLE:
        return w.size  # the Gather reads the table's codes (written with its output)
    x_q = seen.get((node.name, form.input)) if form.input is not None else None
    return _dq_weight(b, view, node, form, w, x_q, numbers)


def _dq_weight(b: _Builder, view: GraphView, node: onnx.NodeProto, form: LayerForm, w: np.ndarray,
               x_q: QParams | None, numbers: _WeightNumbers) -> int:
    """Integer weights behind a DequantizeLinear (or gathered, then dequantized), and the bias."""
    candidate, weight = form.candidate, form.weight or ""
    lookup = form.form == WeightForm.LOOKUP  # one per-tensor scale: row scales would be gathered too
    wq = weight_qparams(w, node, candidate, numbers.spec, weight_ranges=numbers.weight_ranges,
                        per_channel_ok=numbers.per_channel_ok and not lookup)
    if form.bias_mode == BiasMode.INT32 and x_q is not None:
        bias = view.weight_value(form.bias or "")
        if bias is not None and bias.ndim == 1 and np.isfinite(bias).all():
            wq = replace(wq, scale=bias_safe_weight_scale(wq.scale, x_q.scale, bias))
    codes = quantize(w, wq, numpy_dtype(candidate.weights))
    q_name = b.initializer(f"{weight}_quantized", codes, onnx_dtype(candidate.weights))
    scale, zp = _qparam_initializers(b, weight, wq)
    if lookup:
        _dequantize_after_gather(b, node, q_name, scale, zp)
        return codes.size * codes.itemsize
    attrs = {"axis": wq.axis} if wq.axis is not None else {}
    dq = b.node("DequantizeLinear", [q_name, scale, zp], f"{weight}_dequantized", f"{weight}_DequantizeLinear", **attrs)
    node.input[list(node.input).index(weight)] = dq
    if form.bias_mode == BiasMode.INT32 and x_q is not None and form.bias is not None:
        _int32_bias(b, view, node, form.bias, x_q, wq)
    elif form.bias_mode == BiasMode.EXACT and form.bias is not None:
        _exact_bias(b, view, node, form.bias)
    return (codes.size * (4 if candidate.weights in (Precision.INT4, Precision.UINT4) else 8 * codes.itemsize)) // 8


def _int32_bias(b: _Builder, view: GraphView, node: onnx.NodeProto, bias_name: str, x_q: QParams, wq: QParams) -> None:
    """The bias as int32 codes at scale ``s_x·s_w`` (what onnxruntime's integer kernels add)."""
    bias = view.weight_value(bias_name)
    bias_scale = (np.asarray(x_q.scale, np.float64) * np.asarray(wq.scale, np.float64)).astype(np.float32)
    if not np.all(np.isfinite(bias_scale) & (bias_scale > 0)):
        # degenerate activation ranges (e.g. calibration data near float limits): keep the
        # bias exact instead of dividing by a zero or infinite scale
        _exact_bias(b, view, node, bias_name)
        return
    if bias is None or bias.ndim != 1:
        return
    bias_scale = np.broadcast_to(bias_scale, bias.shape).copy() if wq.axis is not None else bias_scale
    # int32 saturates where the bias dwarfs s_x·s_w (degenerate ranges); computed in float64
    # because float32 cannot hold the int32 bounds exactly
    ratio = bias.astype(np.float64) / bias_scale.astype(np.float64)
    codes = np.clip(np.rint(ratio), -(2**31) + 1, 2**31 - 1).astype(np.int32)
    b_name = b.initializer(f"{bias_name}_quantized", codes)
    b_scale = b.initializer(f"{bias_name}_scale", bias_scale)
    attrs = {"axis": 0} if bias_scale.ndim == 1 else {}
    node.input[2] = b.node("DequantizeLinear", [b_name, b_scale], f"{bias_name}_dequantized",
                           f"{bias_name}_DequantizeLinear", **attrs)


def _quantize_constants(b: _Builder, view: GraphView, layout: Layout) -> int:
    """Constant operands of integer-only nodes, then the compressed constants; the bytes saved."""
    for name, grid in sorted(layout.operand_grids.items()):
        _quantize_constant_operands(b, view, view.nodes[name], grid)
    return _compress_constant_operands(b, view, layout.compressed_constants)


def _compress_constant_operands(b: _Builder, view: GraphView, tensors: AbstractSet[str]) -> int:
    """Store the constants the layout chose (:func:`onnxq.layout.compressible_constants`) as
    int8 + DequantizeLinear; the bytes saved."""
    saved = 0
    for tensor in sorted(tensors):
        value = view.weight_value(tensor)
        if value is None:
            continue
        q = constant_int8_qparams(value)
        codes = quantize(value, q, np.int8)
        q_name = b.initializer(f"{tensor}_quantized", codes)
        scale, zp = _qparam_initializers(b, tensor, q)
        dq = b.node("DequantizeLinear", [q_name, scale, zp], f"{tensor}_dequantized", f"{tensor}_DequantizeLinear")
        for consumer in view.consumers.get(tensor, []):
            node = view.nodes[consumer]
            for i, name in enumerate(node.input):
                if name == tensor:
                    node.input[i] = dq
        saved += codes.size
    return saved


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
        inferred = onnx.shape_inference.infer_shapes(shape_skeleton(model))
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as error:
        logger.debug("no shape inference on the rewritten model: %s", error)
        return
    model.graph.value_info.extend(inferred.graph.value_info)


def _gather_codes(b: _Builder, node: onnx.NodeProto, table: np.ndarray, q: QParams, tensor: str) -> str:
    """Make Gather ``node`` look up the codes of ``table`` on grid ``q``; its output, named after
    ``tensor``, is then the quantized tensor itself (no QuantizeLinear after the Gather, no
    DequantizeLinear over the whole table before it, which onnxruntime does not drop)."""
    weight = node.input[0]
    codes = quantize(table, q, numpy_dtype(q.precision))
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


def _dynamic_weight(b: _Builder, view: GraphView, node: onnx.NodeProto, form: LayerForm, w: np.ndarray,
                    spec: HardwareSpec) -> int:
    """The dynamic int8 pattern (:mod:`onnxq.qdq_patterns`); the stored bytes."""
    bias = view.weight_value(form.bias) if form.bias is not None else None
    weight = dynamic_weight_layout(node, w, None if bias is None else bias.astype(np.float32))
    consumers = [view.nodes[c] for c in view.consumers.get(node.output[0], []) if c in view.nodes]
    rule = spec.weight_rule(node.op_type, form.candidate.weights)
    reduce_range = rule is not None and rule.reduce_range
    return emit_dynamic_layer(b, node, weight, form.candidate, consumers, set(view.constants), reduce_range)


def _blockwise_weight(b: _Builder, node: onnx.NodeProto, form: LayerForm, w: np.ndarray, spec: HardwareSpec) -> int:
    """A block-wise weight-only DequantizeLinear (:mod:`onnxq.qdq_patterns`); the stored bytes."""
    weight = form.weight or ""
    rule = spec.weight_rule(node.op_type, form.candidate.weights)
    symmetric = True if rule is None else rule.symmetric
    narrow = False if rule is None else rule.narrow_range
    dq, size = emit_blockwise_weight(b, weight, w, form.candidate.weights, form.block_size, symmetric, narrow)
    node.input[list(node.input).index(weight)] = dq
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


def _quantize_constant_operands(b: _Builder, view: GraphView, node: onnx.NodeProto, grid: Grid) -> None:
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
                               grid.precision, grid.symmetric)
        codes = quantize(value, q, numpy_dtype(grid.precision))
        q_name = b.initializer(f"{tensor}_quantized", codes, onnx_dtype(grid.precision))
        scale, zp = _qparam_initializers(b, tensor, q)
        node.input[i] = b.node("DequantizeLinear", [q_name, scale, zp], f"{tensor}_dequantized",
                               f"{tensor}_DequantizeLinear")


def _to_fp16(b: _Builder, view: GraphView, node: onnx.NodeProto) -> int:
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


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Tensors some node (or a control-flow body) reads, and the graph outputs."""
    used = {t for n in graph.node for t in n.input} | {o.name for o in graph.output}
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                used |= outer_references(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    used |= outer_references(sub)
    return used


def _drop_replaced_constants(graph: onnx.GraphProto, used_before: set[str]) -> None:
    """Delete the Constant nodes the rewrite left unread: a float bias held in a Constant node,
    replaced by its int32 codes (52 dangling Constant nodes in a quantized PP-OCR detector, each
    reported by onnxruntime's CleanUnusedInitializersAndNodeArgs at every session start)."""
    used = _used_names(graph)
    dead = [n for n in graph.node if n.op_type == "Constant" and n.output[0] in used_before and n.output[0] not in used]
    for node in dead:
        graph.node.remove(node)


def _drop_unused_initializers(graph: onnx.GraphProto, originals: Mapping[str, onnx.TensorProto]) -> None:
    used = _used_names(graph)
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
