"""Calibrate the ``ort-cpu-x86`` roofline cost model by measurement on this machine.

Usage::

    python benchmarks/calibrate_cost_model.py [--threads N] [--repeats 15]
        [--spec hardware_specs/ort-cpu-x86.json] [--no-write] [--report benchmarks/COST_MODEL.md]

Two phases, both with onnxruntime's CPU provider, default session options (``ORT_ENABLE_ALL``),
a fixed number of intra-op threads (``--threads``, default 1), one inter-op thread, warm-up
runs, and interleaved rounds of short timed bursts (``--stat min`` by default, ``median`` on
request). The defaults are for shared machines: with other jobs on the cores, the minimum of
many short single-thread bursts is the stable estimate of the uncontended latency, and
interleaving keeps the ratios between candidates and plans comparable:

1. **Micro-benchmarks** built with ``onnx.helper`` (opset 21, IR 10) measure
   * MAC throughput of a Conv (64→64 channels, 3×3, 56×56) and a MatMul (512×512×512) per
     candidate: fp32, fp16 by Cast, uint8 activations × int8 per-channel
     weights (QDQ that fuses into QLinearConv / QLinearMatMul), int8 activations, int16/int16,
     int4 weights with 8-bit activations, weight-only int8 / int4 (block-wise, MatMulNBits);
     the Q of the input and the DQ of the output are subtracted (they are boundaries, which the
     cost model prices separately);
   * memory bandwidth (elementwise Add of two 8 Mi-element fp32 tensors);
   * Q / DQ conversion cost per element (standalone QuantizeLinear and DequantizeLinear);
   * per-op overhead (slope of the latency of chains of tiny Adds).

   The fitted numbers are written into the ``cost`` block of the spec (``placeholder`` false,
   provenance in its ``comment`` and in the spec's description).
2. **Validation** on the bundled models (``models/*.onnx`` with ``<stem>.calib.npz``): for
   fp32, uniform int8/uint8 and three mixed plans the estimate of :func:`onnxq.cost.estimate`
   is compared with the measured latency at batch 1 and batch 32 (relative error, mean absolute
   relative error, Spearman rank correlation between plans). The per-layer overhead the
   roofline lacks for these small graphs is then fitted (least squares on the relative error)
   and the comparison repeated with the fitted value. A Markdown report is printed and written.

The cost model prices one inference: layer MACs and activation elements are per sample, so the
estimate of batch ``B`` scales MACs, activation elements and boundary edges by ``B`` while
weights and op overheads stay fixed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxq
from onnxq.api import layer_ops_for
from onnxq.cost import LayerCost, estimate, nonlayer_work
from onnxq.cost import layer_costs as cost_layer_costs
from onnxq.graph import GraphView
from onnxq.options import QuantizeOptions
from onnxq.precision import Candidate
from onnxq.runtime import optimized_op_types
from onnxq.spec import load_spec
from onnxq.spec.model import HardwareSpec

__all__ = [
    "Measured",
    "Timer",
    "build_linear",
    "layer_costs",
    "main",
    "measure_micro",
    "spearman",
    "validate_models",
]

logger = logging.getLogger("calibrate_cost_model")

ROOT = Path(__file__).resolve().parents[1]
OPSET = 21
IR_VERSION = 10
SEED = 0

_ELEM = {
    "fp32": TensorProto.FLOAT,
    "fp16": TensorProto.FLOAT16,
    "uint8": TensorProto.UINT8,
    "int8": TensorProto.INT8,
    "uint16": TensorProto.UINT16,
    "int16": TensorProto.INT16,
    "int4": TensorProto.INT4,
    "uint4": TensorProto.UINT4,
}
_RANGE = {
    "uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535), "int16": (-32768, 32767),
    "int4": (-8, 7), "uint4": (0, 15),
}


#: The ``cost`` block of ort-cpu-x86 before the first calibration (guesses from ORT_FACTS.md
#: ratios), kept to report how much the calibration changed the estimates.
PLACEHOLDER_COST: dict[str, object] = {
    "macs_per_second": {"fp32": 5e10, "fp16": 4.5e10, "bf16": 4e10, "uint8": 1.1e11, "int8": 1e10,
                        "int16": 2e10, "uint16": 2e10, "int4": 1.5e10},
    "candidate_macs_per_second": {"int4/uint8": 2e10, "int4/int8": 1e10, "int8/fp32": 3e10, "int4/fp32": 4e10,
                                  "uint4/fp32": 4e10, "int16/int16": 2e10},
    "bytes_per_second": 2e10,
    "conversion_ns_per_element": 1.0,
    "op_overhead_seconds": 2e-6,
}


# -- timing ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timer:
    """Times onnxruntime runs: warm-up, then the median of ``repeats`` timed batches of runs.

    Each timed batch runs the session enough times to last at least ``min_seconds`` so that
    microsecond-scale graphs are not dominated by timer resolution.
    """

    threads: int
    repeats: int = 15
    warmup: int = 5
    min_seconds: float = 0.002
    stat: str = "min"

    def session(self, model: onnx.ModelProto | bytes, config: Mapping[str, str] | None = None) -> ort.InferenceSession:
        """A CPU session with default options, ``ORT_ENABLE_ALL`` and pinned thread counts."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, value)
        if isinstance(model, onnx.ModelProto):
            if model.ir_version > IR_VERSION:
                model.ir_version = IR_VERSION
            model = model.SerializeToString()
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def median_seconds(self, session: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> float:
        """Latency of one ``session.run`` on ``feed`` in seconds: ``stat`` (min or median) of the repeats.

        The minimum is the default because the machines this runs on are shared (other jobs
        load the cores); it estimates the uncontended latency. ``median`` is the alternative.
        """
        run = session.run
        feed = dict(feed)
        for _ in range(self.warmup):
            run(None, feed)
        start = time.perf_counter()
        run(None, feed)
        once = max(time.perf_counter() - start, 1e-7)
        inner = max(1, min(10_000, int(self.min_seconds / once)))
        samples = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            for _ in range(inner):
                run(None, feed)
            samples.append((time.perf_counter() - start) / inner)
        return min(samples) if self.stat == "min" else statistics.median(samples)

    def round_robin(self, items: Sequence[tuple[ort.InferenceSession, Mapping[str, np.ndarray]]]) -> list[float]:
        """Latency of every ``(session, feed)``, timed in interleaved rounds.

        Each round gives every item one short burst, so background load on a shared machine
        hits all items alike; ``stat`` is taken per item over the rounds.
        """
        feeds = [dict(feed) for _, feed in items]
        inners = []
        for (session, _), feed in zip(items, feeds, strict=True):
            for _ in range(self.warmup):
                session.run(None, feed)
            start = time.perf_counter()
            session.run(None, feed)
            inners.append(max(1, min(2000, int(self.min_seconds / max(time.perf_counter() - start, 1e-7)))))
        samples: list[list[float]] = [[] for _ in items]
        for _ in range(self.repeats):
            for i, ((session, _), feed) in enumerate(zip(items, feeds, strict=True)):
                start = time.perf_counter()
                for _ in range(inners[i]):
                    session.run(None, feed)
                samples[i].append((time.perf_counter() - start) / inners[i])
        return [min(v) if self.stat == "min" else statistics.median(v) for v in samples]

    def time_model(self, model: onnx.ModelProto | bytes, feed: Mapping[str, np.ndarray],
                   config: Mapping[str, str] | None = None) -> float:
        """Build a session for ``model`` and return its median latency on ``feed``."""
        return self.median_seconds(self.session(model, config), feed)


# -- micro-models ------------------------------------------------------------------------------


def _model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
           outputs: Sequence[onnx.ValueInfoProto], inits: Sequence[TensorProto], name: str) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION  # onnx 1.23 writes IR 14, onnxruntime 1.31 reads at most 13
    return model


def _int_tensor(name: str, precision: str, values: np.ndarray) -> TensorProto:
    """An integer initializer of any width (4-bit types are packed by ``make_tensor``)."""
    values = np.asarray(values)
    if precision in ("int4", "uint4"):
        return helper.make_tensor(name, _ELEM[precision], list(values.shape), values.astype(np.int32).ravel().tolist())
    dtype = {"uint8": np.uint8, "int8": np.int8, "uint16": np.uint16, "int16": np.int16}[precision]
    return numpy_helper.from_array(values.astype(dtype), name)


def _quantize_weights(w: np.ndarray, precision: str, axis: int, block: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization of ``w`` per channel along ``axis`` (or per block along it)."""
    lo, hi = _RANGE[precision]
    qmax = min(hi, -lo) if lo < 0 else hi
    if block:
        blocks = w.reshape(w.shape[0] // block, block, *w.shape[1:])
        scale = np.abs(blocks).max(axis=1) / qmax
        q = np.clip(np.round(blocks / scale[:, None]), lo, hi).reshape(w.shape)
        return q, scale.astype(np.float32)
    other = tuple(i for i in range(w.ndim) if i != axis)
    scale = (np.abs(w).max(axis=other) / qmax).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), lo, hi)
    return q, scale


def _act_qparams(lo_value: float, hi_value: float, precision: str) -> tuple[np.float32, int]:
    """Asymmetric per-tensor scale and zero point covering ``[lo_value, hi_value]``."""
    lo, hi = _RANGE[precision]
    lo_value, hi_value = min(lo_value, 0.0), max(hi_value, 0.0)
    scale = np.float32(max(hi_value - lo_value, 1e-6) / (hi - lo))
    zero = int(np.clip(round(lo - lo_value / float(scale)), lo, hi))
    return scale, zero


@dataclasses.dataclass(frozen=True)
class LinearShape:
    """A large compute-bound layer used to measure MAC throughput."""

    op: str  # "Conv" or "MatMul"
    x: tuple[int, ...]
    w: tuple[int, ...]
    group: int = 1  # Conv groups (the channel count for a depthwise conv)

    @property
    def label(self) -> str:
        """Short text for reports: ``MatMul 64x96x96``, ``Conv 32x32x3x3 @16x16``, ``dw``."""
        if self.op == "Conv":
            kind = "dwConv" if self.group > 1 else "Conv"
            return f"{kind} {self.w[0]}x{self.w[1]}x{self.w[2]}x{self.w[3]} @{self.x[2]}x{self.x[3]}"
        return f"MatMul {int(np.prod(self.x[:-1]))}x{self.w[0]}x{self.w[1]}"

    @property
    def macs(self) -> int:
        if self.op == "Conv":
            _, _, h, w = self.x
            return self.w[0] * self.w[1] * self.w[2] * self.w[3] * h * w
        return int(np.prod(self.x[:-1])) * self.w[0] * self.w[1]

    @property
    def in_elements(self) -> int:
        return int(np.prod(self.x))

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.op == "Conv":
            return (self.x[0], self.w[0], self.x[2], self.x[3])
        return (*self.x[:-1], self.w[1])

    @property
    def out_elements(self) -> int:
        return int(np.prod(self.out_shape))


CONV = LinearShape("Conv", (1, 64, 56, 56), (64, 64, 3, 3))
MATMUL = LinearShape("MatMul", (512, 512), (512, 512))

#: Layers from 1e4 to 1e8 MACs (dense, pointwise and depthwise convs, MatMuls) timed per
#: candidate to fit the fixed and per-element costs that dominate small layers.
SWEEP = (
    LinearShape("MatMul", (16, 32), (32, 32)),
    LinearShape("MatMul", (64, 96), (96, 96)),
    LinearShape("MatMul", (64, 96), (96, 384)),
    LinearShape("MatMul", (256, 256), (256, 256)),
    MATMUL,
    LinearShape("Conv", (1, 16, 8, 8), (16, 16, 3, 3)),
    LinearShape("Conv", (1, 32, 16, 16), (32, 32, 3, 3)),
    LinearShape("Conv", (1, 32, 16, 16), (64, 32, 1, 1)),
    LinearShape("Conv", (1, 64, 28, 28), (64, 64, 3, 3)),
    CONV,
    LinearShape("Conv", (1, 32, 16, 16), (32, 1, 3, 3), group=32),
    LinearShape("Conv", (1, 64, 32, 32), (64, 1, 3, 3), group=64),
)
#: Candidates whose size curve is measured (the others fall back to their compute precision).
SWEEP_CANDIDATES = ("fp32/fp32", "int8/uint8", "fp16/fp16", "int16/int16", "int4/uint8")
#: Elements of the standalone Q/DQ micro-models fitted to ``op + ns · elements``.
CONVERSION_SIZES = (1024, 16 * 1024, 256 * 1024)


def build_linear(shape: LinearShape, candidate: str, rng: np.random.Generator,
                 out_range: tuple[float, float] = (-8.0, 8.0), block: int = 32) -> onnx.ModelProto:
    """One Conv or MatMul in the form onnxq's rewrite produces for ``candidate``.

    * ``fp32/fp32``: the float op; ``fp16/fp16``: Cast → fp16 op → Cast;
    * ``W/A`` with integer ``A``: ``Q(x) → DQ → op(DQ(W)) → Q → DQ`` (per-tensor asymmetric
      activations, per-channel symmetric weights), which onnxruntime fuses into QLinear kernels;
    * ``W/fp32`` (weight-only): ``op(DQ(W))``; 4-bit MatMul weights are block-wise along the
      reduction axis (they fuse into ``MatMulNBits``).
    """
    cand = Candidate.parse(candidate)
    wp, ap = cand.weights.value, cand.activations.value
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape.x))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape.out_shape))
    w = (rng.standard_normal(shape.w) * 0.05).astype(np.float32)
    conv_attrs: dict[str, object] = {}
    if shape.op == "Conv":
        pad = shape.w[2] // 2
        conv_attrs = {"pads": [pad, pad, pad, pad], "group": shape.group}
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    if ap in ("fp32", "fp16") and wp == ap:
        dtype = np.float16 if ap == "fp16" else np.float32
        inits.append(numpy_helper.from_array(w.astype(dtype), "w"))
        if ap == "fp16":
            nodes.append(helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16))
            nodes.append(helper.make_node(shape.op, ["x16", "w"], ["y16"], **conv_attrs))
            nodes.append(helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT))
        else:
            nodes.append(helper.make_node(shape.op, ["x", "w"], ["y"], **conv_attrs))
        return _model(nodes, [x], [y], inits, f"{shape.op}_{candidate}")
    # integer weights: per-channel (output channels) or block-wise for 4-bit weight-only MatMul
    axis = 0 if shape.op == "Conv" else 1
    use_block = shape.op == "MatMul" and ap == "fp32" and wp in ("int4", "uint4")
    if wp.startswith("u") and not use_block:
        q, scale = _quantize_weights(w, wp.lstrip("u"), axis)
        q = q - _RANGE[wp.lstrip("u")][0] + _RANGE[wp][0]  # shift to the unsigned grid
        zero = np.full(scale.shape, -_RANGE[wp.lstrip("u")][0], dtype=np.int64)
    elif use_block:
        q, scale = _quantize_weights(w, "int4", 0, block)
        zero = None
        if wp == "uint4":
            q = q + 8
            zero = np.full(scale.shape, 8, dtype=np.int64)
    else:
        q, scale = _quantize_weights(w, wp, axis)
        zero = np.zeros(scale.shape, dtype=np.int64)
    inits.append(_int_tensor("wq", wp, q))
    inits.append(numpy_helper.from_array(scale, "ws"))
    dq_inputs = ["wq", "ws"]
    if zero is not None:
        inits.append(_int_tensor("wz", wp, zero))
        dq_inputs.append("wz")
    dq_attrs: dict[str, int] = {"axis": 0 if use_block else axis}
    if use_block:
        dq_attrs["block_size"] = block
    nodes.append(helper.make_node("DequantizeLinear", dq_inputs, ["wf"], **dq_attrs))
    if ap == "fp32":
        nodes.append(helper.make_node(shape.op, ["x", "wf"], ["y"], **conv_attrs))
        return _model(nodes, [x], [y], inits, f"{shape.op}_{candidate}")
    xs, xz = _act_qparams(-1.0, 1.0, ap)
    ys, yz = _act_qparams(*out_range, ap)
    inits += [numpy_helper.from_array(np.array(xs, np.float32), "xs"), _int_tensor("xz", ap, np.array(xz)),
              numpy_helper.from_array(np.array(ys, np.float32), "ys"), _int_tensor("yz", ap, np.array(yz))]
    nodes += [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node(shape.op, ["xd", "wf"], ["yf"], **conv_attrs),
        helper.make_node("QuantizeLinear", ["yf", "ys", "yz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]),
    ]
    return _model(nodes, [x], [y], inits, f"{shape.op}_{candidate}")


def _elementwise_add(n: int) -> onnx.ModelProto:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])
    return _model([helper.make_node("Add", ["a", "b"], ["y"])], [a, b], [y], [], "add")


def _conversion(n: int, direction: str, precision: str = "uint8") -> onnx.ModelProto:
    """A standalone QuantizeLinear (``q``) or DequantizeLinear (``dq``) on ``n`` elements."""
    scale = numpy_helper.from_array(np.array(0.01, np.float32), "s")
    zero = _int_tensor("z", precision, np.array(_RANGE[precision][0] + (_RANGE[precision][1] - _RANGE[precision][0] + 1) // 2))
    if direction == "q":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])
        y = helper.make_tensor_value_info("y", _ELEM[precision], [n])
        node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    else:
        x = helper.make_tensor_value_info("x", _ELEM[precision], [n])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])
        node = helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"])
    return _model([node], [x], [y], [scale, zero], f"{direction}_{precision}")


def _add_chain(length: int, n: int = 16) -> onnx.ModelProto:
    """``length`` dependent tiny Adds (distinct constants, nothing for the optimizer to fold)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])
    nodes, inits = [], []
    prev = "x"
    for i in range(length):
        inits.append(numpy_helper.from_array(np.full([n], 1e-3 * (i + 1), np.float32), f"c{i}"))
        out = "y" if i == length - 1 else f"t{i}"
        nodes.append(helper.make_node("Add", [prev, f"c{i}"], [out]))
        prev = out
    return _model(nodes, [x], [y], inits, f"chain{length}")


# -- phase 1: micro-benchmarks -----------------------------------------------------------------


@dataclasses.dataclass
class Measured:
    """Raw micro-benchmark results (seconds, elements, MACs) and the fitted parameters."""

    overhead_seconds: float = 0.0
    run_seconds: float = 0.0
    bytes_per_second: float = 0.0
    q_ns: dict[str, float] = dataclasses.field(default_factory=dict)
    dq_ns: dict[str, float] = dataclasses.field(default_factory=dict)
    linear_seconds: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    linear_macs_per_second: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    threads: int = 1
    #: (shape label, candidate) → seconds of one layer of the size sweep (boundary Q/DQ included)
    sweep_seconds: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    #: candidate → (fixed seconds per layer, ns per activation element) fitted on the sweep
    sweep_fit: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    #: standalone 8-bit Q/DQ: fixed seconds per node and ns per element (line over CONVERSION_SIZES)
    conversion_op_seconds: float = 0.0
    conversion_ns_fit: float = 0.0

    @property
    def conversion_ns(self) -> float:
        """Mean of Q and DQ per element at the 8-bit boundary, cache-resident tensors."""
        return (self.q_ns["uint8_small"] + self.dq_ns["uint8_small"]) / 2


#: Candidates measured on both micro-layers; ``MATMUL_ONLY`` only on MatMul.
LINEAR_CANDIDATES = ("fp32/fp32", "fp16/fp16", "int8/uint8", "int8/int8", "int16/int16", "int4/uint8", "int4/int8")
MATMUL_ONLY = ("int8/fp32", "int4/fp32", "uint4/fp32", "uint8/uint8")


def measure_micro(timer: Timer, log: Callable[[str], None] = print) -> Measured:
    """Run every micro-benchmark and return the raw numbers (MAC rates net of boundary Q/DQ).

    All micro-models are built first and timed together in interleaved rounds
    (:meth:`Timer.round_robin`), so that their ratios survive background load.
    """
    rng = np.random.default_rng(SEED)
    m = Measured(threads=timer.threads)
    items: list[tuple[ort.InferenceSession, dict[str, np.ndarray]]] = []
    keys: list[tuple[str, ...]] = []

    def add(key: tuple[str, ...], model: onnx.ModelProto, feed: dict[str, np.ndarray],
            config: Mapping[str, str] | None = None) -> None:
        try:
            items.append((timer.session(model, config), feed))
            keys.append(key)
        except Exception as error:  # a candidate onnxruntime cannot run is reported, not fatal
            m.notes.append(f"{' '.join(key)}: {str(error).splitlines()[0][:160]}")
            log(f"{' '.join(key)}: FAILED {str(error).splitlines()[0][:160]}")

    lengths = (1, 51, 101, 201)
    tiny = {"x": rng.standard_normal(16).astype(np.float32)}
    for k in lengths:
        add(("chain", str(k)), _add_chain(k), tiny)
    n = 8 * 1024 * 1024
    add(("bandwidth",), _elementwise_add(n),
        {"a": rng.standard_normal(n).astype(np.float32), "b": rng.standard_normal(n).astype(np.float32)})
    sizes = {"small": 256 * 1024, "large": n}
    for label, size in sizes.items():
        for precision in ("uint8", "int16"):
            lo, hi = _RANGE[precision]
            add(("q", precision, label), _conversion(size, "q", precision),
                {"x": rng.uniform(-1, 1, size).astype(np.float32)})
            add(("dq", precision, label), _conversion(size, "dq", precision),
                {"x": rng.integers(lo, hi + 1, size).astype(np.uint8 if precision == "uint8" else np.int16)})
    shapes = {"Conv": CONV, "MatMul": MATMUL}
    for shape in shapes.values():
        x = rng.uniform(-1, 1, shape.x).astype(np.float32)
        ref = timer.session(build_linear(shape, "fp32/fp32", rng)).run(None, {"x": x})[0]
        out_range = (float(ref.min()), float(ref.max()))
        for cand in LINEAR_CANDIDATES + (MATMUL_ONLY if shape.op == "MatMul" else ()):
            add(("linear", shape.op, cand), build_linear(shape, cand, np.random.default_rng(SEED), out_range), {"x": x})
        # the int8-activation trap: forced s8s8 kernels (what runs when the u8 rewrite fails)
        add(("linear", shape.op, "int8/int8 (s8s8 forced)"),
            build_linear(shape, "int8/int8", np.random.default_rng(SEED), out_range), {"x": x},
            {"session.qdqisint8allowed": "1"})
    for size in CONVERSION_SIZES:
        add(("qline", str(size)), _conversion(size, "q"), {"x": rng.uniform(-1, 1, size).astype(np.float32)})
        add(("dqline", str(size)), _conversion(size, "dq"), {"x": rng.integers(0, 256, size).astype(np.uint8)})
    for shape in SWEEP:
        x = rng.uniform(-1, 1, shape.x).astype(np.float32)
        ref = timer.session(build_linear(shape, "fp32/fp32", np.random.default_rng(SEED))).run(None, {"x": x})[0]
        out_range = (float(ref.min()), float(ref.max()))
        for cand in SWEEP_CANDIDATES:
            add(("sweep", shape.label, cand), build_linear(shape, cand, np.random.default_rng(SEED), out_range), {"x": x})
    log(f"timing {len(items)} micro-models in {timer.repeats} interleaved rounds")
    seconds = dict(zip(keys, timer.round_robin(items), strict=True))

    times = [seconds[("chain", str(k))] for k in lengths]
    slope, intercept = np.polyfit(np.array(lengths, float), np.array(times), 1)
    m.overhead_seconds, m.run_seconds = float(slope), float(intercept)
    log(f"op overhead {slope * 1e6:.2f} us/op, Run() fixed {intercept * 1e6:.1f} us "
        f"(chains {', '.join(f'{k}:{t * 1e6:.0f}us' for k, t in zip(lengths, times, strict=True))})")
    fixed = m.run_seconds + m.overhead_seconds
    t = seconds[("bandwidth",)]
    m.bytes_per_second = 12 * n / max(t - fixed, 1e-9)
    log(f"bandwidth {m.bytes_per_second / 1e9:.2f} GB/s (Add of {n} fp32 in {t * 1e3:.2f} ms)")
    for label, size in sizes.items():
        for precision in ("uint8", "int16"):
            key = f"{precision}_{label}"
            m.q_ns[key] = max(seconds[("q", precision, label)] - fixed, 0.0) / size * 1e9
            m.dq_ns[key] = max(seconds[("dq", precision, label)] - fixed, 0.0) / size * 1e9
            log(f"Q {precision} {label}: {m.q_ns[key]:.3f} ns/el, DQ: {m.dq_ns[key]:.3f} ns/el")
    sizes_q = np.array(CONVERSION_SIZES, float)
    q_line = np.polyfit(sizes_q, [seconds[("qline", str(n))] - m.run_seconds for n in CONVERSION_SIZES], 1)
    dq_line = np.polyfit(sizes_q, [seconds[("dqline", str(n))] - m.run_seconds for n in CONVERSION_SIZES], 1)
    m.conversion_ns_fit = float(max((q_line[0] + dq_line[0]) / 2, 0.0) * 1e9)
    m.conversion_op_seconds = float(max((q_line[1] + dq_line[1]) / 2, 0.0))
    log(f"standalone Q/DQ: {m.conversion_op_seconds * 1e6:.2f} us per node + {m.conversion_ns_fit:.3f} ns per element")
    for key, t in seconds.items():
        if key[0] == "sweep":
            m.sweep_seconds[(key[1], key[2])] = t
    for op, shape in shapes.items():
        rates: dict[str, float] = {}
        secs: dict[str, float] = {}
        for key, t in seconds.items():
            if key[0] != "linear" or key[1] != op:
                continue
            cand = key[2]
            act = Candidate.parse(cand.split()[0]).activations.value
            boundary = 0.0
            if act not in ("fp32", "fp16"):
                kind = "uint8" if act in ("uint8", "int8") else "int16"
                boundary = (shape.in_elements * m.q_ns[f"{kind}_small"] + shape.out_elements * m.dq_ns[f"{kind}_small"]) * 1e-9
            secs[cand] = t
            rates[cand] = shape.macs / max(t - boundary - m.run_seconds, t * 0.1)
        for cand, rate in rates.items():
            log(f"{op} {cand}: {secs[cand] * 1e3:.2f} ms ({rate / 1e9:.1f} GMAC/s net of boundary Q/DQ; "
                f"{rate / rates['fp32/fp32']:.2f}x fp32)")
        m.linear_seconds[op] = secs
        m.linear_macs_per_second[op] = rates
    return m


def fit_sweep(m: Measured, rates: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """Per candidate, ``(fixed seconds, ns per activation element)`` of a layer beyond its MACs.

    For every layer of the size sweep the time net of the run overhead and of the boundary
    conversions the micro-model carries (a standalone Q before and a DQ after an integer layer,
    two Casts around an fp16 one, priced by the fitted Q/DQ line) is
    ``macs / rate + fixed + ns · (input + output elements)``, with ``rate`` the large-layer
    rate of the candidate (so large layers keep it); ``fixed`` and ``ns`` come from non-negative
    least squares on the relative error.
    """
    from scipy.optimize import nnls

    shapes = {shape.label: shape for shape in SWEEP}
    out: dict[str, tuple[float, float]] = {}
    for cand in SWEEP_CANDIDATES:
        rate = rates.get(cand)
        rows, target = [], []
        for (label, c), t in sorted(m.sweep_seconds.items()):
            if c != cand or rate is None:
                continue
            shape = shapes[label]
            elements = shape.in_elements + shape.out_elements
            act = Candidate.parse(cand).activations.value
            converted = 0.0 if act == "fp32" else 2 * m.conversion_op_seconds + elements * m.conversion_ns_fit * 1e-9
            net = t - m.run_seconds - converted - shape.macs / rate
            rows.append([1.0 / t, elements * 1e-9 / t])
            target.append(net / t)
        if not rows:
            continue
        x, _ = nnls(np.array(rows), np.array(target))
        out[cand] = (float(x[0]), float(x[1]))
    return out


def _geomean(values: Sequence[float]) -> float:
    return float(math.exp(sum(math.log(v) for v in values) / len(values)))


def fit_cost_block(m: Measured, machine: str, fit: Fit | None = None) -> dict[str, object]:
    """The spec's ``cost`` block from the micro-benchmark numbers.

    ``macs_per_second[p]`` is the geometric mean of the Conv and MatMul rates of the candidate
    the precision stands for (``uint8`` ← int8/uint8, ``int8`` ← int8/int8 …);
    ``candidate_macs_per_second`` holds candidates whose rate the activation format alone does
    not give.
    """
    conv, mm = m.linear_macs_per_second["Conv"], m.linear_macs_per_second["MatMul"]

    def both(cand: str) -> float:
        values = [table[cand] for table in (conv, mm) if cand in table]
        return _geomean(values) if values else 0.0

    fp32 = both("fp32/fp32")
    # int8 activations: the micro-model is rewritten to uint8 (single consumer); in real graphs
    # the rewrite fails where a tensor feeds several consumers and the s8s8 kernels run, so the
    # model takes the pessimistic forced-s8s8 rate (ORT_FACTS: "int8 activations are a trap").
    int8_act = _geomean([conv["int8/int8 (s8s8 forced)"], mm["int8/int8 (s8s8 forced)"]])
    macs = {
        "fp32": fp32,
        "fp16": both("fp16/fp16"),
        "bf16": both("fp16/fp16"),  # no bf16 kernels on ORT CPU: priced like fp16 (Cast + float)
        "uint8": both("int8/uint8"),
        "int8": int8_act,
        "int16": both("int16/int16"),
        "uint16": both("int16/int16"),
        "int4": int8_act,
    }
    candidates = {
        "int4/uint8": both("int4/uint8"),
        "int4/int8": min(both("int4/int8"), int8_act),
        "int8/fp32": mm.get("int8/fp32", fp32),
        "int4/fp32": mm.get("int4/fp32", fp32),
        "uint4/fp32": mm.get("uint4/fp32", fp32),
        "uint8/uint8": mm.get("uint8/uint8", both("int8/uint8")),
        "int16/int16": both("int16/int16"),
    }

    sweep = fit_sweep(m, {cand: both(cand) for cand in SWEEP_CANDIDATES})
    if not m.sweep_fit:
        m.sweep_fit = dict(sweep)

    def sig(value: float) -> float:
        return float(f"{value:.3g}")

    overhead: dict[str, float] = {}
    per_element: dict[str, float] = {}
    # candidates whose curve was measured, and the compute precision each stands for
    stands_for = {"fp32/fp32": ("fp32",), "int8/uint8": ("uint8", "int8"), "fp16/fp16": ("fp16", "bf16"),
                  "int16/int16": ("int16", "uint16"), "int4/uint8": ()}
    def floating(key: str) -> bool:
        return (key.split("/")[-1]).startswith(("fp", "bf"))

    def scale(key: str) -> float:
        if fit is None:
            return 1.0
        return fit.float_scale if floating(key) else fit.int_scale

    for cand, (fixed, ns) in sweep.items():
        for key in (cand, *stands_for.get(cand, ())):
            overhead[key] = sig(max(fixed - m.overhead_seconds, 0.0) * scale(key))
            per_element[key] = sig(ns * scale(key))
    macs = {k: v / scale(k) for k, v in macs.items()}
    candidates = {k: v / scale(k) for k, v in candidates.items()}
    run = fit.run_seconds if fit else m.run_seconds
    nonlayer = fit.nonlayer_ns if fit else 8.0 / m.bytes_per_second * 1e9  # read + write one fp32
    conversion = fit.conversion_ns if fit else m.conversion_ns_fit
    comment = (
        f"measured by benchmarks/calibrate_cost_model.py on {machine}; onnxruntime {ort.__version__}, "
        f"ORT_ENABLE_ALL, threads {m.threads}. MAC rates: geometric mean of a 64x64x3x3 Conv on 56x56 and a 512^3 "
        f"MatMul, net of the boundary Q/DQ; 'int8' and 'int4' (int8 activations) take the forced s8s8 rate (the uint8 "
        f"rewrite fails where a tensor has several consumers); bf16 priced as fp16. candidate_overhead_seconds and "
        f"candidate_ns_per_element: fitted per candidate on a sweep of {len(SWEEP)} Conv/depthwise Conv/MatMul layers "
        f"from 1.6e4 to 1.3e8 MACs (fixed cost per call beyond op_overhead_seconds, and per input+output element). "
        f"conversion_*: standalone 8-bit Q/DQ over {len(CONVERSION_SIZES)} sizes. op_overhead_seconds: slope over "
        f"chains of tiny Adds. "
        + (f"Fitted on the bundled models (NNLS on the relative error, all plans and batches): float layer times "
           f"x{fit.float_scale:.3f}, integer layer times x{fit.int_scale:.3f} (rates divided, fixed and per-element "
           f"costs multiplied), conversion_ns_per_element (boundary Q/DQ inside a graph, reorders included), "
           f"run_overhead_seconds and nonlayer_ns_per_element. " if fit else "Micro-benchmark values only. ")
        + "See benchmarks/COST_MODEL.md"
    )
    return {
        "placeholder": False,
        "comment": comment,
        "macs_per_second": {k: sig(v) for k, v in macs.items() if v > 0},
        "candidate_macs_per_second": {k: sig(v) for k, v in candidates.items() if v > 0},
        "bytes_per_second": sig(m.bytes_per_second),
        "conversion_ns_per_element": sig(conversion),
        "conversion_op_seconds": sig(m.conversion_op_seconds),
        "op_overhead_seconds": sig(m.overhead_seconds),
        "candidate_overhead_seconds": dict(sorted(overhead.items())),
        "candidate_ns_per_element": dict(sorted(per_element.items())),
        "run_overhead_seconds": sig(run),
        "nonlayer_ns_per_element": sig(nonlayer),
    }


# -- phase 2: validation on bundled models -----------------------------------------------------


def _weight_channels(layer_op: str, shape: tuple[int, ...], trans_b: bool) -> int:
    if not shape:
        return 1
    if layer_op in ("Conv", "ConvTranspose"):
        return int(shape[0])
    if layer_op == "Gemm":
        return int(shape[0] if trans_b else shape[-1])
    return int(shape[-1])


def static_shapes(model: onnx.ModelProto, batch: int = 1) -> onnx.ModelProto:
    """A copy with the batch dimension fixed and shapes inferred with data propagation.

    With a symbolic batch, shape inference loses the shapes behind ``Shape → Reshape`` (the
    attention MatMuls of the transformer get 0 MACs); fixing the batch recovers them.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    del copy.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(copy, data_prop=True)


def layer_costs(view: GraphView, batch: int = 1) -> tuple[list[LayerCost], list[tuple[str, str, int]]]:
    """``LayerCost`` per layer of ``view`` and the edges between layers, scaled to ``batch``.

    GraphView counts MACs and activation elements per sample; one inference of ``batch``
    samples multiplies them (and the boundary tensors) by ``batch``; weights stay.
    """
    costs = []
    for layer in view.layers.values():
        node = view.nodes[layer.name]
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        weight_shape = layer.weight.shape if layer.weight else ()
        costs.append(LayerCost(
            name=layer.name,
            op_type=layer.op_type,
            macs=layer.macs * batch,
            weight_elements=layer.weight.elements if layer.weight else 0,
            input_elements=layer.input_elements * batch,
            output_elements=layer.output_elements * batch,
            weight_channels=_weight_channels(layer.op_type, tuple(weight_shape), trans_b),
        ))
    edges = [(a, b, n * batch) for a, b, n in view.edges_between_layers()]
    return costs, edges


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 2 items."""
    def ranks(values: Sequence[float]) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values), dtype=float)
        for v in set(values):
            idx = [i for i, x in enumerate(values) if x == v]
            r[idx] = np.mean(r[idx])
        return r

    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclasses.dataclass
class Case:
    """One (model, plan, batch) comparison.

    ``roofline`` is the estimate without op overheads and boundary conversions (seconds);
    ``boundary_elements`` the elements converted at precision boundaries; ``estimate`` the
    full estimate of :func:`onnxq.cost.estimate` with the spec of the current table.
    """

    model: str
    plan: str
    batch: int
    measured: float
    roofline: float
    layers: int
    plan_map: dict[str, str]
    boundary_elements: float = 0.0
    estimate: float = 0.0
    roofline_int: float = 0.0  # the part of ``roofline`` in layers with integer activations
    ort_nodes: int = 0  # nodes of the graph onnxruntime runs (ORT_ENABLE_ALL)
    ort_qdq: int = 0  # standalone QuantizeLinear/DequantizeLinear nodes left in it
    variable: float = 0.0  # the estimate without run overhead and non-layer ops
    nonlayer_ops: int = 0
    nonlayer_elements: int = 0  # float output elements of the non-layer ops (whole batch)
    boundaries: int = 0  # standalone conversions derived by onnxq.cost.boundaries
    float_seconds: float = 0.0  # layer time of the layers computing in float (no conversions)
    int_seconds: float = 0.0  # layer time of the layers computing on integers


@dataclasses.dataclass(frozen=True)
class Fit:
    """Corrections fitted on the bundled models (non-negative least squares on the relative
    error over every case)::

        measured ≈ float_scale · float layers + int_scale · integer layers
                   + boundary elements · conversion_ns + run_seconds
                   + non-layer ops · op overhead + non-layer elements · nonlayer_ns

    ``float_scale`` and ``int_scale`` multiply the micro-benchmark layer times (the layers of
    the bundled models run at a different share of the micro-layer rates), ``conversion_ns``
    prices a boundary element inside a real graph (Q/DQ plus the layout reorders around it).
    """

    float_scale: float = 1.0
    int_scale: float = 1.0
    conversion_ns: float = 0.0
    run_seconds: float = 0.0
    nonlayer_ns: float = 0.0


def fit_params(cases: Sequence[Case], op_overhead: float, conversion_op: float = 0.0) -> Fit:
    """Non-negative least squares on the relative error over ``cases``."""
    from scipy.optimize import nnls

    # layer times stay the micro-benchmark model's (scales 1): fitting them too on 20 cases lets the
    # plan-independent terms absorb everything (measured: both scales went to 0)
    a = np.array([[c.boundary_elements * 1e-9, 1.0, c.nonlayer_elements * 1e-9]
                  for c in cases]) / np.array([[c.measured] for c in cases])
    b = np.array([(c.measured - c.float_seconds - c.int_seconds - c.nonlayer_ops * op_overhead
                   - c.boundaries * conversion_op) / c.measured for c in cases])
    x, _ = nnls(a, b)
    ns, run, nl = (float(v) for v in x)
    return Fit(conversion_ns=ns, run_seconds=run, nonlayer_ns=nl)


def _plans(view: GraphView, int8_plan: Mapping[str, str]) -> dict[str, dict[str, str]]:
    names = list(view.layer_names)
    half = len(names) // 2
    head = names[-1]
    fp16_ok = view.layers[head].op_type in ("Conv", "Gemm", "MatMul")
    plans = {
        "fp32": {},
        "int8": dict(int8_plan),
        "first half int8": {n: int8_plan[n] for n in names[:half] if n in int8_plan},
        "alternating int8/fp32": {n: int8_plan[n] for i, n in enumerate(names) if i % 2 == 0 and n in int8_plan},
    }
    if fp16_ok:
        plans["int8 + fp16 head"] = {**int8_plan, head: "fp16/fp16"}
    else:
        plans["int8 + fp32 head"] = {n: c for n, c in int8_plan.items() if n != head}
    return plans


def model_estimate(view: GraphView, plan: Mapping[str, str], spec: HardwareSpec, batch: int) -> Case:
    """A ``Case`` (measured 0) with the whole-model estimate of :func:`onnxq.cost.estimate`."""
    layers = cost_layer_costs(view)
    result = estimate(layers, plan, spec, batch=batch, view=view)
    ops, elements = nonlayer_work(view)
    alone = estimate(layers, plan, spec, batch=batch).per_layer
    integer = {name for name, c in plan.items() if not Candidate.parse(str(c)).activations.value.startswith(("fp", "bf"))}
    case = Case("", "", batch, 0.0, roofline=0.0, layers=len(layers), plan_map=dict(plan),
                boundary_elements=float(sum(b.elements for b in result.boundaries) * batch),
                estimate=result.latency_seconds, variable=result.latency_seconds - result.fixed_seconds,
                nonlayer_ops=ops, nonlayer_elements=elements * batch, boundaries=len(result.boundaries),
                float_seconds=sum(t for n, t in alone.items() if n not in integer),
                int_seconds=sum(t for n, t in alone.items() if n in integer))
    return case


def legacy_estimate(view: GraphView, plan: Mapping[str, str], spec: HardwareSpec, batch: int) -> float:
    """The estimate as onnxq computed it before this calibration: per-layer roofline with
    MACs scaled by the caller, layer-to-layer edges only, no run overhead or non-layer ops."""
    layers, edges = layer_costs(view, batch)
    return estimate(layers, plan, spec, edges).latency_seconds


def validate_models(timer: Timer, spec: HardwareSpec, models: Sequence[Path], batches: Sequence[int],
                    log: Callable[[str], None] = print) -> list[Case]:
    """Quantize each bundled model with every plan and time it at each batch size.

    All (model, plan, batch) sessions are timed together in interleaved rounds.
    """
    cases: list[Case] = []
    quiet = QuantizeOptions(progress=False)
    pending: list[tuple[Case, ort.InferenceSession, dict[str, np.ndarray]]] = []
    for path in models:
        calib = np.load(path.with_suffix(".calib.npz"))
        fp32 = onnx.load(path)
        view = GraphView(static_shapes(fp32), layer_ops_for(spec))
        uniform = onnxq.quantize(fp32, path.with_suffix(".calib.npz"), spec, precision="int8/uint8", options=quiet)
        int8_plan = dict(uniform.report["plan"]["layers"])
        for plan_name, plan in _plans(view, int8_plan).items():
            if plan_name == "fp32":
                model = fp32
            elif plan_name == "int8":
                model = uniform.model
            else:
                try:
                    model = onnxq.quantize(fp32, path.with_suffix(".calib.npz"), spec, plan=plan, options=quiet).model
                except Exception as error:
                    log(f"{path.stem} {plan_name}: quantize failed: {error}")
                    continue
            session = timer.session(model)
            with tempfile.TemporaryDirectory() as tmp:
                ops = optimized_op_types(model, str(Path(tmp) / "optimized.onnx"))
            qdq = sum(op in ("QuantizeLinear", "DequantizeLinear") for op in ops)
            for batch in batches:
                feed = {k: v[:batch] for k, v in calib.items()}
                case = dataclasses.replace(model_estimate(view, plan, spec, batch), model=path.stem, plan=plan_name,
                                           ort_nodes=len(ops), ort_qdq=qdq)
                pending.append((case, session, feed))
    measured = timer.round_robin([(session, feed) for _, session, feed in pending])
    for (case, _, _), value in zip(pending, measured, strict=True):
        case.measured = value
        cases.append(case)
        log(f"{case.model:20s} {case.plan:24s} b={case.batch:<3d} measured {case.measured * 1e3:8.3f} ms  "
            f"estimate {case.estimate * 1e3:8.3f} ms  ({case.boundaries} boundaries, "
            f"{case.boundary_elements:.0f} elements)")
    return cases


def reestimate(cases: Sequence[Case], spec: HardwareSpec, models: Sequence[Path], legacy: bool = False) -> list[Case]:
    """The cases with ``estimate`` recomputed on ``spec`` (``legacy``: the old estimate)."""
    views = {path.stem: GraphView(static_shapes(onnx.load(path)), layer_ops_for(spec)) for path in models}
    out = []
    for c in cases:
        view = views[c.model]
        if legacy:
            out.append(dataclasses.replace(c, estimate=legacy_estimate(view, c.plan_map, spec, c.batch)))
        else:
            fresh = model_estimate(view, c.plan_map, spec, c.batch)
            out.append(dataclasses.replace(c, estimate=fresh.estimate, variable=fresh.variable))
    return out


# -- reporting ---------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    """CPU model, core counts, ISA flags of interest, versions and the date."""
    cpu, flags = platform.processor() or "unknown", ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = found.group(1).strip() if found else cpu
        found = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        have = set(found.group(1).split()) if found else set()
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "f16c", "avx512_fp16") if f in have)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": str(os.cpu_count()),
        "flags": flags,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "python": platform.python_version(),
        "date": dt.date.today().isoformat(),
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def error_table(cases: Sequence[Case]) -> tuple[list[str], float, dict[tuple[str, int], float]]:
    """Markdown rows, the mean absolute relative error and Spearman per (model, batch)."""
    rows = ["| model | plan | batch | measured (ms) | estimated (ms) | rel. error | x fp32 measured | x fp32 estimated "
            "| ORT nodes | ORT Q/DQ left |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    errors = []
    base = {(c.model, c.batch): c for c in cases if c.plan == "fp32"}
    for c in cases:
        est = c.estimate
        err = est / c.measured - 1
        errors.append(abs(err))
        ref = base.get((c.model, c.batch))
        ratios = f"{c.measured / ref.measured:.2f} | {est / ref.estimate:.2f}" if ref else "- | -"
        rows.append(f"| {c.model} | {c.plan} | {c.batch} | {c.measured * 1e3:.3f} | {est * 1e3:.3f} | {err:+.1%} | {ratios} "
                    f"| {c.ort_nodes} | {c.ort_qdq} |")
    ranks: dict[tuple[str, int], float] = {}
    for key in sorted({(c.model, c.batch) for c in cases}):
        group = [c for c in cases if (c.model, c.batch) == key]
        ranks[key] = spearman([c.estimate for c in group], [c.measured for c in group])
    return rows, float(np.mean(errors)) if errors else float("nan"), ranks


def render_report(info: Mapping[str, str], threads: int, stat: str, m: Measured, cost: Mapping[str, object],
                  tables: Sequence[tuple[str, Sequence[Case]]], fit: Fit) -> str:
    """The Markdown of ``benchmarks/COST_MODEL.md``."""
    lines = [
        "# ort-cpu-x86 cost model calibration",
        "",
        "Generated by `python benchmarks/calibrate_cost_model.py` (do not edit by hand).",
        "",
        f"- CPU: {info['cpu']} ({info['logical_cores']} logical cores; flags: {info['flags']})",
        f"- onnxruntime {info['onnxruntime']}, onnx {info['onnx']}, Python {info['python']}; "
        f"CPUExecutionProvider, ORT_ENABLE_ALL, intra-op threads {threads}, inter-op 1; statistic: {stat} of repeats "
        f"(load average at start: {info['load']})",
        f"- date: {info['date']}",
        "",
        "## Micro-benchmarks",
        "",
        f"- per-op overhead (slope over chains of tiny Adds): {m.overhead_seconds * 1e6:.2f} us; "
        f"fixed cost of one `Run()` from Python: {m.run_seconds * 1e6:.1f} us",
        f"- memory bandwidth (fp32 Add, 8 Mi elements): {m.bytes_per_second / 1e9:.2f} GB/s",
        "- QuantizeLinear / DequantizeLinear per element (ns): "
        + ", ".join(f"{k}: Q {m.q_ns[k]:.3f} / DQ {m.dq_ns[k]:.3f}" for k in m.q_ns),
        "",
        "| candidate | Conv 64x64x3x3 @56x56 GMAC/s | x fp32 | MatMul 512^3 GMAC/s | x fp32 |",
        "|---|---:|---:|---:|---:|",
    ]
    conv, mm = m.linear_macs_per_second["Conv"], m.linear_macs_per_second["MatMul"]
    for cand in list(dict.fromkeys(list(conv) + list(mm))):
        c = f"{conv[cand] / 1e9:.1f} | {conv[cand] / conv['fp32/fp32']:.2f}" if cand in conv else "- | -"
        d = f"{mm[cand] / 1e9:.1f} | {mm[cand] / mm['fp32/fp32']:.2f}" if cand in mm else "- | -"
        lines.append(f"| {cand} | {c} | {d} |")
    if m.notes:
        lines += ["", "Failures: " + "; ".join(m.notes)]
    lines += ["", "## Fitted `cost` block", "", "```json", json.dumps(cost, indent=2), "```", ""]
    lines += ["## Layer size sweep: fixed and per-element costs", "",
              f"Standalone 8-bit Q/DQ: {m.conversion_op_seconds * 1e6:.2f} us per node + {m.conversion_ns_fit:.3f} ns "
              "per element (line over " + ", ".join(str(n) for n in CONVERSION_SIZES) + " elements).", "",
              "Time of one layer in a micro-model (us; integer and fp16 candidates include the Q/DQ or Casts around "
              "it), and the ratio to fp32:", "",
              "| layer | MACs | " + " | ".join(SWEEP_CANDIDATES) + " |",
              "|---|---:|" + "---:|" * len(SWEEP_CANDIDATES)]
    for shape in SWEEP:
        fp = m.sweep_seconds.get((shape.label, "fp32/fp32"))
        cells = []
        for cand in SWEEP_CANDIDATES:
            t = m.sweep_seconds.get((shape.label, cand))
            cells.append("-" if t is None else f"{t * 1e6:.1f}" + (f" ({t / fp:.2f}x)" if fp and cand != "fp32/fp32" else ""))
        lines.append(f"| {shape.label} | {shape.macs:.2g} | " + " | ".join(cells) + " |")
    lines += ["", "Fitted per layer call beyond its MACs at the large-layer rate (`fixed` includes the "
              f"{m.overhead_seconds * 1e6:.2f} us op overhead): "
              + ", ".join(f"{c}: {f * 1e6:.2f} us + {ns:.3f} ns/element" for c, (f, ns) in m.sweep_fit.items()), ""]
    lines += ["## Corrections fitted on the bundled models", "",
              f"`measured ≈ {fit.float_scale:.3f} × float layers + {fit.int_scale:.3f} × integer layers + boundary "
              f"elements × {fit.conversion_ns:.3f} ns + {fit.run_seconds * 1e6:.1f} us + non-layer ops × op overhead + "
              f"non-layer elements × {fit.nonlayer_ns:.3f} ns` (non-negative least squares on the relative error over "
              "every case below; layer times are the micro-benchmark model's, boundaries come from the plan's exact "
              "Q/DQ layout). The run overhead and the non-layer terms are the same under every plan: they move the "
              "absolute latency, not the ranking.", ""]
    for title, cases in tables:
        rows, mare, ranks = error_table(cases)
        lines += [f"## Estimate vs measured: {title}", ""] + rows + [
            "", f"Mean absolute relative error: **{mare:.1%}**", "",
            "Spearman rank correlation of plans (estimated vs measured latency): "
            + ", ".join(f"{model} b={batch}: {rho:+.2f}" for (model, batch), rho in ranks.items()), ""]
    lines += [
        "## Findings and recommendations", "",
        "- Large layers keep the micro-benchmark ratios: uint8 x int8 (QLinearConv/QLinearMatMul, VNNI) runs ~3.5x the "
        "fp32 rate; int16/int16 and int4 weights with 8-bit activations ~0.75-0.8x; fp16 by Cast ~1.0x; forced s8s8 "
        "0.1-0.2x.",
        "- Small layers do not: the size sweep above shows int8 MatMul/Conv at or above fp32 below ~1e6 MACs, and "
        "depthwise convs slower in int8 at every size. The model now charges each layer call "
        "`candidate_overhead_seconds` and `candidate_ns_per_element` of its candidate on top of the roofline (an "
        "efficiency curve `macs / (macs + overhead x rate)`), fitted on the sweep.",
        "- Precision boundaries come from the plan's exact Q/DQ layout (`onnxq.cost.boundaries`): a Q where a "
        "quantized layer reads a float op or a graph input, a DQ per float consumer of a quantized layer, requantize "
        "pairs, Casts around fp16 layers; integer-capable ops (shared-scale ops, absorbed Relu) are looked through. "
        "The derived count tracks onnxruntime's leftover standalone Q/DQ (transformer int8: 61 derived vs 51 left). "
        "The search uses the plan-independent `onnxq.cost.boundary_edges` (float-op neighbours as unary costs).",
        "- Whole-model estimates (`estimate(..., view=...)`) add the run overhead and the float non-layer ops; batch is "
        "an argument (`batch=`), not a caller-side scaling.",
        "- Measurement caveats: the machine is shared (load average above), so timings are the minimum of interleaved "
        "short bursts with one intra-op thread; run-to-run variation of the larger cases is still up to ~2x (the "
        "transformer at batch 32 moved from 9.9 to 18.5 ms between two runs of this script). Re-run on an idle "
        "machine with `--threads <cores> --stat median` before relying on absolute numbers.",
        "",
    ]
    return "\n".join(lines) + "\n"


def write_spec_cost(path: Path, cost: Mapping[str, object], info: Mapping[str, str]) -> None:
    """Replace the ``cost`` block of the spec JSON (and the placeholder note of its description)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["cost"] = dict(cost)
    note = (f"COST NUMBERS measured by benchmarks/calibrate_cost_model.py on {info['cpu']} "
            f"({info['logical_cores']} cores, onnxruntime {info['onnxruntime']}, {info['date']}); "
            "see benchmarks/COST_MODEL.md.")
    data["description"] = re.sub(r"COST NUMBERS (ARE PLACEHOLDERS|measured).*$", note, data["description"])
    if note not in data["description"]:
        data["description"] = data["description"].rstrip() + " " + note
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# -- encoder layers: candidates that run slower than fp32 at transformer shapes ----------------------
ENCODER_SECTION = "## Encoder layers: measured vs estimated (per layer, with boundaries)"
#: (title, rows per sample, K, N, batch); N = 0: activation x activation (12 heads, head size 32)
ENCODER_LAYERS = (
    ("12x384 by 384x384 (batch 1)", 12, 384, 384, 1),
    ("12x384 by 384x1536 (batch 1)", 12, 384, 1536, 1),
    ("12x1536 by 1536x384 (batch 1)", 12, 1536, 384, 1),
    ("32x19x384 by 384x384 (batch 32)", 19, 384, 384, 32),
    ("32x19x384 by 384x1536 (batch 32)", 19, 384, 1536, 32),
    ("32x19x1536 by 1536x384 (batch 32)", 19, 1536, 384, 32),
    ("attention 12 heads 12x32 by 32x12 (batch 1)", 12, 32, 0, 1),
    ("attention 12 heads 19x32 by 32x19 (batch 32)", 19, 32, 0, 32),
    ("1x2048 by 2048x2048 (one row)", 1, 2048, 2048, 1),
)
ENCODER_CANDIDATES = ("int8/fp32", "fp16/fp16", "int8/dyn-uint8", "int8/uint8", "int4b32/fp32", "int16/int16")


def _encoder_layer(rows: int, k: int, n: int, rng: np.random.Generator) -> tuple[onnx.ModelProto, LayerCost]:
    if n:
        w = numpy_helper.from_array((rng.standard_normal((k, n)) * 0.05).astype(np.float32), "W")
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])]
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "layer", inputs,
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])], [w])
        cost = LayerCost("mm", "MatMul", rows * k * n, k * n, rows * k, rows * n, weight_channels=n)
    else:
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 12, "s", k]),
                  helper.make_tensor_value_info("k", TensorProto.FLOAT, ["b", 12, k, "s"])]
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "k"], ["y"], name="mm")], "layer", inputs,
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 12, "s", "s"])])
        cost = LayerCost("mm", "MatMul", 12 * rows * k * rows, 0, 2 * 12 * rows * k, 12 * rows * rows)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), cost


def _layer_feeds(model: onnx.ModelProto, rows: int, batch: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    feeds = []
    for _ in range(3):
        feed = {}
        for value in model.graph.input:
            dims = [d.dim_value or (batch if d.dim_param == "b" else rows) for d in value.type.tensor_type.shape.dim]
            feed[value.name] = rng.standard_normal(dims).astype(np.float32)
        feeds.append(feed)
    return feeds


def encoder_layer_section(spec: HardwareSpec, previous: HardwareSpec, threads: int, budget: float = 3.0) -> str:
    """Markdown: each encoder-shaped layer alone (onnxq's rewrite of it, boundary Q/DQ included),
    interleaved with fp32 (median ratio of rounds), against the estimates of both specs."""
    from onnxq.api import quantize
    from onnxq.latency import time_interleaved

    rng = np.random.default_rng(SEED)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    lines = [ENCODER_SECTION, "",
             f"Measured {dt.date.today()} by `python benchmarks/calibrate_cost_model.py --encoder-layers` "
             f"(intra-op threads {threads}, interleaved rounds, median ratio). Integer rows include the "
             "layer's boundary Q/DQ, which the layer-only estimate leaves to the boundary terms, so "
             "int8/uint8 is not scored.", "",
             "| layer | candidate | measured x fp32 | previous spec | this spec |", "|---|---|---:|---:|---:|"]
    errors: dict[str, list[float]] = {"previous": [], "new": []}
    wrong = {"previous": 0, "new": 0}
    for title, rows, k, n, batch in ENCODER_LAYERS:
        model, cost = _encoder_layer(rows, k, n, rng)
        feeds = _layer_feeds(model, rows, batch, rng)
        candidates = ENCODER_CANDIDATES if n else ("uint8/uint8", "fp16/fp16")
        sessions = {"fp32": ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])}
        for word in candidates:
            quantized = quantize(model, feeds, spec, plan={"mm": word}).model
            sessions[word] = ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])
        timing = time_interleaved(sessions, feeds[:1], "fp32", budget_seconds=budget, min_rounds=7)
        for word in candidates:
            measured = timing[word].ratio
            estimates = {name: estimate([cost], {"mm": word}, s, batch=batch).latency_seconds
                         / estimate([cost], {}, s, batch=batch).latency_seconds
                         for name, s in (("previous", previous), ("new", spec))}
            lines.append(f"| {title} | {word} | {measured:.2f} | {estimates['previous']:.2f} | {estimates['new']:.2f} |")
            if word == "int8/uint8":
                continue
            for name, value in estimates.items():
                errors[name].append(abs(math.log(value / measured)))
                wrong[name] += int(abs(measured - 1) > 0.05 and (value > 1) != (measured > 1))
    lines += ["", "Error (all rows but int8/uint8): mean |log(estimate / measured)| previous spec "
              f"{np.mean(errors['previous']):.2f} (x{math.exp(np.mean(errors['previous'])):.2f}), this spec "
              f"{np.mean(errors['new']):.2f} (x{math.exp(np.mean(errors['new'])):.2f}); layers estimated on the "
              f"wrong side of fp32 (measured more than 5% away from it): previous {wrong['previous']}, this spec "
              f"{wrong['new']}.", ""]
    return "\n".join(lines)


def write_encoder_section(report: Path, section: str) -> None:
    """Replace (or append) the encoder section of the report."""
    text = report.read_text(encoding="utf-8") if report.exists() else ""
    start = text.find(ENCODER_SECTION)
    if start >= 0:
        end = text.find("\n## ", start + len(ENCODER_SECTION))
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    report.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (default 1: stable on shared machines; use the core count on an idle one)")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--stat", choices=("min", "median"), default="min",
                        help="statistic over the repeats (min: robust to other jobs on a shared machine)")
    parser.add_argument("--spec", type=Path, default=ROOT / "hardware_specs" / "ort-cpu-x86.json")
    parser.add_argument("--models", type=Path, nargs="*",
                        default=[ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "digits_transformer.onnx"])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 32])
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "COST_MODEL.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the spec and the report alone")
    parser.add_argument("--encoder-layers", action="store_true",
                        help="only measure encoder-shaped layers per candidate against the spec's estimates "
                             "(and --previous-spec's) and write that section of the report")
    parser.add_argument("--previous-spec", type=Path, help="the spec to compare with in --encoder-layers")
    args = parser.parse_args(argv)
    if args.encoder_layers:
        spec = load_spec(args.spec)
        section = encoder_layer_section(spec, load_spec(args.previous_spec) if args.previous_spec else spec, args.threads)
        print(section)
        if not args.no_write:
            write_encoder_section(args.report, section)
        return 0
    logging.basicConfig(level=logging.WARNING)
    np.random.seed(SEED)
    timer = Timer(threads=args.threads, repeats=args.repeats, stat=args.stat)
    info = machine_info()
    print(f"# {info['cpu']}, {info['logical_cores']} cores, onnxruntime {info['onnxruntime']}, threads {args.threads}")
    micro = measure_micro(timer)
    base = load_spec(args.spec)
    micro_block = fit_cost_block(micro, info["cpu"])
    micro_spec = dataclasses.replace(base, cost=_cost_params(base, micro_block))
    cases = validate_models(timer, micro_spec, args.models, args.batches)
    fit = fit_params(cases, micro.overhead_seconds, micro.conversion_op_seconds)
    cost = fit_cost_block(micro, info["cpu"], fit)
    fitted_spec = dataclasses.replace(base, cost=_cost_params(base, cost))
    tables = [
        ("previous model (per-layer roofline, layer-to-layer edges, spec before this run)",
         reestimate(cases, base, args.models, legacy=True)),
        ("new model, micro-benchmark numbers only", cases),
        ("new model, calibrated spec (written)", reestimate(cases, fitted_spec, args.models)),
    ]
    report = render_report(info, args.threads, args.stat, micro, cost, tables, fit)
    print(report)
    if not args.no_write:
        args.report.write_text(report, encoding="utf-8")
        write_spec_cost(args.spec, cost, info)
        print(f"wrote {args.report} and the cost block of {args.spec}", file=sys.stderr)
    return 0


def _cost_params(spec: HardwareSpec, block: Mapping[str, object]):  # noqa: ANN202 - CostParams
    """``CostParams`` of ``spec`` with the numbers of a fitted ``cost`` block."""
    from types import MappingProxyType

    from onnxq.precision import Precision

    macs = block["macs_per_second"]
    cands = block["candidate_macs_per_second"]
    assert isinstance(macs, Mapping) and isinstance(cands, Mapping)
    return dataclasses.replace(
        spec.cost,
        macs_per_second=MappingProxyType({Precision(k): float(v) for k, v in macs.items()}),
        candidate_macs_per_second=MappingProxyType({Candidate.parse(k): float(v) for k, v in cands.items()}),
        bytes_per_second=float(block["bytes_per_second"]),  # type: ignore[arg-type]
        conversion_ns_per_element=float(block["conversion_ns_per_element"]),  # type: ignore[arg-type]
        op_overhead_seconds=float(block["op_overhead_seconds"]),  # type: ignore[arg-type]
        placeholder=bool(block.get("placeholder", False)),
        candidate_overhead_seconds=MappingProxyType(
            {_key(k): float(v) for k, v in block.get("candidate_overhead_seconds", {}).items()}),  # type: ignore[union-attr]
        candidate_ns_per_element=MappingProxyType(
            {_key(k): float(v) for k, v in block.get("candidate_ns_per_element", {}).items()}),  # type: ignore[union-attr]
        run_overhead_seconds=float(block.get("run_overhead_seconds", 0.0)),  # type: ignore[arg-type]
        nonlayer_ns_per_element=float(block.get("nonlayer_ns_per_element", 0.0)),  # type: ignore[arg-type]
        conversion_op_seconds=float(block.get("conversion_op_seconds", 0.0)),  # type: ignore[arg-type]
    )


def _key(key: str) -> str:
    """A per-candidate cost key as the spec loader normalises it."""
    from onnxq.precision import Precision

    return str(Candidate.parse(key)) if "/" in key else Precision(key).value


if __name__ == "__main__":
    sys.exit(main())
