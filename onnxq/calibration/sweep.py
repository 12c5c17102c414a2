"""One onnxruntime sweep over the calibration feeds that collects statistics for many tensors.

The model is copied once; for every requested intermediate tensor it gains three scalar outputs
(``ReduceMin``, ``ReduceMax`` and a ``ReduceSum`` that reveals NaNs) and, for the histogram
methods, the tensor itself as an extra graph output. A single
:class:`onnxruntime.InferenceSession` (graph optimizations disabled, so the names survive) runs
over the feeds exactly once, and outputs are viewed as numpy arrays without a copy. Per tensor
only a running min/max and a fixed-size histogram are kept, so peak memory does not grow with
the number of feeds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.calibration.histogram import RunningHistogram, TensorStats
from onnxq.errors import CalibrationError, ModelError
from onnxq.model import MAX_IR_VERSION, detach_initializers, large_initializers, shape_skeleton
from onnxq.progress import Progress
from onnxq.runtime import make_session

__all__ = [
    "FLOAT_TYPES",
    "calibration_model",
    "check_feed",
    "check_tensors",
    "calibration_session",
    "model_input_names",
    "prepare_feeds",
    "reduction_model",
    "sessions_built",
    "sweep",
]

logger = logging.getLogger(__name__)

#: ONNX element types whose tensors can be calibrated.
FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
    }
)

_SESSIONS_BUILT = 0


def sessions_built() -> int:
    """How many calibration sessions this process has built (one per sweep; used by tests)."""
    return _SESSIONS_BUILT


def prepare_feeds(
    feeds: Sequence[Mapping[str, np.ndarray]] | Iterable[Mapping[str, np.ndarray]],
) -> Sequence[Mapping[str, np.ndarray]]:
    """The feeds as a sequence (a lazy sequence stays lazy; iterables are drained).

    Sequences are used as they are, so one that builds each batch on demand keeps memory flat;
    other iterables and onnxruntime ``CalibrationDataReader``s are drained into a list.

    Raises:
        CalibrationError: there is no feed at all.
    """
    if hasattr(feeds, "get_next") and not isinstance(feeds, Sequence):
        reader = feeds
        drained: list[Mapping[str, np.ndarray]] = []
        while (item := reader.get_next()) is not None:
            drained.append(item)
        result = drained
    elif isinstance(feeds, Sequence):
        result = feeds  # used as is: a lazy Sequence keeps memory flat
    else:
        result = list(feeds)
    if len(result) == 0:
        raise CalibrationError(
            "no calibration feeds were given",
            "pass at least one feed dict (input name -> array)",
        )
    return result


def model_input_names(model: onnx.ModelProto) -> tuple[list[str], set[str]]:
    """``(required inputs, all inputs)``; inputs backed by an initializer are optional."""
    inits = {t.name for t in model.graph.initializer}
    all_inputs = [i.name for i in model.graph.input]
    return [n for n in all_inputs if n not in inits], set(all_inputs)


def _known_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(shape_skeleton(model), strict_mode=False).graph
    except Exception as exc:  # noqa: BLE001 - inference is an optional refinement
        logger.debug("shape inference failed (%s); declaring extra outputs as float", exc)
        inferred = graph
    types: dict[str, int] = {}
    for vi in [*inferred.value_info, *inferred.input, *inferred.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def check_tensors(model: onnx.ModelProto, tensors: Sequence[str]) -> dict[str, int]:
    """Check that every name is a float activation of the main graph; returns known types.

    Raises:
        CalibrationError: a name is unknown, a weight, or a tensor of a non-float type.
    """
    graph = model.graph
    produced = {o for node in graph.node for o in node.output if o}
    _, inputs = model_input_names(model)
    inits = {t.name for t in graph.initializer}
    activations = produced | (inputs - inits)
    missing = [t for t in tensors if t not in activations]
    if missing:
        weights = [t for t in missing if t in inits]
        if weights:
            raise CalibrationError(
                f"tensor {weights[0]!r} is a weight initializer, not an activation",
                "calibrate weights with onnxq.calibration.weight_ranges",
            )
        shown = ", ".join(repr(t) for t in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CalibrationError(
            f"tensor(s) {shown}{more} not found in the model's main graph",
            "name graph inputs or node outputs (see `onnxq inspect`)",
        )
    types = _known_types(model)
    for t in tensors:
        elem = types.get(t)
        if elem is not None and elem not in FLOAT_TYPES:
            raise CalibrationError(
                f"tensor {t!r} has element type {onnx.TensorProto.DataType.Name(elem)}, not float",
                "only float activations are calibrated",
            )
    return types


def calibration_model(
    model: onnx.ModelProto, outputs: Sequence[str], types: Mapping[str, int] | None = None
) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``outputs`` (IR version at most 10).

    Tensors without type information are declared FLOAT with unknown shape.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = min(copy.ir_version, MAX_IR_VERSION)
    types = types or {}
    existing = {o.name for o in copy.graph.output}
    for name in outputs:
        if name in existing:
            continue
        elem = types.get(name, onnx.TensorProto.FLOAT)
        copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
        existing.add(name)
    return copy


def reduction_model(
    model: onnx.ModelProto, tensors: Sequence[str], types: Mapping[str, int] | None = None
) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` that outputs ``ReduceMin``, ``ReduceMax`` and ``ReduceSum`` of each tensor.

    The min/max-only sweep fetches three scalars per tensor instead of the whole tensor, and
    onnxruntime releases every intermediate as soon as it is reduced and its model consumers
    have run (the reductions follow their producers in the node list; on a 22M encoder over
    batches of 16 the sweep's run grows RSS by 50 MB instead of 940 MB). ``ReduceSum`` is there
    for NaN detection (onnxruntime's ``ReduceMin``/``ReduceMax`` may skip NaNs). Returns the
    model and the output names, three per tensor in the order min, max, sum.
    """
    copy = calibration_model(model, [], None)
    types = types or {}
    names: list[str] = []
    reductions: dict[str, list[onnx.NodeProto]] = {}
    for t in tensors:
        elem = types.get(t, onnx.TensorProto.FLOAT)
        for op, what in (("ReduceMin", "min"), ("ReduceMax", "max"), ("ReduceSum", "sum")):
            out = f"onnxq_calib/{t}/{what}"
            reductions.setdefault(t, []).append(
                onnx.helper.make_node(op, [t], [out], name=f"onnxq_calib/{t}/{op}", keepdims=0))
            copy.graph.output.append(onnx.helper.make_tensor_value_info(out, elem, []))
            names.append(out)
    # each tensor's reductions right after its producer: run in node order
    # (calibration_session), the tensor is released as soon as the model is done with it
    produced = {output for node in copy.graph.node for output in node.output}
    nodes = [node for t in tensors if t not in produced for node in reductions.pop(t, [])]  # graph inputs
    for node in copy.graph.node:
        nodes.append(node)
        for output in node.output:
            nodes += reductions.pop(output, [])
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy, names


def calibration_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """The session a calibration sweep runs: graph optimizations off, so that every tensor the
    sweep reads is computed as the model states it (fusions would hide intermediate tensors)."""
    global _SESSIONS_BUILT
    try:
        session = make_session(model, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, node_order=True)
    except ModelError as exc:
        raise CalibrationError(f"cannot calibrate: {exc.message}", "check that the model runs in onnxruntime as given") from exc
    _SESSIONS_BUILT += 1
    return session


def check_feed(
    index: int, feed: Mapping[str, np.ndarray], required: Sequence[str], known: set[str]
) -> dict[str, np.ndarray]:
    """Validate one feed dict (names, finiteness) and return it as numpy arrays.

    Raises:
        CalibrationError: an input is missing or unknown, or contains NaN/Inf.
    """
    if not isinstance(feed, Mapping):
        raise CalibrationError(
            f"calibration feed {index} is a {type(feed).__name__}, not a dict",
            "each feed maps input names to arrays",
        )
    arrays = {name: np.asarray(value) for name, value in feed.items()}
    for name in required:
        if name not in arrays:
            raise CalibrationError(
                f"calibration feed {index} lacks the model input {name!r}",
                f"the model's inputs are: {', '.join(required)}",
            )
    for name, arr in arrays.items():
        if name not in known:
            raise CalibrationError(
                f"calibration feed {index} has key {name!r}, which is not a model input",
                f"the model's inputs are: {', '.join(required)}",
            )
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise CalibrationError(
                f"calibration feed {index}: input {name!r} contains NaN or Inf",
                "clean the calibration data (every value must be finite)",
            )
    return arrays


def sweep(
    model: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    tensors: Sequence[str],
    num_bins: int | None = None,
    progress: bool = False,
    types: Mapping[str, int] | None = None,
) -> dict[str, TensorStats]:
    """Run the model once over ``feeds`` and collect statistics of ``tensors``.

    Args:
        model: the fp32 model (not modified).
        feeds: complete feed dicts, one per batch.
        tensors: activation names (graph inputs or node outputs of the main graph), checked.
        num_bins: bins per sign of each histogram; ``None`` collects min/max only, reduced
            inside the graph (see :func:`reduction_model`).
        progress: show the progress over the feeds (:class:`~onnxq.progress.Progress`).
        types: known element types (from :func:`check_tensors`).

    Raises:
        CalibrationError: bad feeds. NaN/Inf values the model computes are left out of the
            statistics and counted in ``TensorStats.non_finite``.
    """
    required, known = model_input_names(model)
    input_names = [t for t in tensors if t in known]
    output_names = [t for t in tensors if t not in known]
    weights: dict[str, ort.OrtValue] = {}
    large = set(large_initializers(model))
    if large:  # the session is fed the weights: a reduction model and session with their own copies tripled them
        model, values = detach_initializers(model, large)
        weights = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in values.items()}
    stats = {
        t: TensorStats(histogram=RunningHistogram(num_bins) if num_bins else None)
        for t in tensors
    }
    # min, max and a NaN-revealing sum are reduced inside onnxruntime; histogram methods also
    # fetch the tensors themselves (viewed without a copy)
    reduced, fetch = reduction_model(model, output_names, types)
    with_tensors = num_bins is not None
    if with_tensors:
        existing = {o.name for o in reduced.graph.output}
        for name in output_names:
            if name not in existing:
                elem = (types or {}).get(name, onnx.TensorProto.FLOAT)
                reduced.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
        fetch = [*fetch, *output_names]
    session = calibration_session(reduced)
    fallbacks: dict[tuple[str, ...], ort.InferenceSession] = {}
    session_inputs = {i.name for i in session.get_inputs()}
    logger.debug("sweep over %d feeds for %d tensors", len(feeds), len(tensors))
    with Progress(len(feeds), "calibration", "batch", progress) as bar:
        for index, feed in enumerate(feeds):
            arrays = check_feed(index, feed, required, known)
            run_feed = {
                k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
                for k, v in arrays.items()
                if k in session_inputs
            }
            run_feed.update(weights)
            try:
                # OrtValue outputs are viewed by numpy without a copy (session.run copies each one)
                values = session.run_with_ort_values(fetch, run_feed) if fetch else []
            except Exception as exc:
                raise CalibrationError(
                    f"onnxruntime failed on calibration feed {index}: {str(exc).splitlines()[0]}",
                    "check the feed's shapes and dtypes against the model inputs",
                ) from exc
            n_red = 3 * len(output_names)
            scalars = [float(np.asarray(v.numpy())) for v in values[:n_red]]
            unclean: list[str] = []
            for k, name in enumerate(output_names):
                lo, hi, total = scalars[3 * k : 3 * k + 3]
                clean = _is_clean(lo, hi, total)
                if with_tensors:
                    _update(stats[name], name, _as_array(values[n_red + k]), index, (lo, hi) if clean else None)
                elif not clean:
                    unclean.append(name)
                elif lo <= hi:
                    stats[name].update_range(lo, hi)
            if unclean:
                # rare: fetch just these tensors whole and reduce their finite values here
                key = tuple(unclean)
                if key not in fallbacks:
                    fallbacks[key] = calibration_session(calibration_model(model, unclean, types))
                for name, value in zip(unclean, fallbacks[key].run(unclean, run_feed), strict=True):
                    finite = TensorStats()
                    _update(finite, name, np.asarray(value), index)
                    stats[name].non_finite += 1
                    if finite.count:
                        stats[name].update_range(finite.min, finite.max)
            for name in input_names:
                _update(stats[name], name, arrays[name], index)
            del values
            bar.update(1)
    for name, st in stats.items():
        if st.non_finite:
            logger.warning("tensor %r takes NaN or Inf values on %d of %d calibration feeds; its range "
                           "covers its finite values only", name, st.non_finite, len(feeds))
    return stats


def _as_array(value: object) -> object:
    if isinstance(value, ort.OrtValue) and value.is_tensor():
        return value.numpy()
    return value


def _is_clean(lo: float, hi: float, total: float) -> bool:
    """Whether a batch's in-graph reductions show no NaN/Inf (an empty tensor is clean)."""
    if lo == math.inf and hi == -math.inf:
        return True
    return not math.isnan(total) and math.isfinite(lo) and math.isfinite(hi)


def _update(
    stats: TensorStats,
    name: str,
    value: object,
    index: int,
    known: tuple[float, float] | None = None,
) -> None:
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        raise CalibrationError(
            f"tensor {name!r} is not a float tensor at run time ({type(value).__name__})",
            "only float activations are calibrated",
        )
    if value.dtype != np.float32 and value.dtype != np.float64:
        value = value.astype(np.float32)
    stats.update(value, known)
