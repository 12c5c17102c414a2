"""Shared fixtures: bundled models and a CLI runner."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path | None = None) -> CliResult:
    proc = subprocess.run([sys.executable, "-m", "onnxq", *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def cnn_path() -> Path:
    path = MODELS / "digits_cnn.onnx"
    if not path.exists():
        pytest.skip("bundled CNN missing")
    return path


@pytest.fixture(scope="session")
def transformer_path() -> Path:
    path = MODELS / "digits_transformer.onnx"
    if not path.exists():
        pytest.skip("bundled transformer missing")
    return path
