"""Scale benchmark of the sensitivity engine: cost per depth, wall time and peak RSS of BERT-size encoders.

Usage::

    python benchmarks/bench_scale.py [--workdir /tmp/onnxq-bench-scale] [--tasks depth e22 s22 e110]
                                     [--timeout 900] [--vmem-kb 20000000]

Builds (onnx.helper, seeded random weights, no torch) post-LN BERT-style encoders — token
embedding Gather + positions + LayerNorm, attention with explicit MatMuls, Erf GELU MLP, mean
pooling, tanh pooler and a 4-class head; opset 17, dynamic batch, sequence length 64 — and
runs every measurement in its own subprocess under ``ulimit -v`` and a timeout, with the peak
RSS from ``os.wait4``:

* ``depth``: ``onnxq.sensitivity.analyze`` (every candidate of the spec, pairs on, ``--depth-samples``)
  on 2-, 4- and 8-layer encoders of the 22M width; cost in plain-inference equivalents (the
  analysis' seconds over one fp32 pass over the same samples, measured in the same process)
  per layer × candidate;
* ``e22``: ``onnxq quantize --max-drop 0.01`` on the 6-layer, 22M-parameter encoder (MiniLM
  layout: vocab 30522, hidden 384, 6 heads, intermediate 1536);
* ``s22``: ``onnxq.sensitivity.analyze`` alone on it, 128 samples, every candidate, pairs on;
* ``e110``: ``onnxq quantize --max-drop 0.01`` on a 12-layer, 110M-parameter BERT-base-size
  encoder (hidden 768, 12 heads, intermediate 3072).

The machine is shared: the load average is printed with every row.

Results 2026-11-30 (2 cores, shared; onnxruntime 1.32.0):

| run | seconds | peak RSS MiB | load |
|---|---|---|---|
| bert22m quantize --max-drop 0.01, engine before (eef2698) | killed at 870 (timeout) | 8455 at kill | 10-11 |
| bert22m quantize --max-drop 0.01, this engine | 619 | 1720 | 9.6 |
| bert22m quantize --max-drop 0.01, engine before (eef2698) | 169.9 | 8444 | 2.5 |
| bert22m quantize --max-drop 0.01, this engine | 91.5 | 1766 | 2.0 |
| bert22m analyze, 128 samples, every candidate (663 evaluations), this engine | killed at 500 (timeout) | 3099 at kill | 4-5 |
| bert110m (109M, 416 MiB) quantize --max-drop 0.01, 2026-11-30 14:47 (git f005d67, `--tasks e110`; before: killed at 9 min, 24.2 GB) | 703.3 | 7712 | 1.7 |
| same, fp32 timing session rebuilt per plan (71aa6f1, reverted) | 787.9 | 7896 | 1.8 |

Depth table (``--depth-samples 8``, load 8-11, so the plain-pass denominators are noisy):

| layers | analysed layers | layer×candidate entries | evaluations | seconds | plain pass ms | cost (plain passes) | peak RSS MiB |
|---|---|---|---|---|---|---|---|
| 2 | 27 | 185 | 240 | 166.6 | 558.2 | 298 | 1144 |
| 4 | 51 | 345 | 452 | 216.6 | 294.9 | 734 | 1452 |
| 8 | timed out at 600 s under load 11 | | | | | | 1783 |

Evaluations per layer × candidate entry: 1.30 (2 layers), 1.31 (4 layers): linear.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["EncoderShape", "build_encoder", "main"]

ROOT = Path(__file__).resolve().parents[1]
SPEC = "ort-cpu-x86"
SEQ = 64
CLASSES = 4


@dataclass(frozen=True)
class EncoderShape:
    """Sizes of a BERT-style encoder."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int = 30522


MINILM = EncoderShape(6, 384, 6, 1536)
BERT_BASE = EncoderShape(12, 768, 12, 3072)


class _Builder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], std: float = 0.02) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * std).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def linear(self, x: str, name: str, fan_in: int, fan_out: int) -> str:
        w = self.weight(f"{name}.weight", (fan_in, fan_out), std=fan_in ** -0.5)
        b = self.const(f"{name}.bias", np.zeros(fan_out, np.float32))
        return self.op("Add", [self.op("MatMul", [x, w], f"{name}/MatMul"), b], f"{name}/Add")

    def layer_norm(self, x: str, name: str, hidden: int) -> str:
        g = self.const(f"{name}.gamma", np.ones(hidden, np.float32))
        b = self.const(f"{name}.beta", np.zeros(hidden, np.float32))
        return self.op("LayerNormalization", [x, g, b], name, axis=-1, epsilon=1e-12)


def _attention(g: _Builder, x: str, name: str, shape: EncoderShape) -> str:
    d = shape.hidden // shape.heads
    split = g.const(f"{name}.split_shape", np.array([0, SEQ, shape.heads, d], np.int64))
    merge = g.const(f"{name}.merge_shape", np.array([0, SEQ, shape.hidden], np.int64))

    def heads(t: str, tag: str, perm: list[int]) -> str:
        return g.op("Transpose", [g.op("Reshape", [t, split], f"{name}/{tag}/Reshape")], f"{name}/{tag}/Transpose",
                    perm=perm)

    q = heads(g.linear(x, f"{name}/q", shape.hidden, shape.hidden), "q", [0, 2, 1, 3])
    k = heads(g.linear(x, f"{name}/k", shape.hidden, shape.hidden), "k", [0, 2, 3, 1])
    v = heads(g.linear(x, f"{name}/v", shape.hidden, shape.hidden), "v", [0, 2, 1, 3])
    scale = g.const(f"{name}.scale", np.array(d ** -0.5, np.float32))
    scores = g.op("Mul", [g.op("MatMul", [q, k], f"{name}/scores/MatMul"), scale], f"{name}/scores/Mul")
    probs = g.op("Softmax", [scores], f"{name}/Softmax", axis=-1)
    ctx = g.op("MatMul", [probs, v], f"{name}/context/MatMul")
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], f"{name}/context/Transpose", perm=[0, 2, 1, 3]), merge],
               f"{name}/context/Reshape")
    return g.linear(ctx, f"{name}/o", shape.hidden, shape.hidden)


def _gelu(g: _Builder, x: str, name: str) -> str:
    sqrt2 = g.const(f"{name}.sqrt2", np.array(np.sqrt(2.0), np.float32))
    one = g.const(f"{name}.one", np.array(1.0, np.float32))
    half = g.const(f"{name}.half", np.array(0.5, np.float32))
    erf = g.op("Erf", [g.op("Div", [x, sqrt2], f"{name}/Div")], f"{name}/Erf")
    return g.op("Mul", [g.op("Mul", [x, g.op("Add", [erf, one], f"{name}/Add")], f"{name}/Mul"), half],
                f"{name}/Mul_1")


def build_encoder(shape: EncoderShape, seed: int = 0) -> onnx.ModelProto:
    """A seeded random BERT-style encoder (opset 17, IR 8, dynamic batch, ``input_ids`` → ``logits``)."""
    g = _Builder(np.random.default_rng(seed))
    tok = g.weight("embeddings.word", (shape.vocab, shape.hidden))
    pos = g.weight("embeddings.position", (1, SEQ, shape.hidden))
    x = g.op("Add", [g.op("Gather", [tok, "input_ids"], "embeddings/Gather", axis=0), pos], "embeddings/Add")
    x = g.layer_norm(x, "embeddings/LayerNorm", shape.hidden)
    for i in range(shape.layers):
        name = f"layer{i}"
        x = g.layer_norm(g.op("Add", [x, _attention(g, x, f"{name}/attn", shape)], f"{name}/attn/residual"),
                         f"{name}/ln1", shape.hidden)
        h = _gelu(g, g.linear(x, f"{name}/fc1", shape.hidden, shape.ffn), f"{name}/gelu")
        x = g.layer_norm(g.op("Add", [x, g.linear(h, f"{name}/fc2", shape.ffn, shape.hidden)], f"{name}/residual"),
                         f"{name}/ln2", shape.hidden)
    pooled = g.op("ReduceMean", [x], "pool/ReduceMean", axes=[1], keepdims=0)
    pooled = g.op("Tanh", [g.linear(pooled, "pooler", shape.hidden, shape.hidden)], "pool/Tanh")
    logits = g.linear(pooled, "head", shape.hidden, CLASSES)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits/Identity"))
    graph = helper.make_graph(
        g.nodes, "bert", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", SEQ])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)


def write_encoder(workdir: Path, stem: str, shape: EncoderShape, samples: int = 128) -> Path:
    """``<stem>.onnx`` and ``<stem>.calib.npz`` (``samples`` random token sequences) in ``workdir``."""
    path = workdir / f"{stem}.onnx"
    if not path.exists():
        onnx.save(build_encoder(shape), str(path))
        ids = np.random.default_rng(1).integers(0, shape.vocab, size=(samples, SEQ), dtype=np.int64)
        np.savez(workdir / f"{stem}.calib.npz", input_ids=ids)
    return path


# -- subprocess runner ----------------------------------------------------------------------------

def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_limited(argv: list[str], timeout: float, vmem_kb: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``argv`` under ``ulimit -v vmem_kb`` and ``timeout``: wall seconds, peak RSS (MiB), CPU seconds
    (user + system, children included), exit code, output."""
    script = f"ulimit -v {int(vmem_kb)}; exec timeout {int(timeout)} {shlex.join(argv)}"
    started = time.perf_counter()
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, cwd=ROOT)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": time.perf_counter() - started, "peak_rss_mib": usage.ru_maxrss / 1024,
            "cpu_seconds": usage.ru_utime + usage.ru_stime, "exit": proc.returncode, "output": out[-3000:],
            "load": load()}


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


_DEPTH_CODE = """
import json, sys, time
import numpy as np, onnx, onnxruntime as ort
from onnxq.sensitivity import analyze
from onnxq.spec import load_spec
model = onnx.load(sys.argv[1]); ids = np.load(sys.argv[2])["input_ids"][:int(sys.argv[3])]
feeds = [{"input_ids": ids}]
s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
s.run(None, feeds[0]); times = []
for _ in range(5):
    t = time.perf_counter(); s.run(None, feeds[0]); times.append(time.perf_counter() - t)
del s
t = time.perf_counter()
sens = analyze(model, feeds, load_spec("ort-cpu-x86"), None, pairs=True, cache_dir=None, seed=0,
               max_samples=int(sys.argv[3]))
seconds = time.perf_counter() - t
entries = sum(len(r["candidates"]) for r in sens["layers"])
print("RESULT " + json.dumps({"seconds": seconds, "plain": float(np.median(times)), "layers": len(sens["layers"]),
      "entries": entries, "pairs": len(sens["pairs"]), "evaluations": sens["evaluations"],
      "peak": sens.get("peak_rss_mib")}))
"""


def _result(run: dict[str, Any]) -> dict[str, Any]:
    for line in run["output"].splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {}


def task_depth(workdir: Path, timeout: float, vmem_kb: int, samples: int) -> list[str]:
    lines = ["| layers | analysed layers | layer×candidate entries | pairs | evaluations | seconds | plain pass ms | "
             "cost (plain passes) | plain passes per entry | peak RSS MiB | load |", "|" + "---|" * 11]
    for depth in (2, 4, 8):
        path = write_encoder(workdir, f"enc{depth}", EncoderShape(depth, 384, 6, 1536))
        run = run_limited(_python(_DEPTH_CODE) + [str(path), str(path.with_suffix(".calib.npz")), str(samples)],
                          timeout, vmem_kb)
        r = _result(run)
        if not r:
            lines.append(f"| {depth} | failed (exit {run['exit']}) | | | | {run['seconds']:.0f} | | | | "
                         f"{run['peak_rss_mib']:.0f} | {run['load']} |")
            print(run["output"], file=sys.stderr)
            continue
        cost = r["seconds"] / r["plain"]
        lines.append(f"| {depth} | {r['layers']} | {r['entries']} | {r['pairs']} | {r['evaluations']} | "
                     f"{r['seconds']:.1f} | {r['plain'] * 1e3:.1f} | {cost:.0f} | {cost / r['entries']:.2f} | "
                     f"{run['peak_rss_mib']:.0f} | {run['load']} |")
        print(lines[-1], flush=True)
    return lines


def task_cli(workdir: Path, stem: str, shape: EncoderShape, command: str, timeout: float,
             vmem_kb: int) -> list[str]:
    path = write_encoder(workdir, stem, shape)
    size_mib = path.stat().st_size / 2**20
    out = workdir / f"{stem}.{command}.out"
    if command == "quantize":
        argv = [sys.executable, "-m", "onnxq", "quantize", str(path), "-o", str(out.with_suffix(".onnx")),
                "--spec", SPEC, "--max-drop", "0.01", "--no-cache", "--report", str(out.with_suffix(".json"))]
    else:  # the CLI uses 64 samples; the API takes 128
        argv = _python(_DEPTH_CODE) + [str(path), str(path.with_suffix(".calib.npz")), "128"]
    run = run_limited(argv, timeout, vmem_kb, env={"PYTHONPATH": str(ROOT), "ONNXQ_CACHE_DIR": tempfile.mkdtemp()})
    if run["exit"] != 0:
        print(run["output"], file=sys.stderr)
    line = (f"| {stem} ({params(onnx.load(str(path), load_external_data=False)) / 1e6:.0f}M, {size_mib:.0f} MiB) "
            f"| `onnxq {command}` | {'ok' if run['exit'] == 0 else 'exit ' + str(run['exit'])} | "
            f"{run['seconds']:.1f} | {run['peak_rss_mib']:.0f} | {run['load']} |")
    print(line, flush=True)
    return [line]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/onnxq-bench-scale")
    parser.add_argument("--tasks", nargs="*", default=["depth", "e22", "s22"],
                        choices=["depth", "e22", "s22", "e110"])
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--vmem-kb", type=int, default=20_000_000)
    parser.add_argument("--depth-samples", type=int, default=32, help="calibration samples of the depth table")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [f"load average at start: {load()}, {os.cpu_count()} CPUs", ""]
    if "depth" in args.tasks:
        lines += task_depth(workdir, args.timeout, args.vmem_kb, args.depth_samples) + [""]
    header = ["| model | command | ok | seconds | peak RSS MiB | load |", "|---|---|---|---|---|---|"]
    rows = []
    if "e22" in args.tasks:
        rows += task_cli(workdir, "bert22m", MINILM, "quantize", args.timeout, args.vmem_kb)
    if "s22" in args.tasks:
        rows += task_cli(workdir, "bert22m", MINILM, "sensitivity", args.timeout, args.vmem_kb)
    if "e110" in args.tasks:
        rows += task_cli(workdir, "bert110m", BERT_BASE, "quantize", args.timeout, args.vmem_kb)
    if rows:
        lines += header + rows
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
