"""Check a QDQ model against a hardware spec.

Works on any QDQ model (onnxq's output, onnxruntime's ``quantize_static`` output, hand-made
ones), with Q/DQ in the ai.onnx or com.microsoft domain and weights stored as initializers or
``Constant`` nodes. For every compute node it reads the precision of each input from the
DequantizeLinear that feeds it (or the float type when none does) and checks:

- the ``weights/activations`` candidate against ``spec.candidates_for(op_type)``;
- each quantized input against the op's quantizer rule for that precision: granularity
  (per-tensor / per-channel / per-block and block size), symmetry (zero point at the grid's
  centre: 0 for signed types, the middle for unsigned ones) and narrow range;
- shared scales: ops in ``shared_scale_ops`` quantized on both sides, and ops whose rule says
  ``shared_input_scales``, must use one scale and zero point;
- integer-only targets: every compute op must take dequantized inputs and feed quantized
  outputs (fusion groups such as Conv+Relu count as one op), and have an integer kernel;
- opsets: 16-bit / 4-bit / per-block Q/DQ need the opsets the spec (or ONNX) requires.

Subgraphs (If/Loop bodies) are not inspected.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.model import shape_skeleton
from onnxq.precision import Candidate, Precision, is_integer, onnx_dtype, qrange
from onnxq.spec.model import (
    DEFAULT_BIAS_INPUTS,
    DEFAULT_WEIGHT_INPUTS,
    Granularity,
    HardwareSpec,
    QuantizerRule,
)

__all__ = ["NO_INTEGER_FORM", "Violation", "validate_model"]

logger = logging.getLogger(__name__)

_Q_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_Q_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})
_FLOAT_TYPES: Mapping[int, Precision] = {
    onnx.TensorProto.FLOAT: Precision.FP32,
    onnx.TensorProto.DOUBLE: Precision.FP32,
    onnx.TensorProto.FLOAT16: Precision.FP16,
    onnx.TensorProto.BFLOAT16: Precision.BF16,
}
_PRECISION_OF_TYPE: Mapping[int, Precision] = {onnx_dtype(p): p for p in Precision}
_SCALE_RTOL = 1e-6
#: Integer ops of ai.onnx (``quantize_dynamic``'s form) and the spec op whose candidates they run.
_INTEGER_OPS: Mapping[str, str] = {"MatMulInteger": "MatMul", "ConvInteger": "Conv"}
#: ai.onnx ops that compute on quantized data themselves (QOperator format): no spec describes
#: them as Q/DQ, so they are named, never passed.
_KNOWN_QUANTIZED_ONNX_OPS = frozenset({"QLinearConv", "QLinearMatMul"})
#: com.microsoft (and other contrib) ops that carry quantized data or fused integer kernels.
_CONTRIB_QUANTIZED_OPS = frozenset({
    "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
    "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax", "QLinearConv", "QLinearMatMul", "QGemm",
    "QAttention", "QEmbedLayerNormalization", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
    "DynamicQuantizeLSTM", "MatMulNBits", "MatMulBnb4", "GatherBlockQuantized", "QOrderedMatMul",
})
_QUANTIZED_TYPES = frozenset({
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
    onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT8E4M3FN,
    onnx.TensorProto.FLOAT8E5M2,
})


@dataclass(frozen=True)
class Violation:
    """One way a model does not conform to a spec.

    Attributes:
        node: node name (unnamed nodes: ``<op_type>_<index>``; model-level: ``(model)``).
        op_type: the node's op type.
        found: what the model does.
        allowed: what the spec allows instead.
    """

    node: str
    op_type: str
    found: str
    allowed: str

    def __str__(self) -> str:
        text = f"node {self.node} ({self.op_type}): found {self.found}; allowed {self.allowed}"
        return " ".join(text.split())


#: How a violation begins its ``allowed`` when an integer-only target has no kernel for the op at all.
NO_INTEGER_FORM = "integer ops only; this target has no integer "


@dataclass(frozen=True)
class _QTensor:
    """What one Q or DQ node says about the tensor it quantizes."""

    node: str
    precision: Precision | None  # None for int32 bias and unknown types
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    granularity: Granularity
    block_size: int
    source: str  # the quantized tensor (DQ input 0) or the float tensor (Q input 0)
    constant_codes: np.ndarray | None  # stored integer codes when the DQ input is constant


class _Graph:
    """Indexes of one ONNX graph: names, producers, consumers, constants, element types."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.names: list[str] = []
        seen: set[str] = set()
        for index, node in enumerate(self.nodes):
            name = node.name
            if not name or name in seen:
                base = f"{node.op_type}_{index}"
                name, suffix = base, 1
                while name in seen:
                    name, suffix = f"{base}_{suffix}", suffix + 1
            seen.add(name)
            self.names.append(name)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = {}
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i
            for k, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((i, k))
        self.graph_outputs = {o.name for o in graph.output}
        self.constants: dict[str, np.ndarray] = {}
        self.types: dict[str, int] = {}
        for init in graph.initializer:
            self.types[init.name] = init.data_type
            self.constants[init.name] = _to_array(init)
        for node in self.nodes:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                value = _constant_node_value(node)
                if value is not None:
                    self.constants[node.output[0]] = value[1]
                    self.types[node.output[0]] = value[0]
        try:
            inferred = onnx.shape_inference.infer_shapes(shape_skeleton(model), strict_mode=False)
            infos: Iterable[onnx.ValueInfoProto] = list(inferred.graph.value_info)
        except Exception as e:  # noqa: BLE001 - inference is best effort on odd models
            logger.debug("shape inference failed (%s); using declared types only", e)
            infos = []
        for info in [*graph.input, *graph.output, *graph.value_info, *infos]:
            elem = info.type.tensor_type.elem_type
            if elem and info.name not in self.types:
                self.types[info.name] = elem
        self.opset = 0
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                self.opset = imp.version
        self._qinfo: dict[int, _QTensor] = {}

    def producer_node(self, tensor: str) -> onnx.NodeProto | None:
        index = self.producer.get(tensor)
        return None if index is None else self.nodes[index]

    def is_dq_output(self, tensor: str) -> int | None:
        index = self.producer.get(tensor)
        if index is not None and _is_q_op(self.nodes[index], "DequantizeLinear"):
            return index
        return None

    def origin(self, tensor: str) -> str:
        """The tensor a DQ output stands for: the float input of its Q, or the stored codes."""
        dq = self.is_dq_output(tensor)
        if dq is None:
            return tensor
        source = self.nodes[dq].input[0]
        q = self.producer.get(source)
        if q is not None and _is_q_op(self.nodes[q], "QuantizeLinear"):
            return self.nodes[q].input[0]
        return source

    def consumer_nodes(self, tensor: str) -> list[int]:
        return [i for i, _ in self.consumers.get(tensor, [])]

    def output_q_nodes(self, tensor: str) -> list[int] | None:
        """Indices of the Q nodes that consume ``tensor`` when every consumer is a Q."""
        consumers = self.consumer_nodes(tensor)
        if not consumers or tensor in self.graph_outputs:
            return None
        if all(_is_q_op(self.nodes[i], "QuantizeLinear") for i in consumers):
            return consumers
        return None

    def precision_of(self, tensor: str) -> Precision | None:
        elem = self.types.get(tensor)
        if elem is None:
            return None
        if elem in _FLOAT_TYPES:
            return _FLOAT_TYPES[elem]
        return _PRECISION_OF_TYPE.get(elem)

    def dynamic_source(self, tensor: str) -> bool:
        """True when ``tensor`` is the codes output of a DynamicQuantizeLinear (per-call scale)."""
        node = self.producer_node(tensor)
        return (node is not None and node.op_type == "DynamicQuantizeLinear"
                and node.domain in ("", "ai.onnx") and bool(node.output) and node.output[0] == tensor)

    def is_float(self, tensor: str) -> bool:
        elem = self.types.get(tensor)
        # unknown types are assumed float unless produced by a DQ (then they are float anyway)
        return elem is None or elem in _FLOAT_TYPES

    def qinfo(self, index: int) -> _QTensor:
        """Quantization parameters of the Q or DQ node at ``index`` (cached)."""
        if index not in self._qinfo:
            self._qinfo[index] = self._read_qinfo(index)
        return self._qinfo[index]

    def _read_qinfo(self, index: int) -> _QTensor:
        node = self.nodes[index]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        scale = self.constants.get(node.input[1]) if len(node.input) > 1 else None
        zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        zero = self.constants.get(zp_name) if zp_name else None
        elem: int | None = None
        if node.op_type == "DequantizeLinear":
            elem = self.types.get(node.input[0])
            if elem is None:
                upstream = self.producer.get(node.input[0])
                if upstream is not None and _is_q_op(self.nodes[upstream], "QuantizeLinear"):
                    elem = self._q_output_type(upstream)
        else:
            elem = self._q_output_type(index)
        if elem is None and zp_name:
            elem = self.types.get(zp_name)
        precision = _PRECISION_OF_TYPE.get(elem) if elem is not None else None
        block = int(attrs.get("block_size", 0) or 0)
        if block > 0:
            granularity = Granularity.PER_BLOCK
        elif scale is not None and scale.size > 1:
            granularity = Granularity.PER_CHANNEL
        else:
            granularity = Granularity.PER_TENSOR
        codes = None
        if node.op_type == "DequantizeLinear":
            codes = self.constants.get(node.input[0])
        return _QTensor(
            node=self.names[index],
            precision=precision,
            scale=None if scale is None else np.asarray(scale, dtype=np.float64),
            zero_point=None if zero is None else _as_int(zero),
            granularity=granularity,
            block_size=block,
            source=node.input[0],
            constant_codes=None if codes is None else _as_int(codes),
        )

    def _q_output_type(self, index: int) -> int | None:
        node = self.nodes[index]
        for attr in node.attribute:
            if attr.name == "output_dtype" and attr.i:
                return int(attr.i)
        if len(node.input) > 2 and node.input[2]:
            elem = self.types.get(node.input[2])
            if elem is not None:
                return elem
        return self.types.get(node.output[0], onnx.TensorProto.UINT8)


def _is_q_op(node: onnx.NodeProto, op_type: str | None = None) -> bool:
    if node.domain not in _Q_DOMAINS or node.op_type not in _Q_OPS:
        return False
    return op_type is None or node.op_type == op_type


def _to_array(tensor: onnx.TensorProto) -> np.ndarray:
    try:
        return np.asarray(numpy_helper.to_array(tensor))
    except Exception as e:  # noqa: BLE001 - external data or exotic types: treat as unknown
        logger.debug("cannot read tensor %s: %s", tensor.name, e)
        return np.zeros((0,), dtype=np.float32)


def _constant_node_value(node: onnx.NodeProto) -> tuple[int, np.ndarray] | None:
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t.data_type, _to_array(attr.t)
        if attr.name == "value_float":
            return onnx.TensorProto.FLOAT, np.asarray(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return onnx.TensorProto.FLOAT, np.asarray(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return onnx.TensorProto.INT64, np.asarray(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return onnx.TensorProto.INT64, np.asarray(list(attr.ints), dtype=np.int64)
    return None


def _as_int(values: np.ndarray) -> np.ndarray:
    try:
        return np.asarray(values).astype(np.int64)
    except (TypeError, ValueError):
        return np.asarray(values, dtype=np.float64).astype(np.int64)


def _fmt(values: np.ndarray | None) -> str:
    if values is None:
        return "?"
    flat = np.asarray(values).reshape(-1)
    if flat.size == 1:
        return f"{flat[0]:.6g}"
    return f"[{', '.join(f'{v:.6g}' for v in flat[:3])}{', …' if flat.size > 3 else ''}]"


def _same_params(a: _QTensor, b: _QTensor) -> bool:
    if a.scale is None or b.scale is None:
        return True  # dynamic scales cannot be compared statically
    if a.scale.shape != b.scale.shape or not np.allclose(a.scale, b.scale, rtol=_SCALE_RTOL):
        return False
    za = a.zero_point if a.zero_point is not None else np.zeros_like(a.scale, dtype=np.int64)
    zb = b.zero_point if b.zero_point is not None else np.zeros_like(b.scale, dtype=np.int64)
    return za.shape == zb.shape and bool(np.all(za == zb))


def _centre(precision: Precision) -> int:
    qmin, qmax = qrange(precision)
    return 0 if qmin < 0 else (qmin + qmax + 1) // 2


class _Checker:
    def __init__(self, model: onnx.ModelProto, spec: HardwareSpec) -> None:
        self.g = _Graph(model)
        self.spec = spec
        self.violations: list[Violation] = []
        self._checked_q: set[tuple[str, str]] = set()
        self.fused_into: dict[int, int] = {}  # tail node index -> head node index
        self.tail_of: dict[int, int] = {}  # head node index -> last node of its fused chain

    def add(self, index: int, found: str, allowed: str) -> None:
        node = self.g.nodes[index]
        self.violations.append(Violation(self.g.names[index], node.op_type, found, allowed))

    # ---------------------------------------------------------------- structure
    def find_fusions(self) -> None:
        groups = sorted(self.spec.fusion_groups, key=len, reverse=True)
        for head, node in enumerate(self.g.nodes):
            if head in self.fused_into:
                continue
            for group in groups:
                if node.op_type != group[0]:
                    continue
                chain = [head]
                for op_type in group[1:]:
                    last = self.g.nodes[chain[-1]]
                    if not last.output or last.output[0] in self.g.graph_outputs:
                        break
                    consumers = self.g.consumer_nodes(last.output[0])
                    if len(consumers) != 1 or self.g.nodes[consumers[0]].op_type != op_type:
                        break
                    chain.append(consumers[0])
                if len(chain) == len(group):
                    for tail in chain[1:]:
                        self.fused_into[tail] = head
                    self.tail_of[head] = chain[-1]
                    break

    def is_compute(self, index: int) -> bool:
        node = self.g.nodes[index]
        if _is_q_op(node) or node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "Constant" or index in self.fused_into:
            return False
        op = node.op_type
        if op in self.spec.ops or op in self.spec.shared_scale_ops:
            return True
        return op not in self.spec.layout_ops

    # ---------------------------------------------------------------- per node
    def check_node(self, index: int) -> None:
        g, spec = self.g, self.spec
        node = g.nodes[index]
        op = node.op_type
        rule = spec.ops.get(op)
        weight_idx = rule.weight_inputs if rule else DEFAULT_WEIGHT_INPUTS.get(op, ())
        bias_idx = rule.bias_inputs if rule else DEFAULT_BIAS_INPUTS.get(op, ())
        tail = g.nodes[self.tail_of.get(index, index)]
        out = tail.output[0] if tail.output else ""

        weights: list[tuple[int, str, Precision | None, int | None]] = []
        acts: list[tuple[int, str, Precision | None, int | None]] = []
        for k, name in enumerate(node.input):
            if not name or k in bias_idx:
                continue
            dq = g.is_dq_output(name)
            if dq is None and not g.is_float(name):
                continue  # indices, shapes, axes
            precision = g.qinfo(dq).precision if dq is not None else (
                g.precision_of(name) or Precision.FP32)
            is_const = (g.qinfo(dq).source in g.constants) if dq is not None else (
                name in g.constants)
            entry = (k, g.origin(name), precision, dq)
            if k in weight_idx and is_const:
                weights.append(entry)
            elif dq is not None or name not in g.constants or not weight_idx:
                acts.append(entry)
        out_qs = g.output_q_nodes(out) if out else None
        quantized_in = any(e[3] is not None for e in weights + acts)

        float_acts = [e for e in acts if e[3] is None]
        computes_in_float = bool(float_acts) or self.float_weight_side(weights)
        if float_acts:
            # Any float activation input makes the op compute in float; DQ'd inputs are just
            # dequantized for it (weights may still be stored quantized: weight-only).
            act_precision = float_acts[0][2]
        elif acts and computes_in_float:
            # A float or block-wise weight keeps the op in float (no QDQ selector takes it), so a
            # DQ'd activation (codes gathered from a weight-only table) is only dequantized for it.
            act_precision = g.precision_of(node.input[acts[0][0]]) or Precision.FP32
        elif acts:
            act_precision = acts[0][2]
        elif out_qs and weights and weights[0][3] is not None and all(
                _same_params(g.qinfo(weights[0][3]), g.qinfo(q)) for q in out_qs):
            # DQ(table) -> Gather -> Q with the table's parameters: runs on integer data
            act_precision = g.qinfo(out_qs[0]).precision
        else:
            # No activation input (Gather): an output Q belongs to the consumer's input.
            act_precision = g.precision_of(out) or Precision.FP32
        integer_compute = act_precision is not None and act_precision not in (
            Precision.FP32, Precision.FP16, Precision.BF16)
        # An activation in a weight slot (attention's act x act MatMul) is the weight side.
        weight_side = weights or [e for e in acts if e[0] in weight_idx]
        w_precision = weight_side[0][2] if weight_side else act_precision
        candidate = None
        if w_precision is not None and act_precision is not None:
            candidate = self.refined(Candidate(w_precision, act_precision), weights, acts, integer_compute)
        mixed = sorted({str(e[2]) for e in acts if e[2] is not None}) if not computes_in_float else []

        shared = op in spec.shared_scale_ops
        moves_data = op in spec.layout_ops and rule is None
        if spec.integer_only and not any(g.is_float(t) for t in [*node.input, *tail.output] if t):
            return  # shape arithmetic on int64, bool masks: integer work already
        if spec.integer_only and not moves_data:
            float_inputs = [e[1] for e in acts + weights if e[3] is None]
            problem = ""
            if float_inputs:
                problem = f"input {float_inputs[0]} is not from DequantizeLinear"
            elif not out_qs and out:
                problem = f"output {out} is not quantized"
            if rule is None and not shared:
                self.add(index, f"{op} in float" + (f" ({problem})" if problem else ""),
                         NO_INTEGER_FORM + op)
                return
            if problem:
                allowed = " ".join(str(c) for c in spec.candidates_for(op)) or (
                    "quantized input and output sharing one scale")
                self.add(index, f"runs in float ({problem})", f"integer only: {allowed}")
                return
        if shared and quantized_in and out_qs:
            self.check_shared(index, acts, out_qs, f"{op} is in shared_scale_ops")
        if rule is None:
            if op in spec.float_only_ops and quantized_in and out_qs:
                self.add(index, f"quantized {op} ({candidate})", f"{op} in float only")
            return
        if len(mixed) > 1:
            self.add(index, "inputs of mixed precision " + "+".join(mixed),
                     "one activation precision per op")
        if candidate is not None and not spec.allows(op, candidate):
            allowed = " ".join(str(c) for c in spec.candidates_for(op)) or "nothing"
            self.add(index, f"candidate {candidate}", allowed)
        for _, name, precision, dq in weights:
            if dq is not None and precision is not None:
                self.check_quantizer(index, "weight", name, g.qinfo(dq),
                                     spec.weight_rule(op, precision))
        for _, name, precision, dq in acts:
            if dq is not None and precision is not None and integer_compute:
                self.check_quantizer(index, "activation", name, g.qinfo(dq),
                                     spec.activation_rule(op, precision))
        if out_qs and quantized_in and integer_compute:
            for q in out_qs:
                info = g.qinfo(q)
                if info.precision is not None:
                    self.check_quantizer(index, "output", out, info,
                                         spec.activation_rule(op, info.precision))
        if rule.shared_input_scales and out_qs and integer_compute:
            self.check_shared(index, acts, out_qs, f"{op} requires shared input scales")

    def float_weight_side(self, weights: Sequence[tuple[int, str, Precision | None, int | None]]) -> bool:
        """True when a constant weight input is float, or stored block-wise (DQ -> MatMulNBits):
        either way the op computes in float whatever its activation inputs are."""
        for _, _, _, dq in weights:
            if dq is None or self.g.qinfo(dq).granularity == Granularity.PER_BLOCK:
                return True
        return False

    def refined(self, candidate: Candidate, weights: Sequence[tuple[int, str, Precision | None, int | None]],
                acts: Sequence[tuple[int, str, Precision | None, int | None]], integer_compute: bool) -> Candidate:
        """The candidate word with its refinements: ``dyn-`` when an activation input is
        quantized per call (DQ of a DynamicQuantizeLinear), ``bN`` for block-wise weights of a
        layer computing in float."""
        g = self.g
        dynamic = any(dq is not None and g.dynamic_source(g.nodes[dq].input[0]) for _, _, _, dq in acts)
        block = 0
        if not integer_compute and weights and weights[0][3] is not None:
            info = g.qinfo(weights[0][3])
            if info.granularity == Granularity.PER_BLOCK and info.precision is not None and is_integer(info.precision):
                block = info.block_size
        if not (dynamic and integer_compute) and not block:
            return candidate
        return Candidate(candidate.weights, candidate.activations, block, dynamic and integer_compute)

    def check_integer_op(self, index: int) -> None:
        """MatMulInteger / ConvInteger (``quantize_dynamic``'s form): integer inputs, int32 out."""
        g, spec = self.g, self.spec
        node = g.nodes[index]
        op = _INTEGER_OPS[node.op_type]
        a_name = node.input[0]
        b_name = node.input[1] if len(node.input) > 1 else ""
        a_precision = g.precision_of(a_name)
        b_precision = g.precision_of(b_name) if b_name else None
        if a_precision is None or b_precision is None:
            self.add(index, f"{node.op_type} with inputs of unknown type", "integer inputs onnxq can read")
            return
        dynamic = g.dynamic_source(a_name)
        if b_name in g.constants:
            candidate = Candidate(b_precision, a_precision, 0, dynamic)
        else:
            candidate = Candidate(a_precision, a_precision, 0, dynamic)
        if not spec.allows(op, candidate):
            allowed = " ".join(str(c) for c in spec.candidates_for(op)) or "nothing"
            self.add(index, f"candidate {candidate} ({node.op_type})", allowed)
            return
        zp_name = node.input[3] if len(node.input) > 3 and node.input[3] else ""
        if b_name in g.constants:
            zero = _as_int(g.constants[zp_name]) if zp_name in g.constants else np.zeros(1, np.int64)
            info = _QTensor(node=g.names[index], precision=b_precision, scale=None, zero_point=zero,
                            granularity=Granularity.PER_CHANNEL if zero.size > 1 else Granularity.PER_TENSOR,
                            block_size=0, source=b_name, constant_codes=_as_int(g.constants[b_name]))
            self.check_quantizer(index, "weight", b_name, info, spec.weight_rule(op, b_precision))

    def check_dynamic_quantize(self, index: int) -> None:
        """A DynamicQuantizeLinear must feed a pattern onnxq recognises: a DequantizeLinear or an
        integer op (whose candidate the spec is asked about there)."""
        g = self.g
        for out in g.nodes[index].output[:1]:
            for consumer in g.consumer_nodes(out):
                other = g.nodes[consumer]
                if not (_is_q_op(other, "DequantizeLinear") or other.op_type in _INTEGER_OPS):
                    self.add(index, f"per-call quantized {out} read by {other.op_type}",
                             "DynamicQuantizeLinear feeding DequantizeLinear, MatMulInteger or ConvInteger")

    def check_unknown_quantized(self, index: int) -> None:
        """An op that reads or writes quantized data and that none of the checks understands."""
        g, spec = self.g, self.spec
        node = g.nodes[index]
        if node.op_type in spec.layout_ops or node.op_type in spec.shared_scale_ops:
            return
        named = node.domain not in ("", "ai.onnx") and node.op_type in _CONTRIB_QUANTIZED_OPS
        typed = [t for t in [*node.input, *node.output] if t and g.types.get(t) in _QUANTIZED_TYPES]
        if named or typed:
            where = f" ({node.domain})" if node.domain not in ("", "ai.onnx") else ""
            self.add(index, f"quantized op {node.op_type}{where} that onnxq does not recognise",
                     "Q/DQ around the spec's ops, DynamicQuantizeLinear, MatMulInteger or ConvInteger")

    def check_shared(self, index: int, acts: Sequence[tuple[int, str, Precision | None, int | None]],
                     out_qs: Sequence[int], reason: str) -> None:
        g = self.g
        infos = [(name, g.qinfo(dq)) for _, name, _, dq in acts if dq is not None]
        infos += [(g.nodes[q].input[0], g.qinfo(q)) for q in out_qs]
        if not infos:
            return
        ref_name, ref = infos[0]
        for name, info in infos[1:]:
            if not _same_params(ref, info):
                self.add(index,
                         f"{name} scale {_fmt(info.scale)} zero point {_fmt(info.zero_point)} vs "
                         f"{ref_name} scale {_fmt(ref.scale)} zero point {_fmt(ref.zero_point)}",
                         f"one shared scale and zero point ({reason})")
                return

    def check_quantizer(self, index: int, role: str, tensor: str, info: _QTensor,
                        rule: QuantizerRule | None) -> None:
        key = (self.g.names[index], f"{role}:{tensor}")
        if rule is None or key in self._checked_q or info.precision is None:
            return
        self._checked_q.add(key)
        label = f"{role} {tensor} {info.precision}"
        if info.granularity not in rule.granularities:
            self.add(index, f"{label} {info.granularity}",
                     " or ".join(str(g) for g in rule.granularities))
        elif info.granularity == Granularity.PER_BLOCK and rule.block_sizes \
                and info.block_size not in rule.block_sizes:
            self.add(index, f"{label} block size {info.block_size}",
                     "block sizes " + " ".join(str(b) for b in rule.block_sizes))
        if rule.symmetric and is_integer(info.precision):
            centre = _centre(info.precision)
            zero = info.zero_point if info.zero_point is not None else np.zeros(1, np.int64)
            if np.any(zero != centre):
                bad = zero[zero != centre].reshape(-1)
                self.add(index, f"{label} asymmetric (zero point {int(bad[0])})",
                         f"symmetric (zero point {centre})")
        if rule.narrow_range and is_integer(info.precision) and info.constant_codes is not None \
                and info.constant_codes.size:
            qmin = qrange(info.precision)[0]
            if qmin < 0 and int(info.constant_codes.min()) <= qmin:
                self.add(index, f"{label} uses {qmin}", f"narrow range [{qmin + 1}, "
                         f"{qrange(info.precision)[1]}]")

    # ---------------------------------------------------------------- opsets
    def check_opsets(self) -> None:
        g, spec = self.g, self.spec
        if spec.max_opset is not None and g.opset > spec.max_opset:
            self.violations.append(Violation("(model)", "opset", f"ai.onnx opset {g.opset}",
                                             f"opset <= {spec.max_opset}"))
        for index, node in enumerate(g.nodes):
            if not _is_q_op(node):
                continue
            info = g.qinfo(index)
            if node.domain == "com.microsoft":
                if info.precision == Precision.FP8E4M3:
                    self.add(index, "float8 in com.microsoft Q/DQ",
                             "ai.onnx Q/DQ (opset >= 19) for float8")
                continue
            features = []
            if info.precision is not None:
                features.append(info.precision.value)
            if info.granularity != Granularity.PER_TENSOR:
                features.append(info.granularity.value)
            for feature in features:
                need = spec.feature_opset(feature)
                if g.opset < need:
                    self.add(index, f"{feature} Q/DQ at opset {g.opset}", f"opset >= {need}")

    def run(self) -> list[Violation]:
        self.find_fusions()
        for index, node in enumerate(self.g.nodes):
            if _is_q_op(node):
                continue
            if node.domain in ("", "ai.onnx") and node.op_type in _INTEGER_OPS:
                self.check_integer_op(index)
            elif node.domain in ("", "ai.onnx") and node.op_type == "DynamicQuantizeLinear":
                self.check_dynamic_quantize(index)
            elif self.is_compute(index) and node.op_type not in _KNOWN_QUANTIZED_ONNX_OPS:
                self.check_node(index)
            else:
                self.check_unknown_quantized(index)
        self.check_opsets()
        return self.violations


def validate_model(model: onnx.ModelProto, spec: HardwareSpec) -> list[Violation]:
    """Every way ``model`` does not conform to ``spec`` (empty when it conforms).

    Violations come in graph order, opset violations last; each names the node.
    """
    violations = _Checker(model, spec).run()
    logger.debug("validated %s against %s: %d violations", model.graph.name, spec.name,
                 len(violations))
    return violations

