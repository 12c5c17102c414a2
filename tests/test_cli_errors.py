"""Bad input: one line on stderr, exit 2, no traceback, nothing written, input untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli


def _assert_clean_failure(result, tmp_path: Path, out: Path | None = None) -> None:  # type: ignore[no-untyped-def]
    assert result.code == 2, (result.code, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("onnxq: error:")
    assert "Traceback" not in result.stderr
    if out is not None:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _quantize(model: Path, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    return run_cli("quantize", str(model), "-o", str(out), "--spec", "ort-cpu-x86", "--precision", "int8/uint8", "--quiet", *extra)


def test_missing_model(tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = _quantize(tmp_path / "nope.onnx", out)
    _assert_clean_failure(result, tmp_path, out)
    assert "does not exist" in result.stderr


@pytest.mark.parametrize("content", [b"this is not a protobuf at all \xff\xfe", b""])
def test_not_onnx(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    out = tmp_path / "q.onnx"
    _assert_clean_failure(_quantize(bad, out, "--calib", str(tmp_path / "x.npz")), tmp_path, out)
    assert bad.read_bytes() == content


def test_truncated_model(cnn_path: Path, tmp_path: Path) -> None:
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(cnn_path.read_bytes()[: cnn_path.stat().st_size // 2])
    out = tmp_path / "q.onnx"
    _assert_clean_failure(_quantize(bad, out, "--calib", str(cnn_path.with_name("digits_cnn.calib.npz"))), tmp_path, out)


def test_calibration_mismatch(cnn_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    wrong_name = tmp_path / "names.npz"
    np.savez(wrong_name, pixels=np.zeros((8, 1, 8, 8), np.float32))
    result = _quantize(cnn_path, out, "--calib", str(wrong_name))
    _assert_clean_failure(result, tmp_path, out)
    assert "input" in result.stderr
    data = np.load(cnn_path.with_name("digits_cnn.calib.npz"))["input"]
    wrong_dtype = tmp_path / "dtype.npz"
    np.savez(wrong_dtype, input=data.astype(np.int64))
    _assert_clean_failure(_quantize(cnn_path, out, "--calib", str(wrong_dtype)), tmp_path, out)
    wrong_rank = tmp_path / "rank.npz"
    np.savez(wrong_rank, input=data.reshape(data.shape[0], -1))
    _assert_clean_failure(_quantize(cnn_path, out, "--calib", str(wrong_rank)), tmp_path, out)
    nan = tmp_path / "nan.npz"
    poisoned = data.copy()
    poisoned[3, 0, 0, 0] = np.nan
    np.savez(nan, input=poisoned)
    result = _quantize(cnn_path, out, "--calib", str(nan))
    _assert_clean_failure(result, tmp_path, out)
    assert "NaN" in result.stderr
    pickled = tmp_path / "pickle.npz"
    np.savez(pickled, input=np.array([object()], dtype=object))
    _assert_clean_failure(_quantize(cnn_path, out, "--calib", str(pickled)), tmp_path, out)


def test_unknown_spec_and_precision(cnn_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = run_cli("quantize", str(cnn_path), "-o", str(out), "--spec", "no-such-chip", "--precision", "int8/uint8")
    _assert_clean_failure(result, tmp_path, out)
    assert "ort-cpu-x86" in result.stderr  # names the built-in specs
    result = run_cli("quantize", str(cnn_path), "-o", str(out), "--spec", "ort-cpu-x86", "--precision", "int7/uint8")
    _assert_clean_failure(result, tmp_path, out)


def test_bad_output_paths(cnn_path: Path, tmp_path: Path) -> None:
    before = hashlib.sha256(cnn_path.read_bytes()).hexdigest()
    _assert_clean_failure(_quantize(cnn_path, cnn_path), tmp_path)
    assert hashlib.sha256(cnn_path.read_bytes()).hexdigest() == before
    _assert_clean_failure(_quantize(cnn_path, tmp_path), tmp_path)
    _assert_clean_failure(_quantize(cnn_path, tmp_path / "missing" / "q.onnx"), tmp_path)


def test_missing_calibration_is_an_error(tmp_path: Path, cnn_path: Path) -> None:
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(cnn_path.read_bytes())
    out = tmp_path / "q.onnx"
    result = _quantize(lonely, out)
    _assert_clean_failure(result, tmp_path, out)
    assert "--calib" in result.stderr


def test_usage_error_exit_2(tmp_path: Path) -> None:
    result = run_cli("quantize")
    assert result.code == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_inspect_and_specs(cnn_path: Path) -> None:
    result = run_cli("inspect", str(cnn_path))
    assert result.code == 0
    assert result.stdout.count("Conv") >= 10 and "initializer" in result.stdout
    specs = run_cli("specs")
    assert specs.code == 0 and "ort-cpu-x86" in specs.stdout
