"""Hypothesis fuzzing of the CLI: mutated models, calibration files and spec files.

Property: ``onnxq quantize`` either succeeds with a model that passes ``onnx.checker`` (full
check), runs in onnxruntime with the original inputs and outputs, stays close to the fp32 model
on the calibration data and is reported as meeting its target, or exits 2 with exactly one clean ``onnxq: error:`` line — never an exception escaping
``main``, never an "internal error" or "report it" line (those mean an onnxq bug), never a
hang (each case runs under a SIGALRM watchdog). Cases call :func:`onnxq.cli.main` in-process
for speed. A quick subset runs by default; ``-m slow`` runs 1,000+ cases.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxq.cli import main
from onnxq.runtime import make_session

CNN = MODELS / "digits_cnn.onnx"
CNN_BYTES = CNN.read_bytes() if CNN.exists() else b""
CALIB = np.load(MODELS / "digits_cnn.calib.npz")["input"][:24] if CNN.exists() else np.zeros((24, 1, 16, 16), np.float32)
SPEC_JSON = json.loads((ROOT / "hardware_specs" / "ort-cpu-x86.json").read_text())
CASE_SECONDS = 120

QUICK = settings(max_examples=8, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=260, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

pytestmark = pytest.mark.skipif(not CNN.exists(), reason="bundled CNN missing")



class Hang(Exception):
    """A case exceeded its time budget."""


@contextlib.contextmanager
def watchdog(seconds: int) -> Iterator[None]:
    def _alarm(signum: int, frame: object) -> None:
        raise Hang(f"case took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_main(*args: str) -> tuple[int, str]:
    """``onnxq.cli.main`` in-process; returns the exit code and what it printed on stderr."""
    err = io.StringIO()
    with watchdog(CASE_SECONDS), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    return code, err.getvalue()


def _cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    finite = np.isfinite(reference)
    if np.any(~np.isfinite(candidate) & finite):
        return -1.0
    r, c = reference[finite].astype(np.float64).ravel(), candidate[finite].astype(np.float64).ravel()
    norms = np.linalg.norm(r) * np.linalg.norm(c)
    return float(r @ c / norms) if norms > 0 else float(np.allclose(r, c, atol=1e-3))


def check_success(folder: Path, model: Path, out: Path, report: Path) -> None:
    """A success is a model that onnxruntime runs with the fp32 model's inputs and outputs, stays
    close to it on the calibration data, and whose report says the target was met."""
    onnx.checker.check_model(str(out), full_check=True)
    fp32, quantized = onnx.load(str(model)), onnx.load(str(out))
    initializers = {t.name for t in fp32.graph.initializer}
    assert [i.name for i in quantized.graph.input] == [i.name for i in fp32.graph.input if i.name not in initializers]
    assert [o.name for o in quantized.graph.output] == [o.name for o in fp32.graph.output]
    with np.load(folder / "calib.npz") as data:
        feed = {"input": np.asarray(data["input"][:8], np.float32)}
    want = make_session(fp32).run(None, feed)
    got = make_session(quantized).run(None, feed)
    for reference, candidate in zip(want, got, strict=True):
        assert candidate.shape == reference.shape
        assert _cosine(reference, candidate) >= 0.9, "the quantized model is far from fp32 on its own calibration data"
    written = json.loads(report.read_text())
    assert written["target_met"] is True and written["sizes"]["quantized_bytes"] == out.stat().st_size


def check_outcome(code: int, stderr: str, out: Path, folder: Path) -> None:
    """Success (checked by :func:`check_success`), or exit 2 with one clean line; nothing
    half-written either way."""
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    if code == 0:
        check_success(folder, folder / "m.onnx", out, folder / "report.json")
        return
    assert code == 2, (code, stderr)
    lines = [line for line in stderr.splitlines() if line.startswith("onnxq:")]
    errors = [line for line in lines if line.startswith("onnxq: error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    assert "internal error" not in errors[0] and "report it" not in errors[0], errors[0]
    assert not out.exists()


def quantize_case(model_bytes: bytes, calib: dict[str, np.ndarray] | None = None, spec: dict | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="onnxq-fuzz-") as name:
        folder = Path(name)
        model = folder / "m.onnx"
        model.write_bytes(model_bytes)
        np.savez(folder / "calib.npz", **(calib if calib is not None else {"input": CALIB}))
        spec_arg = "ort-cpu-x86"
        if spec is not None:
            (folder / "spec.json").write_text(json.dumps(spec))
            spec_arg = str(folder / "spec.json")
        out = folder / "q.onnx"
        inputs = {p.name: p.read_bytes() for p in folder.iterdir()}
        code, stderr = run_main("quantize", str(model), "-o", str(out), "--spec", spec_arg, "--calib",
                                str(folder / "calib.npz"), "--precision", "int8/uint8", "--quiet", "--no-cache",
                                "--report", str(folder / "report.json"))
        check_outcome(code, stderr, out, folder)
        assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in inputs} == inputs


# --------------------------------------------------------------------------- strategies

byte_flips = st.lists(st.tuples(st.integers(0, max(len(CNN_BYTES) - 1, 0)), st.integers(1, 255)), min_size=1, max_size=8)


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    data = bytearray(CNN_BYTES)
    if draw(st.booleans()):
        for position, xor in draw(byte_flips):
            data[position] ^= xor
    else:
        data = data[: draw(st.integers(0, len(data) - 1))]
    return bytes(data)


@st.composite
def mutated_models(draw: st.DrawFn) -> bytes:
    model = onnx.load_from_string(CNN_BYTES)
    kind = draw(st.sampled_from(["delete_node", "opset", "dims", "dtype", "rename_input", "ir_version"]))
    if kind == "delete_node":
        del model.graph.node[draw(st.integers(0, len(model.graph.node) - 1))]
    elif kind == "opset":
        model.opset_import[0].version = draw(st.integers(1, 30))
    elif kind == "dims":
        tensor = model.graph.initializer[draw(st.integers(0, len(model.graph.initializer) - 1))]
        if tensor.dims:
            tensor.dims[draw(st.integers(0, len(tensor.dims) - 1))] = draw(st.integers(0, 70))
        else:
            tensor.dims.append(draw(st.integers(0, 5)))
    elif kind == "dtype":
        tensor = model.graph.initializer[draw(st.integers(0, len(model.graph.initializer) - 1))]
        tensor.data_type = draw(st.sampled_from([1, 2, 3, 6, 7, 10, 11, 16]))
    elif kind == "rename_input":
        node = model.graph.node[draw(st.integers(0, len(model.graph.node) - 1))]
        if node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(["input", "ghost", ""]))
    else:
        model.ir_version = draw(st.integers(0, 20))
    return model.SerializeToString()


@st.composite
def mutated_calibration(draw: st.DrawFn) -> dict[str, np.ndarray]:
    data = CALIB.copy()
    kind = draw(st.sampled_from(["key", "shape", "dtype", "nan", "count", "scale", "extra"]))
    if kind == "key":
        return {draw(st.sampled_from(["Input", "x", "input ", "0"])): data}
    if kind == "shape":
        shape = draw(st.lists(st.integers(1, 20), min_size=0, max_size=5))
        return {"input": np.ones(shape, np.float32)}
    if kind == "dtype":
        dtype = draw(st.sampled_from([np.float16, np.float64, np.int8, np.int64, np.uint8, np.bool_, np.complex64]))
        return {"input": data.astype(dtype)}
    if kind == "nan":
        flat = data.reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return {"input": data}
    if kind == "count":
        return {"input": data[: draw(st.integers(0, 3))]}
    if kind == "scale":
        return {"input": (data * draw(st.sampled_from([0.0, 1e-30, 1e30]))).astype(np.float32)}
    return {"input": data, "other": np.zeros(3)}


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    out: list[tuple] = []
    if isinstance(value, dict):
        for key, child in value.items():
            out.append((*prefix, key))
            out.extend(_paths(child, (*prefix, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value[:3]):
            out.append((*prefix, index))
            out.extend(_paths(child, (*prefix, index)))
    return out


SPEC_PATHS = _paths(SPEC_JSON)


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict:
    spec = json.loads(json.dumps(SPEC_JSON))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(SPEC_PATHS))
        parent: object = spec
        try:
            for key in path[:-1]:
                parent = parent[key]  # type: ignore[index]
            if draw(st.booleans()):
                del parent[path[-1]]  # type: ignore[attr-defined]
            else:
                parent[path[-1]] = draw(st.sampled_from([None, -1, 0, 3.5, "", "int8", [], {}, True, "x" * 50]))  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            continue
    return spec


# --------------------------------------------------------------------------- properties


@QUICK
@given(mutated_bytes())
def test_fuzz_model_bytes(data: bytes) -> None:
    quantize_case(data)


@QUICK
@given(mutated_models())
def test_fuzz_model_structure(data: bytes) -> None:
    quantize_case(data)


@QUICK
@given(mutated_calibration())
def test_fuzz_calibration(calib: dict[str, np.ndarray]) -> None:
    quantize_case(CNN_BYTES, calib=calib)


@QUICK
@given(mutated_specs())
def test_fuzz_spec(spec: dict) -> None:
    quantize_case(CNN_BYTES, spec=spec)


@pytest.mark.slow
@SLOW
@given(mutated_bytes())
def test_fuzz_model_bytes_long(data: bytes) -> None:
    quantize_case(data)


@pytest.mark.slow
@SLOW
@given(mutated_models())
def test_fuzz_model_structure_long(data: bytes) -> None:
    quantize_case(data)


@pytest.mark.slow
@SLOW
@given(mutated_calibration())
def test_fuzz_calibration_long(calib: dict[str, np.ndarray]) -> None:
    quantize_case(CNN_BYTES, calib=calib)


@pytest.mark.slow
@SLOW
@given(mutated_specs())
def test_fuzz_spec_long(spec: dict) -> None:
    quantize_case(CNN_BYTES, spec=spec)


def test_spec_with_list_precision() -> None:
    """The minimal spec mutation the fuzzer found: a quantizer's precision replaced by a list."""
    spec = json.loads(json.dumps(SPEC_JSON))
    next(iter(spec["quantizers"].values()))["precision"] = []
    quantize_case(CNN_BYTES, spec=spec)


def test_success_path_is_checked_and_can_fail() -> None:
    """The clean model succeeds through the full success check; the same check rejects that
    output once one weight scale is flipped in sign (a wrong model that still passes onnx.checker)."""
    with tempfile.TemporaryDirectory(prefix="onnxq-fuzz-") as name:
        folder = Path(name)
        (folder / "m.onnx").write_bytes(CNN_BYTES)
        np.savez(folder / "calib.npz", input=CALIB)
        out, report = folder / "q.onnx", folder / "report.json"
        code, stderr = run_main("quantize", str(folder / "m.onnx"), "-o", str(out), "--spec", "ort-cpu-x86", "--calib",
                                str(folder / "calib.npz"), "--precision", "int8/uint8", "--quiet", "--no-cache", "--report", str(report))
        assert code == 0, stderr
        check_success(folder, folder / "m.onnx", out, report)
        broken = onnx.load(str(out))
        scales = {n.input[1] for n in broken.graph.node if n.op_type == "DequantizeLinear"}
        last_weight_dq = [n for n in broken.graph.node if n.op_type == "DequantizeLinear"
                          and any(t.name == n.input[0] and t.data_type == onnx.TensorProto.INT8 for t in broken.graph.initializer)][-1]
        assert last_weight_dq.input[1] in scales
        for tensor in broken.graph.initializer:
            if tensor.name == last_weight_dq.input[1]:
                tensor.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(tensor), tensor.name))
        onnx.save(broken, str(out))
        with pytest.raises(AssertionError, match="far from fp32"):
            check_success(folder, folder / "m.onnx", out, report)
