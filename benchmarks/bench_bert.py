"""onnxq's speed targets on a 22M-parameter, 6-layer BERT-style encoder, side by side with NNCF.

Usage::

    python benchmarks/bench_bert.py [--workdir /tmp/onnxq-bench-bert] [--train-seconds 90]
                                    [--timeout 1200] [--tools onnxq sensitivity nncf-ac nncf ort]
                                    [--out benchmarks/BERT.md]

1. Builds (torch, seeded) a BERT-style encoder in the MiniLM-L6-H384 layout: vocab 30522, hidden
   384, 6 layers, 6 heads, intermediate 1536, sequence length 64 (≈22.7M parameters, counted and
   printed; most of them are the token embedding). Token embedding (Gather) + learned positions
   + LayerNorm, attention written with explicit MatMuls, GELU MLP, mean pooling and a
   classification head. It is trained for ``--train-seconds`` (wall clock) on a synthetic
   keyword task (4 classes: which class's keyword tokens appear most often in a random
   sequence, with distractors), so that the accuracy is a real task metric. Exported to ONNX
   opset 17 (IR 10, dynamic batch) into ``--workdir`` (never into the repository), with
   ``bert.calib.npz`` (128 unlabelled ``input_ids``), ``bert.val.npz`` (labelled, for NNCF's
   validation function) and ``bert.test.npz`` (labelled, held out for the final measurement).
2. Runs each tool in its own subprocess (peak RSS from ``os.wait4``, a hard ``--timeout``; a
   worker that runs out of time dumps its Python stacks first, so the phase it was in is known):

   * ``onnxq``: ``onnxq.quantize(model, calib, "ort-cpu-x86", max_drop=0.01)`` (cold cache);
     total seconds, ``report["time_per_phase"]``, sensitivity and real evaluations;
   * ``sensitivity``: ``onnxq.sensitivity.analyze`` alone on the 128 calibration samples
     (every candidate the spec allows, pairs on);
   * ``nncf-ac``: ``nncf.quantize_with_accuracy_control`` (``max_drop=0.01`` absolute,
     ``ModelType.TRANSFORMER``) whose validation function is top-1 accuracy on the labelled
     validation set;
   * ``nncf``: plain ``nncf.quantize`` (``ModelType.TRANSFORMER``); ``ort``: onnxruntime
     ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax).
3. Measures every written model in this process: accuracy on the held-out test set, top-1
   agreement with fp32, onnxruntime latency at batch 1 and 32 (default ``ORT_ENABLE_ALL``, one
   intra-op thread, median), and writes ``BERT.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import faulthandler
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPEC = "ort-cpu-x86"
VOCAB, HIDDEN, LAYERS, HEADS, FFN, SEQ, CLASSES = 30522, 384, 6, 6, 1536, 64, 4
CALIB, VAL, TEST = 128, 256, 256
KEYWORDS = 50  # keyword tokens per class: ids [1000 + 50k, 1000 + 50(k+1))
TOOLS = ("onnxq", "nncf-ac", "sensitivity", "nncf", "ort")


# -- model and data --------------------------------------------------------------------------------

def make_data(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random token sequences; class k's keywords appear 3-5 times, 0-2 distractors of each other class."""
    ids = rng.integers(2000, VOCAB, size=(count, SEQ), dtype=np.int64)
    labels = rng.integers(0, CLASSES, size=count, dtype=np.int64)
    for i in range(count):
        inserts = []
        for k in range(CLASSES):
            n = int(rng.integers(3, 6)) if k == labels[i] else int(rng.integers(0, 3))
            inserts += [1000 + KEYWORDS * k + int(rng.integers(0, KEYWORDS)) for _ in range(n)]
        positions = rng.choice(SEQ, size=len(inserts), replace=False)
        ids[i, positions] = inserts
    return ids, labels


def build_model() -> Any:
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            d = HIDDEN // HEADS

            def split(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(b, s, HEADS, d).transpose(1, 2)

            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / d ** 0.5)
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
            return self.o(ctx.transpose(1, 2).reshape(b, s, HIDDEN))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Attention()
            self.ln1 = nn.LayerNorm(HIDDEN)
            self.fc1, self.fc2 = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)
            self.act = nn.GELU()
            self.ln2 = nn.LayerNorm(HIDDEN)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # post-LN, as BERT
            x = self.ln1(x + self.attn(x))
            return self.ln2(x + self.fc2(self.act(self.fc1(x))))

    class Bert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(VOCAB, HIDDEN)
            self.pos = nn.Parameter(torch.randn(1, SEQ, HIDDEN) * 0.02)
            self.ln = nn.LayerNorm(HIDDEN)
            self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
            self.pool = nn.Linear(HIDDEN, HIDDEN)
            self.head = nn.Linear(HIDDEN, CLASSES)
            nn.init.normal_(self.tok.weight, std=0.02)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            x = self.ln(self.tok(input_ids) + self.pos[:, : input_ids.shape[1]])
            for layer in self.layers:
                x = layer(x)
            return self.head(torch.tanh(self.pool(x.mean(dim=1))))

    return Bert()


def prepare(workdir: Path, train_seconds: float, log: list[str]) -> Path:
    """Train (time-capped), export and write the data; returns the model path."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 2)
    rng = np.random.default_rng(0)
    model = build_model()
    params = sum(p.numel() for p in model.parameters())
    log.append(f"parameters: {params:,} ({params / 1e6:.1f}M; token embedding {VOCAB * HIDDEN / 1e6:.1f}M)")
    print(log[-1], flush=True)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    started, step, losses = time.perf_counter(), 0, []
    model.train()
    while time.perf_counter() - started < train_seconds:
        ids, labels = make_data(32, rng)
        loss = loss_fn(model(torch.from_numpy(ids)), torch.from_numpy(labels))
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
        step += 1
    model.eval()
    calib, _ = make_data(CALIB, np.random.default_rng(1))
    val, val_labels = make_data(VAL, np.random.default_rng(2))
    test, test_labels = make_data(TEST, np.random.default_rng(3))
    with torch.no_grad():
        if step == 0:
            # untrained: centre and spread the head's logits so that the fp32 model's own
            # predictions (the labels) use every class, then label with them
            probe, _ = make_data(256, np.random.default_rng(4))
            logits = model(torch.from_numpy(probe))
            model.head.weight.mul_(2.0 / float(logits.std()))
            model.head.bias.sub_(model(torch.from_numpy(probe)).mean(0))
            val_labels = model(torch.from_numpy(val)).argmax(1).numpy()
            test_labels = model(torch.from_numpy(test)).argmax(1).numpy()
            log.append("no training (random init, seeded); labels = the fp32 model's own top-1 on held-out inputs "
                       f"(label-free fidelity benchmark); test class counts {np.bincount(test_labels, minlength=CLASSES).tolist()}")
        else:
            train_acc = float((model(torch.from_numpy(val)).argmax(1).numpy() == val_labels).mean())
            log.append(f"training: {step} steps of batch 32 in {time.perf_counter() - started:.0f} s, "
                       f"loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}, torch validation accuracy {train_acc:.3f}")
    print(log[-1], flush=True)
    path = workdir / "bert.onnx"
    export_kwargs: dict[str, Any] = dict(input_names=["input_ids"], output_names=["logits"], opset_version=17,
                                         dynamic_axes={"input_ids": {0: "batch"}, "logits": {0: "batch"}})
    try:
        torch.onnx.export(model, (torch.from_numpy(calib[:2]),), str(path), dynamo=False, **export_kwargs)
    except TypeError:
        torch.onnx.export(model, (torch.from_numpy(calib[:2]),), str(path), **export_kwargs)
    import onnx

    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, 10)
    onnx.save(proto, str(path))
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    log.append("ONNX ops: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])))
    log.append(f"ONNX file: {path.stat().st_size / 2**20:.1f} MiB, opset 17, IR {proto.ir_version}")
    print(log[-2], log[-1], sep="\n", flush=True)
    np.savez(workdir / "bert.calib.npz", input_ids=calib)
    np.savez(workdir / "bert.val.npz", input_ids=val, labels=val_labels)
    np.savez(workdir / "bert.test.npz", input_ids=test, labels=test_labels)
    return path


# -- the tools (in a subprocess) -------------------------------------------------------------------

def _predict(session: Any, ids: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([session.run(None, {"input_ids": ids[i:i + batch]})[0].argmax(1)
                           for i in range(0, len(ids), batch)])


def _save(proto: Any, out: Path) -> None:
    import onnx

    proto.ir_version = min(proto.ir_version, 10)
    onnx.save(proto, str(out))


def tool_onnxq(workdir: Path, out: Path) -> dict[str, Any]:
    import onnxq
    from onnxq.options import QuantizeOptions

    opts = QuantizeOptions(progress=False, max_drop=0.01, cache_dir="")
    started = time.perf_counter()
    result = onnxq.quantize(str(workdir / "bert.onnx"), str(workdir / "bert.calib.npz"), SPEC, max_drop=0.01,
                            options=opts)
    seconds = time.perf_counter() - started
    _save(result.model, out)
    report = result.report
    search = report.get("search", {})
    return {"seconds": seconds, "time_per_phase": report.get("time_per_phase"), "metric": report.get("metric"),
            "target_met": result.target_met, "layers": report.get("layers"),
            "search": {k: v for k, v in search.items() if not isinstance(v, (list, dict))},
            "sensitivity_evaluations": search.get("sensitivity_evaluations"),
            "real_evaluations": search.get("evaluations"), "report_seconds": report.get("seconds")}


def tool_sensitivity(workdir: Path, out: Path) -> dict[str, Any]:
    from onnxq.model import load_model
    from onnxq.sensitivity import analyze
    from onnxq.spec import load_spec

    model = load_model(workdir / "bert.onnx").proto
    ids = np.load(workdir / "bert.calib.npz")["input_ids"]
    feeds = [{"input_ids": ids[i:i + 32]} for i in range(0, len(ids), 32)]
    started = time.perf_counter()
    sens = analyze(model, feeds, load_spec(SPEC), None, pairs=True, max_samples=CALIB, cache_dir=None, seed=0)
    seconds = time.perf_counter() - started
    entries = sum(len(v) if isinstance(v, (list, dict)) else 1 for v in sens.get("layers", {}).values())
    return {"seconds": seconds, "evaluations": sens.get("evaluations"), "layers": len(sens.get("layers", {})),
            "layer_candidate_entries": entries, "pairs": len(sens.get("pairs", [])), "samples": CALIB,
            "no_model": True}


def _nncf_setup(workdir: Path) -> tuple[Any, Any, list[dict[str, np.ndarray]]]:
    import nncf
    import onnx

    proto = onnx.load(str(workdir / "bert.onnx"))
    ids = np.load(workdir / "bert.calib.npz")["input_ids"]
    return nncf, proto, [{"input_ids": ids[i:i + 1]} for i in range(len(ids))]


def tool_nncf(workdir: Path, out: Path) -> dict[str, Any]:
    nncf, proto, samples = _nncf_setup(workdir)
    started = time.perf_counter()
    quantized = nncf.quantize(proto, nncf.Dataset(samples), subset_size=len(samples),
                              model_type=nncf.ModelType.TRANSFORMER)
    seconds = time.perf_counter() - started
    _save(quantized, out)
    return {"seconds": seconds, "note": f"nncf {nncf.__version__}, ModelType.TRANSFORMER"}


def tool_nncf_ac(workdir: Path, out: Path) -> dict[str, Any]:
    import onnxruntime as ort

    nncf, proto, samples = _nncf_setup(workdir)
    val = np.load(workdir / "bert.val.npz")
    val_items = [{"input_ids": val["input_ids"][i:i + 32], "labels": val["labels"][i:i + 32]}
                 for i in range(0, len(val["labels"]), 32)]
    calls = {"n": 0, "seconds": 0.0}

    def validate(candidate: Any, items: Any) -> float:
        """Top-1 accuracy against the labels of the validation set."""
        t0 = time.perf_counter()
        data = candidate if isinstance(candidate, bytes) else candidate.SerializeToString()
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        correct = total = 0
        for item in items:
            pred = session.run(None, {"input_ids": item["input_ids"]})[0].argmax(1)
            correct += int((pred == item["labels"]).sum())
            total += len(pred)
        calls["n"] += 1
        calls["seconds"] += time.perf_counter() - t0
        return correct / max(total, 1)

    started = time.perf_counter()
    quantized = nncf.quantize_with_accuracy_control(
        proto, nncf.Dataset(samples), nncf.Dataset(val_items), validate, max_drop=0.01,
        drop_type=nncf.DropType.ABSOLUTE, subset_size=len(samples), model_type=nncf.ModelType.TRANSFORMER)
    seconds = time.perf_counter() - started
    _save(quantized, out)
    return {"seconds": seconds, "validation_calls": calls["n"], "validation_seconds": calls["seconds"],
            "note": f"nncf {nncf.__version__}; validation = labelled accuracy on {len(val['labels'])} samples"}


def tool_ort(workdir: Path, out: Path) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    ids = np.load(workdir / "bert.calib.npz")["input_ids"]

    class Reader:
        def __init__(self) -> None:
            self.feeds = iter([{"input_ids": ids[i:i + 16]} for i in range(0, len(ids), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(workdir / "bert.onnx"), str(pre), skip_symbolic_shape=False)
            source, note = pre, "quant_pre_process"
        except Exception as error:  # noqa: BLE001
            source, note = workdir / "bert.onnx", f"no pre-process ({type(error).__name__})"
        quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return {"seconds": time.perf_counter() - started, "note": note}


WORKERS = {"onnxq": tool_onnxq, "sensitivity": tool_sensitivity, "nncf-ac": tool_nncf_ac, "nncf": tool_nncf,
           "ort": tool_ort}


def worker_main(tool: str, workdir: Path, out: Path, result: Path, timeout: float) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("nncf").setLevel(logging.INFO)
    # before the parent kills it, dump every thread's stack to stderr (tells the phase it was in)
    faulthandler.dump_traceback_later(max(5.0, timeout - 15.0), exit=False)
    try:
        payload = {"ok": True, **WORKERS[tool](workdir, out)}
    except BaseException as error:  # noqa: BLE001 - every failure is a result
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        payload = {"ok": False, "error": f"{type(error).__name__}: {lines[0] if lines else ''}"[:400],
                   "traceback": traceback.format_exc()[-5000:]}
    faulthandler.cancel_dump_traceback_later()
    result.write_text(json.dumps(payload, default=str, indent=1))
    return 0


def run_tool(tool: str, workdir: Path, timeout: float) -> dict[str, Any]:
    out, result, log = workdir / f"{tool}.onnx", workdir / f"{tool}.json", workdir / f"{tool}.log"
    for p in (out, result):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--workdir", str(workdir),
           "--timeout", str(timeout)]
    print(f"[{time.strftime('%H:%M:%S')}] {tool} ...", flush=True)
    started = time.perf_counter()
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(ROOT))
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    row: dict[str, Any] = {"tool": tool, "wall_seconds": wall, "peak_rss_mib": usage.ru_maxrss / 1024}
    if result.exists():
        row.update(json.loads(result.read_text()))
    else:
        tail = log.read_text(errors="replace").splitlines()[-60:]
        reason = f"timed out after {timeout:.0f} s" if timed_out.is_set() else f"exit code {proc.returncode}"
        row.update({"ok": False, "error": reason, "traceback": "\n".join(tail)})
    row["log_tail"] = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    if row.get("ok") and not row.get("no_model") and out.exists():
        row["model"] = str(out)
    status_text = "ok" if row.get("ok") else f"FAILED ({row.get('error')})"
    print(f"    {tool}: {status_text}, {row.get('seconds', wall):.1f} s, peak RSS {row['peak_rss_mib']:.0f} MiB",
          flush=True)
    return row


# -- measurement (this process) --------------------------------------------------------------------

def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(path: Path, test: dict[str, np.ndarray], reference: np.ndarray | None) -> dict[str, Any]:
    """Accuracy, agreement with fp32 and file size of one written model."""
    pred = _predict(_session(path), test["input_ids"])
    return {"accuracy": float((pred == test["labels"]).mean()),
            "agreement": float((pred == reference).mean()) if reference is not None else 1.0,
            "size_mib": path.stat().st_size / 2**20, "pred": pred}


def measure_latency(paths: dict[str, Path], test: dict[str, np.ndarray], budget: float = 6.0) -> dict[str, dict[str, float]]:
    """Batch-1 and batch-32 latency of every model, interleaved with fp32 round by round
    (:func:`onnxq.latency.time_interleaved`, the measurement onnxq's search uses)."""
    from onnxq.latency import time_interleaved

    sessions = {tool: _session(path) for tool, path in paths.items()}
    result: dict[str, dict[str, float]] = {tool: {} for tool in paths}
    for batch in (1, 32):
        feed = {"input_ids": test["input_ids"][:batch]}
        for tool, timing in time_interleaved(sessions, [feed], "fp32", budget_seconds=budget).items():
            result[tool][f"lat_b{batch}_ms"] = timing.median_ms
            result[tool][f"lat_b{batch}_ratio"] = timing.ratio
    return result


def machine() -> dict[str, str]:
    import onnx
    import onnxruntime

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    for name in ("torch", "nncf", "onnxq"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            versions[name] = "not installed"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(ROOT), capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = "?"
    mem = "?"
    try:
        mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": mem, "python": platform.python_version(),
            "load": " ".join(f"{x:.1f}" for x in os.getloadavg()), "revision": rev,
            "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
            "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M")}


def _f(value: Any, fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def render(rows: dict[str, dict[str, Any]], measured: dict[str, dict[str, Any]], info: dict[str, str],
           prep_log: list[str], timeout: float) -> str:
    names = {"fp32": "fp32 (reference)", "onnxq": "onnxq quantize, max_drop 0.01 (label-free)",
             "sensitivity": "onnxq sensitivity.analyze alone, 128 samples",
             "nncf-ac": "NNCF quantize_with_accuracy_control, max_drop 0.01 (labelled validation)",
             "nncf": "NNCF quantize (TRANSFORMER)", "ort": "ORT quantize_static QDQ per-channel MinMax"}
    lines = ["# onnxq on a 22M-parameter BERT-style encoder: speed targets", "",
             f"Generated by `python benchmarks/bench_bert.py` on {info['date']}. Machine: {info['cpu']}, "
             f"{info['cores']} cores, {info['memory']}; load average at the end {info['load']}; "
             f"Python {info['python']}; {info['versions']}; onnxq revision {info['revision']}.", "",
             "## Model", ""]
    lines += [f"- {line}" for line in prep_log]
    lines += ["- MiniLM-L6-H384 layout: vocab 30522, hidden 384, 6 layers, 6 heads, intermediate 1536, "
              f"sequence length {SEQ}, mean pooling + tanh pooler + {CLASSES}-class head; post-LN; attention with "
              "explicit MatMuls; GELU (Erf) MLP. (The brief's \"vocab ~8k\" gives only ~14M parameters; the 22M "
              "of the target needs the BERT vocabulary, so the extra parameters are all in the embedding Gather.)",
              f"- data: synthetic keyword task; {CALIB} unlabelled calibration samples, {VAL} labelled validation "
              f"samples (NNCF's validation function only), {TEST} labelled held-out test samples (all the accuracy "
              "and agreement columns).", "",
              "## Results", "",
              "| tool | ok | quantize s | peak RSS MiB | test acc | agreement w/ fp32 | size MiB | b1 ms | b32 ms | b1 × fp32 | b32 × fp32 | notes |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fp = measured.get("fp32", {})
    lines.append(f"| {names['fp32']} | yes | – | – | {_f(fp.get('accuracy'), '{:.3f}')} | 1.000 | "
                 f"{_f(fp.get('size_mib'))} | {_f(fp.get('lat_b1_ms'), '{:.2f}')} | {_f(fp.get('lat_b32_ms'))} | 1.00 | 1.00 | |")
    for tool, row in rows.items():
        m = measured.get(tool, {})
        note = row.get("note", "") if row.get("ok") else f"**{row.get('error')}**"
        if tool == "onnxq" and row.get("ok"):
            layers = row.get("layers") or {}
            note = (f"target met: {row.get('target_met')}; report metric {row.get('metric')}; layers "
                    f"{layers.get('by_candidate')}")
        if tool == "nncf-ac" and row.get("ok"):
            note += f"; {row.get('validation_calls')} validation calls, {_f(row.get('validation_seconds'))} s"
        if tool == "sensitivity" and row.get("ok"):
            note = (f"{row.get('evaluations')} evaluations, {row.get('layers')} layers, {row.get('pairs')} pairs")
        lines.append(f"| {names.get(tool, tool)} | {'yes' if row.get('ok') else 'no'} | "
                     f"{_f(row.get('seconds', row.get('wall_seconds')))} | {_f(row.get('peak_rss_mib'), '{:.0f}')} | "
                     f"{_f(m.get('accuracy'), '{:.3f}')} | {_f(m.get('agreement'), '{:.3f}')} | {_f(m.get('size_mib'))} | "
                     f"{_f(m.get('lat_b1_ms'), '{:.2f}')} | {_f(m.get('lat_b32_ms'))} | "
                     f"{_f(m.get('lat_b1_ratio'), '{:.2f}')} | {_f(m.get('lat_b32_ratio'), '{:.2f}')} | {note} |")
    lines += ["", "Quantize seconds are the tool's call inside its subprocess (imports and model loading "
              "excluded for NNCF/ORT, included for onnxq's `quantize`); a failed or timed-out row shows its wall "
              f"time (timeout {timeout:.0f} s). Latency: onnxruntime CPU, default `ORT_ENABLE_ALL`, 1 intra-op "
              "thread, median.", ""]
    oq, sens, ac = rows.get("onnxq", {}), rows.get("sensitivity", {}), rows.get("nncf-ac", {})
    lines += ["## Targets", "", "| target | measured | limit | ratio | met |", "|---|---|---|---|---|"]
    if sens:
        s = sens.get("seconds") if sens.get("ok") else None
        if s is None and str(sens.get("error", "")).startswith("timed out"):
            w = sens["wall_seconds"]
            lines.append(f"| sensitivity (per-layer + pairs, 128 samples) alone | > {w:.0f} s (timed out) | 300 s | "
                         f"> {w / 300:.2f} | no |")
        else:
            lines.append(f"| sensitivity (per-layer + pairs, 128 samples) alone | {_f(s)} s | 300 s | "
                         f"{_f(s / 300 if s else None, '{:.2f}')} | {'yes' if s and s < 300 else 'no'} |")
    if oq:
        tpp = oq.get("time_per_phase") or {}
        s_in = tpp.get("search:sensitivity")
        lines.append(f"| sensitivity inside `quantize` (32 samples, SENSITIVITY_SAMPLES) | {_f(s_in)} s | 300 s | "
                     f"{_f(s_in / 300 if s_in else None, '{:.2f}')} | {'yes' if s_in and s_in < 300 else 'no'} |")
        t = oq.get("seconds") if oq.get("ok") else None
        lines.append(f"| onnxq whole pipeline | {_f(t)} s | 600 s | {_f(t / 600 if t else None, '{:.2f}')} | "
                     f"{'yes' if t and t < 600 else 'no'} |")
        a = ac.get("seconds") if ac.get("ok") else None
        ratio = t / a if t and a else None
        if ratio is not None:
            lines.append(f"| onnxq total / NNCF accuracy-control total | {_f(t)} s / {_f(a)} s | < 0.5 | "
                         f"{_f(ratio, '{:.2f}')} | {'yes' if ratio < 0.5 else 'no'} |")
        elif t and ac and str(ac.get("error", "")).startswith("timed out"):
            bound = t / ac["wall_seconds"]  # NNCF did not finish: its total is at least the timeout
            lines.append(f"| onnxq total / NNCF accuracy-control total | {_f(t)} s / > {_f(ac['wall_seconds'])} s "
                         f"(NNCF timed out) | < 0.5 | < {bound:.2f} | {'yes' if bound < 0.5 else 'no'} |")
        else:
            lines.append(f"| onnxq total / NNCF accuracy-control total | {_f(t)} s / {_f(a)} s | < 0.5 | – | no |")
        lines += ["", "### onnxq per phase (`report[\"time_per_phase\"]`, seconds)", ""]
        if tpp:
            lines += ["| phase | s |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in tpp.items()]
        lines += ["", f"Sensitivity evaluations: {oq.get('sensitivity_evaluations')}; real (onnxruntime) "
                  f"evaluations in the search: {oq.get('real_evaluations')}; search summary: "
                  f"`{json.dumps(oq.get('search'), default=str)}`"]
    failed = {t: r for t, r in rows.items() if not r.get("ok")}
    if failed:
        lines += ["", "## Failures", ""]
        for tool, row in failed.items():
            lines += [f"### {tool}: {row.get('error')}", "", "```", (row.get("traceback") or "")[-3000:], "```", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "onnxq-bench-bert")
    parser.add_argument("--train-seconds", type=float, default=0.0,
                        help="wall-clock training on the keyword task (0: random init, fp32 labels; a step of batch 32 takes ~10 s on 2 busy cores, so a useful training does not fit the time budget)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per tool (default 1200)")
    parser.add_argument("--short-timeout", type=float, default=420.0,
                        help="seconds for the other tools (sensitivity alone, nncf, ort; default 420)")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--reuse", action="store_true", help="reuse the model and data already in --workdir")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "BERT.md")
    parser.add_argument("--render-only", action="store_true",
                        help="only re-render --out from rows.json / measured.json in --workdir")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.workdir, args.workdir / f"{args.worker}.onnx",
                           args.workdir / f"{args.worker}.json", args.timeout)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.render_only:  # re-render BERT.md from the JSON a previous run left in --workdir
        rows = json.loads((args.workdir / "rows.json").read_text())
        measured = json.loads((args.workdir / "measured.json").read_text())
        prep = json.loads((args.workdir / "prepare.json").read_text())
        info = json.loads((args.workdir / "machine.json").read_text()) if (args.workdir / "machine.json").exists() else machine()
        args.out.write_text(render(rows, measured, info, prep, args.timeout))
        print(args.out.read_text())
        return 0
    prep_log: list[str] = []
    prep_file = args.workdir / "prepare.json"
    if args.reuse and (args.workdir / "bert.onnx").exists() and prep_file.exists():
        prep_log = json.loads(prep_file.read_text())
    else:
        prepare(args.workdir, args.train_seconds, prep_log)
        prep_file.write_text(json.dumps(prep_log))
    rows: dict[str, dict[str, Any]] = {}
    for tool in args.tools:
        limit = args.timeout if tool in ("onnxq", "nncf-ac") else min(args.timeout, args.short_timeout)
        rows[tool] = run_tool(tool, args.workdir, limit)
        (args.workdir / "rows.json").write_text(json.dumps(rows, default=str, indent=1))
        args.out.write_text(render(rows, {}, machine(), prep_log, args.timeout))  # partial results so far
    test = dict(np.load(args.workdir / "bert.test.npz"))
    measured = {"fp32": measure(args.workdir / "bert.onnx", test, None)}
    reference = measured["fp32"]["pred"]
    for tool, row in rows.items():
        if row.get("model"):
            try:
                measured[tool] = measure(Path(row["model"]), test, reference)
            except Exception as error:  # noqa: BLE001
                row["note"] = f"{row.get('note', '')} measurement failed: {type(error).__name__}: {error}"[:300]
    for m in measured.values():
        m.pop("pred", None)
    timed = {"fp32": args.workdir / "bert.onnx"}
    timed.update({tool: Path(rows[tool]["model"]) for tool in measured if tool != "fp32"})
    for tool, latency in measure_latency(timed, test).items():
        measured[tool].update(latency)
    (args.workdir / "measured.json").write_text(json.dumps(measured, indent=1))
    info = machine()
    (args.workdir / "machine.json").write_text(json.dumps(info))
    text = render(rows, measured, info, prep_log, args.timeout)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
