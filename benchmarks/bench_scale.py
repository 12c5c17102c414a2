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
| bert22m analyze, 128 samples, every candidate (496 evaluations, was 919), 2026-11-30 18:21, beside the slow test suite | killed at 600 (timeout) | 3322 at kill | 4.0-4.7 |
| bert110m quantize --max-drop 0.01, 2026-11-30 18:03 (no model copies in the analysis, skeleton shape inference and opset conversion, half-model activation budget, 18 of 32 sensitivity samples by the MAC budget, 277 evaluations instead of 315; a helper's 1B analysis ran niced beside it) | 837.0 | 4313 (sensitivity 2871) | 4.4 |

| bert22m quantize --max-drop 0.01, 2026-11-30 21:25 (idle; 17-sample MAC budget, skeleton plan builds, fp32 sessions from the file) | 59.8 | 931 | 1.4-1.9 |
| bert22m analyze, 128 samples, every candidate (496 evaluations; sequential stop from 32 samples at 10% standard error), 21:30 | 251.7 | 1107 | 1.7-1.9 |
| bert22m analyze, same, stop from 64 samples (first run of the session) | 398.7 | 1113 | 1.7-2.3 |
| bert110m quantize --max-drop 0.01, 2026-11-30 21:18 (idle; 8 sensitivity samples, one fp32 model per run, plans and final rewrite on its skeleton, fp32 sessions from the file, sweep releasing reduced tensors, 4 MB mmap threshold) | 319.5 | 2632 (bound 2689) | 1.8-2.1 |

Depth table 2026-11-30 21:03 (``--depth-samples 8``, idle; plain-pass times are medians of 5 and noisy):

| layers | analysed layers | layer×candidate entries | pairs | evaluations | seconds | plain pass ms | cost (plain passes) | plain passes per entry | peak RSS MiB |
|---|---|---|---|---|---|---|---|---|---|
| 2 | 27 | 199 | 1872 | 181 | 12.1 | 36.0 | 334 | 1.68 | 682 |
| 4 | 51 | 371 | 3518 | 339 | 26.7 | 104.3 | 256 | 0.69 | 905 |
| 8 | 99 | 715 | 6810 | 655 | 94.6 | 139.6 | 678 | 0.95 | 1190 |

Evaluations per entry: 0.91, 0.91, 0.92. Ray (``--tasks ray``, 4-layer encoder, 32 samples, 339
evaluations): in-process 83.0 s; 1 actor 132.4 s (same numbers); 2 actors 82.1 s, 1.61× one actor
(numbers not bit-identical then: each actor got half the memory budget, so other chunks, and
onnxruntime's kernels and dynamic-quantization ranges depend on the batch; the budget is now
per worker and the numbers identical).

Earlier depth table (``--depth-samples 8``, load 8-11, so the plain-pass denominators are noisy):

| layers | analysed layers | layer×candidate entries | evaluations | seconds | plain pass ms | cost (plain passes) | peak RSS MiB |
|---|---|---|---|---|---|---|---|
| 2 | 27 | 185 | 240 | 166.6 | 558.2 | 298 | 1144 |
| 4 | 51 | 345 | 452 | 216.6 | 294.9 | 734 | 1452 |
| 8 | timed out at 600 s under load 11 | | | | | | 1783 |

Evaluations per layer × candidate entry: 1.30 (2 layers), 1.31 (4 layers): linear.

Tasks outside the default set:

* ``e1b``: ``python -m onnxq sensitivity`` (the CLI's defaults: every candidate of the spec,
  pairs; 2 validation plans instead of 20) with 8 calibration samples on a 1.03 B-parameter encoder stored
  with external data (``E1B``: 20 layers, hidden 2048, 16 heads, intermediate 8192, vocab 8192,
  sequence length 16; a 3.9 GiB data file written weight by weight, the builder peaks at 141 MiB);
  the bound is 4 × the fp32 files + 1 GiB, enforced by a watchdog that kills the run above it;
* ``ray``: ``analyze`` (every candidate, pairs) on the 4-layer encoder of the 22M width,
  ``--ray-samples`` (32) samples, in-process and with 1 and 2 Ray actors on a local cluster
  started by the run (its start-up reported apart), checking the numbers are identical.

e1b results (``--tasks e1b``, 2 cores shared):

| model | params | fp32 file MiB | bound MiB | ok | evaluations | seconds | peak RSS MiB | load |
|---|---|---|---|---|---|---|---|---|
| bert1b (E1B, external data) | 1.03 B | 3922 | 16713 | ok | 1605 | 3903.9 | 14938 | 1.5 1.9 2.0 |

(2026-12-01, ``--random-plans 2``; 88% of the time is onnxruntime running the cut sessions, 2.4 s
per evaluation on average; the default suite ran beside it for 6 of the 65 minutes.)

ray results (``--tasks ray``, 2 cores shared; Ray workers at nice 0 like the driver — Ray nices
them to 15, which loses the cores to anything else running):

| executor | workers | evaluations | seconds | Ray start s | speed-up vs 1 actor | same numbers as local | load |
|---|---|---|---|---|---|---|---|
| local, in-process (2 intra-op threads) | 0 | 628 | 164.9 | | | yes | 1.9 2.5 4.1 |
| ray, 1 actor (1 thread) | 1 | 628 | 282.3 | 4.9 | 1.00 | yes | 1.4 1.7 3.3 |
| ray, 2 actors (1 thread each) | 2 | 628 | 167.6 | 4.9 | 1.68 | yes | 2.2 2.1 3.2 |
| ray before (27fc97c: actors on onnxruntime's default threads, round-robin batches), 1 actor | 1 | 628 | 276.2 | | 1.00 | yes | 1.7 → 3.4 |
| ray before (27fc97c), 2 actors | 2 | 628 | 320.0 | | 0.86 | yes | 3.6 → 4.2 |

An earlier run of these rows (this engine) under load 4-7, the machine busy with other work, gave
488.5 / 367.1 / 460.5 s: timings here are only comparable at a similar load.
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
    seq: int = SEQ


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
    split = g.const(f"{name}.split_shape", np.array([0, shape.seq, shape.heads, d], np.int64))
    merge = g.const(f"{name}.merge_shape", np.array([0, shape.seq, shape.hidden], np.int64))

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
    model = _encoder_model(_Builder(np.random.default_rng(seed)), shape)
    onnx.checker.check_model(model)
    return model


def _encoder_model(g: _Builder, shape: EncoderShape) -> onnx.ModelProto:
    tok = g.weight("embeddings.word", (shape.vocab, shape.hidden))
    pos = g.weight("embeddings.position", (1, shape.seq, shape.hidden))
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
        g.nodes, "bert", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", shape.seq])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])], g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)


def write_encoder(workdir: Path, stem: str, shape: EncoderShape, samples: int = 128) -> Path:
    """``<stem>.onnx`` and ``<stem>.calib.npz`` (``samples`` random token sequences) in ``workdir``."""
    path = workdir / f"{stem}.onnx"
    if not path.exists():
        onnx.save(build_encoder(shape), str(path))
        ids = np.random.default_rng(1).integers(0, shape.vocab, size=(samples, shape.seq), dtype=np.int64)
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


# -- e1b: a 1B-parameter encoder stored with external data ----------------------------------------

#: 20 layers of hidden 2048 (16 heads, intermediate 8192), an 8192-token vocabulary and 16-token
#: sequences: 1.03 B parameters, a 3.9 GiB external data file.
E1B = EncoderShape(20, 2048, 16, 8192, vocab=8192, seq=16)
#: Validation plans of the e1b analysis: each builds and runs a quantized 1B model (the CLI's 20
#: would add about as long again as the analysis itself; 2 still put the plan path in the bound).
E1B_RANDOM_PLANS = 2
#: Tensors at least this big go to the external data file.
EXTERNAL_MIN_BYTES = 1024
#: The watchdog stops a run when the machine has less memory available than this (MiB).
MIN_AVAILABLE_MIB = 768


class _ExternalBuilder(_Builder):
    """A builder that writes each large tensor to the external data file as soon as it is made,
    so that building holds one weight at a time, never the model."""

    def __init__(self, rng: np.random.Generator, handle: Any, location: str) -> None:
        super().__init__(rng)
        self.handle = handle
        self.location = location

    def weight(self, name: str, shape: tuple[int, ...], std: float = 0.02) -> str:
        return self.const(name, self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    def const(self, name: str, value: np.ndarray) -> str:
        value = np.ascontiguousarray(value)
        if value.nbytes < EXTERNAL_MIN_BYTES:
            return super().const(name, value)
        offset = self.handle.tell()
        pad = -offset % 4096  # page-aligned, as onnxq.model.save_model writes external data
        self.handle.write(b"\0" * pad)
        value.tofile(self.handle)
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype), dims=value.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, item in (("location", self.location), ("offset", offset + pad), ("length", value.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(item)
        self.inits.append(tensor)
        return name


def write_external_encoder(workdir: Path, stem: str, shape: EncoderShape, samples: int = 8) -> Path:
    """``<stem>.onnx`` with its weights in ``<stem>.onnx.data``, and ``<stem>.calib.npz``; checked
    by path (``onnx.checker`` refuses a proto over 2 GB in memory)."""
    path = workdir / f"{stem}.onnx"
    if path.exists():
        return path
    data = path.with_name(path.name + ".data")
    with open(data, "wb") as handle:
        model = _encoder_model(_ExternalBuilder(np.random.default_rng(0), handle, data.name), shape)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    ids = np.random.default_rng(1).integers(0, shape.vocab, size=(samples, shape.seq), dtype=np.int64)
    np.savez(workdir / f"{stem}.calib.npz", input_ids=ids)
    return path


def _tree_rss_mib(root: int) -> float:
    """Resident memory of ``root`` and its descendants, MiB."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        parents[int(entry.name)] = int(fields.get("PPid", "0").strip())
        rss[int(entry.name)] = int(fields.get("VmRSS", "0 kB").split()[0])
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo.extend(child for child, parent in parents.items() if parent == pid and child not in tree)
    return sum(rss.get(pid, 0) for pid in tree) / 1024


def _available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def run_watched(argv: list[str], timeout: float, vmem_kb: int, rss_limit_mib: float,
                env: dict[str, str] | None = None, log_path: Path | None = None) -> dict[str, Any]:
    """:func:`run_limited` with a watchdog: the run's process group is killed as soon as its
    resident memory exceeds ``rss_limit_mib`` or the machine runs short of memory (the machine
    has no swap and is shared). Adds the watchdog's own peak sample and why it killed. The run's
    output goes to ``log_path`` as it comes when given (to follow a long run's progress)."""
    script = f"ulimit -v {int(vmem_kb)}; exec timeout {int(timeout)} {shlex.join(argv)}"
    started = time.perf_counter()
    with (open(log_path, "w+b") if log_path else tempfile.TemporaryFile()) as log:
        proc = subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, cwd=ROOT, start_new_session=True)
        sampled, killed = 0.0, ""
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss = _tree_rss_mib(proc.pid)
            sampled = max(sampled, rss)
            if not killed and (rss > rss_limit_mib or _available_mib() < MIN_AVAILABLE_MIB):
                killed = f"RSS {rss:.0f} MiB, available {_available_mib():.0f} MiB"
                os.killpg(proc.pid, 9)
            time.sleep(0.2)
        log.seek(0)
        out = log.read().decode(errors="replace")
    return {"seconds": time.perf_counter() - started, "peak_rss_mib": usage.ru_maxrss / 1024,
            "sampled_rss_mib": sampled, "killed": killed, "exit": os.waitstatus_to_exitcode(status),
            "output": out[-6000:], "load": load()}


_BUILD_CODE = """
import sys
sys.path.insert(0, sys.argv[1])
import bench_scale
path = bench_scale.write_external_encoder(bench_scale.Path(sys.argv[2]), sys.argv[3], bench_scale.E1B)
print("RESULT {}")
"""


def task_e1b(workdir: Path, timeout: float, vmem_kb: int) -> list[str]:
    """``onnxq sensitivity`` (8 samples, the CLI's defaults otherwise) on the 1B encoder; the
    bound is 4 × the fp32 file size (graph and data) + 1 GiB."""
    stem = "bert1b"
    path = workdir / f"{stem}.onnx"
    lines = []
    if not path.exists():
        build = run_watched(_python(_BUILD_CODE) + [str(ROOT / "benchmarks"), str(workdir), stem], timeout,
                            vmem_kb, 8192)
        lines.append(f"build: exit {build['exit']}, {build['seconds']:.0f} s, peak RSS {build['peak_rss_mib']:.0f} MiB")
        print(lines[-1], flush=True)
        if build["exit"] != 0:
            print(build["output"], file=sys.stderr)
            return lines
    size_mib = (path.stat().st_size + path.with_name(path.name + ".data").stat().st_size) / 2**20
    bound = 4 * size_mib + 1024
    count = params(onnx.load(str(path), load_external_data=False))
    out = workdir / f"{stem}.sens.json"
    argv = [sys.executable, "-m", "onnxq", "sensitivity", str(path), "--spec", SPEC, "--calib",
            str(workdir / f"{stem}.calib.npz"), "-o", str(out), "--random-plans", str(E1B_RANDOM_PLANS)]
    log_path = workdir / f"{stem}.log"
    print(f"{stem}: following the run in {log_path}", flush=True)
    run = run_watched(argv, timeout, vmem_kb, bound, env={"PYTHONPATH": str(ROOT),
                                                          "ONNXQ_CACHE_DIR": tempfile.mkdtemp()}, log_path=log_path)
    peak = max(run["peak_rss_mib"], run["sampled_rss_mib"])  # wait4 misses a child the watchdog killed
    ok = run["exit"] == 0 and not run["killed"] and peak < bound
    if run["exit"] != 0 or run["killed"]:
        print(run["output"], file=sys.stderr)
    evaluations = json.loads(out.read_text())["evaluations"] if run["exit"] == 0 and out.exists() else "-"
    lines += ["| model | params | fp32 file MiB | bound MiB | ok | evaluations | seconds | peak RSS MiB | load |",
              "|---|---|---|---|---|---|---|---|---|",
              f"| {stem} (E1B, external data) | {count / 1e9:.2f} B | {size_mib:.0f} | {bound:.0f} | "
              f"{'ok' if ok else 'exit ' + str(run['exit']) + (', killed: ' + run['killed'] if run['killed'] else '')} | "
              f"{evaluations} | {run['seconds']:.1f} | {peak:.0f} | {run['load']} |"]
    print(lines[-1], flush=True)
    return lines


# -- ray: the Ray executor against in-process evaluation ------------------------------------------

_RAY_CODE = """
import hashlib, json, os, sys, time
import numpy as np, onnx
from onnxq.sensitivity import analyze
from onnxq.spec import load_spec
model = onnx.load(sys.argv[1]); samples = int(sys.argv[3]); ids = np.load(sys.argv[2])["input_ids"][:samples]
executor, workers = sys.argv[4], int(sys.argv[5])
started = 0.0
if executor == "ray":
    import ray
    t = time.perf_counter(); ray.init(num_cpus=os.cpu_count(), log_to_driver=False); started = time.perf_counter() - t
t = time.perf_counter()
sens = analyze(model, [{"input_ids": ids}], load_spec("ort-cpu-x86"), None, pairs=True, cache_dir=None, seed=0,
               max_samples=samples, executor=executor, workers=workers)
seconds = time.perf_counter() - t
digest = hashlib.sha256(json.dumps({"layers": sens["layers"], "pairs": sens["pairs"]}, sort_keys=True).encode())
print("RESULT " + json.dumps({"seconds": seconds, "ray_start": started, "evaluations": sens["evaluations"],
                              "digest": digest.hexdigest()[:16]}))
"""

#: (executor, workers) of the ray table: in-process, then 1 and 2 Ray actors.
RAY_RUNS = (("local", 0), ("ray", 1), ("ray", 2))


def task_ray(workdir: Path, timeout: float, vmem_kb: int, samples: int) -> list[str]:
    """``analyze`` (every candidate, pairs on) on the 4-layer encoder of the 22M width with the
    in-process evaluator and with 1 and 2 Ray actors (a local Ray cluster started in the run,
    its start-up timed apart); the numbers must be identical."""
    path = write_encoder(workdir, "enc4", EncoderShape(4, 384, 6, 1536))
    lines = ["| executor | workers | evaluations | seconds | Ray start s | speed-up vs 1 actor | same numbers as "
             "local | peak RSS MiB (driver) | load |", "|" + "---|" * 9]
    first: dict[str, Any] = {}
    for executor, workers in RAY_RUNS:
        # Ray runs its workers at nice 15 by default: on a shared machine they would lose the
        # cores to everything else, so they run at the driver's priority here
        run = run_limited(_python(_RAY_CODE) + [str(path), str(path.with_suffix(".calib.npz")), str(samples),
                                                executor, str(workers)], timeout, vmem_kb,
                          env={"PYTHONPATH": str(ROOT), "RAY_worker_niceness": "0"})
        r = _result(run)
        if not r:
            print(run["output"], file=sys.stderr)
            lines.append(f"| {executor} | {workers} | failed (exit {run['exit']}) | {run['seconds']:.0f} | | | | | "
                         f"{run['load']} |")
            continue
        first.setdefault("local", r)
        if executor == "ray" and workers == 1:
            first["ray1"] = r
        speedup = f"{first['ray1']['seconds'] / r['seconds']:.2f}" if executor == "ray" and "ray1" in first else ""
        same = "yes" if r["digest"] == first["local"]["digest"] else "NO"
        lines.append(f"| {executor} | {workers} | {r['evaluations']} | {r['seconds']:.1f} | {r['ray_start']:.1f} | "
                     f"{speedup} | {same} | {run['peak_rss_mib']:.0f} | {run['load']} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/onnxq-bench-scale")
    parser.add_argument("--tasks", nargs="*", default=["depth", "e22", "s22"],
                        choices=["depth", "e22", "s22", "e110", "e1b", "ray"])
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--vmem-kb", type=int, default=20_000_000)
    parser.add_argument("--depth-samples", type=int, default=32, help="calibration samples of the depth table")
    parser.add_argument("--ray-samples", type=int, default=32, help="calibration samples of the ray table")
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
    if "e1b" in args.tasks:
        lines += [""] + task_e1b(workdir, args.timeout, args.vmem_kb)
    if "ray" in args.tasks:
        lines += [""] + task_ray(workdir, args.timeout, args.vmem_kb, args.ray_samples)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
