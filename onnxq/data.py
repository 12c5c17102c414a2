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

__all__ = ["InputSpec", "FeedSet", "model_inputs", "load_feeds", "find_sibling_calibration"]

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
        return self.calibration + self.held_back


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


def find_sibling_calibration(model_path: Path) -> Path | None:
    """``<stem>.calib.npz`` or ``<stem>.calib/`` next to the model, if present."""
    for candidate in (model_path.with_name(f"{model_path.stem}.calib.npz"), model_path.with_name(f"{model_path.stem}.calib")):
        if candidate.exists():
            return candidate
    return None


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


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


def load_feeds(
    source: Any,
    model: onnx.ModelProto,
    *,
    batch_size: int = 16,
    held_back_fraction: float = 0.25,
    min_samples: int = 2,
) -> FeedSet:
    """Load, check and batch calibration data for ``model``.

    Stacked arrays (a single ``.npz``) are cut into batches of ``batch_size`` along axis 0 (or
    batch 1 when the model's batch dimension is fixed at 1). The last ``held_back_fraction`` of
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
    feeds: list[dict[str, np.ndarray]] = []
    if stacked:
        data = checked[0]
        counts = {name: (array.shape[0] if array.ndim else 1) for name, array in data.items()}
        if len(set(counts.values())) != 1:
            raise CalibrationError(f"calibration arrays have different sample counts {counts}", "stack the same number of samples for every input")
        total = next(iter(counts.values()))
        fixed_batch = [spec.shape[0] for spec in inputs if spec.shape and spec.shape[0] > 0]
        if batch_size < 1:
            raise CalibrationError(f"batch size {batch_size} is not positive", "pass --batch-size 1 or more")
        step = fixed_batch[0] if fixed_batch else batch_size
        if fixed_batch and total < step:
            raise CalibrationError(
                f"only {total} calibration sample(s), and the model's batch dimension is fixed at {step}: "
                "onnxq needs at least one full batch", "provide more samples")
        if total % step and fixed_batch:
            total -= total % step
        for start in range(0, total, step):
            feeds.append({name: array[start:start + step] for name, array in data.items()})
        samples = total
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
