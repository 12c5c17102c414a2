"""Calibration data: loading, checking against the model, batching, held-back split.

Accepted forms (DESIGN.md): a ``.npz`` whose keys are the model's input names with samples
stacked on axis 0; a directory of ``.npz`` files, each one complete feed; from Python any
iterable of ``dict[str, np.ndarray]`` or an onnxruntime ``CalibrationDataReader``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.errors import CalibrationError

__all__ = ["InputSpec", "FeedSet", "model_inputs", "batch_axes", "first_sample", "load_feeds", "find_sibling_calibration",
           "resolve_calibration_path", "feed_samples"]

logger = logging.getLogger(__name__)

_NP_OF_ONNX = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype, shape (``-1`` for dynamic dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class FeedSet:
    """Checked calibration feeds, split into calibration and held-back parts."""

    calibration: tuple[dict[str, np.ndarray], ...]
    held_back: tuple[dict[str, np.ndarray], ...]
    samples: int
    sha256: str

    @property
    def all(self) -> tuple[dict[str, np.ndarray], ...]:
        """Every feed once (with too few batches to hold one back, the held-back feeds are the
        calibration feeds themselves)."""
        calibrated = {id(feed) for feed in self.calibration}
        return self.calibration + tuple(f for f in self.held_back if id(f) not in calibrated)


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """Real inputs of the model (graph inputs that are not initializers)."""
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(_NP_OF_ONNX.get(tensor_type.elem_type, np.float32))
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


_UNNAMED = "?"  # a dynamic axis without a symbolic name


def _symbolic_dims(model: onnx.ModelProto) -> dict[str, list[str | None]]:
    """Per real input, the symbolic name of each axis (``None`` for fixed axes, ``_UNNAMED`` for unnamed dynamic ones)."""
    initializers = {init.name for init in model.graph.initializer}
    dims: dict[str, list[str | None]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = tensor_type.shape.dim if tensor_type.HasField("shape") else []
        dims[value.name] = [d.dim_param if d.HasField("dim_param") and d.dim_param else (_UNNAMED if not d.HasField("dim_value") else None)
                            for d in shape]
    return dims


def batch_axes(model: onnx.ModelProto) -> dict[str, int | None]:
    """Per real input, the axis that carries the samples (the batch), or ``None`` when it has none.

    The one place that decides where the batch is. The batch is the symbolic dimension that the
    most inputs share (ties: the one at the lowest axis, then the first input's), so a recurrent
    state ``[2, B, 128]`` beside ``x [B, 128]`` is batched on axis 1 and a ``[T, B, F]`` sequence
    beside its state on axis 1. Inputs without that symbol (fixed shapes, scalars) have no batch
    axis: they are fed whole as given. Without named dimensions, a dynamic axis 0 is the batch;
    a model with fixed shapes only has no batch axis.
    """
    dims = _symbolic_dims(model)
    votes: dict[str, tuple[int, int, int]] = {}  # symbol -> (inputs holding it, -lowest axis, -first input)
    for order, names in enumerate(dims.values()):
        for symbol in dict.fromkeys(n for n in names if n and n != _UNNAMED):
            count, lowest, first = votes.get(symbol, (0, -len(names), -order))
            votes[symbol] = (count + 1, max(lowest, -names.index(symbol)), first)
    if not votes:  # only unnamed dynamic dims: the batch is a dynamic axis 0, as exporters write it
        return {name: 0 if names[:1] == [_UNNAMED] else None for name, names in dims.items()}
    batch = max(votes, key=lambda symbol: votes[symbol])
    return {name: names.index(batch) if batch in names else None for name, names in dims.items()}


def feed_samples(feed: Mapping[str, np.ndarray]) -> int:
    """Samples in a stacked feed: the leading dimension of its first input (a feed of scalars is one)."""
    first = next(iter(feed.values()), None)
    return int(np.shape(first)[0]) if first is not None and np.ndim(first) > 0 else 1


def first_sample(feed: Mapping[str, np.ndarray], axes: Mapping[str, int | None]) -> dict[str, np.ndarray]:
    """The batch-1 slice of ``feed`` along each input's batch axis; inputs without one as given."""
    sliced = {}
    for name, array in feed.items():
        axis = axes.get(name)
        sliced[name] = np.take(array, [0], axis=axis) if axis is not None and array.ndim > axis else array
    return sliced


def find_sibling_calibration(model_path: Path) -> Path | None:
    """``<stem>.calib.npz`` or ``<stem>.calib/`` next to the model, if present."""
    for candidate in (model_path.with_name(f"{model_path.stem}.calib.npz"), model_path.with_name(f"{model_path.stem}.calib")):
        if candidate.exists():
            return candidate
    return None


def resolve_calibration_path(model: str, calib: str | None) -> str:
    """The calibration data to use: ``calib`` if given, else the model's sibling (never random data)."""
    if calib:
        return calib
    found = find_sibling_calibration(Path(model))
    if found is None:
        raise CalibrationError(f"no calibration data for {model!r}: --calib is missing and there is no "
                               f"{Path(model).stem}.calib.npz beside it", "pass --calib DATA (onnxq never calibrates on random data)")
    return str(found)


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
#: Stacked samples that fill fewer than two batches are cut into this many smaller ones.
MIN_BATCHES = 4


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Read every array of a ``.npz`` archive, refusing pickles and anything that is not an archive."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise CalibrationError(f"cannot read calibration file {str(path)!r}: {error.strerror}", "check its permissions") from error
    if magic == b"\x93NUM":
        raise CalibrationError(f"calibration file {str(path)!r} is a single .npy array, not a .npz archive",
                               "save it with numpy.savez(path, input_name=array) so that the keys name the model inputs")
    if magic not in _ZIP_MAGIC:
        raise CalibrationError(f"calibration file {str(path)!r} is not a .npz archive",
                               "save the data with numpy.savez(path, input_name=array)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {}
            for key in archive.files:
                value = archive[key]
                if not isinstance(value, np.ndarray):
                    raise CalibrationError(f"calibration file {str(path)!r}: member {key!r} is not a .npy array",
                                           "save the data with numpy.savez(path, input_name=array)")
                arrays[key] = np.asarray(value)
            return arrays
    except CalibrationError:
        raise
    except ValueError as error:
        if "pickle" in str(error).lower() or "object arrays" in str(error).lower():
            raise CalibrationError(f"calibration file {str(path)!r} holds pickled objects, which onnxq never loads",
                                   "save plain numeric arrays with np.savez") from error
        raise CalibrationError(f"calibration file {str(path)!r} holds a corrupt array ({' '.join(str(error).split())[:120]})",
                               "save the data again with numpy.savez(path, input_name=array)") from error
    except MemoryError as error:
        raise CalibrationError(f"calibration file {str(path)!r} declares arrays too large to load",
                               "use fewer calibration samples") from error
    except (OSError, zipfile.BadZipFile, EOFError, KeyError, TypeError, NotImplementedError, RuntimeError) as error:
        raise CalibrationError(f"calibration file {str(path)!r} is not a readable .npz archive",
                               "save the data with numpy.savez(path, input_name=array)") from error


def _raw_feeds(source: Any) -> tuple[list[dict[str, np.ndarray]], bool]:
    """Feeds from any accepted source, and whether they are stacked samples to re-batch."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise CalibrationError(f"calibration data {str(path)!r} does not exist", "pass a .npz file or a folder of .npz files")
        if path.is_dir():
            try:
                files = sorted(f for f in path.glob("*.npz") if f.is_file())
            except OSError as error:
                raise CalibrationError(f"cannot list calibration folder {str(path)!r}: {error.strerror}",
                                       "check its permissions") from error
            if not files:
                raise CalibrationError(f"calibration folder {str(path)!r} holds no .npz files", "put one .npz per feed in it")
            return [_read_npz(f) for f in files], False
        return [_read_npz(path)], True
    if hasattr(source, "get_next"):
        feeds = []
        while (item := source.get_next()) is not None:
            feeds.append({k: np.asarray(v) for k, v in item.items()})
        return feeds, False
    if isinstance(source, Mapping):
        return [{k: np.asarray(v) for k, v in source.items()}], True
    if isinstance(source, Iterable):
        feeds = []
        for item in source:
            if not isinstance(item, Mapping):
                raise CalibrationError("calibration iterable must yield dicts of input name → array",
                                       f"got {type(item).__name__}")
            feeds.append({k: np.asarray(v) for k, v in item.items()})
        return feeds, False
    raise CalibrationError(f"unsupported calibration data of type {type(source).__name__}",
                           "pass a .npz path, a folder, an iterable of dicts or a CalibrationDataReader")


def _check_feed(feed: dict[str, np.ndarray], inputs: Sequence[InputSpec], where: str, stacked: bool) -> dict[str, np.ndarray]:
    expected = {spec.name for spec in inputs}
    missing = sorted(expected - feed.keys())
    extra = sorted(feed.keys() - expected)
    if missing:
        raise CalibrationError(f"{where} lacks model input(s) {', '.join(missing)}" + (f" (it has {', '.join(extra)})" if extra else ""),
                               f"the keys must be the model's input names: {', '.join(sorted(expected))}")
    if extra:
        logger.warning("%s: ignoring arrays %s that are not model inputs", where, ", ".join(extra))
    checked = {}
    for spec in inputs:
        array = feed[spec.name]
        if array.dtype.kind not in "fiub":
            raise CalibrationError(f"{where}: input {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}",
                                   "save plain numeric arrays")
        if stacked and array.ndim == 0:
            raise CalibrationError(
                f"{where}: input {spec.name!r} is a scalar, but a single .npz stacks samples along axis 0",
                "stack samples along axis 0, or pass a folder of .npz files (one complete feed each) for scalar inputs")
        if spec.shape is not None and not stacked and array.ndim != len(spec.shape):
            raise CalibrationError(
                f"{where}: input {spec.name!r} has rank {array.ndim} (shape {array.shape}), the model expects rank "
                f"{len(spec.shape)} {spec.shape}", "each .npz in a folder is one complete feed with the model's input shapes")
        if array.dtype.kind != spec.dtype.kind and not (array.dtype.kind in "iu" and spec.dtype.kind in "iu"):
            raise CalibrationError(f"{where}: input {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}",
                                   f"convert it with array.astype(np.{spec.dtype.name})")
        if array.dtype != spec.dtype:
            array = array.astype(spec.dtype)
        if spec.shape is not None and spec.shape:
            if array.ndim != len(spec.shape):
                raise CalibrationError(
                    f"{where}: input {spec.name!r} has rank {array.ndim} (shape {array.shape}), the model expects rank {len(spec.shape)} {spec.shape}",
                    "stack samples along axis 0 with the model's full input shape")
            for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=False)):
                if want > 0 and want != got and not (stacked and axis == 0):
                    raise CalibrationError(
                        f"{where}: input {spec.name!r} has shape {array.shape}, the model expects {spec.shape} (axis {axis})",
                        "reshape or resize the calibration data to the model's input shape")
        if array.size == 0:
            raise CalibrationError(f"{where}: input {spec.name!r} is empty (shape {array.shape})", "provide real samples")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise CalibrationError(f"{where}: input {spec.name!r} contains NaN or Inf values", "clean the calibration data")
        checked[spec.name] = array
    return checked


def _cut_batches(data: dict[str, np.ndarray], inputs: Sequence[InputSpec], axes: Mapping[str, int | None],
                 batch_size: int) -> tuple[list[dict[str, np.ndarray]], int]:
    """Cut stacked samples into batches along each input's batch axis; returns batches and samples.

    Without a symbolic batch in the graph every input is stacked on axis 0 (DESIGN.md), in
    batches of the model's fixed batch size if it has one; otherwise inputs with a batch axis
    are cut along it and the others (a fixed-shape state, a scalar) go whole into every batch.
    """
    if batch_size < 1:
        raise CalibrationError(f"batch size {batch_size} is not positive", "pass --batch-size 1 or more")
    fixed_batch: list[int] = []
    if all(axis is None for axis in axes.values()):
        axes = {name: 0 if array.ndim else None for name, array in data.items()}
        fixed_batch = [spec.shape[0] for spec in inputs if spec.shape and spec.shape[0] > 0]
    counts = {name: array.shape[axis] for name, array in data.items() if (axis := axes.get(name)) is not None and array.ndim > axis}
    if not counts:
        return [dict(data)], 1
    if len(set(counts.values())) != 1:
        raise CalibrationError(f"calibration arrays have different sample counts {counts}",
                               "stack the same number of samples for every input (along its batch axis)")
    total = next(iter(counts.values()))
    step = fixed_batch[0] if fixed_batch else batch_size
    if not fixed_batch and total < 2 * step:
        # a dozen large samples would make one batch, held back and calibrated on at once:
        # smaller batches give the fidelity measurement samples of its own
        step = max(1, -(-total // MIN_BATCHES))
    if fixed_batch and total < step:
        raise CalibrationError(
            f"only {total} calibration sample(s), and the model's batch dimension is fixed at {step}: "
            "onnxq needs at least one full batch", "provide more samples")
    if total % step and fixed_batch:
        total -= total % step
    cut = {name: axis for name, axis in axes.items() if name in counts and axis is not None}
    feeds = []
    for start in range(0, total, step):
        window = slice(start, start + step)
        feeds.append({name: array[(slice(None),) * cut[name] + (window,)] if name in cut else array
                      for name, array in data.items()})
    return feeds, total


def load_feeds(
    source: Any,
    model: onnx.ModelProto,
    *,
    batch_size: int = 16,
    held_back_fraction: float = 0.25,
    min_samples: int = 2,
) -> FeedSet:
    """Load, check and batch calibration data for ``model``.

    Stacked arrays (a single ``.npz``) are cut into batches of ``batch_size`` along each input's
    batch axis (:func:`batch_axes`; axis 0 when the graph names no batch, in batches of the
    model's fixed batch size if it has one). The last ``held_back_fraction`` of
    the batches is held back for measuring fidelity, never used to calibrate.
    """
    inputs = model_inputs(model)
    if not inputs:
        raise CalibrationError("the model has no inputs to feed", "it needs at least one graph input")
    raw, stacked = _raw_feeds(source)
    if not raw:
        raise CalibrationError("the calibration data is empty", "provide at least a few samples")
    checked = [_check_feed(feed, inputs, f"calibration feed {i}" if len(raw) > 1 else "calibration data", stacked)
               for i, feed in enumerate(raw)]
    if stacked:
        feeds, samples = _cut_batches(checked[0], inputs, batch_axes(model), batch_size)
    else:
        feeds = checked
        samples = len(feeds)
    if samples < min_samples or not feeds:
        raise CalibrationError(f"only {samples} calibration sample(s); onnxq needs at least {min_samples}",
                               "provide a few hundred representative samples")
    digest = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            digest.update(name.encode())
            digest.update(str(feed[name].shape).encode())
            digest.update(np.ascontiguousarray(feed[name]).tobytes())
    held = int(round(len(feeds) * held_back_fraction)) if len(feeds) >= 4 else 0
    if held == 0 and len(feeds) >= 2 and held_back_fraction > 0:
        held = 1
    calibration = tuple(feeds[: len(feeds) - held]) if held else tuple(feeds)
    held_back = tuple(feeds[len(feeds) - held:]) if held else tuple(feeds)
    return FeedSet(calibration=calibration, held_back=held_back, samples=samples, sha256=digest.hexdigest())
