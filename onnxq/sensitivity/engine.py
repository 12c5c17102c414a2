"""Evaluation of perturbed models: the part of the sensitivity analysis that runs onnxruntime.

A :class:`Job` describes one perturbation *symbolically* (which weights move, by which noise,
which activations are fake-quantized at which precision), so that it is small, hashable and
cheap to send to a worker process or a Ray actor; an :class:`Evaluator` turns it into a feed of
its one :class:`~onnxq.simulate.FakeQuantModel` session and returns the label-free loss of the
outputs against the fp32 reference outputs.

Everything here is deterministic: weight noise is a pure function of the weight and the
quantizer, Rademacher directions come from ``numpy.random.default_rng([seed, index])``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.calibration import weight_ranges
from onnxq.calibration.sweep import MAX_IR_VERSION, make_session
from onnxq.numerics import fake_quantize, qparams_from_range
from onnxq.precision import Precision, is_integer
from onnxq.qdq_patterns import fake_quantize_blockwise
from onnxq.runtime import create_session
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
    "weight_noise",
    "rademacher",
    "loss_between",
]

logger = logging.getLogger(__name__)

#: Label-free losses: KL(softmax(fp32) ‖ softmax(quantized)) per sample, or mean squared error.
LOSSES = ("kl", "mse")


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
        model_bytes: the serialized fp32 model.
        feeds: the calibration feeds.
        activation_tensors: tensors that get a (disabled) fake-quant subgraph.
        weight_tensors: weights exposed as session inputs.
        ranges: calibrated ``(min, max)`` per activation tensor.
        loss: ``kl`` or ``mse``.
        reference: fp32 outputs per feed (set once by the parent; workers never recompute it).
        segments: the layers that get a cut session (jobs with ``segments`` run through them).
        cache_bytes: bound on the cached fp32 cut tensors; above it every job runs in the one
            :class:`FakeQuantModel` session (the slow, always available path).
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
    total = 0.0
    count = 0
    for f, (ref, out) in enumerate(zip(reference, outputs, strict=True)):
        for o, (r, y) in enumerate(zip(ref, out, strict=True)):
            if r.dtype.kind != "f":
                continue
            if kind == "kl" and _is_logits(r):
                log_p = reference_log_probs[f][o] if reference_log_probs is not None else None
                if log_p is None:
                    log_p = _log_softmax(r)
                log_q = _log_softmax(y)
                kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
                total += float(np.sum(kl))
                count += r.shape[0]
            else:
                diff = r.astype(np.float64) - y.astype(np.float64)
                rows = r.shape[0] if r.ndim else 1
                total += float(np.sum(diff * diff)) / max(r.size // max(rows, 1), 1)
                count += rows
    return total / max(count, 1)


def _session(model: onnx.ModelProto) -> object:
    """An optimized CPU session for many short runs: intra-op threads do not spin between runs
    (spinning threads cost more than they save when the runs last milliseconds or the CPU is
    shared)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return create_session(model, options, ["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - the shared helper reports the error in onnxq's words
        return make_session(model, optimize=True)


def _has_subgraphs(model: onnx.ModelProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for node in model.graph.node for a in node.attribute)


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    graph = model.graph
    return {vi.name: vi.type for vi in [*graph.input, *graph.value_info, *graph.output]
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}


class SuffixRunner:
    """Cut sessions: each segment's suffix of the graph, fed from cached fp32 cut tensors.

    An evaluation of layer ``i`` runs only the nodes downstream of ``i``'s weight and input
    activations; the activations themselves are fake-quantized in numpy
    (:func:`onnxq.simulate.fake_quantize_array`, the same arithmetic as the graph), so the cut
    sessions carry no fake-quant nodes and only the segment's weight as an input. Sessions are
    built lazily, once per segment.

    Raises:
        ValueError: the model has control-flow subgraphs, a cut tensor has no known type, or
            the cached cut tensors would exceed ``cache_bytes`` (the caller falls back).
    """

    #: Bytes of fake-quantized cut tensors kept between jobs.
    FQ_CACHE_BYTES = 128 << 20

    def __init__(self, model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]],
                 segments: Sequence[Segment], cache_bytes: int) -> None:
        if _has_subgraphs(model):
            raise ValueError("control-flow subgraphs")
        inits = {t.name for t in model.graph.initializer}
        constant_weights = [w for seg in segments for w in seg.weights if w not in inits]
        if constant_weights:  # Constant-node weights become initializers, so they can be fed
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            for w in constant_weights:
                constant_to_initializer(copy.graph, w)
            model = copy
        self.model = model
        graph = model.graph
        self.nodes = list(graph.node)
        self.output_names = [o.name for o in graph.output]
        self.initializers = {t.name for t in graph.initializer}
        self.graph_inputs = [i.name for i in graph.input if i.name not in self.initializers]
        producer = {o: i for i, node in enumerate(self.nodes) for o in node.output if o}
        consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for t in node.input:
                if t:
                    consumers.setdefault(t, []).append(i)
        self.segments = {seg.name: seg for seg in segments}
        #: per session key (``w:<layer>`` weight-only, ``a:<layer>`` weight and activations):
        #: the suffix's node indices, its cut tensors, and the layer activations it produces
        #: itself (fake-quantized inside the session, parameters as inputs)
        self.suffix: dict[str, list[int]] = {}
        self.cuts: dict[str, list[str]] = {}
        self.internal: dict[str, list[str]] = {}
        for seg in segments:
            for kind, starts in (("w", seg.weights), ("a", (*seg.weights, *seg.activations))):
                key = f"{kind}:{seg.name}"
                todo = [i for t in starts for i in consumers.get(t, ())]
                seen: set[int] = set()
                while todo:
                    i = todo.pop()
                    if i in seen:
                        continue
                    seen.add(i)
                    for out in self.nodes[i].output:
                        todo.extend(consumers.get(out, ()))
                # constants feeding the suffix travel with it (constant folding)
                for i in list(seen):
                    for t in self.nodes[i].input:
                        j = producer.get(t)
                        if j is not None and j not in seen and self.nodes[j].op_type == "Constant":
                            seen.add(j)
                order = sorted(seen)
                produced = {o for i in order for o in self.nodes[i].output}
                cut = [t for i in order for t in self.nodes[i].input
                       if t and t not in produced and t not in self.initializers]
                self.suffix[key] = order
                self.cuts[key] = list(dict.fromkeys(cut))
                self.internal[key] = [t for t in seg.activations if t in produced] if kind == "a" else []
        self.start = {key: (order[0] if order else len(self.nodes)) for key, order in self.suffix.items()}
        types = _value_types(model)
        wanted = list(dict.fromkeys(t for cut in self.cuts.values() for t in cut if t not in self.graph_inputs))
        missing = [t for t in wanted if t not in types]
        if missing:
            raise ValueError(f"no type for cut tensor {missing[0]!r}")
        self.types = types
        # one fp32 run with every cut tensor as an extra output: the reference and the cache
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.ir_version = min(probe.ir_version, MAX_IR_VERSION)
        present = set(self.output_names)
        for t in wanted:
            if t not in present:
                probe.graph.output.append(onnx.helper.make_tensor_value_info(t, types[t].tensor_type.elem_type, None))
        session = _session(probe)
        names = [o.name for o in session.get_outputs()]  # type: ignore[attr-defined]
        self.cache: list[dict[str, np.ndarray]] = []
        self.reference: list[tuple[np.ndarray, ...]] = []
        used = 0
        for feed in feeds:
            values = dict(zip(names, session.run(names, dict(feed)), strict=True))  # type: ignore[attr-defined]
            values.update({k: np.asarray(v) for k, v in feed.items()})
            used += sum(values[t].nbytes for t in wanted)
            if used > cache_bytes:
                raise ValueError(f"cut tensors exceed {cache_bytes} bytes")
            self.reference.append(tuple(values[o] for o in self.output_names))
            self.cache.append(values)
        # keys with the same nodes and internal fake-quants share one session (exposing the
        # weights of all of them): a Conv's weight-only and activation suffixes usually coincide
        self.signature = {key: (tuple(order), tuple(self.internal[key])) for key, order in self.suffix.items()}
        self.group: dict[tuple, list[str]] = {}
        for key, sig in self.signature.items():
            self.group.setdefault(sig, []).append(key)
        self._sessions: dict[tuple, tuple[object, list[str]]] = {}
        self._fq_cache: OrderedDict[object, np.ndarray] = OrderedDict()
        self._fq_bytes = 0

    def _build(self, key: str) -> tuple[object, list[str]]:
        members = [self.segments[k[2:]] for k in self.group[self.signature[key]]]
        order = self.suffix[key]
        produced = {o for i in order for o in self.nodes[i].output}
        partner_cuts = [t for seg in members for p in seg.partners for k in ("w", "a")
                        for t in self.cuts.get(f"{k}:{p}", ()) if t in produced]
        outputs = list(dict.fromkeys([o for o in self.output_names if o in produced] + partner_cuts))
        used = {t for i in order for t in self.nodes[i].input}
        graph = self.model.graph
        new = onnx.helper.make_graph(
            [self.nodes[i] for i in order], f"onnxq_suffix/{key}",
            [self._value_info(t, self.cache[0][t]) for t in self.cuts[key]],
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
            # always-on fake-quant (no Where) of the layer's own activations produced in the suffix
            types = {t: self.types[t].tensor_type.elem_type for t in self.internal[key]}
            insert_fake_quant(model.graph, self.internal[key], types)
            keep = [i for i in model.graph.input if not i.name.endswith("/enable")]
            del model.graph.input[:]
            model.graph.input.extend(keep)
            for node in model.graph.node:
                if node.op_type == "Where" and node.name.startswith("onnxq_fq/") and node.name.endswith("/Where"):
                    node.op_type = "Identity"
                    fq = node.input[1]
                    del node.input[:]
                    node.input.append(fq)
        session = _session(model)
        return session, outputs
    def _value_info(self, name: str, first: np.ndarray) -> onnx.ValueInfoProto:
        shapes = {tuple(c[name].shape) for c in self.cache}
        dims: list[int | str] = [first.shape[k] if all(len(s) == first.ndim and s[k] == first.shape[k] for s in shapes)
                                 else f"d{k}" for k in range(first.ndim)]
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

    def session(self, key: str) -> tuple[object, list[str]]:
        """The cut session of ``key`` (``w:<layer>`` or ``a:<layer>``) and its output names."""
        sig = self.signature[key]
        hit = self._sessions.get(sig)
        if hit is None:
            hit = self._sessions[sig] = self._build(key)
        return hit

    def plan(self, segments: Sequence[str], acts: Mapping[str, object]) -> list[str] | None:
        """The session keys that run a job, in graph order; ``None`` if the cut sessions cannot.

        A segment whose activations the job quantizes runs its ``a:`` session, otherwise its
        ``w:`` one. Every quantized activation must enter every session that computes it either
        as a cut tensor (fake-quantized in numpy) or as one of its internal fake-quants.
        """
        keys = []
        for name in dict.fromkeys(segments):
            seg = self.segments.get(name)
            if seg is None:
                return None
            key = f"a:{name}" if any(t in acts for t in seg.activations) else f"w:{name}"
            if self.suffix[key]:  # an empty suffix (nothing of the layer perturbed) runs nothing
                keys.append(key)
        keys.sort(key=lambda k: (self.start[k], k))
        for k, key in enumerate(keys):
            later = {other[2:] for other in keys[k + 1:]}
            if not later <= set(self.segments[key[2:]].partners):
                return None
            produced = {o for i in self.suffix[key] for o in self.nodes[i].output}
            if any(t in produced and t not in self.internal[key] for t in acts):
                return None
            if any(t not in acts or isinstance(acts[t], DynamicQuant) for t in self.internal[key]):
                return None  # per-call ranges of tensors computed inside a session: not here
        if not any(t in self.cuts[key] or t in self.internal[key] for key in keys for t in acts) and acts:
            return None
        return keys

    def run(self, keys: Sequence[str], weights: Mapping[str, np.ndarray],
            acts: Mapping[str, object]) -> list[tuple[np.ndarray, ...]]:
        """The graph outputs per feed with ``weights`` replaced and ``acts`` fake-quantized,
        running the sessions ``keys`` (from :meth:`plan`) in order."""
        out = []
        for f, cache in enumerate(self.cache):
            values: dict[str, np.ndarray] = {}
            for key in keys:
                session, names = self.session(key)
                feed = {}
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
                for w in self.segments[key[2:]].weights:
                    if w in weights:
                        feed[w] = weights[w]
                values.update(zip(names, session.run(names, feed), strict=True))  # type: ignore[attr-defined]
            out.append(tuple(values.get(o, self.reference[f][k]) for k, o in enumerate(self.output_names)))
        return out


class Evaluator:
    """Evaluates :class:`Job` s: cut sessions (:class:`SuffixRunner`) for the single-layer and
    pair jobs, a model built per job for the validation plans, and the one
    :class:`FakeQuantModel` session as the fallback when cut sessions are not possible.

    Args:
        context: model, feeds, tensors, ranges and loss; ``context.reference`` may be ``None``
            (then call :meth:`fp32_outputs` and :meth:`set_reference` first).
    """

    #: Bytes of weight noise kept between jobs (plans and pairs reuse every layer's noise).
    NOISE_CACHE_BYTES = 256 << 20

    def __init__(self, context: EvalContext) -> None:
        self.context = context
        model = onnx.ModelProto()
        model.ParseFromString(context.model_bytes)
        self.model = model
        self._fq: FakeQuantModel | None = None
        self.suffix: SuffixRunner | None = None
        if context.segments:
            try:
                self.suffix = SuffixRunner(model, context.feeds, context.segments, context.cache_bytes)
            except ValueError as exc:
                logger.info("sensitivity: no cut sessions (%s); using one fake-quant session", exc)
        inits = {t.name: t for t in model.graph.initializer}
        self.weights: dict[str, np.ndarray] = {}
        for name in context.weight_tensors:
            if name in inits:
                self.weights[name] = onnx.numpy_helper.to_array(inits[name]).astype(np.float32)
        for node in model.graph.node:
            if node.op_type == "Constant" and node.output and node.output[0] in context.weight_tensors:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.weights[node.output[0]] = onnx.numpy_helper.to_array(attr.t).astype(np.float32)
        self._noise: OrderedDict[object, np.ndarray] = OrderedDict()
        self._noise_bytes = 0
        self._log_probs: list[list[np.ndarray | None]] | None = None
        self.evaluations = 0
        if context.reference is not None:
            self.set_reference(context.reference)

    @property
    def fq(self) -> FakeQuantModel:
        """The one fake-quant session (built on first use)."""
        if self._fq is None:
            self._fq = FakeQuantModel(self.model, self.context.activation_tensors, self.context.weight_tensors)
        return self._fq

    def fp32_outputs(self) -> tuple[tuple[np.ndarray, ...], ...]:
        """Outputs of the model with nothing perturbed (the reference)."""
        if self.suffix is not None:
            return tuple(self.suffix.reference)
        session = make_session(self.model, optimize=True)
        names = [o.name for o in session.get_outputs()]
        return tuple(tuple(session.run(names, dict(f))) for f in self.context.feeds)

    def set_reference(self, reference: Sequence[Sequence[np.ndarray]]) -> None:
        self.reference = reference
        self._log_probs = [
            [_log_softmax(r) if self.context.loss == "kl" and _is_logits(r) else None for r in ref]
            for ref in reference
        ]

    def _cached(self, key: object, make) -> np.ndarray:  # type: ignore[no-untyped-def]
        hit = self._noise.get(key)
        if hit is None:
            hit = make()
            self._noise[key] = hit
            self._noise_bytes += hit.nbytes
            while self._noise_bytes > self.NOISE_CACHE_BYTES and len(self._noise) > 1:
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

    def outputs(self, job: Job) -> list[Sequence[np.ndarray]]:
        """The perturbed model's outputs per feed."""
        weights, acts = self.job_feeds(job)
        if not job.weights and not job.activations:
            return list(self.reference)
        keys = self.suffix.plan(job.segments, acts) if job.segments and self.suffix is not None else None
        if keys is not None:
            return self.suffix.run(keys, weights, acts)  # type: ignore[union-attr,return-value]
        if not job.segments:
            session = _session(bake(self.model, acts, weights))  # type: ignore[arg-type]
            names = [o.name for o in session.get_outputs()]  # type: ignore[attr-defined]
            return [session.run(names, dict(f)) for f in self.context.feeds]  # type: ignore[attr-defined]
        return self.fq.run_all(self.context.feeds, self._calibrated(acts), weights)  # type: ignore[arg-type]

    def loss(self, job: Job) -> float:
        """The loss of the perturbed model against the fp32 reference."""
        outputs = self.outputs(job)
        self.evaluations += 1
        return loss_between(self.context.loss, self.reference, outputs, self._log_probs)

    def losses(self, jobs: Sequence[Job]) -> list[float]:
        return [self.loss(job) for job in jobs]
