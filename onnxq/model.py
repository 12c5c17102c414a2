"""Loading, checking and saving ONNX models safely.

A model is loaded once, its external data resolved (refusing locations that escape the
model's folder), checked, and shape-inferred. Saving is atomic: a temporary file in the
destination folder is renamed over the target, so a failure never leaves half a model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import google.protobuf.message
import onnx
import onnx.external_data_helper
import onnx.shape_inference
import onnx.version_converter

from onnxq.errors import ModelError, UsageError

__all__ = [
    "MIN_OPSET",
    "MAX_OPSET",
    "LoadedModel",
    "load_model",
    "save_model",
    "model_opset",
    "set_opset",
    "upgrade_opset",
    "model_sha256",
    "check_output_path",
    "atomic_write_text",
]

logger = logging.getLogger(__name__)

MIN_OPSET = 9
MAX_OPSET = 21
#: onnxruntime 1.31 reads IR versions up to 13; onnx 1.23 writes 14 by default.
MAX_IR_VERSION = 10
_TWO_GB = 2**31 - 1


@dataclass(frozen=True)
class LoadedModel:
    """A checked model and where it came from."""

    proto: onnx.ModelProto
    path: Path | None
    sha256: str

    @property
    def opset(self) -> int:
        return model_opset(self.proto)


def model_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def set_opset(model: onnx.ModelProto, version: int) -> None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version
            return
    model.opset_import.append(onnx.helper.make_opsetid("", version))


def _check_external_locations(model: onnx.ModelProto, base_dir: Path) -> None:
    base = base_dir.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise ModelError(
                f"refusing external data location {location!r} of tensor {tensor.name!r}: it "
                f"points outside the model's folder {base}",
                "external data files must sit next to the model (relative paths inside its folder)",
            )
        if not target.is_file():
            raise ModelError(
                f"external data file {location!r} of tensor {tensor.name!r} is missing",
                f"copy it next to the model in {base}",
            )


def model_sha256(model: onnx.ModelProto) -> str:
    """A stable hash of a model's content (serialised proto, external data loaded)."""
    digest = hashlib.sha256()
    digest.update(model.SerializeToString(deterministic=True))
    return digest.hexdigest()


def load_model(source: str | os.PathLike[str] | onnx.ModelProto, *, infer_shapes: bool = True) -> LoadedModel:
    """Load, check and shape-infer a model from a path or a ``ModelProto``.

    Raises:
        ModelError: missing/unreadable file, not ONNX, truncated, unsafe external data,
            failing ``onnx.checker``, or an unsupported opset.
    """
    if isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
        path = None
    else:
        path = Path(source)
        if not path.exists():
            raise ModelError(f"model file {str(path)!r} does not exist", "check the path")
        if path.is_dir():
            raise ModelError(f"model path {str(path)!r} is a directory", "pass the .onnx file inside it")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ModelError(f"cannot read model {str(path)!r}: {error.strerror}", "check its permissions") from error
        if not data:
            raise ModelError(f"model file {str(path)!r} is empty", "re-export the model")
        proto = onnx.ModelProto()
        try:
            proto.ParseFromString(data)
        except (google.protobuf.message.DecodeError, RuntimeError, ValueError) as error:
            raise ModelError(
                f"{str(path)!r} is not an ONNX model (the protobuf does not parse: it is truncated or another format)",
                "pass a .onnx file exported by torch.onnx, tf2onnx or onnx",
            ) from error
        if not proto.HasField("graph") or not proto.graph.node:
            raise ModelError(f"{str(path)!r} is not an ONNX model with a graph", "pass a .onnx file with a non-empty graph")
        _check_external_locations(proto, path.parent)
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError) as error:
            raise ModelError(f"cannot load external data of {str(path)!r}: {error}", "keep data files next to the model") from error

    opset = model_opset(proto)
    if opset < MIN_OPSET:
        raise ModelError(
            f"model opset {opset} is older than the oldest onnxq supports ({MIN_OPSET})",
            "re-export with a newer opset or convert with onnx.version_converter",
        )
    if opset > 26:
        raise ModelError(f"model opset {opset} is newer than onnxruntime runs (26)", "export with opset ≤ 21")
    try:
        if proto.ByteSize() < _TWO_GB:
            onnx.checker.check_model(proto)
        elif path is not None:
            onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "invalid model"
        raise ModelError(f"model fails onnx.checker: {first}", "fix or re-export the model") from error
    if infer_shapes and proto.ByteSize() < _TWO_GB:
        try:
            proto = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
        except Exception as error:  # shape inference is best-effort: onnxq also reads real shapes at run time
            logger.warning("shape inference failed (%s); continuing without inferred shapes", error)
    return LoadedModel(proto=proto, path=path, sha256=model_sha256(proto))


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Convert the model to ai.onnx opset ``target`` (no-op when already there or newer)."""
    current = model_opset(model)
    if current >= target:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, target)
    except Exception as error:
        raise ModelError(
            f"the model's opset {current} must be converted to {target} for the chosen precisions, "
            f"and onnx.version_converter failed: {str(error).splitlines()[0] if str(error) else error}",
            f"re-export the model at opset {target}, or choose 8-bit per-tensor precisions",
        ) from error
    logger.info("converted model from opset %d to %d", current, target)
    return converted


def check_output_path(output: str | os.PathLike[str], inputs: list[Path | None]) -> Path:
    """Refuse an output path that is an input, a directory, or in an unwritable folder."""
    out = Path(output)
    if out.is_dir():
        raise UsageError(f"output path {str(out)!r} is a directory", "give a file name such as model.int8.onnx")
    for source in inputs:
        if source is not None and out.exists() and out.resolve() == source.resolve():
            raise UsageError(f"output path {str(out)!r} is the input model", "write to a new file; onnxq never overwrites its input")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"output folder {str(folder)!r} does not exist", "create it first")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"output folder {str(folder)!r} is not writable", "choose another output path")
    return out


def save_model(model: onnx.ModelProto, output: str | os.PathLike[str]) -> Path:
    """Write ``model`` atomically; models over 2 GB get an external data file beside them."""
    out = Path(output)
    folder = out.parent if str(out.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    data_name = f"{out.name}.data"
    try:
        if model.ByteSize() >= _TWO_GB:
            tmp_data = folder / f".{data_name}.tmp"
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=1024)
            os.replace(tmp_data, folder / data_name)
            # the external-data reference inside the proto must name the final file
            saved = onnx.load(str(tmp), load_external_data=False)
            for tensor in onnx.external_data_helper._get_all_tensors(saved):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            tmp.write_bytes(saved.SerializeToString(deterministic=True))
        else:
            tmp.write_bytes(model.SerializeToString(deterministic=True))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file atomically (temporary file + rename)."""
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out
