"""onnxq against the anchors: accuracy, size, latency, time to quantize and peak memory.

Usage::

    python benchmarks/run.py [--models digits_cnn digits_transformer] [--quick] [--threads 1]
                             [--tools fp32 onnxq-int8 ...] [--out benchmarks]

For each bundled model ``models/<stem>.onnx`` (calibration ``<stem>.calib.npz``, evaluation
``<stem>.eval.npz`` with the ground truth under ``labels``) every tool runs in its own
subprocess (so its peak RSS can be read from ``os.wait4``) and writes a quantized model:

* ``fp32``: the model as is;
* ``onnxq-int8``: ``onnxq.quantize(..., precision="int8/uint8")`` (uniform, no search);
* ``onnxq-maxdrop``: ``onnxq.quantize(path, calib, "ort-cpu-x86", max_drop=0.01)`` (default search);
* ``onnxq-4.5bit``: ``QuantizeOptions(target_bits=4.5)`` (budget search);
* ``ort-qdq-pc`` / ``ort-qdq-pt``: onnxruntime ``quantize_static`` (QDQ, int8 weights per-channel /
  per-tensor, uint8 activations, MinMax);
* ``nncf``: ``nncf.quantize`` on the ONNX model (default preset, 256 calibration samples);
* ``nncf-ac``: ``nncf.quantize_with_accuracy_control`` with ``max_drop=0.01``; its validation
  function is top-1 agreement with the fp32 model on the calibration samples (the same
  label-free information onnxq's search gets, so the labelled eval set stays held out);
* ``aimet-amp``: AIMET-ONNX automatic mixed precision, when ``aimet_onnx`` imports here.

Then, in this process and one after another (so that they compete for nothing), each model is
measured: top-1 accuracy on the eval set, file size, and onnxruntime CPU latency at batch 1 and
batch 32 (default ``ORT_ENABLE_ALL``, ``intra_op_num_threads`` pinned, warm-up first, median of
repeated runs). A tool that fails or cannot run is a row ``failed: <reason>``.

Writes ``<out>/RESULTS.md`` (a table per model, with the machine and the date),
``<out>/pareto_size.png`` (accuracy vs size) and ``<out>/pareto_latency.png`` (accuracy vs batch-1
latency). Prints the Markdown on stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from onnxq.latency import Timing

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SPEC = "ort-cpu-x86"
TOOLS: tuple[str, ...] = ("fp32", "onnxq-int8", "onnxq-dyn", "onnxq-maxdrop", "onnxq-4.5bit", "ort-qdq-pc", "ort-qdq-pt",
                          "ort-dynamic", "nncf", "nncf-ac", "aimet-amp")
DESCRIPTIONS: dict[str, str] = {
    "fp32": "float model",
    "onnxq-int8": "onnxq uniform int8/uint8",
    "onnxq-dyn": "onnxq uniform int8/dyn-uint8 (dynamic int8 MatMul/Gemm, static elsewhere where declared)",
    "onnxq-maxdrop": "onnxq search, --max-drop 0.01 (objective latency: measured on this machine)",
    "onnxq-4.5bit": "onnxq budget, --target-bits 4.5",
    "ort-qdq-pc": "ORT quantize_static QDQ, per-channel int8 w / uint8 a, MinMax",
    "ort-qdq-pt": "ORT quantize_static QDQ, per-tensor int8 w / uint8 a, MinMax",
    "ort-dynamic": "ORT quantize_dynamic, per-channel int8 weights, uint8 activations per call",
    "nncf": "NNCF quantize (ONNX, default preset)",
    "nncf-ac": "NNCF quantize_with_accuracy_control, max_drop 0.01",
    "aimet-amp": "AIMET-ONNX automatic mixed precision",
}

logger = logging.getLogger("benchmarks.run")


# -- data ------------------------------------------------------------------------------------------

def load_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file."""
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def model_files(stem: str) -> tuple[Path, Path, Path]:
    """``(model, calib, eval)`` paths of a bundled model."""
    return MODELS / f"{stem}.onnx", MODELS / f"{stem}.calib.npz", MODELS / f"{stem}.eval.npz"


def input_batches(arrays: dict[str, np.ndarray], batch: int, skip: Sequence[str] = ("labels",)) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of ``batch`` samples (the last one may be smaller), in order."""
    names = [k for k in sorted(arrays) if k not in skip]
    count = len(arrays[names[0]])
    for start in range(0, count, batch):
        yield {k: arrays[k][start:start + batch] for k in names}


def _save(model: Any, path: Path) -> None:
    """Save a ModelProto with an IR version onnxruntime accepts."""
    import onnx

    if model.ir_version > 10:
        model.ir_version = 10
    onnx.save(model, str(path))


# -- the tools (run in a subprocess) ---------------------------------------------------------------

def _onnxq(model: Path, calib: Path, out: Path, **kwargs: Any) -> dict[str, Any]:
    import onnxq

    result = onnxq.quantize(str(model), str(calib), SPEC, **kwargs)
    _save(result.model, out)
    report = result.report
    info: dict[str, Any] = {"layers": report.get("layers", {}).get("by_candidate"), "target_met": result.target_met}
    if not result.target_met:
        info["note"] = f"target not met: {report.get('search', {}).get('shortfall', '?')}"
    return info


def tool_fp32(model: Path, calib: Path, out: Path, quick: bool) -> dict[str, Any]:
    shutil.copyfile(model, out)
    return {}


def tool_onnxq_int8(model: Path, calib: Path, out: Path, quick: bool) -> dict[str, Any]:
    return _onnxq(model, calib, out, precision="int8/uint8")


def tool_onnxq_dyn(model: Path, calib: Path, out: Path, quick: bool) -> dict[str, Any]:
    return _onnxq(model, calib, out, precision="int8/dyn-uint8")


def tool_ort_dynamic(model: Path, calib: Path, out: Path, quick: bool) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return {}


def tool_onnxq_maxdrop(model: Path, calib: Path, out: Path, quick: bool) -> dict[str, Any]:
    from onnxq.options import QuantizeOptions

    return _onnxq(model, calib, out, max_drop=0.01, options=QuantizeOptions(progress=False, max_drop=0.01))


def tool_onnxq_bits(model: Path, calib: Path, out: Path, quick: bool) -> dict[str, Any]:
    from onnxq.options import QuantizeOptions

    return _onnxq(model, calib, out, options=QuantizeOptions(target_bits=4.5, progress=False))


class _Reader:
    """An onnxruntime ``CalibrationDataReader`` over the calibration batches."""

    def __init__(self, arrays: dict[str, np.ndarray], batch: int = 16) -> None:
        self._feeds = list(input_batches(arrays, batch))
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._index >= len(self._feeds):
            return None
        self._index += 1
        return self._feeds[self._index - 1]

    def rewind(self) -> None:
        self._index = 0


def _ort_static(model: Path, calib: Path, out: Path, per_channel: bool) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = _Reader(load_npz(calib))
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "pre.onnx"
        try:  # the recommended pre-processing (shape inference + ORT's optimizer)
            quant_pre_process(str(model), str(prepped), skip_symbolic_shape=False)
            source, note = prepped, "quant_pre_process"
        except Exception as error:  # noqa: BLE001 - fall back to the raw model
            source, note = model, f"no pre-process ({type(error).__name__})"
        quantize_static(str(source), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return {"note": note}


def tool_ort_pc(model: Path, calib: Path, out: Path, quick: bool) -> dict[str, Any]:
    return _ort_static(model, calib, out, per_channel=True)


def tool_ort_pt(model: Path, calib: Path, out: Path, quick: bool) -> dict[str, Any]:
    return _ort_static(model, calib, out, per_channel=False)


def _nncf_common(model: Path, calib: Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    import nncf
    import onnx

    proto = onnx.load(str(model))
    samples = list(input_batches(load_npz(calib), 1))
    kwargs: dict[str, Any] = {"subset_size": len(samples)}
    if "transformer" in model.stem:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    return nncf, proto, samples, kwargs


def tool_nncf(model: Path, calib: Path, out: Path, quick: bool) -> dict[str, Any]:
    nncf, proto, samples, kwargs = _nncf_common(model, calib)
    quantized = nncf.quantize(proto, nncf.Dataset(samples), **kwargs)
    _save(quantized, out)
    return {"note": f"nncf {nncf.__version__}"}


def tool_nncf_ac(model: Path, calib: Path, out: Path, quick: bool) -> dict[str, Any]:
    import onnxruntime as ort

    nncf, proto, samples, kwargs = _nncf_common(model, calib)
    reference = _predict(ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]), samples)

    def validate(candidate: Any, items: Any) -> float:
        """Top-1 agreement with the fp32 model on the calibration samples (label-free)."""
        data = candidate if isinstance(candidate, bytes) else candidate.SerializeToString()
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        predictions = _predict(session, list(items))
        return float(np.mean(predictions == reference[: len(predictions)]))

    dataset = nncf.Dataset(samples)
    quantized = nncf.quantize_with_accuracy_control(proto, dataset, dataset, validate, max_drop=0.01,
                                                    drop_type=nncf.DropType.ABSOLUTE, **kwargs)
    _save(quantized, out)
    return {"note": f"nncf {nncf.__version__}; validation = agreement with fp32 on calib"}


def tool_aimet(model: Path, calib: Path, out: Path, quick: bool) -> dict[str, Any]:
    """AIMET-ONNX AMP: sim at w8/a8, candidates w8a8 / w4a8 / w8a16, allowed drop 0.01 in fp32 agreement."""
    try:
        from aimet_onnx.common.defs import CallbackFunc, QuantizationDataType
        from aimet_onnx.mixed_precision import choose_mixed_precision
        from aimet_onnx.quantsim import QuantizationSimModel
    except Exception as error:  # noqa: BLE001 - report why it cannot run
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise RuntimeError(f"aimet_onnx does not import with {sys.executable} ({type(error).__name__}: {first}); "
                           "set ONNXQ_BENCH_AIMET_PYTHON to an interpreter that has aimet-onnx") from error
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(model))
    feeds = list(input_batches(load_npz(calib), 16))
    reference = _predict(ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]), feeds)

    def forward_pass(session: Any, *_: Any) -> None:
        for feed in feeds:
            session.run(None, feed)

    def agreement(session: Any, *_: Any, limit: int | None = None) -> float:
        used = feeds if limit is None else feeds[:limit]
        predictions = _predict(session, used)
        return float(np.mean(predictions == reference[: len(predictions)]))

    sim = QuantizationSimModel(proto, param_type="int8", activation_type="int8", quant_scheme="min_max",
                               providers=["CPUExecutionProvider"])
    sim.compute_encodings(CallbackFunc(forward_pass))
    candidates = [((8, QuantizationDataType.int), (8, QuantizationDataType.int)),
                  ((8, QuantizationDataType.int), (4, QuantizationDataType.int)),
                  ((16, QuantizationDataType.int), (8, QuantizationDataType.int))]
    with tempfile.TemporaryDirectory() as results_dir:
        choose_mixed_precision(sim, candidates, CallbackFunc(lambda s, *a: agreement(s, limit=4)),
                               CallbackFunc(lambda s, *a: agreement(s)), allowed_accuracy_drop=0.01,
                               results_dir=results_dir, clean_start=True, forward_pass_callback=CallbackFunc(forward_pass))
    _save(sim.to_onnx_qdq(prequantize_constants=True), out)
    import aimet_onnx

    return {"note": f"aimet-onnx {getattr(aimet_onnx, '__version__', '?')}; candidates (a,w) 8/8, 8/4, 16/8; "
                    "eval = agreement with fp32 on calib"}


WORKERS: dict[str, Callable[[Path, Path, Path, bool], dict[str, Any]]] = {
    "fp32": tool_fp32, "onnxq-int8": tool_onnxq_int8, "onnxq-dyn": tool_onnxq_dyn, "onnxq-maxdrop": tool_onnxq_maxdrop,
    "ort-dynamic": tool_ort_dynamic,
    "onnxq-4.5bit": tool_onnxq_bits, "ort-qdq-pc": tool_ort_pc, "ort-qdq-pt": tool_ort_pt, "nncf": tool_nncf,
    "nncf-ac": tool_nncf_ac, "aimet-amp": tool_aimet,
}


def worker_main(tool: str, stem: str, out: Path, result: Path, quick: bool) -> int:
    """Run one tool on one model (in a subprocess) and write ``{seconds, info | error}`` to ``result``."""
    logging.basicConfig(level=logging.WARNING)
    model, calib, _ = model_files(stem)
    started = time.perf_counter()
    payload: dict[str, Any]
    try:
        info = WORKERS[tool](model, calib, out, quick)
        payload = {"ok": True, "seconds": time.perf_counter() - started, "info": info}
    except BaseException as error:  # noqa: BLE001 - every failure becomes a table row
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
        payload = {"ok": False, "seconds": time.perf_counter() - started, "error": reason[:300],
                   "traceback": traceback.format_exc()[-4000:]}
    result.write_text(json.dumps(payload, default=str))
    return 0


# -- measuring (in this process) -------------------------------------------------------------------

@dataclass
class Row:
    """One tool on one model."""

    tool: str
    ok: bool
    error: str = ""
    note: str = ""
    accuracy: float | None = None
    size_bytes: int | None = None
    latency_b1_ms: float | None = None
    latency_b32_ms: float | None = None
    latency_b1_ratio: float | None = None  # median of per-round ratios to fp32 (interleaved)
    latency_b32_ratio: float | None = None
    quantize_seconds: float | None = None
    peak_rss_mib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _predict(session: Any, feeds: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
    """Top-1 class per sample over ``feeds``."""
    outputs = [session.run(None, feed)[0] for feed in feeds]
    return np.concatenate([o.reshape(o.shape[0], -1).argmax(axis=1) for o in outputs])


def make_session(path: Path, threads: int) -> Any:
    """A default CPU session (ORT_ENABLE_ALL) with pinned intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def accuracy_of(session: Any, eval_arrays: dict[str, np.ndarray]) -> float:
    """Top-1 accuracy on the eval set (batches of 32)."""
    predictions = _predict(session, list(input_batches(eval_arrays, 32)))
    return float(np.mean(predictions == eval_arrays["labels"]))


def latencies(sessions: dict[str, Any], eval_arrays: dict[str, np.ndarray],
              quick: bool) -> dict[str, tuple[Timing, Timing]]:
    """Batch-1 and batch-32 timings per session against fp32, interleaved round by round
    (:func:`onnxq.latency.time_interleaved`, the measurement the search itself uses), so that
    drift in the machine's load hits all tools alike."""
    from onnxq.latency import time_interleaved

    if not sessions:
        return {}
    reference = "fp32" if "fp32" in sessions else next(iter(sessions))
    budget = 1.0 if quick else 4.0
    b1 = time_interleaved(sessions, [next(input_batches(eval_arrays, 1))], reference, budget_seconds=budget)
    b32 = time_interleaved(sessions, [next(input_batches(eval_arrays, 32))], reference, budget_seconds=budget)
    return {name: (b1[name], b32[name]) for name in sessions}


def run_tool(tool: str, stem: str, workdir: Path, quick: bool, timeout: float) -> tuple[dict[str, Any], float, Path]:
    """Run one tool in a subprocess; returns its result payload, its peak RSS in MiB and the model path."""
    out = workdir / f"{stem}.{tool}.onnx"
    result = workdir / f"{stem}.{tool}.json"
    python = os.environ.get("ONNXQ_BENCH_AIMET_PYTHON", sys.executable) if tool == "aimet-amp" else sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--worker", tool, "--models", stem,
           "--worker-out", str(out), "--worker-result", str(result)] + (["--quick"] if quick else [])
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="2", TQDM_DISABLE="1")
    log = (workdir / f"{stem}.{tool}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
        log.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss_mib = usage.ru_maxrss / 1024.0  # KiB on Linux
    if result.exists():
        payload = json.loads(result.read_text())
    elif proc.returncode is not None and proc.returncode < 0:
        payload = {"ok": False, "error": f"killed after {timeout:.0f} s" if proc.returncode == -9 else
                   f"signal {-proc.returncode}"}
    else:
        tail = (workdir / f"{stem}.{tool}.log").read_text()[-300:].strip().splitlines()
        payload = {"ok": False, "error": f"exit {proc.returncode}: {tail[-1] if tail else ''}"}
    return payload, rss_mib, out


def benchmark_model(stem: str, tools: Sequence[str], workdir: Path, threads: int, quick: bool,
                    timeout: float) -> list[Row]:
    """Every tool on one model."""
    eval_arrays = load_npz(model_files(stem)[2])
    rows: list[Row] = []
    sessions: dict[str, Any] = {}
    for tool in tools:
        logger.info("%s: %s", stem, tool)
        payload, rss, out = run_tool(tool, stem, workdir, quick, timeout)
        info = payload.get("info") or {}
        row = Row(tool=tool, ok=bool(payload.get("ok")), quantize_seconds=payload.get("seconds"), peak_rss_mib=rss,
                  note=str(info.get("note", "")), extra={k: v for k, v in info.items() if k != "note"})
        if not row.ok:
            row.error = str(payload.get("error", "unknown"))
            if payload.get("traceback"):
                logger.debug("%s %s traceback:\n%s", stem, tool, payload["traceback"])
        elif out.exists():
            try:
                sessions[tool] = make_session(out, threads)
                row.accuracy = accuracy_of(sessions[tool], eval_arrays)
                row.size_bytes = out.stat().st_size
            except Exception as error:  # noqa: BLE001 - a model that does not run is a result too
                sessions.pop(tool, None)
                row.ok, row.error = False, f"does not run in onnxruntime: {type(error).__name__}: {str(error)[:200]}"
        else:
            row.ok, row.error = False, "no model written"
        if tool == "fp32":
            row.quantize_seconds = None
        rows.append(row)
        logger.info("  -> %s", row.error or f"acc {row.accuracy:.4f} size {row.size_bytes} in {row.quantize_seconds} s")
    logger.info("%s: latency of %d models", stem, len(sessions))
    for tool, (b1, b32) in latencies(sessions, eval_arrays, quick).items():
        row = next(r for r in rows if r.tool == tool)
        row.latency_b1_ms, row.latency_b32_ms = b1.median_ms, b32.median_ms
        row.latency_b1_ratio, row.latency_b32_ratio = b1.ratio, b32.ratio
    return rows


# -- output ----------------------------------------------------------------------------------------

def machine_info(threads: int) -> dict[str, str]:
    """What the numbers were measured on."""
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
    for name in ("nncf", "onnxq"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            versions[name] = "not installed"
    revision = os.environ.get("ONNXQ_BENCH_REVISION")
    if not revision:
        try:
            revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(ROOT), capture_output=True,
                                      text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            revision = "unknown"
    versions["onnxq"] += f" (git {revision})"
    return {"date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": f"{cpu}, {os.cpu_count()} logical cores",
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
            "latency": (f"onnxruntime CPU, ORT_ENABLE_ALL, intra_op_num_threads={threads}, median of interleaved "
                        "rounds after warm-up; b1 × and b32 × are medians of the per-round ratios to fp32"),
            "load average (1/5/15 min) at the end": " / ".join(f"{v:.1f}" for v in os.getloadavg())}


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(results: dict[str, list[Row]], info: dict[str, str], quick: bool) -> str:
    """RESULTS.md."""
    command = info.get("command") or "python benchmarks/run.py" + (" --quick" if quick else "")
    lines = ["# onnxq benchmarks", "", f"Generated by `{command}`.", ""]
    lines += [f"- **{k}**: {v}" for k, v in info.items() if k != "command"]
    lines += ["", "Accuracy is top-1 on the model's eval set (360 samples, labels held out from every tool); "
              "size is the .onnx file; latency is per call; quantize time is the tool's call in its own "
              "subprocess (imports excluded); peak RSS is that subprocess's max RSS (imports included).", ""]
    for stem, rows in results.items():
        base = next((r for r in rows if r.tool == "fp32" and r.ok), None)
        lines += [f"## {stem}", "",
                  "| tool | accuracy | Δ acc | size (KiB) | size × | latency b1 (ms) | latency b32 (ms) | "
                  "b1 × | b32 × | quantize (s) | peak RSS (MiB) | notes |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if not r.ok:
                lines.append(f"| {r.tool} | failed: {r.error.replace('|', '/')} | | | | | | | | "
                             f"{_cell(r.quantize_seconds, '.1f')} | {_cell(r.peak_rss_mib, '.0f')} | "
                             f"{DESCRIPTIONS.get(r.tool, '')} |")
                continue
            delta = None if base is None or r.accuracy is None else r.accuracy - (base.accuracy or 0.0)
            size_x = None if base is None or not base.size_bytes or r.size_bytes is None else r.size_bytes / base.size_bytes
            lat_x, lat32_x = r.latency_b1_ratio, r.latency_b32_ratio
            notes = DESCRIPTIONS.get(r.tool, "")
            if r.extra.get("layers"):
                notes += "; layers " + ", ".join(f"{k}: {v}" for k, v in sorted(r.extra["layers"].items()))
            if r.note:
                notes += f"; {r.note}"
            lines.append(
                f"| {r.tool} | {_cell(r.accuracy, '.4f')} | {_cell(delta, '+.4f')} | "
                f"{_cell(None if r.size_bytes is None else r.size_bytes / 1024, '.1f')} | {_cell(size_x, '.3f')} | "
                f"{_cell(r.latency_b1_ms, '.3f')} | {_cell(r.latency_b32_ms, '.2f')} | "
                f"{_cell(lat_x, '.2f')} | {_cell(lat32_x, '.2f')} | "
                f"{_cell(r.quantize_seconds, '.1f')} | {_cell(r.peak_rss_mib, '.0f')} | {notes.replace('|', '/')} |")
        lines.append("")
        for key, label in (("size_bytes", "size"), ("latency_b1_ms", "batch-1 latency")):
            optimal = _optimal_tools(rows, key)
            if optimal:
                lines.append(f"Pareto-optimal for accuracy vs {label}: {', '.join(optimal)}.  ")
        lines.append("")
    return "\n".join(lines)


def pareto_plots(results: dict[str, list[Row]], out_dir: Path) -> list[Path]:
    """``pareto_size.png`` and ``pareto_latency.png``: accuracy vs size / batch-1 latency per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no Pareto plots (pip install .[bench])")
        return []
    written = []
    markers = dict(zip(TOOLS, "osD^v<>Xph*P", strict=False))
    colours = {tool: f"C{i}" for i, tool in enumerate(TOOLS)}
    for key, xlabel, name in (("size_bytes", "model size (KiB)", "pareto_size.png"),
                              ("latency_b1_ms", "latency, batch 1 (ms)", "pareto_latency.png")):
        fig = Figure(figsize=(6.0 * max(1, len(results)), 4.6))
        for i, (stem, rows) in enumerate(results.items()):
            ax = fig.add_subplot(1, max(1, len(results)), i + 1)
            points = [(r.tool, getattr(r, key), r.accuracy) for r in rows if r.ok and getattr(r, key) is not None]
            for tool, x, y in points:
                x = x / 1024 if key == "size_bytes" else x
                ax.plot([x], [y], marker=markers.get(tool, "o"), color=colours.get(tool, "k"), linestyle="none",
                        markersize=8, alpha=0.85, label=tool)
            front = _front([(x / 1024 if key == "size_bytes" else x, y) for _, x, y in points])
            if len(front) > 1:
                ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="#888888", linewidth=0.8)
            ax.set_title(stem, fontsize=10)
            ax.set_xlabel(xlabel, fontsize=9)
            ax.set_ylabel("top-1 accuracy (eval)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(str(path), dpi=100, metadata={"Software": None})
        written.append(path)
    return written


def _optimal_tools(rows: Sequence[Row], key: str) -> list[str]:
    """Tools not dominated in (higher accuracy, lower ``key``), in table order."""
    points = [(r.tool, getattr(r, key), r.accuracy) for r in rows
              if r.ok and getattr(r, key) is not None and r.accuracy is not None]
    return [tool for tool, x, y in points
            if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for _, x2, y2 in points)]


def _front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto front (lower x, higher y is better), sorted by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


# -- entry point -----------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None, help="model stems in models/ (default: all)")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--quick", action="store_true", help="shorter latency measurements")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra_op_num_threads (default 1)")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per tool run (default 420)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    parser.add_argument("--keep", type=Path, default=None, help="keep the quantized models and results.json here")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="only re-render RESULTS.md and the plots from a results.json written with --keep")
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.models[0], args.worker_out, args.worker_result, args.quick)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        info = saved.pop("_machine", None) or machine_info(args.threads)
        results = {stem: [Row(**row) for row in rows] for stem, rows in saved.items()}
        return _write(results, info, args.out, bool(saved and args.quick))
    stems = args.models or sorted(p.name[: -len(".eval.npz")] for p in MODELS.glob("*.eval.npz")
                                  if (MODELS / p.name.replace(".eval.npz", ".onnx")).exists())
    results: dict[str, list[Row]] = {}
    with tempfile.TemporaryDirectory(prefix="onnxq-bench-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for stem in stems:
            results[stem] = benchmark_model(stem, args.tools, workdir, args.threads, args.quick, args.timeout)
    info = machine_info(args.threads)
    info["command"] = " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])])
    if args.keep:  # the raw rows beside the kept models
        raw: dict[str, Any] = {s: [asdict(r) for r in rows] for s, rows in results.items()}
        raw["_machine"] = info
        (args.keep / "results.json").write_text(json.dumps(raw, indent=1, sort_keys=True, default=str) + "\n")
    return _write(results, info, args.out, args.quick)


def _write(results: dict[str, list[Row]], info: dict[str, str], out: Path, quick: bool) -> int:
    """RESULTS.md and the Pareto plots into ``out``; the Markdown on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(results, info, quick)
    (out / "RESULTS.md").write_text(text + "\n")
    pareto_plots(results, out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
