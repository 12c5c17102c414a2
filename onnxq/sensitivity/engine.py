"""Evaluation of perturbed models: the part of the sensitivity analysis that runs onnxruntime.

A :class:`Job` describes one perturbation *symbolically* (which weights move, by which noise,
which activations are fake-quantized at which precision), so that it is small, hashable and
cheap to send to a worker process or a Ray actor; an :class:`Evaluator` turns it into a feed of
the sessions that run it and returns the label-free loss of the outputs against the fp32
reference outputs.

Memory is bounded by the model plus a budget: the large weights live once, as arrays every
session is fed (:func:`split_shared_weights`), and the fp32 activations cached where the graph
is cut are held for one chunk of the feeds at a time (:func:`plan_chunks`), with every job run
inside each chunk.

Everything here is deterministic: weight noise is a pure function of the weight and the
quantizer, Rademacher directions come from ``numpy.random.default_rng([seed, index])``.
"""

from __future__ import annotations

import logging
import math
import os
import resource
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.calibration import weight_ranges
from onnxq.data import feed_samples
from onnxq.model import MAX_IR_VERSION, detach_initializers
from onnxq.numerics import fake_quantize, qparams_from_range
from onnxq.precision import Precision, is_integer
from onnxq.qdq_patterns import fake_quantize_blockwise
from onnxq.runtime import create_session, make_session
from onnxq.simulate import (
    DynamicQuant,
    FakeQuantModel,
    bake,
    constant_to_initializer,
    fake_quant_input_name,
    fake_quantize_array,
    insert_fake_quant,
)

__all__ = [
    "LOSSES",
    "WeightQuantizer",
    "WeightPerturbation",
    "ActivationQuant",
    "Job",
    "Segment",
    "SuffixRunner",
    "EvalContext",
    "Evaluator",
    "EvaluatorUsage",
    "weight_noise",
    "rademacher",
    "loss_between",
    "sample_losses",
    "converged",
    "SEQUENTIAL_MIN_SAMPLES",
    "split_shared_weights",
    "detach_weights",
    "with_weights",
    "batch_splittable",
    "plan_chunks",
    "SHARED_MIN_BYTES",
    "USE_CUT_SESSIONS",
    "default_memory_budget",
    "peak_rss_mib",
]

logger = logging.getLogger(__name__)

#: Label-free losses: KL(softmax(fp32) ‖ softmax(quantized)) per sample, or mean squared error.
LOSSES = ("kl", "mse")
#: ``False``: every evaluation runs in the one fake-quant session (the slow reference path that
#: tests compare the cut sessions with).
USE_CUT_SESSIONS = True
#: Float initializers at least this big are shared by all sessions instead of copied into each.
SHARED_MIN_BYTES = 4096
#: ... except convolution weights, which onnxruntime reorders into its blocked layout when they
#: are constant (1.5× faster cut sessions on the bundled ResNet): copied below this size.
SHARED_CONV_MIN_BYTES = 1 << 20
#: Ops whose weights run markedly faster as constants.
_CONV_OPS = ("Conv", "ConvTranspose")


@dataclass(frozen=True)
class WeightQuantizer:
    """How one weight tensor is quantized at one precision (mirrors the rewrite pass).

    Attributes:
        tensor: the weight tensor.
        precision: target precision; integer grids are fake-quantized, ``fp16``/``bf16`` are
            rounded through the float format.
        axis: per-channel axis, ``None`` for one scale.
        symmetric: symmetric quantizer.
        narrow: narrow signed grid.
        method: range method of :func:`onnxq.calibration.weight_ranges` (``mse`` ≤ 4 bits).
    """

    tensor: str
    precision: Precision
    axis: int | None
    symmetric: bool
    narrow: bool
    method: str
    block_size: int = 0
    reduce_range: bool = False


@dataclass(frozen=True)
class WeightPerturbation:
    """``W ← W + sign · ΔW``: quantization noise (``quantizer``) or ``eps`` · a Rademacher vector."""

    tensor: str
    sign: float = 1.0
    quantizer: WeightQuantizer | None = None
    direction: int = -1
    eps: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class ActivationQuant:
    """Fake-quantize activation ``tensor`` at ``precision`` with its calibrated range, or with
    each call's own range when ``dynamic``."""

    tensor: str
    precision: Precision
    symmetric: bool
    dynamic: bool = False


@dataclass(frozen=True)
class Job:
    """One evaluation: all the perturbations applied at once.

    ``segments`` names the layers (:class:`Segment` s) whose cut sessions run the job, chained
    in graph order, starting from the cached fp32 cut tensors; empty: the job runs in a model
    built for it (:func:`onnxq.simulate.bake`) — validation plans that touch many layers.
    """

    weights: tuple[WeightPerturbation, ...] = ()
    activations: tuple[ActivationQuant, ...] = ()
    segments: tuple[str, ...] = ()


@dataclass(frozen=True)
class Segment:
    """Where a layer's perturbations enter the graph: its weight and input activations.

    The layer's cut session ("suffix") holds every node downstream of those tensors; its inputs
    are the cut tensors (the layer's input activations and whatever else the suffix consumes
    from upstream), its outputs the graph outputs it produces plus the cut tensors of the
    ``partners`` (layers it is chained with in pair jobs) that it produces.
    """

    name: str
    weights: tuple[str, ...]
    activations: tuple[str, ...]
    partners: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalContext:
    """Everything a worker needs to build its own session (picklable).

    Attributes:
        model_bytes: the serialized fp32 model, whose graph inputs may include weights
            given in ``weights``.
        feeds: the calibration feeds.
        activation_tensors: tensors that get a (disabled) fake-quant subgraph.
        weight_tensors: weights exposed as session inputs.
        ranges: calibrated ``(min, max)`` per activation tensor.
        loss: ``kl`` or ``mse``.
        reference: fp32 outputs per feed (set once by the parent; workers never recompute it).
        segments: the layers that get a cut session (jobs with ``segments`` run through them).
        cache_bytes: memory budget of the cached fp32 cut tensors: the feeds are processed in
            chunks that fit it (:func:`plan_chunks`).
        weights: values of the graph inputs that are the model's large weights
            (:func:`detach_weights`): one copy, shared by every session of an evaluator (and
            put in Ray's object store once).
    """

    model_bytes: bytes
    feeds: tuple[dict[str, np.ndarray], ...]
    activation_tensors: tuple[str, ...]
    weight_tensors: tuple[str, ...]
    ranges: Mapping[str, tuple[float, float]]
    loss: str
    reference: tuple[tuple[np.ndarray, ...], ...] | None = field(default=None, compare=False)
    segments: tuple[Segment, ...] = ()
    cache_bytes: int = 1 << 30
    weights: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False)
    #: intra-op threads of every session (0: onnxruntime's default, one per core); parallel
    #: executors give each worker its share of the cores
    threads: int = 0
    #: relative standard error at which a segment job stops early (0: every job runs on every
    #: sample; see :func:`converged`)
    tolerance: float = 0.0


def _round_bf16(w: np.ndarray) -> np.ndarray:
    as_int = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = (as_int + np.uint32(0x7FFF) + ((as_int >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def weight_noise(w: np.ndarray, quantizer: WeightQuantizer) -> np.ndarray:
    """``Q(W) − W`` for one quantizer, float32."""
    w = np.asarray(w, dtype=np.float32)
    precision = quantizer.precision
    if precision is Precision.FP16:
        return (w.astype(np.float16).astype(np.float32) - w).astype(np.float32)
    if precision is Precision.BF16:
        return (_round_bf16(w) - w).astype(np.float32)
    if not is_integer(precision):
        logger.debug("no weight-noise model for %s; treated as exact", precision)
        return np.zeros_like(w)
    if quantizer.block_size:
        return (fake_quantize_blockwise(w, precision, quantizer.block_size, quantizer.symmetric,
                                        quantizer.narrow) - w).astype(np.float32)
    lo, hi = weight_ranges(w, quantizer.axis, precision, quantizer.symmetric, method=quantizer.method)
    q = qparams_from_range(lo, hi, precision, quantizer.symmetric, narrow=quantizer.narrow, axis=quantizer.axis,
                           reduce_range=quantizer.reduce_range)
    return (fake_quantize(w, q) - w).astype(np.float32)


def rademacher(shape: tuple[int, ...], seed: int, direction: int) -> np.ndarray:
    """A deterministic ±1 tensor (``seed``, ``direction`` pick it)."""
    rng = np.random.default_rng([int(seed), int(direction)])
    return (rng.integers(0, 2, size=shape, dtype=np.int8) * 2 - 1).astype(np.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _is_logits(x: np.ndarray) -> bool:
    return x.dtype.kind == "f" and x.ndim == 2 and x.shape[-1] >= 2


def loss_between(
    kind: str,
    reference: Sequence[Sequence[np.ndarray]],
    outputs: Sequence[Sequence[np.ndarray]],
    reference_log_probs: Sequence[Sequence[np.ndarray | None]] | None = None,
) -> float:
    """The label-free loss of ``outputs`` against ``reference`` over all feeds.

    ``kl``: mean over samples of KL(softmax(ref) ‖ softmax(out)) on 2-D logit outputs (other
    outputs add their MSE); ``mse``: mean squared error over all output elements.
    """
    rows = sample_losses(kind, reference, outputs, reference_log_probs)
    return math.fsum(rows) / max(rows.size, 1)


def sample_losses(
    kind: str,
    reference: Sequence[Sequence[np.ndarray]],
    outputs: Sequence[Sequence[np.ndarray]],
    reference_log_probs: Sequence[Sequence[np.ndarray | None]] | None = None,
) -> np.ndarray:
    """The per-sample terms of :func:`loss_between`, float64, in feed and output order.

    Callers sum them with :func:`math.fsum`, which is exact: a job's loss is then the same
    to the last bit in whatever order its chunks ran and were added up.
    """
    parts: list[np.ndarray] = []
    for f, (ref, out) in enumerate(zip(reference, outputs, strict=True)):
        for o, (r, y) in enumerate(zip(ref, out, strict=True)):
            if r.dtype.kind != "f":
                continue
            if kind == "kl" and _is_logits(r):
                log_p = reference_log_probs[f][o] if reference_log_probs is not None else None
                if log_p is None:
                    log_p = _log_softmax(r)
                log_q = _log_softmax(y)
                per_row = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
            else:
                diff = r.astype(np.float64) - y.astype(np.float64)
                rows = r.shape[0] if r.ndim else 1
                per_row = np.sum((diff * diff).reshape(rows, -1), axis=1) / max(r.size // max(rows, 1), 1)
            parts.append(np.asarray(per_row, dtype=np.float64).reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0)


def _session(model: onnx.ModelProto, threads: int = 0) -> object:
    """An optimized CPU session for many short runs (``threads`` intra-op threads; 0: one per core).

    Intra-op threads do not spin between runs (spinning costs more than it saves when runs last
    milliseconds or the CPU is shared); no memory arena, so a session idle between its jobs keeps
    no activation buffers (dozens of cut sessions live at once); no weight prepacking, which
    would give every session its own packed copy of the shared weights.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return create_session(model, options, ["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - the shared helper reports the error in onnxq's words
        return make_session(model, threads=threads)


def _has_subgraphs(model: onnx.ModelProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for node in model.graph.node for a in node.attribute)


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    graph = model.graph
    return {vi.name: vi.type for vi in [*graph.input, *graph.value_info, *graph.output]
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}


def _is_shared(tensor: onnx.TensorProto, conv_inputs: set[str], min_bytes: int, conv_min_bytes: int) -> bool:
    nbytes = int(np.prod(tensor.dims, dtype=np.int64)) * 4
    return tensor.data_type == onnx.TensorProto.FLOAT and nbytes >= (
        conv_min_bytes if tensor.name in conv_inputs else min_bytes)


def _conv_inputs(graph: onnx.GraphProto) -> set[str]:
    return {t for node in graph.node if node.op_type in _CONV_OPS for t in node.input}


def _as_inputs(graph: onnx.GraphProto, shared: Mapping[str, np.ndarray]) -> None:
    inputs = {i.name for i in graph.input}
    for name, value in shared.items():
        if name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(value.shape)))


def split_shared_weights(model: onnx.ModelProto, min_bytes: int = SHARED_MIN_BYTES,
                         conv_min_bytes: int = SHARED_CONV_MIN_BYTES) -> dict[str, np.ndarray]:
    """Move ``model``'s float initializers of at least ``min_bytes`` (``conv_min_bytes`` for
    those a convolution consumes) out of it, in place.

    Each one becomes a graph input of the same name, type and shape, and its value is returned:
    every session built from the model is then fed the same arrays (onnxruntime does not copy
    contiguous CPU inputs), so no session holds a copy of the weights. ``add_initializer`` with
    shared OrtValues was measured to cost a full copy per session anyway (onnxruntime 1.32).
    Small tensors (shapes, biases, scalars) stay initializers: constant folding needs them.
    """
    graph = model.graph
    conv_inputs = _conv_inputs(graph)
    shared: dict[str, np.ndarray] = {}
    keep = []
    for tensor in graph.initializer:
        if _is_shared(tensor, conv_inputs, min_bytes, conv_min_bytes):
            shared[tensor.name] = onnx.numpy_helper.to_array(tensor)
        else:
            keep.append(tensor)
    if not shared:
        return shared
    del graph.initializer[:]
    graph.initializer.extend(keep)
    _as_inputs(graph, shared)
    return shared


def detach_weights(model: onnx.ModelProto, extra_value_info: Sequence[onnx.ValueInfoProto] = ()
                   ) -> tuple[bytes, dict[str, np.ndarray]]:
    """``model`` as :class:`EvalContext` carries it: the serialized graph without the weights
    :func:`split_shared_weights` would move (they are graph inputs) and those weights as arrays.

    ``model`` is not modified and its weights are copied once (into the arrays), never into a
    second proto: this is how a model of several GB enters the analysis. ``extra_value_info``
    (inferred shapes) is added to the graph.
    """
    conv_inputs = _conv_inputs(model.graph)
    names = frozenset(t.name for t in model.graph.initializer
                      if _is_shared(t, conv_inputs, SHARED_MIN_BYTES, SHARED_CONV_MIN_BYTES))
    skeleton, shared = detach_initializers(model, names)
    known = {vi.name for vi in skeleton.graph.value_info}
    skeleton.graph.value_info.extend(vi for vi in extra_value_info if vi.name not in known)
    return skeleton.SerializeToString(), shared


def with_weights(model: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs named in ``weights`` are initializers again."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    keep = [i for i in copy.graph.input if i.name not in weights]
    del copy.graph.input[:]
    copy.graph.input.extend(keep)
    copy.graph.initializer.extend(onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in weights.items())
    return copy


def _feed_bytes(feed: Mapping[str, np.ndarray]) -> int:
    return sum(np.asarray(v).nbytes for v in feed.values())


def _split_feed(feed: Mapping[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    rows = feed_samples(feed)
    return [{k: v[i:i + size] for k, v in feed.items()} for i in range(0, rows, size)]


def batch_splittable(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]]) -> bool:
    """Whether the feeds can be cut along axis 0: every graph input declares a dynamic leading
    dimension and every array of a feed has the same leading size."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits and any(i.name in f for f in feeds)]
    if not inputs or not all(i.type.tensor_type.HasField("shape") and len(i.type.tensor_type.shape.dim) > 0
                             and not i.type.tensor_type.shape.dim[0].HasField("dim_value") for i in inputs):
        return False
    for feed in feeds:
        if len({np.asarray(v).shape[0] if np.ndim(v) else -1 for v in feed.values()} - {-1}) != 1:
            return False
        if any(np.ndim(v) == 0 for v in feed.values()):
            return False
    return True


def plan_chunks(feeds: Sequence[Mapping[str, np.ndarray]], bytes_per_input_byte: float, budget: int,
                splittable: bool) -> list[list[dict[str, np.ndarray]]]:
    """Group (and, when ``splittable``, cut) the feeds into chunks whose cached cut tensors,
    estimated as ``bytes_per_input_byte`` × the feeds' own bytes, stay within ``budget``.

    A feed that cannot be cut and alone exceeds the budget gets a chunk of its own (logged).
    """
    chunks: list[list[dict[str, np.ndarray]]] = []
    current: list[dict[str, np.ndarray]] = []
    used = largest = 0.0
    for feed in feeds:
        pieces = [dict(feed)]
        rows = feed_samples(feed) if splittable else 1
        per_row = bytes_per_input_byte * _feed_bytes(feed) / max(rows, 1)
        if splittable and per_row * rows > budget:
            pieces = _split_feed(feed, max(1, int(budget // max(per_row, 1.0))))
        for piece in pieces:
            need = bytes_per_input_byte * _feed_bytes(piece)
            if current and used + need > budget:
                chunks.append(current)
                current, used = [], 0.0
            largest = max(largest, need)
            current.append(piece)
            used += need
    if current:
        chunks.append(current)
    if largest > budget:
        logger.warning("sensitivity: %s needs %.1f MB of cached activations, above the memory budget of "
                       "%.1f MB; such chunks run alone, over the budget", "one sample" if splittable else
                       "one calibration feed (its batch cannot be split)", largest / 2**20, budget / 2**20)
    return chunks


class SuffixRunner:
    """Cut sessions: each segment's suffix of the graph, fed from cached fp32 cut tensors.

    An evaluation of layer ``i`` runs only the nodes downstream of ``i``'s weight and input
    activations; the activations themselves are fake-quantized in numpy
    (:func:`onnxq.simulate.fake_quantize_array`, the same arithmetic as the graph), so the cut
    sessions carry no fake-quant nodes. Every session takes the shared weights
    (:func:`split_shared_weights`) as inputs fed from one set of arrays. The cut tensors are
    cached for one chunk of feeds at a time (:meth:`load`); sessions are built lazily, once per
    segment, and serve every chunk.

    Raises:
        ValueError: the model has control-flow subgraphs or a cut tensor has no known type.
    """

    #: Bytes of fake-quantized cut tensors kept between jobs.
    FQ_CACHE_BYTES = 64 << 20

    def __init__(self, model: onnx.ModelProto, segments: Sequence[Segment], shared: Mapping[str, np.ndarray],
                 dynamic_batch: bool = False, threads: int = 0) -> None:
        if _has_subgraphs(model):
            raise ValueError("control-flow subgraphs")
        self.model = model
        self.shared = shared
        self.threads = threads
        self.dynamic_batch = dynamic_batch
        #: keep the cut tensors' dims that are the same over the first loaded chunk (off when
        #: several chunks of uncuttable feeds may differ in shape)
        self.static_shapes = True
        graph = model.graph
        self.nodes = list(graph.node)
        self.output_names = [o.name for o in graph.output]
        self.initializers = {t.name for t in graph.initializer} | set(shared)
        self.graph_inputs = [i.name for i in graph.input if i.name not in self.initializers]
        #: graph outputs no node reads: a job quantizing one (the Q at an integer target's
        #: output) fake-quantizes the final value in numpy, whichever session computed it
        self.terminal = set(self.output_names) - {t for node in self.nodes for t in node.input}
        self.segments = {seg.name: seg for seg in segments}
        #: per session key (``w:<layer>`` weight-only, ``a:<layer>`` weight and activations):
        #: the suffix's node indices, its cut tensors, and the layer activations it produces
        #: itself (fake-quantized inside the session, parameters as inputs)
        self.suffix: dict[str, list[int]] = {}
        self.cuts: dict[str, list[str]] = {}
        self.internal: dict[str, list[str]] = {}
        self._index_suffixes(segments)
        self.start = {key: (order[0] if order else len(self.nodes)) for key, order in self.suffix.items()}
        types = _value_types(model)
        self.wanted = list(dict.fromkeys(t for cut in self.cuts.values() for t in cut if t not in self.graph_inputs))
        missing = [t for t in self.wanted if t not in types]
        if missing:
            raise ValueError(f"no type for cut tensor {missing[0]!r}")
        self.types = types
        # keys with the same nodes and internal fake-quants share one session (exposing the
        # weights of all of them): a Conv's weight-only and activation suffixes usually coincide
        self.signature = {key: (tuple(order), tuple(self.internal[key])) for key, order in self.suffix.items()}
        self.group: dict[tuple, list[str]] = {}
        for key, sig in self.signature.items():
            self.group.setdefault(sig, []).append(key)
        self._sessions: dict[tuple, tuple[object, list[str], dict[str, np.ndarray]]] = {}
        self._probe: tuple[object, list[str]] | None = None
        self.cache: list[dict[str, np.ndarray]] = []
        self.reference: list[tuple[np.ndarray, ...]] = []
        self._fq_cache: OrderedDict[object, np.ndarray] = OrderedDict()
        self._fq_bytes = 0

    def _index_suffixes(self, segments: Sequence[Segment]) -> None:
        self._producer = {o: i for i, node in enumerate(self.nodes) for o in node.output if o}
        self._consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for t in node.input:
                if t:
                    self._consumers.setdefault(t, []).append(i)
        for seg in segments:
            for kind, starts in (("w", seg.weights), ("a", (*seg.weights, *seg.activations))):
                self._index(f"{kind}:{seg.name}", starts, seg.activations if kind == "a" else ())

    def _index(self, key: str, starts: Sequence[str], activations: Sequence[str]) -> None:
        """Session ``key``: every node downstream of ``starts``, its cut tensors, and which of
        ``activations`` it computes (and fake-quantizes) itself."""
        todo = [i for t in starts for i in self._consumers.get(t, ())]
        seen: set[int] = set()
        while todo:
            i = todo.pop()
            if i in seen:
                continue
            seen.add(i)
            for out in self.nodes[i].output:
                todo.extend(self._consumers.get(out, ()))
        # constants feeding the suffix travel with it (constant folding)
        for i in list(seen):
            for t in self.nodes[i].input:
                j = self._producer.get(t)
                if j is not None and j not in seen and self.nodes[j].op_type == "Constant":
                    seen.add(j)
        order = sorted(seen)
        produced = {o for i in order for o in self.nodes[i].output}
        cut = [t for i in order for t in self.nodes[i].input if t and t not in produced and t not in self.initializers]
        self.suffix[key] = order
        self.cuts[key] = list(dict.fromkeys(cut))
        self.internal[key] = list(dict.fromkeys(t for t in activations if t in produced))

    def _probe_session(self) -> tuple[object, list[str]]:
        """The fp32 model with every cut tensor as an extra output (the reference and the cache)."""
        if self._probe is None:
            probe = onnx.ModelProto()
            probe.CopyFrom(self.model)
            probe.ir_version = min(probe.ir_version, MAX_IR_VERSION)
            present = set(self.output_names)
            for t in self.wanted:
                if t not in present:
                    probe.graph.output.append(onnx.helper.make_tensor_value_info(
                        t, self.types[t].tensor_type.elem_type, None))
            session = _session(probe, self.threads)
            self._probe = session, [o.name for o in session.get_outputs()]  # type: ignore[attr-defined]
        return self._probe

    def load(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> int:
        """Run fp32 over ``feeds`` and cache their cut tensors and outputs (replacing the
        previous chunk); returns the cached bytes."""
        session, names = self._probe_session()
        self.cache, self.reference = [], []
        self._fq_cache.clear()
        self._fq_bytes = 0
        used = 0
        for feed in feeds:
            values = dict(zip(names, session.run(names, {**self.shared, **feed}), strict=True))  # type: ignore[attr-defined]
            kept = {t: values[t] for t in self.wanted}
            kept.update({k: np.asarray(v) for k, v in feed.items()})
            used += sum(v.nbytes for v in kept.values())
            self.reference.append(tuple(values[o] for o in self.output_names))
            self.cache.append(kept)
        return used

    def _build(self, key: str) -> tuple[object, list[str], dict[str, np.ndarray]]:
        members = self._members(key)
        order = self.suffix[key]
        produced = {o for i in order for o in self.nodes[i].output}
        partner_cuts = [] if key.startswith("u:") else [
            t for seg in members for p in seg.partners for k in ("w", "a") for t in self.cuts.get(f"{k}:{p}", ())
            if t in produced]
        outputs = list(dict.fromkeys([o for o in self.output_names if o in produced] + partner_cuts))
        used = {t for i in order for t in self.nodes[i].input}
        graph = self.model.graph
        shared = {t: self.shared[t] for t in used if t in self.shared}
        new = onnx.helper.make_graph(
            [self.nodes[i] for i in order], f"onnxq_suffix/{key}",
            [self._value_info(t, self.cache[0][t]) for t in self.cuts[key]]
            + [onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, list(v.shape)) for t, v in shared.items()],
            [onnx.helper.make_tensor_value_info(o, self.types[o].tensor_type.elem_type, None)
             if o in self.types else onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None)
             for o in outputs],
            [t for t in graph.initializer if t.name in used],
        )
        inner = {o for i in order for o in self.nodes[i].output} - set(outputs)
        new.value_info.extend(vi for vi in graph.value_info if vi.name in inner)
        for w in dict.fromkeys(w for seg in members for w in seg.weights):
            for t in new.initializer:
                if t.name == w:
                    new.input.append(onnx.helper.make_tensor_value_info(w, t.data_type, list(t.dims)))
        model = onnx.helper.make_model(new, opset_imports=list(self.model.opset_import),
                                       ir_version=min(self.model.ir_version, MAX_IR_VERSION))
        model.functions.extend(self.model.functions)
        if self.internal[key]:
            self._insert_internal_fake_quant(model, self.internal[key])
        return _session(model, self.threads), outputs, shared

    def _members(self, key: str) -> list[Segment]:
        """The segments whose weights session ``key`` exposes."""
        if key.startswith("u:"):
            return [self.segments[name] for name in key[2:].split("|")]
        return [self.segments[k[2:]] for k in self.group[self.signature[key]]]

    def _union(self, names: Sequence[str], acts: Mapping[str, object]) -> list[str] | None:
        """One session for layers whose suffixes overlap so that no chain of their own sessions
        works (two projections of one input: each one's suffix recomputes the other): every node
        downstream of any of them, with all their activations fake-quantized inside or at the
        cut. ``None`` when a per-call range would have to be computed inside."""
        key = "u:" + "|".join(sorted(names))
        if key not in self.suffix:
            segs = [self.segments[name] for name in sorted(names)]
            self._index(key, [t for seg in segs for t in (*seg.weights, *seg.activations)],
                        [t for seg in segs for t in seg.activations])
            self.signature[key] = (tuple(self.suffix[key]), tuple(self.internal[key]), key)
            self.group[self.signature[key]] = [key]
            self.start[key] = self.suffix[key][0] if self.suffix[key] else len(self.nodes)
        produced = {o for i in self.suffix[key] for o in self.nodes[i].output}
        for t, q in acts.items():
            if t in produced and t not in self.terminal and (t not in self.internal[key] or isinstance(q, DynamicQuant)):
                return None
        if any(t not in acts for t in self.internal[key]):
            return None
        return [key]

    def _insert_internal_fake_quant(self, model: onnx.ModelProto, tensors: Sequence[str]) -> None:
        """Always-on fake-quant (no ``Where``) of the layer's own activations produced in the suffix."""
        types = {t: self.types[t].tensor_type.elem_type for t in tensors}
        insert_fake_quant(model.graph, list(tensors), types)
        keep = [i for i in model.graph.input if not i.name.endswith("/enable")]
        del model.graph.input[:]
        model.graph.input.extend(keep)
        for node in model.graph.node:
            if node.op_type == "Where" and node.name.startswith("onnxq_fq/") and node.name.endswith("/Where"):
                node.op_type = "Identity"
                fq = node.input[1]
                del node.input[:]
                node.input.append(fq)

    def _value_info(self, name: str, first: np.ndarray) -> onnx.ValueInfoProto:
        shapes = {tuple(c[name].shape) for c in self.cache}
        dims: list[int | str] = [
            first.shape[k] if all(len(s) == first.ndim and s[k] == first.shape[k] for s in shapes)
            and self.static_shapes and not (k == 0 and self.dynamic_batch) else f"d{k}"
            for k in range(first.ndim)]
        elem = onnx.helper.np_dtype_to_tensor_dtype(first.dtype)
        return onnx.helper.make_tensor_value_info(name, elem, dims)

    def _quantized_cache(self, f: int, tensor: str, q: object) -> np.ndarray:
        """``fake_quantize_array`` of a cached fp32 cut tensor, memoised (bounded LRU)."""
        key = (f, tensor, q) if isinstance(q, DynamicQuant) else (
            f, tensor, np.asarray(q.scale).tobytes(), np.asarray(q.zero_point).tobytes(),  # type: ignore[attr-defined]
            q.qmin, q.qmax)  # type: ignore[attr-defined]
        hit = self._fq_cache.get(key)
        if hit is None:
            hit = fake_quantize_array(self.cache[f][tensor], q)  # type: ignore[arg-type]
            self._fq_cache[key] = hit
            self._fq_bytes += hit.nbytes
            while self._fq_bytes > self.FQ_CACHE_BYTES and len(self._fq_cache) > 1:
                self._fq_bytes -= self._fq_cache.popitem(last=False)[1].nbytes
        else:
            self._fq_cache.move_to_end(key)
        return hit

    def session(self, key: str) -> tuple[object, list[str], dict[str, np.ndarray]]:
        """The cut session of ``key`` (``w:<layer>`` or ``a:<layer>``), its output names and
        the shared weights it is fed."""
        sig = self.signature[key]
        hit = self._sessions.get(sig)
        if hit is None:
            hit = self._sessions[sig] = self._build(key)
        return hit

    def plan(self, segments: Sequence[str], acts: Mapping[str, object]) -> list[str] | None:
        """The session keys that run a job, in graph order; ``None`` if the cut sessions cannot.

        A segment whose activations the job quantizes runs its ``a:`` session, otherwise its
        ``w:`` one. Every quantized activation must enter every session that computes it either
        as a cut tensor (fake-quantized in numpy) or as one of its internal fake-quants; a
        session may also compute a quantized activation of a later ``a:`` session (a pair's
        second layer): that session takes it as a cut tensor, fake-quantized, or computes it
        again and fake-quantizes it inside, and recomputes everything downstream of it (an
        ``a:`` suffix holds every consumer of the layer's activations). Layers no chain serves
        run in one session built for them together (:meth:`_union`).
        """
        names = list(dict.fromkeys(segments))
        if any(name not in self.segments for name in names):
            return None
        keys = self._chain(names, acts)
        if keys is None and len(names) > 1:
            keys = self._union(names, acts)
        return keys

    def _chain(self, names: Sequence[str], acts: Mapping[str, object]) -> list[str] | None:
        keys = []
        for name in names:
            seg = self.segments[name]
            key = f"a:{name}" if any(t in acts for t in seg.activations) else f"w:{name}"
            if self.suffix[key]:  # an empty suffix (nothing of the layer perturbed) runs nothing
                keys.append(key)
        keys.sort(key=lambda k: (self.start[k], k))
        for k, key in enumerate(keys):
            later = keys[k + 1:]
            if not {other[2:] for other in later} <= set(self.segments[key[2:]].partners):
                return None
            produced = {o for i in self.suffix[key] for o in self.nodes[i].output}
            for t in (t for t in acts if t not in self.terminal):
                if t in produced and isinstance(acts[t], DynamicQuant) and t not in self.internal[key]:
                    return None  # a per-call range is not passed between sessions
                if t in produced and t not in self.internal[key] and not any(
                        other.startswith("a:") and t in self.segments[other[2:]].activations
                        and (t in self.cuts[other] or t in self.internal[other]) for other in later):
                    return None
            if any(t not in acts or isinstance(acts[t], DynamicQuant) for t in self.internal[key]):
                return None  # per-call ranges of tensors computed inside a session: not here
        if acts and not any(t in self.terminal for t in acts) and not any(
                t in self.cuts[key] or t in self.internal[key] for key in keys for t in acts):
            return None
        return keys

    def run(self, keys: Sequence[str], weights: Mapping[str, np.ndarray],
            acts: Mapping[str, object]) -> list[tuple[np.ndarray, ...]]:
        """The graph outputs per cached feed with ``weights`` replaced and ``acts``
        fake-quantized, running the sessions ``keys`` (from :meth:`plan`) in order."""
        inside = {t for key in keys for t in self.internal[key]}
        requantized = [(k, acts[o]) for k, o in enumerate(self.output_names)
                       if o in self.terminal and o in acts and o not in inside]
        out = []
        for f, cache in enumerate(self.cache):
            values: dict[str, np.ndarray] = {}
            for key in keys:
                session, names, shared = self.session(key)
                feed = dict(shared)
                for t in self.cuts[key]:
                    q = acts.get(t)
                    if t in values:
                        feed[t] = values[t] if q is None else fake_quantize_array(values[t], q)  # type: ignore[arg-type]
                    else:
                        feed[t] = cache[t] if q is None else self._quantized_cache(f, t, q)
                for t in self.internal[key]:
                    q = acts[t]
                    dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.types[t].tensor_type.elem_type))
                    feed[fake_quant_input_name(t, "scale")] = np.asarray(q.scale, dtype=dt)  # type: ignore[attr-defined]
                    feed[fake_quant_input_name(t, "zero_point")] = np.asarray(q.zero_point).astype(dt)  # type: ignore[attr-defined]
                    feed[fake_quant_input_name(t, "qmin")] = np.asarray(q.qmin, dtype=dt)  # type: ignore[attr-defined]
                    feed[fake_quant_input_name(t, "qmax")] = np.asarray(q.qmax, dtype=dt)  # type: ignore[attr-defined]
                for w in dict.fromkeys(w for seg in self._members(key) for w in seg.weights):
                    if w in weights:
                        feed[w] = weights[w]
                values.update(zip(names, session.run(names, feed), strict=True))  # type: ignore[attr-defined]
            final = [values.get(o, self.reference[f][k]) for k, o in enumerate(self.output_names)]
            for k, q in requantized:
                final[k] = fake_quantize_array(final[k], q)  # type: ignore[arg-type]
            out.append(tuple(final))
        return out


#: Samples a job runs on before it may stop early (:func:`converged`); analyses on no more
#: samples than this (every one inside ``quantize``) use every sample for every job.
SEQUENTIAL_MIN_SAMPLES = 32


def converged(losses: Sequence[Sequence[np.ndarray]], active: Sequence[int], tolerance: float) -> set[int]:
    """The jobs among ``active`` whose mean loss is known well enough to stop: at least
    :data:`SEQUENTIAL_MIN_SAMPLES` samples and a standard error of the mean within
    ``tolerance`` × the larger of the job's mean and the median mean of the active jobs.

    Sequential estimation: a job's loss is a mean over samples, and once its standard error
    is small the remaining samples change the estimate by about that much. The floor at the
    median keeps a near-zero loss (a 16-bit grid, an insensitive layer) from running to the
    end for a relative precision that matters to no plan: the search adds losses up, so an
    error small against a typical term is small against every sum.

    ``losses[i]``: the per-sample losses (:func:`sample_losses`) of job ``i`` so far, chunk by chunk.
    """
    seen = {i: np.concatenate(losses[i]) if losses[i] else np.zeros(0) for i in active}
    means = {i: math.fsum(rows) / max(rows.size, 1) for i, rows in seen.items()}
    floor = float(np.median(list(means.values()))) if means else 0.0
    done = set()
    for i, rows in seen.items():
        n = rows.size
        if n < SEQUENTIAL_MIN_SAMPLES:
            continue
        variance = max(math.fsum(rows * rows) / n - means[i] ** 2, 0.0) * n / max(n - 1, 1)
        if math.sqrt(variance / n) <= tolerance * max(means[i], floor):
            done.add(i)
    return done


@dataclass(frozen=True)
class EvaluatorUsage:
    """What one evaluator's process used so far: the chunks it cut the feeds into, its largest
    cache of cut activations, its jobs that stopped before the last chunk, its peak RSS."""

    process: int
    chunks: int
    cached_bytes: int
    stopped_early: int
    peak_rss_mib: float

    @staticmethod
    def combined(usages: Sequence[EvaluatorUsage]) -> EvaluatorUsage | None:
        """Several workers as one: jobs are split between them, so early stops add up; the rest
        is the largest (every worker cuts the same chunks)."""
        if not usages:
            return None
        return EvaluatorUsage(-1, max(u.chunks for u in usages), max(u.cached_bytes for u in usages),
                              sum(u.stopped_early for u in usages), max(u.peak_rss_mib for u in usages))


class Evaluator:
    """Evaluates :class:`Job` s: cut sessions (:class:`SuffixRunner`) for the single-layer and
    pair jobs, chunk by chunk of the feeds; a model built per job for the validation plans; the
    one :class:`FakeQuantModel` session where cut sessions are not possible (logged).

    Memory: the model's weights once (:func:`split_shared_weights`; every session is fed the
    same arrays) plus one chunk of cached cut tensors, at most ``context.cache_bytes``
    (:func:`plan_chunks`). Jobs run inside each chunk, so a chunk's fp32 pass is run once.

    Args:
        context: model, feeds, tensors, ranges and loss; ``context.reference`` may be ``None``
            (then call :meth:`fp32_outputs` and :meth:`set_reference` first).
    """

    #: Bytes of weight noise kept between jobs (plans and pairs reuse every layer's noise), at
    #: most a quarter of the weights' own bytes (at least 32 MiB).
    NOISE_CACHE_BYTES = 256 << 20

    def __init__(self, context: EvalContext) -> None:
        self.context = context
        model = onnx.ModelProto()
        model.ParseFromString(context.model_bytes)
        inits = {t.name for t in model.graph.initializer} | set(context.weights)
        for name in context.weight_tensors:  # Constant-node weights become initializers, so they can be fed
            if name not in inits:
                constant_to_initializer(model.graph, name)
        split = split_shared_weights(model)
        self.shared = {**context.weights, **split}
        #: the model without its shared weights (they are graph inputs)
        self.model = model
        if split:  # parsed again so that the protobuf arena that held the weights is released
            self.model = onnx.ModelProto()
            self.model.ParseFromString(model.SerializeToString())
            del model
            model = self.model
        self._fq: FakeQuantModel | None = None
        self.suffix: SuffixRunner | None = None
        self.fallbacks: dict[str, int] = {}
        if context.segments and USE_CUT_SESSIONS:
            try:
                self.suffix = SuffixRunner(model, context.segments, self.shared,
                                           batch_splittable(model, context.feeds), context.threads)
            except ValueError as exc:
                logger.warning("sensitivity: no cut sessions (%s); every evaluation runs the whole model "
                               "in one fake-quant session (slower)", exc)
        small = {t.name: t for t in model.graph.initializer}
        self.weights: dict[str, np.ndarray] = {}
        for name in context.weight_tensors:
            if name in self.shared:
                self.weights[name] = self.shared[name]
            elif name in small:
                self.weights[name] = onnx.numpy_helper.to_array(small[name]).astype(np.float32)
        self._noise: OrderedDict[object, np.ndarray] = OrderedDict()
        self._noise_bytes = 0
        self._noise_budget = min(self.NOISE_CACHE_BYTES,
                                 max(32 << 20, sum(w.nbytes for w in self.weights.values()) // 4))
        self._log_probs: list[list[np.ndarray | None]] | None = None
        self._chunks: list[list[dict[str, np.ndarray]]] | None = None
        self._loaded: int | None = None
        self.evaluations = 0
        #: segment jobs that stopped before the last chunk (:func:`converged`)
        self.stopped_early = 0
        self.cached_bytes = 0
        if context.reference is not None:
            self.set_reference(context.reference)

    @property
    def fq(self) -> FakeQuantModel:
        """The one fake-quant session (built on first use; fed the shared weights like the cut sessions)."""
        if self._fq is None:
            self._fq = FakeQuantModel(self.model, self.context.activation_tensors,
                                      [w for w in self.context.weight_tensors if w not in self.shared])
        return self._fq

    def chunks(self) -> list[list[dict[str, np.ndarray]]]:
        """The feeds in chunks whose cached cut tensors fit ``context.cache_bytes``."""
        if self._chunks is None:
            feeds = [dict(f) for f in self.context.feeds]
            if self.suffix is None or not feeds:
                self._chunks = [feeds]
            else:
                first = _split_feed(feeds[0], 1)[0] if self.suffix.dynamic_batch else feeds[0]
                ratio = self.suffix.load([first]) / max(_feed_bytes(first), 1)
                self._chunks = plan_chunks(feeds, ratio, self._chunk_budget(feeds, ratio), self.suffix.dynamic_batch)
                self._loaded = None
                self.suffix.static_shapes = len(self._chunks) == 1 or self.suffix.dynamic_batch
                if len(self._chunks) > 1:
                    logger.info("sensitivity: feeds in %d chunks (about %.0f MB of cached activations per "
                                "input MB; memory budget %.0f MB)", len(self._chunks), ratio,
                                self.context.cache_bytes / 2**20)
        return self._chunks

    def _chunk_budget(self, feeds: Sequence[Mapping[str, np.ndarray]], ratio: float) -> float:
        """The memory budget, or less when jobs may stop early: chunks of
        :data:`SEQUENTIAL_MIN_SAMPLES` samples, so that a job can stop after the first."""
        budget = float(self.context.cache_bytes)
        rows = sum(feed_samples(f) for f in feeds)
        if self.context.tolerance > 0 and self.suffix is not None and self.suffix.dynamic_batch \
                and rows > SEQUENTIAL_MIN_SAMPLES:
            per_row = ratio * sum(_feed_bytes(f) for f in feeds) / rows
            budget = min(budget, per_row * SEQUENTIAL_MIN_SAMPLES * (1 + 1e-9))
        return budget

    @property
    def planned_chunks(self) -> int:
        """Chunks of feeds this evaluator has run (0 before its first segment job)."""
        return len(self._chunks or ())

    def _load(self, index: int) -> list[tuple[np.ndarray, ...]]:
        """Make chunk ``index`` current; its fp32 reference outputs."""
        chunk = self.chunks()[index]
        if self.suffix is None:
            assert len(self.chunks()) == 1
            return list(self.reference)
        if self._loaded != index:
            self.cached_bytes = max(self.cached_bytes, self.suffix.load(chunk))
            self._loaded = index
        return self.suffix.reference

    def _full_session(self, model: onnx.ModelProto) -> tuple[object, list[str]]:
        session = _session(model, self.context.threads)
        return session, [o.name for o in session.get_outputs()]  # type: ignore[attr-defined]

    def fp32_outputs(self) -> tuple[tuple[np.ndarray, ...], ...]:
        """Outputs of the model with nothing perturbed (the reference), one fp32 pass."""
        session, names = self._full_session(self.model)
        return tuple(tuple(session.run(names, {**self.shared, **f})) for f in self.context.feeds)  # type: ignore[attr-defined]

    def set_reference(self, reference: Sequence[Sequence[np.ndarray]]) -> None:
        self.reference = reference
        self._log_probs = self._log_probs_of(reference)

    def _log_probs_of(self, reference: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray | None]]:
        return [[_log_softmax(r) if self.context.loss == "kl" and _is_logits(r) else None for r in ref]
                for ref in reference]

    def _cached(self, key: object, make) -> np.ndarray:  # type: ignore[no-untyped-def]
        hit = self._noise.get(key)
        if hit is None:
            hit = make()
            self._noise[key] = hit
            self._noise_bytes += hit.nbytes
            while self._noise_bytes > self._noise_budget and len(self._noise) > 1:
                self._noise_bytes -= self._noise.popitem(last=False)[1].nbytes
        else:
            self._noise.move_to_end(key)
        return hit

    def _delta(self, p: WeightPerturbation) -> np.ndarray:
        w = self.weights[p.tensor]
        if p.quantizer is not None:
            quantizer = p.quantizer
            return self._cached(quantizer, lambda: weight_noise(w, quantizer))
        return p.eps * self._cached(("rademacher", p.tensor, p.seed, p.direction),
                                    lambda: rademacher(w.shape, p.seed, p.direction))

    def job_feeds(self, job: Job) -> tuple[dict[str, np.ndarray], dict[str, object]]:
        weights: dict[str, np.ndarray] = {}
        for p in job.weights:
            base = weights.get(p.tensor, self.weights[p.tensor])
            weights[p.tensor] = base + np.float32(p.sign) * self._delta(p)
        acts: dict[str, object] = {}
        for a in job.activations:
            if a.dynamic:
                acts[a.tensor] = DynamicQuant(a.precision)
                continue
            lo, hi = self.context.ranges[a.tensor]
            acts[a.tensor] = qparams_from_range(lo, hi, a.precision, a.symmetric)
        return weights, acts

    def _calibrated(self, acts: Mapping[str, object]) -> dict[str, object]:
        """``acts`` with per-call quantization replaced by the calibrated range over all feeds
        (an upper bound of its error), for the one fake-quant session whose parameters are inputs."""
        out = dict(acts)
        for tensor, q in acts.items():
            if isinstance(q, DynamicQuant):
                lo, hi = self.context.ranges[tensor]
                out[tensor] = qparams_from_range(lo, hi, q.precision, False)
        return out

    def _chunk_outputs(self, job: Job, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[Sequence[np.ndarray]]:
        """A segment job's outputs on the current chunk (cut sessions, else the fake-quant session)."""
        weights, acts = self.job_feeds(job)
        keys = self.suffix.plan(job.segments, acts) if self.suffix is not None else None
        if keys is not None:
            return self.suffix.run(keys, weights, acts)  # type: ignore[union-attr,return-value]
        reason = "no cut sessions" if self.suffix is None else "the job's layers cannot be chained in cut sessions"
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
        shared = {k: weights.get(k, v) for k, v in self.shared.items()}
        own = {k: v for k, v in weights.items() if k not in self.shared}
        return self.fq.run_all([{**shared, **f} for f in feeds], self._calibrated(acts), own)  # type: ignore[arg-type]

    def _plan_outputs(self, job: Job) -> list[Sequence[np.ndarray]]:
        """A validation plan's outputs: a model built for it, fed the shared weights, perturbed
        or not (baked in, the perturbed ones were copied into the model and again into its session)."""
        weights, acts = self.job_feeds(job)
        model = bake(self.model, acts, {k: v for k, v in weights.items() if k not in self.shared})  # type: ignore[arg-type]
        session, names = self._full_session(model)
        shared = {k: weights.get(k, v) for k, v in self.shared.items()}
        return [session.run(names, {**shared, **f}) for f in self.context.feeds]  # type: ignore[attr-defined]

    def losses(self, jobs: Sequence[Job], advance: Callable[[int], object] | None = None) -> list[float]:
        """The loss of each job against the fp32 reference.

        Segment jobs run chunk by chunk (each chunk's fp32 pass once, then every job on it) and
        their loss sums over the chunks; plan jobs run over all feeds in a model built for them.
        With ``context.tolerance`` set, a segment job stops before the next chunk once it has
        run on :data:`SEQUENTIAL_MIN_SAMPLES` samples and the standard error of its mean is
        within the tolerance (:func:`converged`). ``advance`` is called with the number of job ×
        chunk runs done or skipped.
        """
        seen: list[list[np.ndarray]] = [[] for _ in jobs]
        active = [i for i, job in enumerate(jobs) if job.segments and (job.weights or job.activations)]
        chunks = self.chunks() if active else []
        samples = 0
        for index, chunk in enumerate(chunks):
            # stop only at multiples of SEQUENTIAL_MIN_SAMPLES: the same samples whatever the
            # chunking (a smaller --memory-budget cuts the feeds into more chunks)
            if index and self.context.tolerance > 0 and samples % SEQUENTIAL_MIN_SAMPLES == 0:
                done = converged(seen, active, self.context.tolerance)
                if done:
                    self.stopped_early += len(done)
                    active = [i for i in active if i not in done]
                    if advance is not None:
                        advance(len(done) * (len(chunks) - index))
            if not active:
                break
            reference = self._load(index)
            log_probs = self._log_probs_of(reference) if self.suffix is not None else self._log_probs
            for i in active:
                seen[i].append(sample_losses(self.context.loss, reference, self._chunk_outputs(jobs[i], chunk),
                                             log_probs))
                if advance is not None:
                    advance(1)
            samples += sum(feed_samples(f) for f in chunk)
        for i, job in enumerate(jobs):
            if job.segments and (job.weights or job.activations):
                continue
            if job.weights or job.activations:
                seen[i].append(sample_losses(self.context.loss, self.reference, self._plan_outputs(job),
                                             self._log_probs))
            if advance is not None:
                advance(1)
        self.evaluations += len(jobs)
        for reason, count in sorted(self.fallbacks.items()):
            logger.warning("sensitivity: %d job runs on the whole-model fake-quant session (%s)", count, reason)
        self.fallbacks.clear()
        losses = [np.concatenate(rows) if rows else np.zeros(0) for rows in seen]
        return [math.fsum(rows) / rows.size if rows.size else 0.0 for rows in losses]

    def usage(self) -> EvaluatorUsage:
        """This evaluator's usage so far (workers send it back with each batch of losses)."""
        return EvaluatorUsage(os.getpid(), self.planned_chunks, self.cached_bytes, self.stopped_early, peak_rss_mib())

    def runs(self, jobs: Sequence[Job]) -> int:
        """Session runs :meth:`losses` reports through ``advance`` for ``jobs``."""
        segment = sum(1 for job in jobs if job.segments and (job.weights or job.activations))
        return segment * len(self.chunks()) + len(jobs) - segment

    def loss(self, job: Job) -> float:
        """The loss of one perturbed model against the fp32 reference."""
        return self.losses([job])[0]


#: Floor of the default activation-cache budget (small models: every feed in one chunk).
MIN_DEFAULT_BUDGET = 128 << 20


def _available_memory() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def default_memory_budget(model_bytes: int = 0) -> int:
    """The default bound on cached activations: a quarter of the bytes of the model's weights
    (at least :data:`MIN_DEFAULT_BUDGET`), never more than a quarter of the memory the kernel
    reports available (``MemAvailable``), at least 64 MiB.

    Tied to the model so that the analysis' peak memory is a small multiple of the model
    whatever the machine has free: chunking the feeds costs one fp32 pass per chunk, while a
    budget of a quarter of a big machine's memory made a 110M-parameter encoder hold 1.4 GB of
    activations next to 0.4 GB of weights.
    """
    return max(64 << 20, min(_available_memory() // 4, max(MIN_DEFAULT_BUDGET, int(model_bytes) // 4)))


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
