"""Shared fixtures: bundled models and a CLI runner.

``run_cli`` runs ``python -m onnxq ARGS`` as a real child process with its own stdout, stderr, exit
code, working directory and environment. A fresh interpreter spends about a second of CPU importing
and compiling onnxq and its libraries before the CLI starts, and the suite runs the CLI a hundred
times; so by default the children are forked from one server process that has done those imports,
and compiled onnxq's bytecode, once (the forkserver idea of :mod:`multiprocessing`). Each child is a
new process that runs ``onnxq/__main__.py`` the way ``python -m`` does: uncaught exceptions print
their traceback and exit 1, ``atexit`` handlers run, fds 1 and 2 are the child's own. Set
``ONNXQ_TEST_SUBPROCESS=1`` to launch a fresh interpreter per run instead.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from onnxq.sensitivity import analyze, engine

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
CLI_TIMEOUT = 600


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str


# The server imports the CLI once, then forks one child per request line ({"args", "cwd", "env",
# "stdout", "stderr"}) and answers with the child's pid, then its exit code. The child leaves the
# loop and runs the CLI at the top level, so the interpreter exits it exactly as `python -m onnxq`.
_SERVER = r"""
import json, os, sys
requests = os.fdopen(os.dup(0), "rb", buffering=0)
replies = os.fdopen(os.dup(1), "wb", buffering=0)
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
os.dup2(null, 1)
# the slow imports every run would repeat; not onnxq itself, which imports onnxruntime: a child
# forked after onnxruntime is imported aborts at exit (its thread pools do not survive fork)
import jsonschema, networkx, numpy, onnx, onnx.shape_inference, onnx.version_converter, tqdm
import compileall, runpy, shutil, tempfile
# onnxq's own bytecode, compiled once into a private folder: with PYTHONDONTWRITEBYTECODE set every
# child would otherwise compile the whole package from source (about half a second a run)
sys.pycache_prefix = tempfile.mkdtemp(prefix="onnxq-test-pyc-")
sys.dont_write_bytecode = False
for folder in ("onnxq", "passes"):
    compileall.compile_dir(folder, quiet=1)
while True:
    line = requests.readline()
    if not line:
        shutil.rmtree(sys.pycache_prefix, ignore_errors=True)
        sys.exit(0)
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        requests.close()
        replies.close()
        break
    replies.write(f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    replies.write(f"{os.waitstatus_to_exitcode(status)}\n".encode())
os.setsid()
os.chdir(request["cwd"])
os.environ.clear()
os.environ.update(request["env"])
for fd, name in ((1, "stdout"), (2, "stderr")):
    os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
os.close(null)
sys.argv = ["onnxq", *request["args"]]
runpy.run_module("onnxq", run_name="__main__", alter_sys=True)
"""


class _ForkServer:
    """One pre-imported interpreter that forks a fresh child per CLI run."""

    def __init__(self) -> None:
        # unbuffered pipes: select() on the reply fd must not miss lines already read into a buffer
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, cwd=ROOT, bufsize=0)
        self.replies = self.proc.stdout
        atexit.register(self.close)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=30)

    def _reply(self, deadline: float | None) -> str:
        ready, _, _ = select.select([self.replies], [], [], deadline)
        if not ready:
            raise TimeoutError
        line = self.replies.readline().decode()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError("the CLI fork server exited")
        return line

    def run(self, args: tuple[str, ...], cwd: Path | None) -> CliResult:
        with tempfile.TemporaryDirectory(prefix="onnxq-cli-") as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            request = {"args": list(args), "cwd": str(cwd or Path.cwd()), "env": dict(os.environ),
                       "stdout": str(out), "stderr": str(err)}
            data = (json.dumps(request) + "\n").encode()
            while data:
                data = data[self.proc.stdin.write(data):]  # type: ignore[union-attr]
            pid = int(self._reply(30))
            try:
                code = int(self._reply(CLI_TIMEOUT))
            except TimeoutError:
                os.killpg(pid, signal.SIGKILL)
                self._reply(30)
                raise subprocess.TimeoutExpired(["onnxq", *args], CLI_TIMEOUT) from None
            return CliResult(code, out.read_text(errors="replace"), err.read_text(errors="replace"))


_server: _ForkServer | None = None


def _fork_server() -> _ForkServer | None:
    global _server
    if os.environ.get("ONNXQ_TEST_SUBPROCESS") == "1" or not hasattr(os, "fork"):
        return None
    if _server is None or _server.proc.poll() is not None:
        _server = _ForkServer()
    return _server


def run_cli(*args: str, cwd: Path | None = None) -> CliResult:
    server = _fork_server()
    if server is not None:
        return server.run(args, cwd)
    proc = subprocess.run([sys.executable, "-m", "onnxq", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=CLI_TIMEOUT)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def analyze_on_the_fake_quant_session(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """``analyze`` with every evaluation in the one whole-model fake-quant session: the slow
    reference path the cut sessions are checked against."""
    engine.USE_CUT_SESSIONS = False
    try:
        return analyze(*args, **kwargs)
    finally:
        engine.USE_CUT_SESSIONS = True


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


@dataclass(frozen=True)
class QuantizedModel:
    """A CLI output shared by the session: the model and its JSON and HTML reports (copy before changing)."""

    model: Path
    report: Path
    html: Path


@pytest.fixture(scope="session")
def cnn_int8_cli(tmp_path_factory: pytest.TempPathFactory, cnn_path: Path) -> QuantizedModel:
    """The bundled CNN quantized once per session by ``onnxq quantize --precision int8/uint8``."""
    folder = tmp_path_factory.mktemp("cnn-int8")
    artifact = QuantizedModel(folder / "cnn.int8.onnx", folder / "report.json", folder / "report.html")
    result = run_cli("quantize", str(cnn_path), "-o", str(artifact.model), "--spec", "ort-cpu-x86", "--precision",
                     "int8/uint8", "--report", str(artifact.report), "--report-html", str(artifact.html), "--quiet",
                     "--no-cache")
    assert result.code == 0, result.stderr
    return artifact
