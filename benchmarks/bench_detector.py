"""onnxq against onnxruntime's quantizers on a real-weights text detector (PP-OCRv4 DBNet, 640×640 pages).

Usage (from the repository root; the model and pages come from ``models/export_ppocr_det.py``)::

    python models/export_ppocr_det.py          # once: writes models/.cache/ppocr_det/
    ulimit -v 16000000; python benchmarks/bench_detector.py [--out benchmarks/DETECTOR.md]
        [--variants onnxq-max-drop onnxq-int8 ort-static ort-dynamic] [--timeout 1800]
        [--threads 1] [--budget 40] [--vmem-kb 16000000]

1. Quantizes ``ppocr_det.onnx`` once per variant, each in its own subprocess under ``ulimit -v``
   and a timeout (``bench_scale.run_limited``: wall time, peak RSS from ``os.wait4``, the load
   average when it ends):

   * ``onnxq-max-drop``: ``onnxq quantize --spec ort-cpu-x86 --max-drop 0.01`` (the CLI, the
     sibling ``ppocr_det.calib.npz``: 12 pages), the run of issue 13;
   * ``onnxq-int8``: the same with ``--precision int8/uint8`` (uniform, no search);
   * ``ort-static``: ``quant_pre_process`` then ``quantize_static`` (QDQ, int8 per-channel
     weights, uint8 activations, MinMax) on the same 12 pages;
   * ``ort-dynamic``: ``quantize_dynamic`` (per-channel int8 weights; Conv becomes
     ``ConvInteger`` with activations quantized per call).
2. In this process, on the 40 labelled test pages at batch 1: text-line detection precision /
   recall / F1 (``export_ppocr_det.detection_scores``: DB post-processing at 0.3, connected
   components, IoU ≥ 0.5 one-to-one matching), agreement of the probability map with fp32 (mean
   absolute difference; IoU of the maps binarised at 0.3), file size, and latency at batch 1
   interleaved with fp32 (``onnxq.latency.time_interleaved``, median per-round ratio and IQR).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import load, run_limited  # noqa: E402

from onnxq.latency import machine_id, time_interleaved  # noqa: E402

MODEL_DIR = ROOT / "models" / ".cache" / "ppocr_det"
WORK_DIR = ROOT / "benchmarks" / ".cache" / "detector"
VARIANTS = ("onnxq-max-drop", "onnxq-int8", "ort-static", "ort-dynamic")
TITLES = {
    "fp32": "fp32 (reference)",
    "onnxq-max-drop": "onnxq quantize --max-drop 0.01 --spec ort-cpu-x86",
    "onnxq-int8": "onnxq quantize --precision int8/uint8 --spec ort-cpu-x86",
    "ort-static": "ORT quant_pre_process + quantize_static (QDQ, per-channel int8 w / uint8 a, MinMax)",
    "ort-dynamic": "ORT quantize_dynamic (per-channel int8 weights, ConvInteger)",
}


def export_module() -> Any:
    """``models/export_ppocr_det.py`` (rendering, preprocessing and the detection metric)."""
    spec = importlib.util.spec_from_file_location("export_ppocr_det", ROOT / "models" / "export_ppocr_det.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# -- quantizers (each in a worker subprocess) ---------------------------------------------------------

class _Reader:
    def __init__(self, x: np.ndarray) -> None:
        self.feeds = iter([{"x": x[i:i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def pre_process(model: Path, out: Path) -> str:
    """What onnxruntime's quantizers need first: opset 13 (per-channel DequantizeLinear takes an
    ``axis`` only from 13; on the opset-12 file ``quantize_static`` writes a model onnxruntime
    refuses to load), then the recommended ``quant_pre_process``, whose symbolic shape inference
    gives up on this graph ("Incomplete symbolic shape inference"): it is retried without that
    step (ONNX shape inference and ORT's optimizer still run; they also fold the ``Constant``-node
    weights into the initializers ``quantize_dynamic`` requires)."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes = []
    source = onnx.load(str(model))
    if source.opset_import[0].version < 13:
        source = version_converter.convert_version(source, 13)
        notes.append("converted to opset 13")
    upgraded = out.with_suffix(".opset.onnx")
    onnx.save(source, str(upgraded))
    try:
        quant_pre_process(str(upgraded), str(out), skip_symbolic_shape=False)
        notes.append("quant_pre_process")
    except Exception as error:  # noqa: BLE001 - the documented fallback
        quant_pre_process(str(upgraded), str(out), skip_symbolic_shape=True)
        notes.append(f"quant_pre_process(skip_symbolic_shape=True) after: {str(error).strip()[:80]}")
    finally:
        (Path.cwd() / "sym_shape_infer_temp.onnx").unlink(missing_ok=True)  # left by the failed inference
    upgraded.unlink()
    return "; ".join(notes)


def ort_static(model: Path, out: Path) -> str:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    prepped = out.with_suffix(".pre.onnx")
    note = pre_process(model, prepped)
    x = np.load(model.with_suffix(".calib.npz"))["x"]
    quantize_static(str(prepped), str(out), _Reader(x), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    prepped.unlink()
    return note


def ort_dynamic(model: Path, out: Path) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prepped = out.with_suffix(".pre.onnx")
    note = pre_process(model, prepped)
    quantize_dynamic(str(prepped), str(out), per_channel=True, weight_type=QuantType.QInt8)
    prepped.unlink()
    return note


def worker(variant: str, model: Path, out: Path) -> int:
    started = time.perf_counter()
    note = {"ort-static": ort_static, "ort-dynamic": ort_dynamic}[variant](model, out)
    print("RESULT " + json.dumps({"call_seconds": time.perf_counter() - started, "note": note}))
    return 0


def command(variant: str, model: Path, out: Path, report: Path) -> list[str]:
    if variant.startswith("ort-"):
        return [sys.executable, "benchmarks/bench_detector.py", "--worker", variant, "--model", str(model),
                "--output", str(out)]
    mode = ["--precision", "int8/uint8"] if variant == "onnxq-int8" else ["--max-drop", "0.01"]
    return [sys.executable, "-m", "onnxq", "quantize", str(model), "-o", str(out), "--spec", "ort-cpu-x86", *mode,
            "--no-cache", "--report", str(report)]


def run_variant(variant: str, model: Path, work: Path, timeout: float, vmem_kb: int) -> dict[str, Any]:
    out, report = work / f"{variant}.onnx", work / f"{variant}.report.json"
    for path in (out, report):
        path.unlink(missing_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {variant} (load {load()}) ...", flush=True)
    row: dict[str, Any] = {"variant": variant, "load_before": load()}
    row.update(run_limited(command(variant, model, out, report), timeout, vmem_kb, env={"PYTHONPATH": str(ROOT)}))
    row["command"] = " ".join(Path(a).name if a == sys.executable else a for a in
                              command(variant, Path("MODEL"), Path("OUT"), Path("REPORT.json")))
    if report.exists():
        row["report"] = json.loads(report.read_text())
    for line in row["output"].splitlines():
        if line.startswith("RESULT "):
            row["worker"] = json.loads(line[len("RESULT "):])
    if out.exists() and row["exit"] in (0, 1):  # onnxq exits 1 when a target is missed but still writes
        row["model"] = out
    else:
        row["failure"] = f"exit code {row['exit']}\n" + row["output"][-2000:]
    print(f"    {variant}: {'ok' if 'model' in row else 'FAILED'} in {row['seconds']:.1f} s, peak RSS "
          f"{row['peak_rss_mib']:.0f} MiB, load {row['load']}", flush=True)
    return row


# -- measurement (this process) -------------------------------------------------------------------------

def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def task_metrics(sessions: dict[str, ort.InferenceSession], test: dict[str, np.ndarray],
                 det: Any) -> dict[str, dict[str, float]]:
    probs = {name: det.run_pages(s, test["images"]) for name, s in sessions.items()}
    reference = probs["fp32"]
    ref_mask = reference > det.THRESH
    result = {}
    for name, prob in probs.items():
        mask = prob > det.THRESH
        union = np.logical_or(mask, ref_mask).sum()
        scores = det.detection_scores(prob, test["boxes"], test["box_page"])
        result[name] = {**scores, "prob_mad": float(np.abs(prob - reference).mean()),
                        "mask_iou": float(np.logical_and(mask, ref_mask).sum() / max(union, 1))}
    return result


def versions() -> str:
    import onnx

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(ROOT), capture_output=True,
                         text=True).stdout.strip()
    return (f"Python {platform.python_version()}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
            f"numpy {np.__version__}; onnxq revision {rev or '?'}")


def onnxq_note(row: dict[str, Any]) -> str:
    report = row.get("report")
    if not report:
        worker = row.get("worker", {})
        return f"call {worker['call_seconds']:.1f} s; {worker['note']}" if worker else ""
    counts: dict[str, int] = {}
    for candidate in report.get("plan", {}).get("layers", {}).values():
        counts[candidate] = counts.get(candidate, 0) + 1
    metric, search = report.get("metric", {}), report.get("search", {})
    phases = {k: round(v, 1) for k, v in sorted(report.get("time_per_phase", {}).items(), key=lambda kv: -kv[1])[:6]}
    text = (f"onnxq's own seconds {report.get('seconds', 0):.1f}; layers {dict(sorted(counts.items()))}; own metric "
            f"{metric.get('name')} drop {metric.get('drop', 0):.4f}; own latency ratio "
            f"{report.get('latency', {}).get('ratio')}; slowest phases {phases}")
    if search:
        text += (f"; sensitivity on {search.get('sensitivity_samples')} sample(s), "
                 f"{search.get('sensitivity_evaluations')} evaluations; {search.get('evaluations')} plans measured")
        if search.get("notice"):
            text += f"; notice: {search['notice']}"
    return text


def render(rows: dict[str, dict[str, Any]], metrics: dict[str, dict[str, float]], lats: dict[str, dict[str, Any]],
           sizes: dict[str, int], meta: dict[str, Any], args: argparse.Namespace, started: str, load_start: str) -> str:
    lines = [
        "# Real-weights text detector (PP-OCRv4 DBNet, 640×640): onnxq vs onnxruntime's quantizers", "",
        "Generated by `ulimit -v 16000000; python benchmarks/bench_detector.py` (after "
        f"`python models/export_ppocr_det.py`) on {started}. Machine: {machine_id()}; load average at the start "
        f"{load_start}, at the end {load()} (1, 5, 15 min; the machine is shared). {versions()}.", "",
        "## Model and task", "",
        f"- {meta['source']} (sha256 {meta['sha256'][:12]}…), {meta['onnx_bytes'] / 2**20:.1f} MiB, opset 12: "
        "PP-LCNetV3 backbone (62 Conv incl. depthwise, hard-swish as Clip/Add/Mul/Div, SE blocks with "
        "HardSigmoid), RSE-FPN neck (Resize), DB head (2 ConvTranspose, Sigmoid); input `x` [N, 3, H, W].",
        f"- pages: {meta['page']}×{meta['page']} rendered with PIL ({', '.join(meta['fonts'])}), "
        f"{meta['calib_pages']} calibration pages (`ppocr_det.calib.npz`), {meta['test_pages']} test pages with "
        f"{meta['test_lines']} ground-truth text lines; preprocessing as rapidocr's `DetPreProcess` "
        "(BGR, (v/255 − 0.5)/0.5, CHW).",
        "- metric: DB post-processing (probability > 0.3, 8-connected components, mean probability ≥ 0.5, "
        "unclip by area × 1.6 / perimeter), one-to-one matching to ground truth at IoU ≥ 0.5; "
        "map MAD: mean |p − p_fp32| over all pixels; mask IoU: IoU of the maps binarised at 0.3 with fp32's.",
        "", "## Results", "",
        "| variant | ok | precision | recall | F1 | map MAD | mask IoU | size vs fp32 | "
        + " | ".join(f"latency b1 vs fp32, {label} (IQR)" for label in lats)
        + " | quantize s (CPU s) | peak RSS MiB | load after |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(lats) + "---|---|---|",
    ]
    for name in ["fp32", *args.variants]:
        row = rows.get(name, {})
        if name != "fp32" and name not in metrics:
            lines.append(f"| {TITLES[name]} | **no** | – | – | – | – | – | – | {'– | ' * len(lats)}{row.get('seconds', 0):.1f} "
                         f"| {row.get('peak_rss_mib', 0):.0f} | {row.get('load', '')} |")
            continue
        m = metrics[name]
        ratios = " | ".join(f"{t[name].ratio:.2f} ({t[name].ratio_low:.2f}–{t[name].ratio_high:.2f})" for t in lats.values())
        quantize = "–" if name == "fp32" else f"{row['seconds']:.1f} ({row['cpu_seconds']:.0f})"
        rss = "–" if name == "fp32" else f"{row['peak_rss_mib']:.0f}"
        lines.append(f"| {TITLES[name]} | yes | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} "
                     f"| {m['prob_mad']:.4f} | {m['mask_iou']:.4f} | {sizes[name] / sizes['fp32']:.3f} "
                     f"| {ratios} | {quantize} | {rss} "
                     f"| {row.get('load', '–')} |")
    lines += [
        "", "fp32 absolute, per page at batch 1: " + "; ".join(
            f"{label} {t['fp32'].median_ms:.0f} ms (median of {t['fp32'].rounds} interleaved rounds)"
            for label, t in lats.items())
        + ". Every model runs once per round, in an order rotated every round; onnxq's search and its "
        "final report time with onnxruntime's default thread count.", "",
        "Quantize seconds: wall time of the quantizer's subprocess (interpreter start, imports and loading "
        f"included) under `ulimit -v {args.vmem_kb}`, and in brackets its CPU time (user + system, from "
        "`os.wait4`; less sensitive to the other jobs on the machine than the wall time); peak RSS from "
        "`os.wait4`; the load average (1, 5, 15 min) when the subprocess ended.", "",
        "## Notes per variant", "",
    ]
    for name in args.variants:
        row = rows[name]
        lines.append(f"- **{name}**: `{row['command']}`. {onnxq_note(row)}")
    failures = [name for name in args.variants if "failure" in rows[name]]
    if failures:
        lines += ["", "## Failures", ""]
        for name in failures:
            lines += [f"### {name}", "", "```", rows[name]["failure"], "```", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL_DIR / "ppocr_det.onnx", help="the exported detector")
    parser.add_argument("--workdir", type=Path, default=WORK_DIR, help="where quantized models go (git-ignored)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="what to run")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per quantizer before it is killed")
    parser.add_argument("--vmem-kb", type=int, default=16_000_000, help="ulimit -v of every quantizer")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for latency (0: onnxruntime default)")
    parser.add_argument("--budget", type=float, default=40.0, help="seconds of interleaved latency timing")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "DETECTOR.md", help="markdown report")
    parser.add_argument("--worker", choices=["ort-static", "ort-dynamic"], help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.model, args.output)
    if not args.model.exists():
        parser.error(f"{args.model} not found: run `python models/export_ppocr_det.py` first")
    started, load_start = dt.datetime.now().strftime("%Y-%m-%d %H:%M"), load()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = {name: run_variant(name, args.model, args.workdir, args.timeout, args.vmem_kb) for name in args.variants}
    paths = {"fp32": args.model, **{name: row["model"] for name, row in rows.items() if "model" in row}}
    sessions = {}
    for name, path in paths.items():
        try:
            sessions[name] = session(path, args.threads)
        except Exception as error:  # noqa: BLE001 - a model onnxruntime cannot load is a failed row
            rows[name]["failure"] = f"onnxruntime cannot load the written model: {str(error).strip()[:400]}"
    paths = {name: path for name, path in paths.items() if name in sessions}
    threads = [args.threads] if args.threads == 0 else [args.threads, 0]
    det = export_module()
    with np.load(args.model.with_suffix(".test.npz"), allow_pickle=False) as data:
        test = {key: data[key] for key in data.files}
    metrics = task_metrics(sessions, test, det)
    print("F1:", {k: round(v["f1"], 4) for k, v in metrics.items()}, flush=True)
    page = {"x": det.preprocess(test["images"][:1])}
    lats = {}
    for count in threads:
        timed = sessions if count == args.threads else {name: session(path, count) for name, path in paths.items()}
        label = f"{count} thread{'s' if count > 1 else ''}" if count else f"default threads ({os.cpu_count()} cores)"
        lats[label] = time_interleaved(timed, [page], "fp32", budget_seconds=args.budget, min_rounds=7, max_rounds=200)
    sizes = {name: path.stat().st_size for name, path in paths.items()}
    meta = json.loads(args.model.with_suffix(".json").read_text())
    text = render(rows, metrics, lats, sizes, meta, args, started, load_start)
    args.out.write_text(text)
    (args.workdir / "results.json").write_text(json.dumps({
        "metrics": metrics, "sizes": sizes,
        "latency_b1": {label: {k: vars(v) for k, v in t.items()} for label, t in lats.items()},
        "quantize": {k: {f: v[f] for f in ("seconds", "cpu_seconds", "peak_rss_mib", "exit", "load", "load_before")}
                     for k, v in rows.items()},
    }, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
