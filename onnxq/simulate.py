"""Fast fake-quantization of an ONNX model with one onnxruntime session.

:class:`FakeQuantModel` copies the model once and

* after every chosen activation ``x`` inserts ``Where(enable, (Min(Max(Round(x/s)+zp, qmin),
  qmax) - zp)·s, x)`` whose ``s``, ``zp``, ``qmin``, ``qmax`` and ``enable`` are new graph
  inputs — so one session simulates any range and any bit width, and a disabled tensor passes
  through bit-exactly; the result is bit-exact with ``QuantizeLinear`` → ``DequantizeLinear``;
* turns every chosen weight initializer into a graph input that keeps the initializer as its
  default, so a perturbed or quantized weight can be fed while the others stay fp32.

Used by the LAPQ calibration and by the sensitivity analysis.

Two cheaper tools for evaluations that know their perturbation up front (no ``Where``, so no
quantized branch is computed for tensors that stay fp32):

* :func:`bake` returns a copy of the model with chosen weights replaced and an unconditional
  fake-quant subgraph (constant parameters) after chosen activations;
* :func:`fake_quantize_array` is the same arithmetic in numpy, float for float, for activations
  fed to a session from outside (the sensitivity analysis' cached cut tensors).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxq.calibration.sweep import check_tensors
from onnxq.calibration.types import TensorRange
from onnxq.errors import CalibrationError
from onnxq.model import MAX_IR_VERSION, model_opset, shape_skeleton
from onnxq.numerics import MIN_SCALE, QParams, qparams_from_range
from onnxq.precision import Candidate, Precision
from onnxq.qdq_patterns import dynamic_activation_qparams
from onnxq.runtime import make_session
from onnxq.spec.model import HardwareSpec

__all__ = [
    "DynamicQuant",
    "FakeQuantModel",
    "WeightFormat",
    "activation_qparams",
    "bake",
    "constant_to_initializer",
    "fake_quant_input_name",
    "fake_quantize_array",
    "insert_fake_quant",
    "per_call_qparams",
    "weight_format",
]

logger = logging.getLogger(__name__)

_PARAMS = ("scale", "zero_point", "qmin", "qmax", "enable")


def activation_qparams(
    ranges: Mapping[str, TensorRange],
    precision_for: Mapping[str, Precision] | None = None,
    symmetric_for: Mapping[str, bool] | None = None,
    default: Precision = Precision.UINT8,
) -> dict[str, QParams]:
    """Per-tensor quantization parameters of calibrated ranges (asymmetric uint8 by default)."""
    precision_for = precision_for or {}
    symmetric_for = symmetric_for or {}
    return {
        name: qparams_from_range(
            r.min,
            r.max,
            Precision(precision_for.get(name, default)),
            bool(symmetric_for.get(name, False)),
        )
        for name, r in ranges.items()
    }


@dataclass(frozen=True)
class WeightFormat:
    """How a layer's weight is quantized for one candidate (what sensitivity perturbs it with).

    Candidates with the same weight precision can store the weight differently: ``int8/uint8``
    per channel, ``int8b32/fp32`` in blocks of 32, ``int8/dyn-uint8`` on a 7-bit grid where the
    spec asks for ``reduce_range``.
    """

    precision: Precision
    block_size: int = 0
    reduce_range: bool = False
    dynamic: bool = False

    def __str__(self) -> str:
        block = f"b{self.block_size}" if self.block_size else ""
        return f"{self.precision.value}{block}{'r' if self.reduce_range else ''}{'d' if self.dynamic else ''}"


def weight_format(spec: HardwareSpec, op_type: str, candidate: Candidate) -> WeightFormat:
    """The weight format the rewrite writes for ``candidate`` on an ``op_type`` layer: block-wise
    for weight-only block candidates, 7-bit int8 where the spec's quantizer says
    ``reduce_range``, per column for dynamic layers (onnxq.qdq_patterns)."""
    rule = spec.weight_rule(op_type, candidate.weights)
    block = spec.weight_block_size(op_type, candidate)
    reduce_range = (rule is not None and rule.reduce_range and rule.symmetric and not block
                    and candidate.weights == Precision.INT8)
    return WeightFormat(candidate.weights, block, reduce_range, candidate.dynamic)


@dataclass(frozen=True)
class DynamicQuant:
    """Quantize an activation per call, as ``DynamicQuantizeLinear`` does: uint8, asymmetric,
    one scale from the range of each call's input (``int8/dyn-uint8``).

    Attributes:
        precision: the per-call grid (uint8, what onnxruntime runs).
        per_sample: one call per sample (index of axis 0), as a batch-1 deployment runs it,
            whatever batches the simulation evaluates; False: one call per evaluated batch.
    """

    precision: Precision = Precision.UINT8
    per_sample: bool = True


def per_call_qparams(x: np.ndarray) -> QParams:
    """The parameters ``DynamicQuantizeLinear`` computes for the batch ``x``."""
    scale, zero = dynamic_activation_qparams(x)
    return QParams(scale=np.asarray(max(float(scale), float(MIN_SCALE)), dtype=np.float32),
                   zero_point=np.asarray(zero, dtype=np.int64), precision=Precision.UINT8)


def fake_quant_input_name(tensor: str, param: str) -> str:
    return f"onnxq_fq/{tensor}/{param}"


class FakeQuantModel:
    """One onnxruntime session that simulates quantization of chosen tensors.

    Args:
        model: the fp32 model (not modified).
        activation_tensors: activations (graph inputs or node outputs of the main graph) to give
            a fake-quant subgraph.
        weight_tensors: initializers (or ``Constant`` node outputs) that become overridable
            graph inputs.
        providers: onnxruntime execution providers (default CPU).

    Raises:
        CalibrationError: a tensor is unknown or not float.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        activation_tensors: Sequence[str] = (),
        weight_tensors: Sequence[str] = (),
        providers: Sequence[str] | None = None,
    ) -> None:
        self.activation_tensors = list(dict.fromkeys(activation_tensors))
        self.weight_tensors = list(dict.fromkeys(weight_tensors))
        types = check_tensors(model, self.activation_tensors) if self.activation_tensors else {}
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        copy.ir_version = min(copy.ir_version, MAX_IR_VERSION)
        self._ranks = _ranks(model)
        self._act_dtype: dict[str, np.dtype] = {}
        for name in self.activation_tensors:
            elem = types.get(name, onnx.TensorProto.FLOAT)
            self._act_dtype[name] = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
        insert_fake_quant(copy.graph, self.activation_tensors, types)
        self._weight_dtype = _expose_weights(copy.graph, self.weight_tensors)
        self.model = copy
        self.session = make_session(copy, providers=providers)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._disabled = self._disabled_feed()

    def _disabled_feed(self) -> dict[str, np.ndarray]:
        feed: dict[str, np.ndarray] = {}
        for name in self.activation_tensors:
            dt = self._act_dtype[name]
            feed[fake_quant_input_name(name, "scale")] = np.ones((), dtype=dt)
            feed[fake_quant_input_name(name, "zero_point")] = np.zeros((), dtype=dt)
            feed[fake_quant_input_name(name, "qmin")] = np.zeros((), dtype=dt)
            feed[fake_quant_input_name(name, "qmax")] = np.zeros((), dtype=dt)
            feed[fake_quant_input_name(name, "enable")] = np.zeros((), dtype=np.bool_)
        return feed

    def _param_feed(self, name: str, q: QParams) -> dict[str, np.ndarray]:
        dt = self._act_dtype[name]
        scale = np.asarray(q.scale, dtype=dt)
        zero = np.asarray(q.zero_point).astype(dt)
        if scale.ndim > 0 and q.axis is not None:
            rank = self._ranks.get(name)
            if rank is None:
                raise CalibrationError(
                    f"per-channel parameters for {name!r}, whose rank is unknown",
                    "give the model shape information or use per-tensor parameters",
                )
            axis = q.axis % rank
            shape = (-1,) + (1,) * (rank - 1 - axis)
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return {
            fake_quant_input_name(name, "scale"): scale,
            fake_quant_input_name(name, "zero_point"): zero,
            fake_quant_input_name(name, "qmin"): np.asarray(q.qmin, dtype=dt),
            fake_quant_input_name(name, "qmax"): np.asarray(q.qmax, dtype=dt),
            fake_quant_input_name(name, "enable"): np.ones((), dtype=np.bool_),
        }

    def feed(
        self,
        feeds: Mapping[str, np.ndarray],
        activation_params: Mapping[str, QParams | None] | None = None,
        weights: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """The complete session feed for one run (see :meth:`run`)."""
        full = dict(feeds)
        full.update(self._disabled)
        for name, q in (activation_params or {}).items():
            if name not in self._act_dtype:
                raise CalibrationError(
                    f"tensor {name!r} has no fake-quant subgraph in this FakeQuantModel",
                    "list it in activation_tensors when building the FakeQuantModel",
                )
            if q is not None:
                full.update(self._param_feed(name, q))
        for name, value in (weights or {}).items():
            if name not in self._weight_dtype:
                raise CalibrationError(
                    f"weight {name!r} is not an input of this FakeQuantModel",
                    "list it in weight_tensors when building the FakeQuantModel",
                )
            full[name] = np.asarray(value, dtype=self._weight_dtype[name])
        return full

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        activation_params: Mapping[str, QParams | None] | None = None,
        weights: Mapping[str, np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """The model's outputs with the given quantization applied.

        Args:
            feeds: the model's inputs.
            activation_params: ``{tensor: QParams}``; tensors absent or mapped to ``None`` pass
                through unchanged (fp32).
            weights: replacement values of weight tensors; the others keep their fp32 value.
        """
        return self.session.run(self.output_names, self.feed(feeds, activation_params, weights))

    def run_all(
        self,
        feeds: Iterable[Mapping[str, np.ndarray]],
        activation_params: Mapping[str, QParams | None] | None = None,
        weights: Mapping[str, np.ndarray] | None = None,
    ) -> list[list[np.ndarray]]:
        """:meth:`run` over several feeds."""
        return [self.run(f, activation_params, weights) for f in feeds]


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    try:
        graph = onnx.shape_inference.infer_shapes(shape_skeleton(model), strict_mode=False).graph
    except Exception:  # noqa: BLE001 - ranks are only needed for per-channel parameters
        graph = model.graph
    ranks = {}
    for vi in [*graph.value_info, *graph.input, *graph.output]:
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            ranks[vi.name] = len(tt.shape.dim)
    return ranks


def insert_fake_quant(
    graph: onnx.GraphProto, tensors: Sequence[str], types: Mapping[str, int]
) -> None:
    """Insert the fake-quant subgraph after each tensor (in place, keeping topological order)."""
    if not tensors:
        return
    for name in tensors:
        elem = types.get(name, onnx.TensorProto.FLOAT)
        for param in _PARAMS:
            ptype = onnx.TensorProto.BOOL if param == "enable" else elem
            graph.input.append(helper.make_tensor_value_info(fake_quant_input_name(name, param), ptype, None))
    _insert_after(graph, tensors, "fq", _fq_nodes)


def _insert_dynamic_quant(graph: onnx.GraphProto, tensors: Sequence[str]) -> None:
    """``DynamicQuantizeLinear -> DequantizeLinear`` after each tensor (in place, in order)."""

    def nodes(name: str, raw: str, out: str) -> list[onnx.NodeProto]:
        base = f"onnxq_dq/{name}"
        return [helper.make_node("DynamicQuantizeLinear", [raw], [f"{base}/q", f"{base}/s", f"{base}/z"],
                                 name=f"{base}/DynamicQuantizeLinear"),
                helper.make_node("DequantizeLinear", [f"{base}/q", f"{base}/s", f"{base}/z"], [out],
                                 name=f"{base}/DequantizeLinear")]

    _insert_after(graph, tensors, "dq", nodes)


def _insert_after(graph: onnx.GraphProto, tensors: Sequence[str], suffix: str,
                  make: Callable[[str, str, str], list[onnx.NodeProto]]) -> None:
    """Put ``make(name, raw, out)`` after each tensor: a node's output is renamed ``name/fp32``
    and the inserted nodes give back ``name``; a graph input feeds ``name/<suffix>``, which its
    consumers then read (in place, keeping topological order)."""
    producer_of = {o: i for i, node in enumerate(graph.node) for o in node.output}
    after: dict[int, list[onnx.NodeProto]] = {}
    prologue: list[onnx.NodeProto] = []
    renames: dict[str, str] = {}
    for name in tensors:
        if name in producer_of:
            raw, out = f"{name}/fp32", name
            node = graph.node[producer_of[name]]
            node.output[list(node.output).index(name)] = raw
            after.setdefault(producer_of[name], []).extend(make(name, raw, out))
        else:
            raw, out = name, f"{name}/{suffix}"
            renames[name] = out
            prologue.extend(make(name, raw, out))
    for node in graph.node:
        for i, inp in enumerate(node.input):
            if inp in renames:
                node.input[i] = renames[inp]
    nodes = list(prologue)
    for i, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(after.get(i, []))
    del graph.node[:]
    graph.node.extend(nodes)


def _per_sample_nodes(x: str, out: str, opset: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``DynamicQuantizeLinear -> DequantizeLinear`` of each sample (row of axis 0) of ``x``,
    in float32 as onnxruntime computes it, for any batch."""
    base = f"onnxq_dq/{x}"
    consts = {"zero": np.float32(0), "levels": np.float32(255), "tiny": np.float32(MIN_SCALE), "axes": np.asarray([1], np.int64)}
    inits = [numpy_helper.from_array(np.asarray(v), f"{base}/{k}") for k, v in consts.items()]
    c = {k: f"{base}/{k}" for k in consts}
    reduce = ({"keepdims": 1}, [c["axes"]]) if opset >= 18 else ({"keepdims": 1, "axes": [1]}, [])
    steps: list[tuple[str, list[str], str, dict]] = [
        ("Shape", [x], "shape", {}),
        ("Flatten", [x], "flat", {"axis": 1}),
        ("ReduceMin", ["flat", *reduce[1]], "min0", reduce[0]),
        ("ReduceMax", ["flat", *reduce[1]], "max0", reduce[0]),
        ("Min", ["min0", c["zero"]], "min", {}),
        ("Max", ["max0", c["zero"]], "max", {}),
        ("Sub", ["max", "min"], "span", {}),
        ("Div", ["span", c["levels"]], "scale0", {}),
        ("Max", ["scale0", c["tiny"]], "scale", {}),
        ("Div", ["min", "scale"], "min_steps", {}),
        ("Sub", [c["zero"], "min_steps"], "zp0", {}),
        ("Round", ["zp0"], "zp1", {}),
        ("Clip", ["zp1", c["zero"], c["levels"]], "zp", {}),
        ("Div", ["flat", "scale"], "div", {}),
        ("Round", ["div"], "round", {}),
        ("Add", ["round", "zp"], "add", {}),
        ("Clip", ["add", c["zero"], c["levels"]], "clip", {}),
        ("Sub", ["clip", "zp"], "sub", {}),
        ("Mul", ["sub", "scale"], "fq", {}),
    ]
    local = {name for _, _, name, _ in steps}
    nodes = []
    for op, inputs, name, attrs in steps:
        ins = [f"{base}/{i}" if i in local else i for i in inputs]
        nodes.append(helper.make_node(op, ins, [f"{base}/{name}"], name=f"{base}/{op}_{name}", **attrs))
    nodes.append(helper.make_node("Reshape", [f"{base}/fq", f"{base}/shape"], [out], name=f"{base}/Reshape"))
    return nodes, inits


def _insert_per_sample_dynamic_quant(graph: onnx.GraphProto, tensors: Sequence[str], opset: int) -> None:
    """:func:`_per_sample_nodes` after each tensor (in place, keeping topological order)."""
    if not tensors:
        return

    def nodes(name: str, raw: str, out: str) -> list[onnx.NodeProto]:
        made, inits = _per_sample_nodes(raw, out, opset)
        graph.initializer.extend(inits)
        return made

    _insert_after(graph, tensors, "dq", nodes)


def _fq_nodes(tensor: str, x: str, out: str) -> list[onnx.NodeProto]:
    p = {param: fake_quant_input_name(tensor, param) for param in _PARAMS}
    base = f"onnxq_fq/{tensor}"
    steps = [
        ("Div", [x, p["scale"]], "div"),
        ("Round", [f"{base}/div"], "round"),
        ("Add", [f"{base}/round", p["zero_point"]], "add"),
        ("Max", [f"{base}/add", p["qmin"]], "max"),
        ("Min", [f"{base}/max", p["qmax"]], "min"),
        ("Sub", [f"{base}/min", p["zero_point"]], "sub"),
        ("Mul", [f"{base}/sub", p["scale"]], "fq"),
    ]
    nodes = [
        helper.make_node(op, inputs, [f"{base}/{suffix}"], name=f"{base}/{op}")
        for op, inputs, suffix in steps
    ]
    nodes.append(helper.make_node("Where", [p["enable"], f"{base}/fq", x], [out], name=f"{base}/Where"))
    return nodes


def _expose_weights(graph: onnx.GraphProto, weights: Sequence[str]) -> dict[str, np.dtype]:
    """Make each weight an overridable graph input whose default is its initializer."""
    inits = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    dtypes: dict[str, np.dtype] = {}
    for name in weights:
        if name not in inits:
            constant_to_initializer(graph, name)
            inits = {t.name: t for t in graph.initializer}
        if name not in inits:
            raise CalibrationError(
                f"weight {name!r} is neither an initializer nor a Constant output",
                "name a weight of the main graph",
            )
        tensor = inits[name]
        dtypes[name] = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        if name not in inputs:
            graph.input.append(
                helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims))
            )
    return dtypes


def constant_to_initializer(graph: onnx.GraphProto, name: str) -> None:
    for i, node in enumerate(graph.node):
        if node.op_type == "Constant" and list(node.output) == [name]:
            attrs = {a.name: a for a in node.attribute}
            if "value" not in attrs:
                return
            array = numpy_helper.to_array(attrs["value"].t)
            graph.initializer.append(numpy_helper.from_array(array, name))
            del graph.node[i]
            return


def fake_quantize_array(x: np.ndarray, q: QParams | DynamicQuant) -> np.ndarray:
    """``(Min(Max(Round(x/s)+zp, qmin), qmax) - zp)·s`` in ``x``'s float dtype.

    The same operations, in the same order and precision, as the fake-quant subgraph of
    :class:`FakeQuantModel` (``np.round`` rounds half to even like ONNX ``Round``); a
    :class:`DynamicQuant` takes ``x``'s own range (one call).
    """
    x = np.asarray(x)
    if isinstance(q, DynamicQuant):
        if q.per_sample and x.ndim > 0:
            return np.stack([fake_quantize_array(row, DynamicQuant(q.precision, False)) for row in x]) \
                if len(x) else x.copy()
        q = per_call_qparams(x)
    dt = x.dtype if x.dtype.kind == "f" else np.dtype(np.float32)
    scale = np.asarray(q.scale, dtype=dt)
    zero = np.asarray(q.zero_point).astype(dt)
    if scale.ndim > 0 and q.axis is not None:
        axis = q.axis % x.ndim
        shape = (-1,) + (1,) * (x.ndim - 1 - axis)
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    y = np.divide(x.astype(dt, copy=False), scale, dtype=dt)
    np.round(y, out=y)
    np.add(y, zero, out=y)
    np.maximum(y, np.asarray(q.qmin, dtype=dt), out=y)
    np.minimum(y, np.asarray(q.qmax, dtype=dt), out=y)
    np.subtract(y, zero, out=y)
    np.multiply(y, scale, out=y)
    return y


def bake(
    model: onnx.ModelProto,
    activation_params: Mapping[str, QParams | DynamicQuant] | None = None,
    weights: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` with ``weights`` replaced and ``activation_params`` applied.

    Each activation gets the fake-quant subgraph of :class:`FakeQuantModel` with constant
    parameters and no ``Where`` (per-tensor parameters only, or per-channel ones whose tensor
    rank shape inference knows); each weight (initializer or ``Constant`` output) takes the given
    value in its own dtype.

    Raises:
        CalibrationError: an unknown or non-float tensor.
    """
    activation_params = dict(activation_params or {})
    activation_params_all = activation_params
    dynamic = [t for t, q in activation_params.items() if isinstance(q, DynamicQuant)]
    activation_params = {t: q for t, q in activation_params.items() if isinstance(q, QParams)}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = min(copy.ir_version, MAX_IR_VERSION)
    graph = copy.graph
    for name, value in (weights or {}).items():
        inits = {t.name: t for t in graph.initializer}
        if name not in inits:
            constant_to_initializer(graph, name)
            inits = {t.name: t for t in graph.initializer}
        if name not in inits:
            raise CalibrationError(f"weight {name!r} is neither an initializer nor a Constant output",
                                   "name a weight of the main graph")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(inits[name].data_type))
        inits[name].CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
    if dynamic:
        check_tensors(model, dynamic)
        per_sample = [t for t in dynamic if activation_params_all[t].per_sample]
        _insert_dynamic_quant(graph, [t for t in dynamic if t not in per_sample])
        _insert_per_sample_dynamic_quant(graph, per_sample, model_opset(model))
    if activation_params:
        tensors = list(activation_params)
        types = check_tensors(model, tensors)
        ranks = _ranks(model) if any(np.ndim(q.scale) > 0 for q in activation_params.values()) else {}
        insert_fake_quant(graph, tensors, types)
        drop = {fake_quant_input_name(t, p) for t in tensors for p in _PARAMS}
        keep = [i for i in graph.input if i.name not in drop]
        del graph.input[:]
        graph.input.extend(keep)
        for name in tensors:
            q = activation_params[name]
            dt = np.dtype(helper.tensor_dtype_to_np_dtype(types.get(name, onnx.TensorProto.FLOAT)))
            scale = np.asarray(q.scale, dtype=dt)
            zero = np.asarray(q.zero_point).astype(dt)
            if scale.ndim > 0 and q.axis is not None:
                rank = ranks.get(name)
                if rank is None:
                    raise CalibrationError(f"per-channel parameters for {name!r}, whose rank is unknown",
                                           "give the model shape information or use per-tensor parameters")
                shape = (-1,) + (1,) * (rank - 1 - q.axis % rank)
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            values = {"scale": scale, "zero_point": zero, "qmin": np.asarray(q.qmin, dtype=dt),
                      "qmax": np.asarray(q.qmax, dtype=dt)}
            for param, value in values.items():
                graph.initializer.append(numpy_helper.from_array(value, fake_quant_input_name(name, param)))
        # the Where node becomes Identity: x ← fq(x), unconditionally
        for node in graph.node:
            if node.op_type == "Where" and node.name.startswith("onnxq_fq/") and node.name.endswith("/Where"):
                fq = node.input[1]
                node.op_type = "Identity"
                del node.input[:]
                node.input.append(fq)
    return copy
