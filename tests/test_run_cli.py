"""conftest.run_cli: a forked CLI run behaves as a fresh ``python -m onnxq`` process."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from conftest import run_cli
from onnx import TensorProto, helper


def _model(path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_exit_codes_and_streams_are_the_childs(tmp_path: Path) -> None:
    ok = run_cli("--help")
    assert ok.code == 0 and "usage" in ok.stdout.lower() and ok.stderr == ""
    usage = run_cli("quantize")
    assert usage.code == 2 and usage.stdout == "" and usage.stderr.strip()
    crash = run_cli("inspect", str(tmp_path / "missing.onnx"), "--debug")  # --debug lets the exception escape
    assert crash.code == 1 and "Traceback (most recent call last)" in crash.stderr and "missing.onnx" in crash.stderr


@pytest.mark.slow  # a fresh interpreter beside the forked one: ~8 s
def test_cwd_and_environment_are_the_callers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _model(tmp_path / "relative.onnx")
    assert run_cli("inspect", "relative.onnx", cwd=tmp_path).code == 0
    assert run_cli("inspect", "relative.onnx").code == 2  # not found from the default working directory
    monkeypatch.setenv("ONNXQ_TEST_SUBPROCESS", "1")
    fresh = run_cli("inspect", "relative.onnx", cwd=tmp_path)
    monkeypatch.delenv("ONNXQ_TEST_SUBPROCESS")
    forked = run_cli("inspect", "relative.onnx", cwd=tmp_path)
    assert (forked.code, forked.stdout, forked.stderr) == (fresh.code, fresh.stdout, fresh.stderr)
    monkeypatch.setenv("COLUMNS", "50")  # argparse wraps help to the terminal width it reads from the environment
    narrow = run_cli("--help").stdout
    monkeypatch.setenv("COLUMNS", "200")
    wide = run_cli("--help").stdout
    assert max(map(len, narrow.splitlines())) <= 50 < max(map(len, wide.splitlines()))
