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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import google.protobuf.message
import numpy as np
import onnx
import onnx.external_data_helper
import onnx.numpy_helper
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
    "byte_size",
    "is_large",
    "large_initializers",
    "without_initializers",
    "detach_initializers",
    "check_output_path",
    "shape_skeleton",
    "rewritable_copy",
    "copy_fields",
    "float16_tensors",
    "check_quantizable_dtypes",
    "atomic_write_text",
]

logger = logging.getLogger(__name__)

MIN_OPSET = 9
MAX_OPSET = 21
#: the newest ai.onnx opset onnxruntime 1.31 runs.
MAX_RUNTIME_OPSET = 26
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
    """Refuse external-data references that escape ``base_dir``, are missing, or lie past the file's end."""
    base = base_dir.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        try:
            target = (base / location).resolve()
            escapes = not location or os.path.isabs(location) or not target.is_relative_to(base)
        except (OSError, ValueError, RuntimeError):  # embedded NUL bytes, symlink loops, ...
            escapes = True
        if escapes:
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
        try:
            offset = int(info.get("offset", "0") or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError as error:
            raise ModelError(f"external data of tensor {tensor.name!r} has a malformed offset or length",
                             "re-save the model with onnx.save_model(..., save_as_external_data=True)") from error
        size = target.stat().st_size
        if offset < 0 or (length is not None and length < 0) or offset + (length or 0) > size:
            raise ModelError(
                f"external data of tensor {tensor.name!r} (offset {offset}, length {length}) lies outside "
                f"{location!r} ({size} bytes)",
                "the data file is truncated or belongs to another model",
            )


#: Bytes per element of the tensor types whose ``raw_data`` is sized exactly by their dims.
_RAW_ITEM_BYTES = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
    onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2,
    onnx.TensorProto.INT32: 4, onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BOOL: 1,
}


def _raw_bytes_lower_bound(model: onnx.ModelProto) -> int:
    """Bytes of the tensors held in ``raw_data``, from their dims (reads no tensor data)."""
    return sum(_raw_nbytes(t) for t in onnx.external_data_helper._get_all_tensors(model) if t.HasField("raw_data"))


def byte_size(model: onnx.ModelProto) -> int:
    """``model.ByteSize()``, or at least 2 GB when the model is larger than protobuf can serialise.

    Models whose tensors alone exceed 2 GB are sized from their tensors' dims: the upb
    protobuf runtime serialises the whole message to size it, a transient copy of the model.
    """
    raw = _raw_bytes_lower_bound(model)
    if raw >= _TWO_GB:
        return raw
    try:
        return int(model.ByteSize())
    except (google.protobuf.message.EncodeError, ValueError):
        return _TWO_GB


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is too large to serialise as one protobuf (≥ 2 GB)."""
    return byte_size(model) >= _TWO_GB


def _raw_nbytes(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= int(dim)
    return count * _RAW_ITEM_BYTES.get(tensor.data_type, 0)


def large_initializers(model: onnx.ModelProto, min_bytes: int = 1 << 20) -> list[str]:
    """Names of the main graph's float32 initializers of at least ``min_bytes`` held in
    ``raw_data`` (sized from their dims: reads no tensor data)."""
    return [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
            and t.HasField("raw_data") and _raw_nbytes(t) >= min_bytes]


def without_initializers(model: onnx.ModelProto, names: set[str] | frozenset[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose main-graph initializers ``names`` are graph inputs of the same
    type and shape instead.

    Built field by field, so the left-out tensors are never copied: for a model over 2 GB this
    costs the graph, not a second copy of the weights.
    """
    shell = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(shell, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(shell.graph, field, value)
    inputs = {i.name for i in shell.graph.input}
    for tensor in model.graph.initializer:
        if tensor.name not in names:
            shell.graph.initializer.append(tensor)
        elif tensor.name not in inputs:
            shell.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                                        list(tensor.dims)))
    return shell


def detach_initializers(model: onnx.ModelProto,
                        names: set[str] | frozenset[str]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """:func:`without_initializers` and the values of the left-out tensors (read one at a time):
    sessions of the returned model are fed them as inputs (onnxruntime does not copy contiguous
    CPU inputs), so the weights live once, as these arrays."""
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names}
    return without_initializers(model, names), values


def _check_strings(model: onnx.ModelProto) -> None:
    """Refuse a model whose own or main graph's text fields are not valid UTF-8 (protobuf
    raises when they are read, as :func:`shape_skeleton` does to copy them)."""
    bad = False
    try:
        for message in (model, model.graph, *model.metadata_props):
            for field in message.DESCRIPTOR.fields:
                if field.type == field.TYPE_STRING:
                    value = getattr(message, field.name)  # bytes when the text is not UTF-8
                    values = [value] if isinstance(value, (str, bytes)) else list(value)
                    bad = bad or any(not isinstance(v, str) for v in values)
    except UnicodeDecodeError:
        bad = True
    if bad:
        raise ModelError("the model holds a text field that is not valid UTF-8",
                         "the file is corrupt; re-export the model")


def _check_names(graph: onnx.GraphProto) -> None:
    """Refuse names that are not valid UTF-8 (protobuf hands them over as ``bytes``, not ``str``)."""
    def bad(value: object) -> bool:
        return not isinstance(value, str)

    names: list[object] = [v.name for v in (*graph.input, *graph.output, *graph.value_info)]
    names += [t.name for t in graph.initializer]
    for node in graph.node:
        names += [node.name, node.op_type, node.domain, *node.input, *node.output, *(a.name for a in node.attribute)]
        for attribute in node.attribute:
            if attribute.HasField("g"):
                _check_names(attribute.g)
            for sub in attribute.graphs:
                _check_names(sub)
    for name in names:
        if bad(name):
            raise ModelError(f"the model holds a name that is not valid UTF-8 ({name!r:.60})",
                             "the file is corrupt; re-export the model")


#: Models at least this big are hashed part by part (:func:`model_sha256`).
HASH_BY_PARTS_BYTES = 32 << 20


def model_sha256(model: onnx.ModelProto) -> str:
    """A stable hash of a model's content (serialised proto, external data loaded).

    Models over 2 GB cannot be serialised in one piece, and serialising one of hundreds of MB
    takes 2.5 times its size while the buffer grows; from :data:`HASH_BY_PARTS_BYTES` on they
    are hashed part by part (the model without its graph, then each graph field, then each
    initializer), which never holds more than one tensor's bytes in addition to the model.
    """
    if not is_large(model) and model.ByteSize() < HASH_BY_PARTS_BYTES:
        return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
    return _sha256_by_parts(model)


def _sha256_by_parts(model: onnx.ModelProto) -> str:
    digest = hashlib.sha256()
    digest.update(b"onnxq-large-model/1")
    skeleton = onnx.ModelProto()
    copy_fields(skeleton, model, skip=("graph",))
    digest.update(skeleton.SerializeToString(deterministic=True))
    graph = model.graph
    shell = onnx.GraphProto()
    copy_fields(shell, graph, skip=("initializer", "sparse_initializer", "node"))
    digest.update(shell.SerializeToString(deterministic=True))
    for node in graph.node:
        digest.update(node.SerializeToString(deterministic=True))
    for tensor in graph.initializer:
        digest.update(tensor.SerializeToString(deterministic=True))
    for sparse in graph.sparse_initializer:
        digest.update(sparse.SerializeToString(deterministic=True))
    return digest.hexdigest()


#: Initializers at least this big lose their data in :func:`shape_skeleton`.
SKELETON_MIN_BYTES = 1 << 16


def shape_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference and cost views: every initializer of at least
    :data:`SKELETON_MIN_BYTES` keeps its name, type and dims but not its data (the shapes of
    weights are all that inference reads from them; small ones such as Reshape targets are
    kept whole). Never run or read weight values from it."""
    skeleton = onnx.ModelProto()
    copy_fields(skeleton, model, skip=("graph",))
    graph = model.graph
    copy_fields(skeleton.graph, graph, skip=("initializer",))
    for tensor in graph.initializer:
        if _left_out_of_skeleton(tensor):
            skeleton.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        else:
            skeleton.graph.initializer.append(tensor)
    return skeleton


def rewritable_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy of ``model`` for passes that rewrite it, without a copy of its weights: its
    :func:`shape_skeleton`, and the tensors of ``model`` that the skeleton's stubs stand for
    (what :func:`fill_stubs` and ``GraphView(weights=)`` read). The caller keeps ``model`` alive
    while the copy is in use."""
    return shape_skeleton(model), {t.name: t for t in model.graph.initializer if _left_out_of_skeleton(t)}


def is_stub(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` is an initializer :func:`shape_skeleton` left without its data."""
    return (tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.HasField("raw_data")
            and all(d > 0 for d in tensor.dims) and len(tensor.dims) > 0
            and not (tensor.float_data or tensor.int32_data or tensor.int64_data or tensor.double_data
                     or tensor.uint64_data or tensor.string_data))


def fill_stubs(model: onnx.ModelProto, source: Mapping[str, onnx.TensorProto]) -> int:
    """Give every stub initializer of ``model``'s main graph (:func:`is_stub`) the data of the
    tensor of its name in ``source``, in place; how many were filled."""
    filled = 0
    for tensor in model.graph.initializer:
        if is_stub(tensor) and tensor.name in source:
            tensor.CopyFrom(source[tensor.name])
            filled += 1
    return filled


def _left_out_of_skeleton(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.ByteSize() >= SKELETON_MIN_BYTES


def copy_fields(target: google.protobuf.message.Message, source: google.protobuf.message.Message,
                skip: Sequence[str] = ()) -> None:
    """Copy every set field of ``source`` into ``target`` except those named in ``skip`` (to
    build a copy of a model without its weights)."""
    for field, value in source.ListFields():
        if field.name not in skip:
            _copy_field(target, field, value)


def _copy_field(target: google.protobuf.message.Message, field: object, value: object) -> None:
    name = field.name  # type: ignore[attr-defined]
    if isinstance(value, google.protobuf.message.Message):
        getattr(target, name).CopyFrom(value)
    elif not isinstance(value, (str, bytes, int, float, bool)):  # a repeated field
        getattr(target, name).extend(value)  # type: ignore[arg-type]
    else:
        setattr(target, name, value)


def float16_tensors(model: onnx.ModelProto, limit: int = 3) -> list[str]:
    """Names of (up to ``limit``) graph inputs, outputs and initializers stored as float16/bfloat16."""
    half = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    found: list[str] = []
    graph = model.graph
    for value in [*graph.input, *graph.output]:
        if value.type.tensor_type.elem_type in half and value.name not in found:
            found.append(value.name)
    for tensor in graph.initializer:
        if tensor.data_type in half and tensor.name not in found:
            found.append(tensor.name)
    return found[:limit]


def check_quantizable_dtypes(model: onnx.ModelProto) -> None:
    """Refuse float16/bfloat16 models: onnxq quantizes float32 models (fp16 is an output precision).

    Raises:
        ModelError: naming the first half-precision tensors.
    """
    half = float16_tensors(model)
    if half:
        raise ModelError(
            f"the model computes in float16/bfloat16 (e.g. {', '.join(repr(n) for n in half)}); onnxq quantizes "
            "float32 models",
            "export or convert the model to float32 first (fp16 layers can then be chosen with --precision fp16/fp16)",
        )


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
            del data  # the parsed copy is the model from here on
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
        except Exception as error:  # onnx raises OSError, ValueError or its own ValidationError
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelError(f"cannot load external data of {str(path)!r}: {first}", "keep data files next to the model") from error
        for tensor in onnx.external_data_helper._get_all_tensors(proto):
            if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.DEFAULT:
                tensor.ClearField("data_location")  # same bytes (and hash) as the model saved inline

    _check_strings(proto)
    _check_names(proto.graph)
    opset = model_opset(proto)
    if opset < MIN_OPSET:
        raise ModelError(
            f"model opset {opset} is older than the oldest onnxq supports ({MIN_OPSET})",
            "re-export with a newer opset or convert with onnx.version_converter",
        )
    if opset > MAX_RUNTIME_OPSET:
        raise ModelError(f"model opset {opset} is newer than onnxruntime runs ({MAX_RUNTIME_OPSET})",
                         f"export with opset ≤ {MAX_OPSET}")
    try:
        large = is_large(proto)
        if not large:
            onnx.checker.check_model(proto)
        elif path is not None:
            onnx.checker.check_model(str(path))
    except Exception as error:  # ValidationError, and whatever else the C++ checker throws on garbage
        first = str(error).strip().splitlines()[0] if str(error).strip() else "invalid model"
        raise ModelError(f"model fails onnx.checker: {first}", "fix or re-export the model") from error
    if infer_shapes:
        try:
            # on a copy without the weights' data: what inference adds is the graph's value
            # infos and output types, and the model is never held twice
            inferred = onnx.shape_inference.infer_shapes(shape_skeleton(proto), check_type=False, strict_mode=False,
                                                         data_prop=True).graph
        except Exception as error:  # shape inference is best-effort: onnxq also reads real shapes at run time
            logger.warning("shape inference failed (%s); continuing without inferred shapes", error)
        else:
            for field in ("value_info", "output"):
                del getattr(proto.graph, field)[:]
                getattr(proto.graph, field).extend(getattr(inferred, field))
    return LoadedModel(proto=proto, path=path, sha256=model_sha256(proto))


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Convert the model to ai.onnx opset ``target`` (no-op when already there or newer)."""
    current = model_opset(model)
    if current >= target:
        return model
    try:
        converted = _convert_without_weights(model, target)
    except Exception as error:
        raise ModelError(
            f"the model's opset {current} must be converted to {target} for the chosen precisions, "
            f"and onnx.version_converter failed: {str(error).splitlines()[0] if str(error) else error}",
            f"re-export the model at opset {target}, or choose 8-bit per-tensor precisions",
        ) from error
    logger.info("converted model from opset %d to %d", current, target)
    return converted


def _convert_without_weights(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``onnx.version_converter`` run on the model's :func:`shape_skeleton`, the weights put
    back afterwards: the converter serialises its input, so on the whole model it held the
    weights two and a half times over (and took 30 s on a 110M encoder). The adapters rewrite
    ops and small constants, not weights; a weight they changed sends the model through the
    converter whole."""
    originals = {t.name: t for t in model.graph.initializer if _left_out_of_skeleton(t)}
    converted = onnx.version_converter.convert_version(shape_skeleton(model), target)
    restored = 0
    for tensor in converted.graph.initializer:
        original = originals.get(tensor.name)
        if original is None:
            continue
        if list(tensor.dims) != list(original.dims) or tensor.data_type != original.data_type:
            return onnx.version_converter.convert_version(model, target)
        tensor.CopyFrom(original)
        restored += 1
    if restored != len(originals):
        return onnx.version_converter.convert_version(model, target)
    return converted


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(output: str | os.PathLike[str], inputs: list[Path | None]) -> Path:
    """Refuse an output path that is an input, a directory, or in an unwritable folder."""
    out = Path(output)
    if not str(output).strip():
        raise UsageError("the output path is empty", "give a file name such as model.int8.onnx")
    if out.is_dir():
        raise UsageError(f"output path {str(out)!r} is a directory", "give a file name such as model.int8.onnx")
    for source in inputs:
        if source is not None and (_same_file(out, Path(source)) or out.resolve() == Path(source).resolve()):
            raise UsageError(f"output path {str(out)!r} is an input of this run ({str(source)!r})",
                             "write to a new file; onnxq never overwrites its input")
    folder = out.parent if str(out.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"output folder {str(folder)!r} is not a folder", "choose another output path")
    if not folder.is_dir():
        raise UsageError(f"output folder {str(folder)!r} does not exist", "create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {str(folder)!r} is not writable", "choose another output path")
    if out.exists() and not os.access(out, os.W_OK):
        raise UsageError(f"output file {str(out)!r} exists and is not writable", "choose another output path")
    return out


def _externalize(model: onnx.ModelProto, data_file: Path, location: str, threshold: int) -> list[tuple[onnx.TensorProto, int, int, bool]]:
    """Move tensors' ``raw_data`` into ``data_file`` and point them at ``location`` (in place).

    Returns ``(tensor, offset, length, had_data_location)`` for every moved tensor so that :func:`_internalize`
    can restore the model from the file afterwards.
    """
    moved: list[tuple[onnx.TensorProto, int, int, bool]] = []
    with open(data_file, "wb") as handle:
        for tensor in onnx.external_data_helper._get_all_tensors(model):
            if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
                continue
            if len(tensor.raw_data) < threshold:
                continue
            offset = handle.tell()
            pad = (-offset) % 4096  # page-aligned offsets let onnxruntime memory-map the data
            handle.write(b"\0" * pad)
            offset += pad
            data = tensor.raw_data
            handle.write(data)
            moved.append((tensor, offset, len(data), tensor.HasField("data_location")))
            del data
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(moved[-1][2]))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    return moved


def _internalize(moved: list[tuple[onnx.TensorProto, int, int, bool]], data_file: Path) -> None:
    """Undo :func:`_externalize`: read the bytes back into the tensors."""
    with open(data_file, "rb") as handle:
        for tensor, offset, length, had_location in moved:
            handle.seek(offset)
            tensor.raw_data = handle.read(length)
            if had_location:
                tensor.data_location = onnx.TensorProto.DEFAULT
            else:
                tensor.ClearField("data_location")  # proto2: exactly as unset as before
            del tensor.external_data[:]


def save_model(model: onnx.ModelProto, output: str | os.PathLike[str]) -> Path:
    """Write ``model`` atomically; models over 2 GB get an external data file ``<name>.data`` beside them.

    ``model`` is left as it was (its tensors are moved out for serialisation and read back).
    Nothing but the final files remains after a failure.
    """
    out = Path(output)
    folder = out.parent if str(out.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp_data: Path | None = None
    data_name = f"{out.name}.data"
    try:
        if is_large(model):
            fd, data_tmp_name = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=folder)
            os.close(fd)
            tmp_data = Path(data_tmp_name)
            moved: list[tuple[onnx.TensorProto, int, int, bool]] = []
            try:
                moved = _externalize(model, tmp_data, data_name, threshold=1024)
                if is_large(model):
                    raise ModelError(f"cannot save {str(out)!r}: the graph is over 2 GB even without its weights",
                                     "split the model")
                tmp.write_bytes(model.SerializeToString(deterministic=True))
            finally:
                _internalize(moved, tmp_data)
            os.replace(tmp_data, folder / data_name)
            tmp_data = None
        else:
            tmp.write_bytes(model.SerializeToString(deterministic=True))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if tmp_data is not None:
            tmp_data.unlink(missing_ok=True)
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
