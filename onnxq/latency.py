"""Measured latency on the machine the target runs on: whole models and a per-layer table.

Latency here is never estimated: models run in real onnxruntime sessions (default session
options unless a thread count is given), each candidate interleaved with its reference in the
same process, round after round, so that load from other processes hits both alike. The
statistic is the median over rounds of the per-round ratio, with the interquartile range of
those ratios as the spread.

The per-layer table times each layer alone: a one-node model holding the layer's real weight,
fed with the layer's real inputs at the deploy shape (captured by running the fp32 model on a
deploy feed), against the same layer at each candidate, given either as a callback that builds
the candidate from the one-node model or as a quantized whole model whose region for the layer
is cut out (``region_builder``). Entries are cached on disk per machine, model hash, layer,
shapes and candidate; the table is built most work first within a time budget, and the pairs
left untimed are listed so that callers fall back to the cost model for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.shape_inference
import onnxruntime as ort

from onnxq.errors import ModelError, UsageError
from onnxq.graph import DEFAULT_LAYER_OPS, GraphView, constant_tensors, constant_value
from onnxq.model import atomic_write_text, model_sha256, shape_skeleton
from onnxq.runtime import make_session, runs_here

__all__ = [
    "TABLE_FORMAT",
    "CandidateBuilder",
    "Timing",
    "LatencyRatio",
    "LayerLatency",
    "LatencyTable",
    "machine_id",
    "runs_here",
    "time_interleaved",
    "measure_latency",
    "deploy_feeds",
    "capture_layer_inputs",
    "layer_model",
    "region_builder",
    "build_latency_table",
]

logger = logging.getLogger(__name__)

TABLE_FORMAT = "onnxq-latency-table/1"

#: Builds the candidate version of a one-layer fp32 model. Arguments: the one-layer model (the
#: layer's node, its real weight as an initializer, its other inputs as graph inputs at the deploy
#: shape) and the layer's real input values (for calibration). Returns the quantized model.
CandidateBuilder = Callable[[onnx.ModelProto, Mapping[str, np.ndarray]], onnx.ModelProto]

ModelSource = onnx.ModelProto | str | os.PathLike[str]
Feed = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Timing:
    """One session's time in an interleaved measurement.

    Attributes:
        median_ms: median over rounds of the time to run every feed once.
        ratio: median over rounds of this session's time / the reference's time in that round.
        ratio_low: 25th percentile of the per-round ratios.
        ratio_high: 75th percentile of the per-round ratios.
        rounds: number of timed rounds.
    """

    median_ms: float
    ratio: float
    ratio_low: float
    ratio_high: float
    rounds: int

    @property
    def spread(self) -> float:
        return self.ratio_high - self.ratio_low


@dataclass(frozen=True)
class LatencyRatio:
    """Candidate latency relative to a reference, measured interleaved in one process.

    ``ratio`` is the median of the per-round ratios, ``ratio_low``/``ratio_high`` their quartiles.
    """

    ratio: float
    ratio_low: float
    ratio_high: float
    reference_ms: float
    candidate_ms: float
    rounds: int

    @property
    def spread(self) -> float:
        return self.ratio_high - self.ratio_low


@dataclass(frozen=True)
class LayerLatency:
    """One (layer, candidate) entry of the latency table; times are per run of the deploy feed."""

    layer: str
    candidate: str
    shapes: str
    candidate_ms: float
    fp32_ms: float
    ratio: float
    spread: float
    cached: bool


@dataclass(frozen=True)
class LatencyTable:
    """Measured per-layer latencies; ``untimed`` pairs fall back to the cost model."""

    machine: str
    model_sha256: str
    entries: tuple[LayerLatency, ...]
    untimed: tuple[tuple[str, str, str], ...]
    seconds: float
    budget_seconds: float

    def ratio(self, layer: str, candidate: str) -> float | None:
        """Measured candidate / fp32 ratio of ``layer``, or None when it was not timed."""
        for entry in self.entries:
            if entry.layer == layer and entry.candidate == candidate:
                return entry.ratio
        return None

    @property
    def cache_hits(self) -> int:
        return sum(entry.cached for entry in self.entries)

    def summary(self) -> str:
        """One line: how much was measured, from cache, and what falls back to the cost model."""
        measured = len(self.entries) - self.cache_hits
        text = (f"latency table: {measured} layer×candidate pairs measured, {self.cache_hits} from cache "
                f"in {self.seconds:.1f} s (budget {self.budget_seconds:g} s)")
        if self.untimed:
            text += f"; {len(self.untimed)} not timed, they fall back to the cost model"
        return text


# -- timing ------------------------------------------------------------------------------------


def machine_id() -> str:
    """What a measured latency depends on besides the model: CPU, platform and onnxruntime."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()}-{platform.machine()}|{cpu}|{os.cpu_count()} cpus|onnxruntime {ort.__version__}"


def _run_all(session: ort.InferenceSession, feeds: Sequence[Feed], repeats: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        for feed in feeds:
            session.run(None, dict(feed))
    return time.perf_counter() - started


def time_interleaved(
    sessions: Mapping[str, ort.InferenceSession],
    feeds: Sequence[Feed],
    reference: str,
    *,
    budget_seconds: float = 2.0,
    min_rounds: int = 5,
    max_rounds: int = 50,
    warmup: int = 2,
    min_round_seconds: float = 0.01,
) -> dict[str, Timing]:
    """Time every session on the same feeds, interleaved round by round.

    A round runs each session over all ``feeds``, repeated so that the reference's share of a
    round lasts at least ``min_round_seconds`` (short runs are dominated by timer and scheduler
    noise), in an order rotated every round; rounds continue until ``max_rounds`` or until
    ``min_rounds`` are done and ``budget_seconds`` spent. Reported times are per pass over ``feeds``.
    """
    if reference not in sessions:
        raise UsageError(f"reference session {reference!r} is not among the sessions timed")
    if not feeds:
        raise UsageError("latency needs at least one feed")
    names = list(sessions)
    one_pass = 0.0
    for name in names:
        for run in range(warmup):
            last = _run_all(sessions[name], feeds)
            if name == reference and run >= 1:
                one_pass = last  # a warm run of the reference sizes the rounds (no extra run)
    if one_pass <= 0.0:
        one_pass = _run_all(sessions[reference], feeds)
    repeats = max(1, int(np.ceil(min_round_seconds / max(one_pass, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - started < budget_seconds):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_run_all(sessions[name], feeds, repeats) / repeats)
        rounds += 1
    base = np.array(times[reference])
    result = {}
    for name in names:
        ratios = np.array(times[name]) / base
        result[name] = Timing(
            median_ms=float(np.median(times[name]) * 1e3),
            ratio=float(np.median(ratios)),
            ratio_low=float(np.percentile(ratios, 25)),
            ratio_high=float(np.percentile(ratios, 75)),
            rounds=rounds,
        )
    return result


def deploy_feeds(feeds: Sequence[Feed], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Feeds at the deploy batch size, made from calibration feeds (stacked or one sample each).

    Samples are taken in order along axis 0 and grouped ``batch_size`` at a time; samples of
    different lengths (ragged text) are zero-padded at the end of each axis to the longest in
    their group, which is what padding token ids and attention masks look like. A last group
    shorter than ``batch_size`` is dropped unless it is the only one. Scalars pass through.
    """
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, not {batch_size}")
    samples: list[dict[str, np.ndarray]] = []
    for feed in feeds:
        arrays = {name: np.asarray(value) for name, value in feed.items()}
        count = min((a.shape[0] for a in arrays.values() if a.ndim), default=1)
        samples += [{n: a[i:i + 1] if a.ndim else a for n, a in arrays.items()} for i in range(count)]
    groups = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    if len(groups) > 1 and len(groups[-1]) < batch_size:
        groups.pop()
    return [{name: _stack_padded([sample[name] for sample in group]) for name in group[0]} for group in groups]


def _stack_padded(arrays: list[np.ndarray]) -> np.ndarray:
    if arrays[0].ndim == 0:
        return arrays[0]
    width = np.max([a.shape for a in arrays], axis=0)
    out = np.zeros((sum(a.shape[0] for a in arrays), *width[1:]), dtype=arrays[0].dtype)
    row = 0
    for array in arrays:
        out[(slice(row, row + array.shape[0]), *(slice(0, d) for d in array.shape[1:]))] = array
        row += array.shape[0]
    return out


def _session(model: ModelSource | ort.InferenceSession, threads: int) -> ort.InferenceSession:
    if isinstance(model, ort.InferenceSession):
        return model
    if isinstance(model, onnx.ModelProto):
        return make_session(model, threads=threads)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ModelError(f"onnxruntime cannot load {model}: {str(error).strip()[:200]}") from error


def measure_latency(
    candidate: ModelSource,
    reference: ModelSource | ort.InferenceSession,
    feeds: Sequence[Feed],
    *,
    budget_seconds: float = 2.0,
    min_rounds: int = 5,
    max_rounds: int = 50,
    threads: int = 0,
) -> LatencyRatio:
    """Latency of ``candidate`` relative to ``reference`` (e.g. fp32) on deploy-shape ``feeds``;
    a caller timing many candidates passes the reference's session once built."""
    sessions = {"reference": _session(reference, threads), "candidate": _session(candidate, threads)}
    timings = time_interleaved(sessions, feeds, "reference", budget_seconds=budget_seconds,
                               min_rounds=min_rounds, max_rounds=max_rounds)
    measured = timings["candidate"]
    return LatencyRatio(ratio=measured.ratio, ratio_low=measured.ratio_low, ratio_high=measured.ratio_high,
                        reference_ms=timings["reference"].median_ms, candidate_ms=measured.median_ms,
                        rounds=measured.rounds)


# -- one-layer models --------------------------------------------------------------------------


def _node_inputs(view: GraphView, layer: str) -> list[str]:
    """The layer node's inputs that are not constants (activations, and Gather's indices)."""
    return [t for t in view.nodes[layer].input if t and not view.is_constant(t)]


def capture_layer_inputs(model: onnx.ModelProto, view: GraphView, layers: Sequence[str],
                         feed: Feed) -> dict[str, np.ndarray]:
    """The real values of every non-constant input of ``layers`` on ``feed`` (one fp32 run)."""
    wanted = sorted({t for layer in layers for t in _node_inputs(view, layer)})
    graph_inputs = {value.name for value in model.graph.input}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {value.name for value in probe.graph.output}
    extra = [t for t in wanted if t not in existing and t not in graph_inputs]
    dtypes = dict(view.dtypes)
    if any(not dtypes.get(t) for t in extra):
        inferred = onnx.shape_inference.infer_shapes(shape_skeleton(model)).graph.value_info
        dtypes.update({value.name: value.type.tensor_type.elem_type for value in inferred})
    for tensor in extra:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, dtypes.get(tensor) or onnx.TensorProto.FLOAT, None))
    names = [value.name for value in probe.graph.output]
    outputs = dict(zip(names, make_session(probe).run(names, dict(feed)), strict=True))
    values = {t: np.asarray(feed[t]) for t in wanted if t in graph_inputs}
    values.update({t: outputs[t] for t in wanted if t in outputs})
    return values


def layer_model(model: onnx.ModelProto, view: GraphView, layer: str, inputs: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A model of the layer's node alone: real constants, other inputs fixed at their captured shapes."""
    node = view.nodes[layer]
    constants = constant_tensors(model.graph)
    initializers = []
    graph_inputs = []
    for tensor in dict.fromkeys(t for t in node.input if t):
        if tensor in constants:
            value = constant_value(constants[tensor][1])
            if value is None:
                raise ModelError(f"layer {layer}: constant {tensor} has a form onnxq cannot read")
            initializers.append(onnx.numpy_helper.from_array(np.asarray(value), tensor))
        else:
            array = inputs[tensor]
            dtype = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            graph_inputs.append(onnx.helper.make_tensor_value_info(tensor, dtype, list(array.shape)))
    output = onnx.helper.make_tensor_value_info(node.output[0], view.dtypes.get(node.output[0]) or onnx.TensorProto.FLOAT, None)
    one = onnx.NodeProto()
    one.CopyFrom(node)
    del one.output[1:]
    graph = onnx.helper.make_graph([one], f"{layer}-alone", graph_inputs, [output], initializer=initializers)
    built = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    built.ir_version = min(model.ir_version, 10) if model.ir_version else 10
    inferred = onnx.shape_inference.infer_shapes(built)
    if inferred.graph.output[0].type.tensor_type.HasField("shape"):
        built.graph.output[0].CopyFrom(inferred.graph.output[0])
    return built


def _quantized_output(quantizer: onnx.NodeProto, initializers: Mapping[str, onnx.TensorProto]) -> onnx.ValueInfoProto:
    """The value info of a QuantizeLinear output: the zero point's type (uint8 without one)."""
    zero_point = initializers.get(quantizer.input[2]) if len(quantizer.input) > 2 else None
    dtype = zero_point.data_type if zero_point is not None else onnx.TensorProto.UINT8
    return onnx.helper.make_tensor_value_info(quantizer.output[0], dtype, None)


def region_builder(quantized: ModelSource) -> CandidateBuilder:
    """A builder that cuts each layer's region out of an already quantized whole model.

    The region of a layer is everything the quantized model computes the layer's output tensor
    from the layer's own (float) input tensors: input Q/DQ or DynamicQuantizeLinear, weight DQ,
    the integer kernel and its rescaling, and the QuantizeLinear on its output when there is one
    (its cost is the layer's: the next layer reads the quantized tensor). A layer whose region
    does not start at those tensors (the quantizer renamed or re-routed them) cannot be cut; the
    table then leaves it untimed.
    """
    proto = quantized if isinstance(quantized, onnx.ModelProto) else onnx.load(str(quantized))
    graph = proto.graph
    producers = {out: (index, node) for index, node in enumerate(graph.node) for out in node.output if out}
    initializers = {init.name: init for init in graph.initializer}
    output_quantizers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input:
            output_quantizers.setdefault(node.input[0], []).append(node)

    def build(one_layer: onnx.ModelProto, inputs: Mapping[str, np.ndarray]) -> onnx.ModelProto:
        # a Q on the layer's output belongs to its region: onnxruntime fuses int8 kernels (QLinearConv,
        # QLinearMatMul, Gather on int8 data) only when the output is quantized
        layer_output = one_layer.graph.output[0].name
        quantizers = output_quantizers.get(layer_output, [])
        outputs = [q.output[0] for q in quantizers] or [layer_output]
        included: dict[int, onnx.NodeProto] = {}
        used_inputs: set[str] = set()
        used_initializers: set[str] = set()
        frontier, seen = list(outputs), set()
        while frontier:
            tensor = frontier.pop()
            if not tensor or tensor in seen:
                continue
            seen.add(tensor)
            if tensor in inputs:
                used_inputs.add(tensor)
            elif tensor in initializers:
                used_initializers.add(tensor)
            elif tensor in producers:
                index, node = producers[tensor]
                if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                    raise ModelError(f"the region of {outputs[0]} holds a control-flow node ({node.name})")
                included[index] = node
                frontier.extend(node.input)
            else:
                raise ModelError(f"in the quantized model, {outputs[0]} is not computed from the layer's inputs "
                                 f"({tensor} comes from outside the layer)")
        graph_inputs = [onnx.helper.make_tensor_value_info(t, onnx.helper.np_dtype_to_tensor_dtype(inputs[t].dtype),
                                                           list(inputs[t].shape)) for t in sorted(used_inputs)]
        graph_outputs = [_quantized_output(q, initializers) for q in quantizers] or list(one_layer.graph.output)
        region = onnx.helper.make_graph(
            [included[i] for i in sorted(included)], "region", graph_inputs, graph_outputs,
            initializer=[initializers[name] for name in sorted(used_initializers)])
        built = onnx.helper.make_model(region, opset_imports=list(proto.opset_import))
        built.ir_version = min(proto.ir_version, 10) if proto.ir_version else 10
        return built

    return build


# -- the table ---------------------------------------------------------------------------------


def _shapes_text(inputs: Mapping[str, np.ndarray], tensors: Sequence[str]) -> str:
    return ";".join("x".join(str(d) for d in inputs[t].shape) for t in tensors)


def _deploy_work(view: GraphView, layer: str, inputs: Mapping[str, np.ndarray]) -> int:
    """Multiply-accumulates (or copied elements) of ``layer`` at the captured deploy shapes."""
    node = view.nodes[layer]
    weight = view.layers[layer].weight
    first = inputs.get(_node_inputs(view, layer)[0]) if _node_inputs(view, layer) else None
    elements = int(first.size) if first is not None else 0
    if node.op_type == "Gather":
        return elements * int(weight.shape[-1]) if weight and weight.shape else elements
    if weight is not None and weight.shape:
        return elements * int(np.prod(weight.shape)) // max(1, int(weight.shape[0]))
    other = inputs.get(node.input[1]) if len(node.input) > 1 else None
    return elements * (int(other.shape[-1]) if other is not None and other.ndim else 1)


def _cache_path(cache_dir: Path, machine: str, model_sha: str) -> Path:
    machine_hash = hashlib.sha256(machine.encode()).hexdigest()[:12]
    return cache_dir / f"latency-{machine_hash}-{model_sha[:16]}.json"


def _read_cache(path: Path, machine: str, model_sha: str) -> dict[str, dict[str, float]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if data.get("format") != TABLE_FORMAT or data.get("machine") != machine or data.get("model_sha256") != model_sha:
        return {}
    return dict(data.get("entries", {}))


def _write_cache(path: Path, machine: str, model_sha: str, entries: Mapping[str, Mapping[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": TABLE_FORMAT, "machine": machine, "model_sha256": model_sha,
               "entries": {key: dict(entries[key]) for key in sorted(entries)}}
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


def _entry_key(layer: str, shapes: str, candidate: str, threads: int) -> str:
    return f"{layer}|{shapes}|{candidate}|threads={threads}"


def _reason(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:200]


def _time_layer(fp32: onnx.ModelProto, builder: CandidateBuilder, feed: Feed, budget: float,
                threads: int) -> dict[str, float]:
    """Build the candidate's one-layer model and time it interleaved with the fp32 one."""
    built = builder(fp32, feed)
    sessions = {"fp32": make_session(fp32, threads=threads), "candidate": make_session(built, threads=threads)}
    timings = time_interleaved(sessions, [feed], "fp32", budget_seconds=budget, min_rounds=5, max_rounds=200)
    measured = timings["candidate"]
    return {"candidate_ms": measured.median_ms, "fp32_ms": timings["fp32"].median_ms,
            "ratio": measured.ratio, "spread": measured.spread}


def build_latency_table(
    model: ModelSource,
    feed: Feed,
    builders: Mapping[str, CandidateBuilder],
    *,
    layers: Sequence[str] | None = None,
    layer_ops: frozenset[str] = DEFAULT_LAYER_OPS,
    budget_seconds: float = 60.0,
    per_pair_seconds: float = 0.3,
    cache_dir: str | os.PathLike[str] | None = None,
    threads: int = 0,
) -> LatencyTable:
    """Time every (layer, candidate) pair alone at the deploy shape of ``feed``.

    Args:
        model: the fp32 model (proto or path).
        feed: one deploy-shape feed of the whole model (batch size and sequence length as deployed).
        builders: candidate word -> builder of that candidate's one-layer model (a callback, or
            ``region_builder(quantized_model)``). Cache entries are keyed by the word: a caller whose
            emission of a candidate changes must change the word (or the cache folder).
        layers: the layers to time, in this order (default: every layer of the graph view, the most
            work at the deploy shape first, so that a short budget covers the layers that matter).
        budget_seconds: wall-clock budget for building sessions and timing; cache hits are free.
            Pairs not reached are listed in ``untimed``.
        per_pair_seconds: timing budget of one pair (after at least 5 interleaved rounds).
        cache_dir: where measured entries persist (None: no cache).
        threads: intra-op threads (0: onnxruntime's default).
    """
    started = time.perf_counter()
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    model_sha = model_sha256(proto)
    machine = machine_id()
    view = GraphView(proto, layer_ops)
    names = list(layers) if layers is not None else list(view.layers)
    cache_path = _cache_path(Path(cache_dir), machine, model_sha) if cache_dir is not None else None
    cached = _read_cache(cache_path, machine, model_sha) if cache_path else {}
    inputs = capture_layer_inputs(proto, view, names, feed) if budget_seconds > 0 or cached else {}
    if layers is None and inputs:
        names.sort(key=lambda name: (-_deploy_work(view, name, inputs), name))
    entries: list[LayerLatency] = []
    untimed: list[tuple[str, str, str]] = []
    fresh: dict[str, dict[str, float]] = {}
    for layer in names:
        tensors = _node_inputs(view, layer)
        shapes = _shapes_text(inputs, tensors) if inputs else "?"
        one_layer: onnx.ModelProto | None = None
        for candidate in sorted(builders):
            key = _entry_key(layer, shapes, candidate, threads)
            values = cached.get(key)
            if values is None:
                remaining = budget_seconds - (time.perf_counter() - started)
                if remaining <= 0:
                    untimed.append((layer, candidate, "time budget spent"))
                    continue
                try:
                    one_layer = one_layer or layer_model(proto, view, layer, inputs)
                    values = _time_layer(one_layer, builders[candidate], {t: inputs[t] for t in tensors},
                                         min(per_pair_seconds, remaining), threads)
                except Exception as error:  # a builder or a session failing leaves the pair to the cost model
                    untimed.append((layer, candidate, _reason(error)))
                    logger.debug("latency table: %s %s not timed: %s", layer, candidate, untimed[-1][2])
                    continue
                fresh[key] = values
            entries.append(LayerLatency(layer=layer, candidate=candidate, shapes=shapes,
                                        candidate_ms=values["candidate_ms"], fp32_ms=values["fp32_ms"],
                                        ratio=values["ratio"], spread=values["spread"], cached=key not in fresh))
    if cache_path and fresh:
        _write_cache(cache_path, machine, model_sha, {**cached, **fresh})
    table = LatencyTable(machine=machine, model_sha256=model_sha, entries=tuple(entries), untimed=tuple(untimed),
                         seconds=time.perf_counter() - started, budget_seconds=budget_seconds)
    logger.info("%s", table.summary())
    return table
