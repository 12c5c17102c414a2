"""The Q/DQ patterns onnxruntime fuses for the candidates beyond static int8.

Each pattern is written with standard ai.onnx ops in the form onnxruntime's optimizer turns into
one fast kernel (onnxruntime 1.32, default session options; ../shared/ORT_FACTS.md):

* **dynamic int8** (``int8/dyn-uint8``), MatMul without a bias ``Add`` after it:
  ``DynamicQuantizeLinear(x) -> DequantizeLinear(xq, xs, xz) -> MatMul <- DequantizeLinear(W
  int8, per column, axis=1)`` becomes ``DynamicQuantizeMatMul``
  (core/optimizer/qdq_transformer, dynamic_quantize_matmul_fusion.cc).
* **dynamic int8 with a bias** (Gemm, or a MatMul whose only consumer adds a constant): the
  Q/DQ form is not safe there, because ``MatMulAddFusion`` first turns a 2-D ``MatMul + Add``
  into a float ``Gemm`` that nothing fuses afterwards. The form ``quantize_dynamic`` writes is
  used instead: ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(xs · ws) [-> Add
  bias]``, fused into ``DynamicQuantizeMatMul`` (matmul_integer_to_float.cc, then
  dynamic_quantize_matmul_fusion.cc) whatever the rank.
* **weight-only block-wise** (``int4b32/fp32``): ``DequantizeLinear(W int4, scale[K/B, N],
  zero point?, axis=0, block_size=B) -> MatMul`` becomes ``MatMulNBits``
  (qdq_transformer/selectors_actions, DQMatMulToMatMulNBits).

4-bit constants are stored packed (two codes per byte in ``raw_data``), 0.5 byte per weight.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import helper

from onnxq.errors import PassError
from onnxq.numerics import MIN_SCALE, qparams_from_range, quantize
from onnxq.precision import Candidate, Precision, bits, numpy_dtype, onnx_dtype, qrange

__all__ = [
    "BlockQParams",
    "DynamicWeight",
    "NodeSink",
    "blockwise_qparams",
    "dequantize_blockwise",
    "dynamic_activation_qparams",
    "dynamic_weight_layout",
    "weight_form_problem",
    "emit_blockwise_weight",
    "emit_dynamic_layer",
    "fake_quantize_blockwise",
    "make_tensor",
    "pack_4bit",
    "quantize_blockwise",
    "storage_bytes",
]

logger = logging.getLogger(__name__)

_FOUR_BIT = frozenset({onnx.TensorProto.INT4, onnx.TensorProto.UINT4})
#: Ops that add a constant bias and that onnxruntime folds into the dynamic MatMul kernel.
_BIAS_CONSUMERS = frozenset({"Add"})


class NodeSink(Protocol):
    """Where a pattern puts its initializers and nodes (the rewrite pass' builder)."""

    def initializer(self, base: str, array: np.ndarray, dtype: int | None = None) -> str: ...

    def node(self, op_type: str, inputs: list[str], base_output: str, name: str, **attrs: Any) -> str: ...

    def unique(self, base: str) -> str: ...

    @property
    def new_nodes(self) -> list[onnx.NodeProto]: ...


# --------------------------------------------------------------------------------------------
# Storage


def pack_4bit(codes: np.ndarray) -> bytes:
    """Two 4-bit codes per byte, the first in the low nibble (ONNX's int4/uint4 layout)."""
    flat = np.asarray(codes).reshape(-1).astype(np.int64) & 0xF
    if flat.size % 2:
        flat = np.append(flat, 0)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def make_tensor(name: str, array: np.ndarray, dtype: int | None = None) -> onnx.TensorProto:
    """An initializer of ``array``; int4/uint4 (``dtype``) are packed into ``raw_data``."""
    if dtype in _FOUR_BIT:
        return helper.make_tensor(name, dtype, list(np.shape(array)), pack_4bit(array), raw=True)
    return onnx.numpy_helper.from_array(np.require(array, requirements="C"), name)


def storage_bytes(elements: int, precision: Precision) -> int:
    """Bytes of ``elements`` codes on disk (4-bit formats packed two per byte)."""
    return math.ceil(elements * bits(precision) / 8)


# --------------------------------------------------------------------------------------------
# Block-wise arithmetic (blocks of ``block_size`` along axis 0, the reduction axis of MatMul)


@dataclass(frozen=True)
class BlockQParams:
    """Scales and zero points of a block-wise quantized ``[K, N]`` weight.

    Attributes:
        scale: ``[ceil(K / block_size), N]`` float32.
        zero_point: same shape, int64 codes.
        precision: the integer grid.
        block_size: rows per block.
        narrow: narrow signed grid.
        symmetric: zero point at the grid's centre (then it is not stored).
    """

    scale: np.ndarray
    zero_point: np.ndarray
    precision: Precision
    block_size: int
    narrow: bool = False
    symmetric: bool = True

    @property
    def qmin(self) -> int:
        return qrange(self.precision, self.narrow)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.precision, self.narrow)[1]


def _expand(values: np.ndarray, rows: int, block_size: int) -> np.ndarray:
    return np.repeat(values, block_size, axis=0)[:rows]


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """``w`` as ``[blocks, block_size, N]``, the last block padded with zeros."""
    rows = w.shape[0]
    pad = (-rows) % block_size
    if pad:
        w = np.concatenate([w, np.zeros((pad, *w.shape[1:]), dtype=w.dtype)], axis=0)
    return w.reshape(-1, block_size, *w.shape[1:])


def weight_form_problem(node: onnx.NodeProto, weight_shape: tuple[int, ...], candidate: Candidate) -> str | None:
    """Why these patterns cannot write ``node``'s weight at ``candidate``, or None.

    Dynamic int8 and block-wise weights each have one pattern, a 2-D ``W`` in ``x @ W``: MatMul,
    or Gemm for dynamic int8 unless it transposes ``x``. A batched MatMul weight or a
    ``transA=1`` Gemm has no such form. The search, the uniform and explicit plans ask this
    before planning a layer so; the writers below raise it."""
    if not (candidate.dynamic or candidate.block_size):
        return None
    form = "dynamic int8" if candidate.dynamic else "block-wise"
    if len(weight_shape) != 2:
        return f"{form} needs a 2-D weight, got shape {tuple(weight_shape)}"
    if candidate.dynamic and node.op_type not in ("MatMul", "Gemm"):
        return f"no dynamic int8 pattern for {node.op_type}"
    if candidate.dynamic and node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
        return "Gemm with transA=1 has no dynamic int8 pattern"
    return None


def blockwise_qparams(w: np.ndarray, precision: Precision, block_size: int, symmetric: bool,
                      narrow: bool = False) -> BlockQParams:
    """Min/max scales per block of ``block_size`` rows (zero included in every range)."""
    if w.ndim != 2:
        raise PassError(f"block-wise weights must be 2-D, got shape {w.shape}",
                        "use a per-channel candidate for this layer")
    blocks = _blocks(np.asarray(w, dtype=np.float64), block_size)
    lo = np.minimum(blocks.min(axis=1), 0.0)
    hi = np.maximum(blocks.max(axis=1), 0.0)
    qmin, qmax = qrange(precision, narrow)
    if symmetric:
        bound = np.maximum(-lo, hi)
        scale = bound / (qmax if qmin < 0 else (qmax - qmin) / 2.0)
        zero = np.zeros_like(scale) if qmin < 0 else np.full_like(scale, (qmin + qmax + 1) // 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero = np.clip(np.round(qmin - lo / safe), qmin, qmax)
    scale = np.maximum(scale, float(MIN_SCALE)).astype(np.float32)
    return BlockQParams(scale, zero.astype(np.int64), precision, block_size, narrow, symmetric)


def quantize_blockwise(w: np.ndarray, q: BlockQParams) -> np.ndarray:
    """Integer codes (int64) of ``w``, as ``QuantizeLinear`` with ``block_size`` computes them."""
    rows = w.shape[0]
    scale = _expand(q.scale, rows, q.block_size)
    zero = _expand(q.zero_point, rows, q.block_size)
    return np.clip(np.rint(w / scale) + zero, q.qmin, q.qmax).astype(np.int64)


def dequantize_blockwise(codes: np.ndarray, q: BlockQParams) -> np.ndarray:
    rows = codes.shape[0]
    scale = _expand(q.scale, rows, q.block_size)
    zero = _expand(q.zero_point, rows, q.block_size)
    return ((codes - zero) * scale).astype(np.float32)


def fake_quantize_blockwise(w: np.ndarray, precision: Precision, block_size: int, symmetric: bool,
                            narrow: bool = False) -> np.ndarray:
    """What a layer computes with after block-wise quantization of ``w`` (float32)."""
    w = np.asarray(w, dtype=np.float32)
    q = blockwise_qparams(w, precision, block_size, symmetric, narrow)
    return dequantize_blockwise(quantize_blockwise(w, q), q)


# --------------------------------------------------------------------------------------------
# Dynamic (per call) activation arithmetic


def dynamic_activation_qparams(x: np.ndarray) -> tuple[np.float32, int]:
    """Scale and zero point ``DynamicQuantizeLinear`` computes for one call (uint8, asymmetric,
    range widened to include 0, zero point rounded half to even)."""
    values = np.asarray(x, dtype=np.float32)
    lo = np.minimum(values.min(), np.float32(0)) if values.size else np.float32(0)
    hi = np.maximum(values.max(), np.float32(0)) if values.size else np.float32(0)
    scale = np.float32((hi - lo) / np.float32(255))  # float32 throughout, as onnxruntime computes it
    if scale == 0:
        return np.float32(0.0), 0
    zero = int(np.clip(np.rint(np.float32(0) - lo / scale), 0, 255))
    return scale, zero


# --------------------------------------------------------------------------------------------
# Emission


def emit_blockwise_weight(sink: NodeSink, tensor: str, w: np.ndarray, precision: Precision, block_size: int,
                          symmetric: bool, narrow: bool = False) -> tuple[str, int]:
    """``DequantizeLinear(codes, scale, zero point?, axis=0, block_size)`` of a ``[K, N]`` weight.

    Returns:
        The dequantized tensor's name and the bytes its codes, scales and zero points take.
    """
    q = blockwise_qparams(w, precision, block_size, symmetric, narrow)
    codes = quantize_blockwise(w, q).astype(numpy_dtype(precision))
    q_name = sink.initializer(f"{tensor}_quantized", codes, onnx_dtype(precision))
    scale = sink.initializer(f"{tensor}_scale", q.scale)
    inputs = [q_name, scale]
    size = storage_bytes(codes.size, precision) + q.scale.nbytes
    if not symmetric:
        zero = q.zero_point.astype(numpy_dtype(precision))
        inputs.append(sink.initializer(f"{tensor}_zero_point", zero, onnx_dtype(precision)))
        size += storage_bytes(zero.size, precision)
    dq = sink.node("DequantizeLinear", inputs, f"{tensor}_dequantized", f"{tensor}_DequantizeLinear",
                   axis=0, block_size=block_size)
    return dq, size


@dataclass(frozen=True)
class DynamicWeight:
    """The ``[K, N]`` weight a dynamic layer multiplies by, and the bias it adds.

    Attributes:
        matrix: the weight as ``x @ matrix`` reads it (Gemm's ``transB`` and ``alpha`` applied).
        bias: the constant added after the product (Gemm's ``C`` times ``beta``), or None.
        bias_tensor: a non-constant ``C`` added as is (``beta`` = 1), or empty.
    """

    matrix: np.ndarray
    bias: np.ndarray | None = None
    bias_tensor: str = ""


def dynamic_weight_layout(node: onnx.NodeProto, w: np.ndarray, bias: np.ndarray | None) -> DynamicWeight:
    """What ``x @ W (+ b)`` a MatMul or Gemm computes, or PassError when the pattern cannot express it."""
    problem = weight_form_problem(node, tuple(w.shape), Candidate.parse("int8/dyn-uint8"))
    if problem:
        raise PassError(f"layer {node.name}: {problem}", "plan this layer with a static or float candidate")
    if node.op_type == "MatMul":
        return DynamicWeight(w)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    matrix = (w.T if attrs.get("transB", 0) else w) * np.float32(attrs.get("alpha", 1.0))
    beta = float(attrs.get("beta", 1.0))
    c = node.input[2] if len(node.input) > 2 else ""
    if not c:
        return DynamicWeight(matrix.astype(np.float32))
    if bias is not None:
        return DynamicWeight(matrix.astype(np.float32), (bias * np.float32(beta)).astype(np.float32))
    if beta != 1.0:
        raise PassError(f"layer {node.name}: Gemm with a computed C and beta={beta}",
                        "plan this layer with a static or float candidate")
    return DynamicWeight(matrix.astype(np.float32), None, c)


def _per_column_int8(matrix: np.ndarray, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    bound = np.abs(matrix.astype(np.float64)).max(axis=0)
    q = qparams_from_range(-bound, bound, Precision.INT8, True, narrow=True, axis=1, reduce_range=reduce_range)
    return quantize(matrix, q, np.int8), q.scale


def _bias_consumer(consumers: list[onnx.NodeProto], constants: set[str]) -> bool:
    return (len(consumers) == 1 and consumers[0].op_type in _BIAS_CONSUMERS
            and any(t in constants for t in consumers[0].input))


def emit_dynamic_layer(sink: NodeSink, node: onnx.NodeProto, weight: DynamicWeight, candidate: Candidate,
                       consumers: list[onnx.NodeProto], constants: set[str], reduce_range: bool = False) -> int:
    """Rewrite MatMul/Gemm ``node`` (in place) into the dynamic int8 pattern onnxruntime fuses.

    ``node`` keeps its name; its input 0 is the activation, its output the layer's float output.
    Weights are int8, symmetric per output column (``[-63, 63]`` with ``reduce_range``, :func:`onnxq.numerics.grid`), with an
    explicit zero point (onnxruntime's fusion needs it). ``consumers`` of the node's output and the graph's ``constants`` decide the
    form (see the module docstring).

    Returns:
        Bytes of the stored weight (codes, scales, zero points, bias).
    """
    if candidate.weights != Precision.INT8 or candidate.activations != Precision.UINT8 or not candidate.dynamic:
        raise PassError(f"layer {node.name}: no dynamic pattern for {candidate}",
                        "onnxruntime runs dynamic int8 as int8 weights with uint8 activations")
    base = node.name or node.output[0]
    x, output = node.input[0], node.output[0]
    codes, scale = _per_column_int8(weight.matrix, reduce_range)
    columns = codes.shape[1]
    w_q = sink.initializer(f"{base}_weight_quantized", codes, onnx.TensorProto.INT8)
    w_scale = sink.initializer(f"{base}_weight_scale", scale)
    w_zero = sink.initializer(f"{base}_weight_zero_point", np.zeros(columns, np.int8), onnx.TensorProto.INT8)
    size = codes.size + scale.nbytes + columns
    dql = sink.unique(f"{x}_dynamic_quantized")
    x_scale, x_zero = sink.unique(f"{x}_dynamic_scale"), sink.unique(f"{x}_dynamic_zero_point")
    sink.new_nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [dql, x_scale, x_zero],
                                     name=sink.unique(f"{base}_DynamicQuantizeLinear")))
    has_bias = weight.bias is not None or bool(weight.bias_tensor)
    if not has_bias and node.op_type == "MatMul" and not _bias_consumer(consumers, constants):
        x_dq = sink.node("DequantizeLinear", [dql, x_scale, x_zero], f"{x}_dynamic_dequantized",
                         f"{base}_input_DequantizeLinear")
        w_dq = sink.node("DequantizeLinear", [w_q, w_scale, w_zero], f"{base}_weight_dequantized",
                         f"{base}_weight_DequantizeLinear", axis=1)
        _retarget(node, "MatMul", [x_dq, w_dq], output)
        return size
    product = sink.unique(f"{base}_int32")
    _retarget(node, "MatMulInteger", [dql, w_q, x_zero, w_zero], product)
    as_float = sink.node("Cast", [product], f"{base}_int32_float", f"{base}_Cast", to=onnx.TensorProto.FLOAT)
    multiplier = sink.node("Mul", [x_scale, w_scale], f"{base}_output_scale", f"{base}_scale_Mul")
    if not has_bias:
        sink.new_nodes.append(helper.make_node("Mul", [as_float, multiplier], [output], name=sink.unique(f"{base}_Mul")))
        return size
    scaled = sink.node("Mul", [as_float, multiplier], f"{base}_scaled", f"{base}_Mul")
    if weight.bias is not None:
        bias = sink.initializer(f"{base}_bias", weight.bias)
        size += weight.bias.nbytes
    else:
        bias = weight.bias_tensor
    sink.new_nodes.append(helper.make_node("Add", [scaled, bias], [output], name=sink.unique(f"{base}_bias_Add")))
    return size


def _retarget(node: onnx.NodeProto, op_type: str, inputs: list[str], output: str) -> None:
    """Turn ``node`` into ``op_type(inputs) -> output`` in place (name and position kept)."""
    node.op_type = op_type
    node.domain = ""
    del node.attribute[:]
    del node.input[:]
    node.input.extend(inputs)
    node.output[0] = output
