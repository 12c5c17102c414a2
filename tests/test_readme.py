"""The README's Python example runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent


def test_python_api_example_runs(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(ROOT)
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert isinstance(namespace["quantized_model"], onnx.ModelProto)
    assert any(node.op_type == "QuantizeLinear" for node in namespace["quantized_model"].graph.node)  # type: ignore[union-attr]


def test_readme_has_exactly_two_setup_commands() -> None:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    assert len(commands) == 2
    assert "pip install" in commands[0] and "onnxq quantize models/" in commands[0]
    assert "pip install" in commands[1] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].strip() in ci
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
