"""onnxq against onnxruntime's quantizers on a real-weights BERT-class sentence encoder (all-MiniLM-L6-v2).

Usage (from the repository root; the model comes from ``models/export_minilm.py``)::

    python models/export_minilm.py            # once: writes models/.cache/minilm/
    ulimit -v 20000000; python benchmarks/bench_encoder.py [--out benchmarks/ENCODER.md]
        [--variants ort-dynamic ort-static onnxq-max-drop onnxq-max-drop-padded onnxq-int8 onnxq-dyn]
        [--timeout 900] [--threads 1] [--budget 20] [--layer-budget 150]

1. Quantizes ``minilm.onnx`` once per variant, each in its own subprocess (wall time, peak RSS
   from ``os.wait4``, a hard timeout; a failure is recorded with its text and the run goes on):

   * ``ort-dynamic``: ``quantize_dynamic`` (per-channel int8 weights, activations quantized per
     call) - the bar of issue 12;
   * ``ort-static``: ``quantize_static`` (QDQ, uint8 activations, int8 per-channel weights,
     MinMax) on the calibration feeds;
   * ``onnxq-max-drop``: ``onnxq quantize --spec ort-cpu-x86 --max-drop 0.01`` (CLI,
     ``PYTHONPATH`` at the repository root);
   * ``onnxq-max-drop-padded``: the same with the calibration sentences padded into one ``.npz``
     (a workaround while ragged feeds fail in the search);
   * ``onnxq-int8``: ``onnxq quantize --spec ort-cpu-x86 --precision int8/uint8``;
   * ``onnxq-dyn``: ``onnxq quantize --spec ort-cpu-x86 --precision int8/dyn-uint8``.

   The calibration feeds are ``minilm.calib/`` (one ``.npz`` per sentence, each at its own length).
2. In this process: the task metrics of every model, each sentence run at batch 1 at its own
   length (leave-one-out nearest-centroid topic accuracy over 216 written sentences; top-1
   retrieval of 120 written paraphrases among them; the cosine of its embeddings to fp32), file size, and latency interleaved with fp32 (``onnxq.latency``): batch 1
   over 16 sentences at their real lengths, and batch 32 padded to the longest of 32 sentences.
   Latency is reported as the median per-round ratio to fp32 with its interquartile range.
3. The per-layer latency table (``onnxq.latency.build_latency_table``) at batch 1 for a sentence of
   median length: every layer alone in fp32 against its region cut out of each quantized model
   (``region_builder``), within ``--layer-budget`` seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxq.latency import LatencyTable, build_latency_table, machine_id, region_builder, time_interleaved  # noqa: E402

MODEL_DIR = ROOT / "models" / ".cache" / "minilm"
WORK_DIR = ROOT / "benchmarks" / ".cache" / "encoder"
VARIANTS = ("ort-dynamic", "ort-static", "onnxq-max-drop", "onnxq-max-drop-padded", "onnxq-int8", "onnxq-dyn")
MEMORY_LIMIT = 20_000_000 * 1024  # the `ulimit -v 20000000` of the brief, for every worker
TITLES = {
    "fp32": "fp32 (reference)",
    "ort-dynamic": "ORT quantize_dynamic (int8 per-channel weights, dynamic uint8 activations)",
    "ort-static": "ORT quantize_static (QDQ, uint8 act / int8 per-channel weights, MinMax)",
    "onnxq-max-drop": "onnxq quantize --max-drop 0.01 --spec ort-cpu-x86",
    "onnxq-max-drop-padded": "same, calibration padded to one length (workaround)",
    "onnxq-int8": "onnxq quantize --precision int8/uint8 --spec ort-cpu-x86",
    "onnxq-dyn": "onnxq quantize --precision int8/dyn-uint8 --spec ort-cpu-x86",
}


# -- quantizers (each runs in a worker subprocess) ---------------------------------------------------

def calib_feeds(folder: Path) -> list[dict[str, np.ndarray]]:
    feeds = []
    for path in sorted(folder.glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            feeds.append({key: data[key] for key in data.files})
    return feeds


def ort_dynamic(model: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model), str(out), per_channel=True, weight_type=QuantType.QInt8)


def ort_static(model: Path, out: Path) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader:
        def __init__(self) -> None:
            self.feeds = iter(calib_feeds(model.parent / "minilm.calib"))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def worker(variant: str, model: Path, out: Path) -> int:
    started = time.perf_counter()
    {"ort-dynamic": ort_dynamic, "ort-static": ort_static}[variant](model, out)
    print(json.dumps({"call_seconds": time.perf_counter() - started}))
    return 0


def padded_calibration(model: Path, out: Path) -> Path:
    """The calibration sentences as one .npz padded to the longest (attention_mask marks the padding)."""
    feeds = calib_feeds(model.parent / "minilm.calib")
    width = max(feed["input_ids"].shape[1] for feed in feeds)
    stacked = {key: np.zeros((len(feeds), width), np.int64) for key in ("input_ids", "attention_mask")}
    for i, feed in enumerate(feeds):
        for key in stacked:
            stacked[key][i, : feed[key].shape[1]] = feed[key][0]
    np.savez(out, **stacked)
    return out


def command(variant: str, model: Path, out: Path, report: Path) -> list[str]:
    if variant.startswith("ort-"):
        return ["python", "benchmarks/bench_encoder.py", "--worker", variant, "--model", str(model), "--output", str(out)]
    precision = {"onnxq-int8": "int8/uint8", "onnxq-dyn": "int8/dyn-uint8"}.get(variant)
    mode = ["--precision", precision] if precision else ["--max-drop", "0.01"]
    if variant == "onnxq-max-drop-padded":
        mode += ["--calib", str(out.parent / "calib_padded.npz")]
    return ["python", "-m", "onnxq", "quantize", str(model), "-o", str(out), "--spec", "ort-cpu-x86",
            *mode, "--report", str(report), "--no-cache"]


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_variant(variant: str, model: Path, work: Path, timeout: float) -> dict[str, Any]:
    out, report, log = work / f"{variant}.onnx", work / f"{variant}.report.json", work / f"{variant}.log"
    for path in (out, report):
        path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    print(f"[{time.strftime('%H:%M:%S')}] {variant} ...", flush=True)
    started = time.perf_counter()
    with open(log, "w") as log_file:
        argv = command(variant, model, out, report)
        proc = subprocess.Popen([sys.executable, *argv[1:]], stdout=log_file, stderr=subprocess.STDOUT,
                                cwd=str(ROOT), env=env, preexec_fn=limit_memory)
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
        code = os.waitstatus_to_exitcode(status)
    row: dict[str, Any] = {"variant": variant, "seconds": time.perf_counter() - started,
                           "peak_rss_mib": usage.ru_maxrss / 1024, "exit_code": code,
                           "command": " ".join(command(variant, Path("MODEL"), Path("OUT"), Path("REPORT.json")))}
    text = log.read_text(errors="replace")
    if report.exists():
        row["report"] = json.loads(report.read_text())
    if out.exists() and code in (0, 1):  # onnxq exits 1 when its target is not met but still writes the model
        row["model"] = out
    else:
        reason = f"timed out after {timeout:.0f} s" if timed_out.is_set() else f"exit code {code}"
        row["failure"] = reason + "\n" + "\n".join(text.splitlines()[-25:])
    row["log_tail"] = "\n".join(text.splitlines()[-8:])
    print(f"    {variant}: {'ok' if 'model' in row else 'FAILED'} in {row['seconds']:.1f} s, "
          f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
    return row


# -- measurement (this process) ----------------------------------------------------------------------

def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def sentence_feeds(test: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{"input_ids": test["input_ids"][i:i + 1, :n], "attention_mask": test["attention_mask"][i:i + 1, :n]}
            for i, n in enumerate(test["lengths"])]


def batch_feed(test: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    width = int(test["lengths"][:size].max())
    return {"input_ids": test["input_ids"][:size, :width], "attention_mask": test["attention_mask"][:size, :width]}


def nearest_centroid_accuracy(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest-centroid accuracy on cosine similarity (as models/export_minilm.py)."""
    embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    classes = np.unique(labels)
    sums = np.stack([embeddings[labels == c].sum(0) for c in classes])
    counts = np.array([(labels == c).sum() for c in classes], dtype=np.float64)
    correct = 0
    for i, label in enumerate(labels):
        centroids = sums.copy()
        centroids[int(np.searchsorted(classes, label))] -= embeddings[i]
        centroids /= (counts - (classes == label))[:, None]
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        correct += int(classes[int(np.argmax(centroids @ embeddings[i]))] == label)
    return correct / len(labels)


def retrieval_accuracy(unit: np.ndarray, test: dict[str, np.ndarray]) -> float:
    """Share of paraphrases whose most cosine-similar task sentence is their original."""
    corpus = test["task_rows"]
    nearest = corpus[np.argmax(unit[test["query_rows"]] @ unit[corpus].T, axis=1)]
    return float(np.mean(nearest == test["query_targets"]))


def task_metrics(sessions: dict[str, ort.InferenceSession], test: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    feeds = sentence_feeds(test)
    embeddings = {name: np.concatenate([s.run(None, feed)[0] for feed in feeds]) for name, s in sessions.items()}
    reference = embeddings["fp32"] / np.linalg.norm(embeddings["fp32"], axis=1, keepdims=True)
    result = {}
    for name, values in embeddings.items():
        unit = values / np.linalg.norm(values, axis=1, keepdims=True)
        cosine = (unit * reference).sum(1)
        result[name] = {"accuracy": nearest_centroid_accuracy(values[test["task_rows"]], test["labels"]),
                        "retrieval": retrieval_accuracy(unit, test),
                        "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}
    return result


def file_bytes(path: Path) -> int:
    """The model file plus any external-data files written beside it with its stem."""
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(f"{path.stem}.onnx.data"))


def layer_table(paths: dict[str, Path], test: dict[str, np.ndarray], budget: float, threads: int) -> LatencyTable:
    """Per-layer latency of every quantized model's layers, cut out of it (onnxq.latency), at batch 1."""
    lengths = test["lengths"][test["task_rows"]]
    row = int(np.argsort(lengths)[len(lengths) // 2])  # a sentence of median length
    feed = {"input_ids": test["input_ids"][row:row + 1, :lengths[row]],
            "attention_mask": test["attention_mask"][row:row + 1, :lengths[row]]}
    builders = {name: region_builder(path) for name, path in paths.items() if name != "fp32"}
    return build_latency_table(paths["fp32"], feed, builders, budget_seconds=budget, per_pair_seconds=0.3,
                               threads=threads)


def render_layer_table(table: LatencyTable, names: list[str]) -> list[str]:
    layers = list(dict.fromkeys(entry.layer for entry in table.entries))
    by_key = {(entry.layer, entry.candidate): entry for entry in table.entries}
    lines = ["", "## Per-layer latency (onnxq.latency), batch 1", "",
             f"{table.summary()}. Each layer alone (a one-node fp32 model with its real weight, fed its real input "
             "at the deploy shape of a median-length sentence) against the same layer's region cut out of each "
             "quantized model (input Q/DQ or DynamicQuantizeLinear, weight DQ, kernel, rescale, and the Q on its output if any), interleaved; "
             "ratio to fp32 (IQR). A dash: the region could not be cut (the quantizer re-routed the layer's "
             "input, e.g. a quantized Gather output) or the budget ran out.", "",
             "| layer | shape in | fp32 µs | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for layer in layers:
        entries = [by_key.get((layer, name)) for name in names]
        first = next(e for e in entries if e)
        cells = [f"{e.ratio:.2f} ({e.spread:.2f})" if e else "–" for e in entries]
        lines.append(f"| {layer} | {first.shapes} | {first.fp32_ms * 1e3:.0f} | " + " | ".join(cells) + " |")
    totals = []
    for name in names:
        timed = [e for e in table.entries if e.candidate == name]
        if timed:
            totals.append(f"{name}: {sum(e.candidate_ms for e in timed) / sum(e.fp32_ms for e in timed):.2f} "
                          f"over {len(timed)} layers")
    lines += ["", "Sum of the timed layers' candidate time over their fp32 time: " + "; ".join(totals) + "."]
    slow = [e for e in table.entries if e.ratio > 3.0]
    if slow:
        worst = sorted(slow, key=lambda e: -(e.candidate_ms - e.fp32_ms))[:6]
        lines.append("Layers a candidate makes more than 3× slower than fp32 (largest extra time first): " + "; ".join(
            f"{e.layer} under {e.candidate}: {e.ratio:.0f}× (+{(e.candidate_ms - e.fp32_ms):.2f} ms)" for e in worst) + ".")
    reasons = sorted({reason.split(":")[0] for _, _, reason in table.untimed})
    if reasons:
        lines.append(f"Untimed pairs: {len(table.untimed)} ({', '.join(reasons)}).")
    return lines


# -- report ------------------------------------------------------------------------------------------

def versions() -> str:
    import onnx

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=str(ROOT), capture_output=True,
                         text=True).stdout.strip()
    return (f"Python {platform.python_version()}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
            f"numpy {np.__version__}; onnxq revision {rev or '?'}")


def onnxq_note(row: dict[str, Any]) -> str:
    report = row.get("report")
    if not report:
        return ""
    counts: dict[str, int] = {}
    for candidate in report.get("plan", {}).get("layers", {}).values():
        counts[candidate] = counts.get(candidate, 0) + 1
    metric, latency = report.get("metric", {}), report.get("latency", {})
    return (f"layers {dict(sorted(counts.items()))}; own metric {metric.get('name')} drop {metric.get('drop')}; "
            f"own latency ratio {latency.get('ratio')}")


def fmt_ratio(timing: Any) -> str:
    return f"{timing.ratio:.2f} ({timing.ratio_low:.2f}–{timing.ratio_high:.2f})"


def render(rows: dict[str, dict[str, Any]], metrics: dict[str, dict[str, float]], lat1: dict[str, Any],
           lat32: dict[str, Any], sizes: dict[str, int], meta: dict[str, Any], args: argparse.Namespace,
           started: str, table: LatencyTable | None) -> str:
    lines = [
        "# Real-weights sentence encoder (all-MiniLM-L6-v2): onnxq vs onnxruntime's quantizers", "",
        f"Generated by `ulimit -v 20000000; python benchmarks/bench_encoder.py` (after `python models/export_minilm.py`) "
        f"on {started}. Machine: {machine_id()}; load average at the end "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (shared by other jobs). {versions()}.", "",
        "## Model and task", "",
        f"- {meta['source']}: {meta['parameters']:,} parameters (6 layers, hidden 384, 12 heads, FFN 1536), "
        f"ONNX opset {meta['opset']}, {meta['onnx_bytes'] / 2**20:.1f} MiB; inputs `input_ids`, `attention_mask` "
        "(dynamic batch and sequence), output the L2-normalised mean-pooled `sentence_embedding`.",
        f"- task: {meta['task']}; {meta['test_sentences']} sentences, topics {', '.join(meta['topics'])}; "
        f"one sentence = {100 / meta['test_sentences']:.2f} points.",
        f"- retrieval: {meta['retrieval']}; {meta['queries']} paraphrases written for the benchmark, "
        f"one = {100 / meta['queries']:.2f} points. Token lengths of all sentences {meta['test_lengths'][0]}–"
        f"{meta['test_lengths'][1]}; cosine to fp32 is over all {meta['test_sentences'] + meta['queries']} sentences.",
        f"- calibration: {meta['calib_sentences']} other sentences, `minilm.calib/`, one `.npz` per sentence at its own length.",
        "", "## Results", "",
        "| variant | ok | topic accuracy | paraphrase retrieval | cosine to fp32 (mean / min) | size vs fp32 | latency b1 vs fp32 (IQR) "
        "| latency b32 vs fp32 (IQR) | quantize s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ["fp32", *args.variants]:
        row = rows.get(name, {})
        if name != "fp32" and name not in metrics:
            lines.append(f"| {TITLES[name]} | **no** | – | – | – | – | – | – | {row.get('seconds', 0):.1f} "
                         f"| {row.get('peak_rss_mib', 0):.0f} |")
            continue
        m = metrics[name]
        quantize = "–" if name == "fp32" else f"{row['seconds']:.1f}"
        rss = "–" if name == "fp32" else f"{row['peak_rss_mib']:.0f}"
        lines.append(f"| {TITLES[name]} | yes | {m['accuracy']:.3f} | {m['retrieval']:.3f} | {m['cosine_mean']:.4f} / {m['cosine_min']:.4f} "
                     f"| {sizes[name] / sizes['fp32']:.3f} | {fmt_ratio(lat1[name])} | {fmt_ratio(lat32[name])} "
                     f"| {quantize} | {rss} |")
    lines += [
        "", f"fp32 absolute: batch 1 {lat1['fp32'].median_ms / 16:.2f} ms per sentence (median of the 16-sentence round); "
        f"batch 32 {lat32['fp32'].median_ms:.1f} ms. Rounds: {lat1['fp32'].rounds} (b1), {lat32['fp32'].rounds} (b32).", "",
        "Latency: onnxruntime CPU, default session options except "
        f"{'intra_op_num_threads=' + str(args.threads) if args.threads else 'the default thread count'} "
        "(the machine is shared, so every model runs interleaved with fp32 in one process, round after round, "
        "and the table shows the median of the per-round ratios with their interquartile range). "
        "Batch 1: 16 sentences (every 21st) at their real lengths per round; batch 32: the first 32 sentences padded to the longest. "
        "Quantize seconds: wall time of the quantizer's subprocess (imports and loading included); peak RSS from "
        "`os.wait4`; every worker runs under a 20 GB address-space limit.", "",
        "## Notes per variant", "",
    ]
    for name in args.variants:
        row = rows[name]
        lines.append(f"- **{name}**: `{row['command']}`. {onnxq_note(row)}")
    if table is not None:
        lines += render_layer_table(table, [name for name in args.variants if name in metrics])
    failures = [name for name in args.variants if "failure" in rows[name]]
    if failures:
        lines += ["", "## Failures", ""]
        for name in failures:
            lines += [f"### {name}", "", "```", rows[name]["failure"], "```", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL_DIR / "minilm.onnx", help="the exported encoder")
    parser.add_argument("--workdir", type=Path, default=WORK_DIR, help="where quantized models go (git-ignored)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="what to run")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per quantizer before it is killed")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for latency (0: onnxruntime default)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of interleaved timing per batch size")
    parser.add_argument("--layer-budget", type=float, default=150.0,
                        help="seconds for the per-layer latency table (0: skip it)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "ENCODER.md", help="markdown report")
    parser.add_argument("--worker", choices=["ort-dynamic", "ort-static"], help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.model, args.output)
    if not args.model.exists():
        parser.error(f"{args.model} not found: run `python models/export_minilm.py` first")
    started = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    args.workdir.mkdir(parents=True, exist_ok=True)
    padded_calibration(args.model, args.workdir / "calib_padded.npz")
    rows = {name: run_variant(name, args.model, args.workdir, args.timeout) for name in args.variants}
    paths = {"fp32": args.model, **{name: row["model"] for name, row in rows.items() if "model" in row}}
    sessions = {name: session(path, args.threads) for name, path in paths.items()}
    with np.load(args.model.parent / "minilm.test.npz", allow_pickle=False) as data:
        test = {key: data[key] for key in data.files}
    metrics = task_metrics(sessions, test)
    print("accuracy:", {k: (round(v["accuracy"], 4), round(v["retrieval"], 4)) for k, v in metrics.items()}, flush=True)
    lat1 = time_interleaved(sessions, sentence_feeds(test)[::21][:16], "fp32", budget_seconds=args.budget,
                            min_rounds=7, max_rounds=200)
    lat32 = time_interleaved(sessions, [batch_feed(test, 32)], "fp32", budget_seconds=args.budget,
                             min_rounds=7, max_rounds=200)
    sizes = {name: file_bytes(path) for name, path in paths.items()}
    meta = json.loads((args.model.parent / "minilm.json").read_text())
    table = layer_table(paths, test, args.layer_budget, args.threads) if args.layer_budget > 0 else None
    text = render(rows, metrics, lat1, lat32, sizes, meta, args, started, table)
    args.out.write_text(text)
    (args.workdir / "results.json").write_text(json.dumps({
        "metrics": metrics, "sizes": sizes,
        "latency_b1": {k: vars(v) for k, v in lat1.items()}, "latency_b32": {k: vars(v) for k, v in lat32.items()},
        "quantize": {k: {f: v[f] for f in ("seconds", "peak_rss_mib", "exit_code")} for k, v in rows.items()},
    }, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
