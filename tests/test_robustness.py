"""Robustness and security of every command against bad and hostile input.

Every bad input must give exactly one line ``onnxq: error: ...`` on stderr, exit code 2, no
traceback (unless ``--debug``), leave every input file byte-identical, and leave no output or
temporary file behind. Runs are real subprocesses of ``python -m onnxq`` (``conftest.run_cli``)
or calls of :func:`onnxq.api.quantize`; models run in real onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, CliResult, QuantizedModel, run_cli
from onnx import TensorProto, helper, numpy_helper

from onnxq.api import quantize
from onnxq.errors import OnnxqError
from onnxq.model import load_model, save_model

SPEC = "ort-cpu-x86"
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------- helpers


def _snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path → digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and os.access(p, os.R_OK)}


def assert_clean_failure(result: CliResult, *, contains: Sequence[str] = ()) -> str:
    """Exit 2, exactly one ``onnxq: error:`` line on stderr, no traceback; returns the line."""
    assert result.code == 2, (result.code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("onnxq: error:"), lines[0]
    assert "Traceback" not in result.stderr
    assert "internal error" not in lines[0], lines[0]
    for word in contains:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


def run_unchanged(folder: Path, *args: str) -> CliResult:
    """Run the CLI and check that nothing in ``folder`` changed (inputs untouched, nothing written)."""
    before = _snapshot(folder)
    names_before = sorted(os.listdir(folder))
    result = run_cli(*args)
    assert _snapshot(folder) == before
    assert sorted(os.listdir(folder)) == names_before, "an output or temporary file was left behind"
    return result


def make_matmul_model(path: Path, *, opset: int = 17, input_shape: Sequence[int | str | None] | None = (4, 16),
                      dtype: int = TensorProto.FLOAT, nothing_to_quantize: bool = False, ir_version: int = 8) -> Path:
    """x[.,16] → MatMul(W 16×8) → Relu → y; or, with ``nothing_to_quantize``, only Relu and Tanh (no op the spec quantizes)."""
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 8)).astype(np_dtype), "W")
    x = helper.make_tensor_value_info("x", dtype, None if input_shape is None else list(input_shape))
    if nothing_to_quantize:
        nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"), helper.make_node("Tanh", ["h"], ["y"], name="tanh")]
        y = helper.make_tensor_value_info("y", dtype, ["N", 16])
        inits = []
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="relu")]
        y = helper.make_tensor_value_info("y", dtype, ["N", 8])
        inits = [weight]
    graph = helper.make_graph(nodes, "tiny", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    path.write_bytes(model.SerializeToString())
    return path


def write_calib(path: Path, shape: Sequence[int] = (32, 16), dtype: type = np.float32, key: str = "x") -> Path:
    np.savez(path, **{key: np.random.default_rng(1).standard_normal(shape).astype(dtype)})
    return path


def quantize_cli(model: Path, out: Path, *extra: str) -> CliResult:
    return run_cli("quantize", str(model), "-o", str(out), "--spec", SPEC, "--precision", "int8/uint8", "--quiet",
                   "--no-cache", *extra)


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def cnn_quantized(cnn_int8_cli: QuantizedModel) -> Path:
    """onnxq's own int8 output of the bundled CNN (an already-quantized model), built once per session."""
    return cnn_int8_cli.model


# --------------------------------------------------------------------------- models


def test_unreadable_model(work: Path) -> None:
    model = make_matmul_model(work / "m.onnx")
    write_calib(work / "m.calib.npz")
    model.chmod(0)
    try:
        if os.access(model, os.R_OK):
            pytest.skip("running as root: chmod 000 does not make the file unreadable")
        assert_clean_failure(run_unchanged(work, "quantize", str(model), "-o", str(work / "q.onnx"), "--spec", SPEC,
                                           "--precision", "int8/uint8"), contains=["cannot read"])
    finally:
        model.chmod(0o644)


@pytest.mark.parametrize("command", ["quantize", "inspect", "validate"])
def test_model_is_missing_or_a_directory(work: Path, command: str) -> None:
    folder_model = work / "dir.onnx"
    folder_model.mkdir()
    for target, word in ((work / "nope.onnx", "does not exist"), (folder_model, "directory")):
        args = {"quantize": ["quantize", str(target), "-o", str(work / "q.onnx"), "--spec", SPEC, "--calib", "x.npz"],
                "inspect": ["inspect", str(target)],
                "validate": ["validate", str(target), "--spec", SPEC]}[command]
        assert_clean_failure(run_unchanged(work, *args), contains=[word])


def _garbage(cnn: bytes) -> dict[str, bytes]:
    return {
        "text": b"ir_version: 8\ngraph { }\n",
        "random": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated": cnn[: len(cnn) - 7],
        "zip": b"PK\x03\x04" + b"\0" * 100,
        "no_graph": onnx.ModelProto(ir_version=8).SerializeToString(),
    }


@pytest.mark.parametrize("kind", ["text", "truncated", *(pytest.param(k, marks=pytest.mark.slow) for k in ("random", "zip", "no_graph"))])
def test_not_onnx_every_command(work: Path, cnn_path: Path, kind: str) -> None:
    bad = work / "bad.onnx"
    bad.write_bytes(_garbage(cnn_path.read_bytes())[kind])
    write_calib(work / "bad.calib.npz", (8, 1, 16, 16), key="input")
    assert_clean_failure(run_unchanged(work, "quantize", str(bad), "-o", str(work / "q.onnx"), "--spec", SPEC,
                                       "--precision", "int8/uint8"))
    assert_clean_failure(run_unchanged(work, "inspect", str(bad)))
    assert_clean_failure(run_unchanged(work, "validate", str(bad), "--spec", SPEC))


def _break_unknown_op(model: onnx.ModelProto) -> None:
    model.graph.node[0].op_type = "NoSuchOp"


def _break_undefined_input(model: onnx.ModelProto) -> None:
    model.graph.node[1].input[0] = "undefined_tensor"


def _break_weight_dims(model: onnx.ModelProto) -> None:
    model.graph.initializer[0].dims[0] = 17


def _break_ir_version(model: onnx.ModelProto) -> None:
    model.ir_version = 99


@pytest.mark.parametrize("breaker", [_break_unknown_op, _break_undefined_input, _break_weight_dims, _break_ir_version],
                         ids=lambda f: f.__name__[7:])
def test_model_failing_checker(work: Path, breaker: Callable[[onnx.ModelProto], None]) -> None:
    path = make_matmul_model(work / "m.onnx")
    model = onnx.load(str(path))
    breaker(model)
    path.write_bytes(model.SerializeToString())
    write_calib(work / "m.calib.npz")
    assert_clean_failure(run_unchanged(work, "quantize", str(path), "-o", str(work / "q.onnx"), "--spec", SPEC,
                                       "--precision", "int8/uint8"), contains=["onnx.checker"])
    assert_clean_failure(run_unchanged(work, "inspect", str(path)), contains=["onnx.checker"])


@pytest.mark.parametrize(("opset", "word"), [(7, "older"), (8, "older"), (27, "newer"), (40, "newer")])
def test_opset_out_of_range(work: Path, opset: int, word: str) -> None:
    path = make_matmul_model(work / "m.onnx", opset=opset)
    write_calib(work / "m.calib.npz")
    assert_clean_failure(run_unchanged(work, "quantize", str(path), "-o", str(work / "q.onnx"), "--spec", SPEC,
                                       "--precision", "int8/uint8"), contains=[word, str(opset)])


def test_nothing_to_quantize(work: Path) -> None:
    path = make_matmul_model(work / "m.onnx", input_shape=["N", 16], nothing_to_quantize=True)
    write_calib(work / "m.calib.npz")
    assert_clean_failure(run_unchanged(work, "quantize", str(path), "-o", str(work / "q.onnx"), "--spec", SPEC,
                                       "--precision", "int8/uint8"), contains=["nothing to quantize"])


def test_already_quantized(work: Path, cnn_quantized: Path, cnn_path: Path) -> None:
    model = work / "cnn.int8.onnx"
    shutil.copy(cnn_quantized, model)
    shutil.copy(cnn_path.with_name("digits_cnn.calib.npz"), work / "cnn.int8.calib.npz")
    assert_clean_failure(run_unchanged(work, "quantize", str(model), "-o", str(work / "q.onnx"), "--spec", SPEC,
                                       "--precision", "int8/uint8"), contains=["already quantized"])
    # ... while inspect and validate accept it
    assert run_cli("inspect", str(model)).code == 0
    assert run_cli("validate", str(model), "--spec", SPEC).code == 0


def test_fp16_model_is_refused_clearly(work: Path) -> None:
    """Decision: float16 models are refused with a clear message (onnxq quantizes float32 graphs)."""
    path = make_matmul_model(work / "m.onnx", dtype=TensorProto.FLOAT16, opset=19)
    write_calib(work / "m.calib.npz", dtype=np.float16)
    assert_clean_failure(run_unchanged(work, "quantize", str(path), "-o", str(work / "q.onnx"), "--spec", SPEC,
                                       "--precision", "int8/uint8"), contains=["float16", "float32"])
    assert run_cli("inspect", str(path)).code == 0


def test_fp16_model_through_the_api_does_not_crash(work: Path) -> None:
    """The API raises an OnnxqError (no other exception) on a float16 model."""
    path = make_matmul_model(work / "m.onnx", dtype=TensorProto.FLOAT16, opset=19)
    feeds = [{"x": np.random.default_rng(i).standard_normal((4, 16)).astype(np.float16)} for i in range(4)]
    with pytest.raises(OnnxqError):
        quantize(path, feeds, SPEC, precision="int8/uint8")


@pytest.mark.parametrize("shape", [["N", 16], ["N", "K"], [None, None]], ids=["dynamic_batch", "all_dynamic", "unknown_dims"])
def test_dynamic_or_missing_dims_quantize(work: Path, shape: list[int | str | None]) -> None:
    path = make_matmul_model(work / "m.onnx", input_shape=shape)
    write_calib(work / "m.calib.npz")
    out = work / "q.onnx"
    result = quantize_cli(path, out)
    assert result.code == 0, result.stderr
    onnx.checker.check_model(str(out), full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        y = session.run(None, {"x": np.ones((batch, 16), np.float32)})[0]
        assert y.shape == (batch, 8)


def test_input_without_shape_is_refused(work: Path) -> None:
    """A graph input with no shape at all fails onnx.checker: refused, not crashed."""
    path = make_matmul_model(work / "m.onnx", input_shape=None)
    write_calib(work / "m.calib.npz")
    assert_clean_failure(run_unchanged(work, "quantize", str(path), "-o", str(work / "q.onnx"), "--spec", SPEC,
                                       "--precision", "int8/uint8"))


def test_debug_shows_the_traceback(work: Path) -> None:
    result = run_cli("inspect", str(work / "nope.onnx"), "--debug")
    assert result.code != 0 and "Traceback" in result.stderr


# --------------------------------------------------------------------------- calibration data


def _calib_cases(folder: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name → (extra CLI args, words the error must contain)."""
    rng = np.random.default_rng(2)
    good = rng.standard_normal((32, 16)).astype(np.float32)
    cases: dict[str, tuple[list[str], list[str]]] = {}

    def npz(name: str, words: list[str], **arrays: np.ndarray) -> None:
        np.savez(folder / f"{name}.npz", **arrays)
        cases[name] = (["--calib", str(folder / f"{name}.npz")], words)

    npz("wrong_name", ["x"], pixels=good)
    npz("wrong_rank", ["rank"], x=good.reshape(32, 4, 4))
    npz("wrong_width", ["shape"], x=good[:, :15])
    npz("wrong_dtype", ["dtype"], x=good.astype(np.int64))
    npz("complex", ["dtype"], x=good.astype(np.complex64))
    npz("strings", ["dtype"], x=np.array([["a"] * 16] * 8))
    npz("too_few", ["sample"], x=good[:1])
    npz("empty", ["empty"], x=good[:0])
    npz("scalar", ["scalar"], x=np.float32(1.0))
    nan = good.copy()
    nan[5, 3] = np.nan
    npz("nan", ["NaN"], x=nan)
    inf = good.copy()
    inf[0, 0] = -np.inf
    npz("inf", ["Inf"], x=inf)
    npz("uneven_counts", ["sample counts"], x=good, extra_input=good[:3])  # extra key is ignored, counts are per input
    cases.pop("uneven_counts")
    np.savez(folder / "pickled.npz", x=np.array([{"a": 1}, None], dtype=object))
    cases["pickled"] = (["--calib", str(folder / "pickled.npz")], ["pickled"])
    np.save(folder / "plain.npy", good)
    cases["npy"] = (["--calib", str(folder / "plain.npy")], [".npy"])
    (folder / "text.npz").write_text("x = [1, 2, 3]\n")
    cases["text"] = (["--calib", str(folder / "text.npz")], ["not a .npz"])
    (folder / "broken_zip.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    cases["broken_zip"] = (["--calib", str(folder / "broken_zip.npz")], ["npz"])
    (folder / "empty_dir").mkdir()
    cases["empty_dir"] = (["--calib", str(folder / "empty_dir")], ["no .npz"])
    (folder / "ragged_dir").mkdir()
    np.savez(folder / "ragged_dir" / "a.npz", x=good[:4])
    np.savez(folder / "ragged_dir" / "b.npz", x=good[:4, :8])
    cases["ragged_dir"] = (["--calib", str(folder / "ragged_dir")], ["feed 1"])
    cases["missing"] = (["--calib", str(folder / "nope.npz")], ["does not exist"])
    return cases


CALIB_CASES = ["wrong_name", "wrong_rank", "wrong_width", "wrong_dtype", "complex", "strings", "too_few", "empty",
               "scalar", "nan", "inf", "pickled", "npy", "text", "broken_zip", "empty_dir", "ragged_dir", "missing"]


@pytest.mark.parametrize("case", CALIB_CASES)
def test_bad_calibration(work: Path, case: str) -> None:
    model = make_matmul_model(work / "m.onnx", input_shape=["N", 16])
    data = work / "data"
    data.mkdir()
    args, words = _calib_cases(data)[case]
    assert_clean_failure(run_unchanged(work, "quantize", str(model), "-o", str(work / "q.onnx"), "--spec", SPEC,
                                       "--precision", "int8/uint8", *args), contains=words)


def test_too_few_samples_for_a_fixed_batch(work: Path) -> None:
    model = make_matmul_model(work / "m.onnx", input_shape=[4, 16])
    write_calib(work / "m.calib.npz", (3, 16))
    assert_clean_failure(run_unchanged(work, "quantize", str(model), "-o", str(work / "q.onnx"), "--spec", SPEC,
                                       "--precision", "int8/uint8"), contains=["fixed at 4"])


def test_pickled_npz_refused_by_the_api(work: Path) -> None:
    model = make_matmul_model(work / "m.onnx", input_shape=["N", 16])
    np.savez(work / "p.npz", x=np.array([object(), object()], dtype=object))
    with pytest.raises(OnnxqError, match="pickled"):
        quantize(model, work / "p.npz", SPEC, precision="int8/uint8")


# --------------------------------------------------------------------------- specs and plans


@pytest.mark.parametrize("fixture", ["bad_syntax.json", "bad_schema.json", "bad_meaning.json"])
def test_bad_spec_file(work: Path, fixture: str) -> None:
    model = make_matmul_model(work / "m.onnx", input_shape=["N", 16])
    write_calib(work / "m.calib.npz")
    spec = work / fixture
    shutil.copy(ROOT / "tests" / "data" / "specs" / fixture, spec)
    line = assert_clean_failure(run_unchanged(work, "quantize", str(model), "-o", str(work / "q.onnx"),
                                              "--spec", str(spec), "--precision", "int8/uint8"))
    assert "spec" in line
    assert_clean_failure(run_unchanged(work, "validate", str(model), "--spec", str(spec)))
    checked = run_unchanged(work, "spec-check", str(spec))
    assert checked.code == 2 and "Traceback" not in checked.stderr and checked.stderr.strip()


def test_spec_check_bad_paths(work: Path) -> None:
    assert_clean_failure(run_unchanged(work, "spec-check", str(work / "nope.json")), contains=["does not exist"])
    assert_clean_failure(run_unchanged(work, "spec-check", str(work)), contains=["directory"])
    (work / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    checked = run_unchanged(work, "spec-check", str(work / "binary.json"))
    assert checked.code == 2 and "Traceback" not in checked.stderr


def test_bad_plan_file(work: Path) -> None:
    model = make_matmul_model(work / "m.onnx", input_shape=["N", 16])
    write_calib(work / "m.calib.npz")
    (work / "broken.json").write_text('{"format": "onnxq-plan/1", "layers": {')
    (work / "unknown_layer.json").write_text(json.dumps({"format": "onnxq-plan/1", "layers": {"ghost": "int8/uint8"}}))
    (work / "bad_candidate.json").write_text(json.dumps({"format": "onnxq-plan/1", "layers": {"mm": "int7/uint8"}}))
    for name in ("broken.json", "unknown_layer.json", "bad_candidate.json", "nope.json"):
        assert_clean_failure(run_unchanged(work, "quantize", str(model), "-o", str(work / "q.onnx"), "--spec", SPEC,
                                           "--plan", str(work / name)))


# --------------------------------------------------------------------------- output paths


def test_output_paths(work: Path) -> None:
    model = make_matmul_model(work / "m.onnx", input_shape=["N", 16])
    calib = write_calib(work / "m.calib.npz")
    (work / "sub").mkdir()
    (work / "afile").write_text("not a folder")
    os.link(model, work / "hardlink.onnx")
    for out, words in ((model, ["input"]), (work / "hardlink.onnx", ["input"]), (calib, ["input"]),
                       (work / "sub", ["directory"]), (work / "missing" / "q.onnx", ["does not exist"]),
                       (work / "afile" / "q.onnx", ["not a folder"])):
        assert_clean_failure(run_unchanged(work, "quantize", str(model), "-o", str(out), "--spec", SPEC,
                                           "--precision", "int8/uint8"), contains=words)
    assert_clean_failure(run_unchanged(work, "quantize", str(model), "-o", str(work / "q.onnx"), "--spec", SPEC,
                                       "--precision", "int8/uint8", "--report", str(work / "q.onnx")))


def test_unwritable_output_folder(work: Path) -> None:
    model = make_matmul_model(work / "m.onnx", input_shape=["N", 16])
    write_calib(work / "m.calib.npz")
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a 555 folder stays writable")
        assert_clean_failure(run_unchanged(work, "quantize", str(model), "-o", str(locked / "q.onnx"), "--spec", SPEC,
                                           "--precision", "int8/uint8"), contains=["not writable"])
    finally:
        locked.chmod(0o755)


def test_failed_run_leaves_nothing(work: Path) -> None:
    """A failure after the output path was accepted (NaN in calibration) writes nothing."""
    model = make_matmul_model(work / "m.onnx", input_shape=["N", 16])
    data = np.ones((8, 16), np.float32)
    data[2, 2] = np.nan
    np.savez(work / "m.calib.npz", x=data)
    assert_clean_failure(run_unchanged(work, "quantize", str(model), "-o", str(work / "q.onnx"), "--spec", SPEC,
                                       "--precision", "int8/uint8", "--report", str(work / "r.json")))


# --------------------------------------------------------------------------- hostile files


def _external_model(folder: Path, location: str) -> Path:
    """A MatMul model saved with external data, then hand-edited to point at ``location``."""
    path = make_matmul_model(folder / "ext.onnx", input_shape=["N", 16])
    model = onnx.load(str(path))
    onnx.external_data_helper.convert_model_to_external_data(model, all_tensors_to_one_file=True,
                                                             location="ext.data", size_threshold=0)
    onnx.save_model(model, str(path))
    assert (folder / "ext.data").exists()
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())
    write_calib(folder / "ext.calib.npz")
    return path


@pytest.mark.parametrize("location", ["../../etc/passwd", "link.bin", *(pytest.param(loc, marks=pytest.mark.slow)
                                                            for loc in ("/etc/passwd", "../outside.bin", "sub/../../outside.bin"))])
def test_external_data_escaping_is_refused(work: Path, location: str) -> None:
    outside = work.parent / "outside.bin"
    outside.write_bytes(b"\0" * 4096)
    (work / "link.bin").symlink_to(outside)
    path = _external_model(work, location)
    for args in (["quantize", str(path), "-o", str(work / "q.onnx"), "--spec", SPEC, "--precision", "int8/uint8"],
                 ["inspect", str(path)], ["validate", str(path), "--spec", SPEC]):
        assert_clean_failure(run_unchanged(work, *args), contains=["refusing external data"])
    with pytest.raises(OnnxqError, match="outside the model's folder"):
        load_model(path)


def test_external_data_past_end_or_missing(work: Path) -> None:
    path = _external_model(work, "ext.data")
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "offset":
            entry.value = str(10**9)
    past_end = work / "past.onnx"
    past_end.write_bytes(model.SerializeToString())
    assert_clean_failure(run_unchanged(work, "inspect", str(past_end)), contains=["outside"])
    missing = _external_model(work, "ext.data")
    (work / "ext.data").rename(work / "moved.data")
    assert_clean_failure(run_unchanged(work, "inspect", str(missing)), contains=["missing"])


def test_external_data_inside_the_folder_works(work: Path) -> None:
    path = _external_model(work, "ext.data")
    out = work / "q.onnx"
    result = quantize_cli(path, out)
    assert result.code == 0, result.stderr
    onnx.checker.check_model(str(out), full_check=True)
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": np.ones((2, 16), np.float32)})


def test_save_model_is_atomic_and_keeps_the_model(work: Path) -> None:
    model = load_model(make_matmul_model(work / "m.onnx", input_shape=["N", 16])).proto
    before = model.SerializeToString(deterministic=True)
    save_model(model, work / "copy.onnx")
    assert model.SerializeToString(deterministic=True) == before
    assert (work / "copy.onnx").read_bytes() == before
    assert sorted(os.listdir(work)) == ["copy.onnx", "m.onnx"]


# --------------------------------------------------------------------------- determinism


def _report_without_timing(path: Path) -> dict[str, object]:
    report = json.loads(path.read_text())
    report.pop("time_per_phase", None)
    report.pop("seconds", None)
    report.pop("latency", None)  # measured onnxruntime latency on this machine
    for value in report.values():  # nested timing fields (e.g. the search's) are timing too
        if isinstance(value, dict):
            value.pop("seconds", None)
            value.pop("time_per_phase", None)
    return report


@pytest.mark.parametrize("mode", [["--precision", "int8/uint8"],
                                  pytest.param(["--precision", "int8/uint8", "--calibration", "entropy"],
                                               marks=pytest.mark.slow)],
                         ids=["minmax", "entropy"])
def test_determinism(tmp_path: Path, cnn_path: Path, mode: list[str]) -> None:
    """Same inputs and seed: byte-identical models; reports identical except timing fields.

    The report's ``time_per_phase``, ``seconds`` and measured ``latency`` are wall-clock timings
    and differ between runs, so the reports are compared without them.
    """
    runs = []
    for index in range(2):
        folder = tmp_path / f"run{index}"
        folder.mkdir()
        result = run_cli("quantize", str(cnn_path), "-o", "q.onnx", "--spec", SPEC, "--report", "r.json", "--seed", "7",
                         "--quiet", "--no-cache", *mode, cwd=folder)
        assert result.code == 0, result.stderr
        runs.append(folder)
    assert (runs[0] / "q.onnx").read_bytes() == (runs[1] / "q.onnx").read_bytes()
    assert _report_without_timing(runs[0] / "r.json") == _report_without_timing(runs[1] / "r.json")


def test_determinism_api(cnn_path: Path) -> None:
    calib = cnn_path.with_name("digits_cnn.calib.npz")
    first = quantize(cnn_path, calib, SPEC, precision="int8/uint8")
    second = quantize(cnn_path, calib, SPEC, precision="int8/uint8")
    assert first.model.SerializeToString(deterministic=True) == second.model.SerializeToString(deterministic=True)


def test_external_data_writer_round_trip(work: Path, cnn_path: Path) -> None:
    """The >2 GB save path's writer, on a small model: the file runs in onnxruntime, the proto is restored exactly."""
    from onnxq.model import _externalize, _internalize

    model = load_model(cnn_path).proto
    before = model.SerializeToString(deterministic=True)
    moved = _externalize(model, work / "w.onnx.data", "w.onnx.data", threshold=1024)
    assert moved
    (work / "w.onnx").write_bytes(model.SerializeToString(deterministic=True))
    _internalize(moved, work / "w.onnx.data")
    assert model.SerializeToString(deterministic=True) == before
    onnx.checker.check_model(str(work / "w.onnx"), full_check=True)
    feed = {"input": np.ones((2, 1, 16, 16), np.float32)}
    a = ort.InferenceSession(str(work / "w.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    b = ort.InferenceSession(str(cnn_path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_array_equal(a, b)
    assert load_model(work / "w.onnx").sha256 == load_model(cnn_path).sha256


@pytest.mark.parametrize("mode", [["--precision", "int8/int8"], []], ids=["uniform", "search"])
def test_an_op_an_integer_target_cannot_run_is_named(work: Path, mode: list[str]) -> None:
    """MatMul → Tanh → MatMul on edge-int-only: no integer Tanh and no float fallback. It was
    reported as an onnxq fault ("the plan should never allow it"), or, in the search, as an
    onnxruntime load failure of the written model."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "W1"),
               numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
             helper.make_node("MatMul", ["t", "W2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "tanh", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), work / "m.onnx")
    write_calib(work / "m.calib.npz", (64, 16))
    assert_clean_failure(run_unchanged(work, "quantize", str(work / "m.onnx"), "-o", str(work / "q.onnx"), "--spec",
                                       "edge-int-only", "--quiet", "--no-cache", *mode),
                         contains=["Tanh (node tanh)", "cannot run", "float fallback"])
