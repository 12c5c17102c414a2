"""onnxruntime sessions: building them from protos and running feed sets."""

from __future__ import annotations

import logging
import os
import platform
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.errors import ModelError
from onnxq.model import MAX_IR_VERSION, is_large, save_model

if TYPE_CHECKING:
    from onnxq.spec.model import RuntimeTarget

__all__ = ["create_session", "make_session", "run_all", "optimized_op_types", "runs_here", "fidelity_session"]

logger = logging.getLogger(__name__)


def _serialise(model: onnx.ModelProto) -> bytes:
    if model.ir_version > MAX_IR_VERSION:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        copy.ir_version = MAX_IR_VERSION
        model = copy
    return model.SerializeToString()


def _release_model_bytes(session: ort.InferenceSession, providers: Sequence[str]) -> None:
    """Drop the serialised model a session built from bytes keeps for the rest of its life
    (onnxruntime's Python wrapper holds it only to rebuild the session on a fallback execution
    provider, which a CPU-only session never has): a second copy of the weights per live session."""
    if set(providers) <= {"CPUExecutionProvider"} and getattr(session, "_model_bytes", None) is not None:
        session._model_bytes = None


def create_session(model: onnx.ModelProto | bytes, options: ort.SessionOptions,
                   providers: Sequence[str] = ("CPUExecutionProvider",)) -> ort.InferenceSession:
    """An InferenceSession from a proto or bytes; models over 2 GB go through a temporary file
    with external data (protobuf cannot serialise them in one piece)."""
    if isinstance(model, bytes):
        session = ort.InferenceSession(model, options, providers=list(providers))
        _release_model_bytes(session, providers)
        return session

    if not is_large(model):
        session = ort.InferenceSession(_serialise(model), options, providers=list(providers))
        _release_model_bytes(session, providers)
        return session
    with tempfile.TemporaryDirectory(prefix="onnxq-session-") as folder:
        path = Path(folder) / "model.onnx"
        if model.ir_version > MAX_IR_VERSION:
            model.ir_version = MAX_IR_VERSION
        save_model(model, path)
        return ort.InferenceSession(str(path), options, providers=list(providers))


def make_session(
    model: onnx.ModelProto | bytes,
    *,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    threads: int = 0,
    optimized_path: str | None = None,
    exact_qdq: bool = False,
    providers: Sequence[str] | None = None,
    node_order: bool = False,
    path: str | os.PathLike[str] | None = None,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``model`` (default session options unless asked).

    ``node_order``: run the nodes in the order of the graph's node list where the dependencies
    allow (onnxruntime's priority-based order, ties broken by node index) instead of its
    default order, which may postpone a side branch such as a reduction of an early tensor to
    the end of the run and keep every such tensor alive until then.

    ``path``: the file ``model`` was loaded from, unchanged: onnxruntime reads it itself. Built
    from a proto, a session passes through a serialised copy and onnxruntime's parse of it (on
    a 416 MB encoder the peak is 1.25 GB above the proto, against none from the file).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if node_order:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    if exact_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if path is not None:
        try:
            return ort.InferenceSession(os.fspath(path), options, providers=list(providers or ("CPUExecutionProvider",)))
        except Exception as error:  # noqa: BLE001 - e.g. an IR version onnxruntime refuses: use the proto
            logger.debug("session from %s failed (%s); building it from the proto", path, error)
    try:
        return create_session(model, options, providers or ("CPUExecutionProvider",))
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"onnxruntime cannot load the model: {message}", "check the model runs in onnxruntime") from error


@cache
def runs_here(runtime: RuntimeTarget | None) -> bool:
    """Whether the target ``runtime`` is this machine: onnxruntime with that execution provider
    available, on one of the listed architectures. Latency is then measured, not estimated."""
    if runtime is None or runtime.engine != "onnxruntime":
        return False
    return (runtime.execution_provider in ort.get_available_providers()
            and platform.machine().lower() in runtime.machines)


def fidelity_session(model: onnx.ModelProto | bytes, runtime: RuntimeTarget | None,
                     default: ort.InferenceSession | None = None) -> ort.InferenceSession:
    """The session whose outputs stand for the target's when a quantized model is scored.

    On the target itself (:func:`runs_here`): onnxruntime's default session, the kernels the model
    will run on (``default`` when given). Elsewhere: the Q/DQ arithmetic as written, fused integer
    kernels off, which is what an integer target computes; this machine's kernels add errors of
    their own (x86 u8s8 kernels without VNNI saturate on full-range int8 weights: a correct
    edge-int-only CNN scored 27% agreement with fp32)."""
    if runs_here(runtime):
        return default if default is not None else make_session(model)
    return make_session(model, exact_qdq=True)


def run_all(session: ort.InferenceSession, feeds: Sequence[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Run every feed; returns the outputs per feed."""
    return [session.run(None, feed) for feed in feeds]


def optimized_op_types(model: onnx.ModelProto, path: str) -> list[str]:
    """Op types of the graph onnxruntime actually runs (ORT_ENABLE_ALL, default options)."""
    make_session(model, optimized_path=path)
    optimized = onnx.load(path)
    return [node.op_type for node in optimized.graph.node]
