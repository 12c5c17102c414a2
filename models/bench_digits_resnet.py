"""Measure fp32 vs int8 onnxruntime CPU latency and accuracy of a bundled model (default ``digits_resnet``).

Run ``python models/bench_digits_resnet.py [--stem digits_resnet]``.  No torch needed.

Variants:

- ``fp32``: the bundled ``.onnx``;
- ``onnxq int8``: ``onnxq.quantize(path, calib, "ort-cpu-x86", precision="int8/uint8")``;
- ``ORT quantize_static``: QDQ, per-channel int8 weights, uint8 activations, MinMax
  calibration on the bundled ``.calib.npz``, after ``quant_pre_process``.

Latency: onnxruntime CPUExecutionProvider, default session options except
``ORT_ENABLE_ALL`` and ``intra_op_num_threads`` (2), warm-up runs, then
``--rounds`` rounds in which the variants run interleaved (so load from other
jobs on a shared machine hits them alike); the table reports the median and
the minimum per variant.  Accuracy: the whole eval split.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

MODELS_DIR = Path(__file__).resolve().parent


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


class _Reader:
    """onnxruntime ``CalibrationDataReader`` over fixed-size batches of a feed dict."""

    def __init__(self, arrays: dict[str, np.ndarray], batch: int = 16) -> None:
        n = len(next(iter(arrays.values())))
        self._feeds = [{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._feeds):
            return None
        self._i += 1
        return self._feeds[self._i - 1]

    def rewind(self) -> None:
        self._i = 0


def ort_quantize_static(model: Path, calib: dict[str, np.ndarray], out: Path) -> None:
    """onnxruntime ``quantize_static``: QDQ, per-channel int8 weights, uint8 activations, MinMax."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(model), str(pre), skip_symbolic_shape=False)
        quantize_static(str(pre), str(out), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax)


def onnxq_int8(model: Path, calib_path: Path, out: Path) -> None:
    """``onnxq.quantize(..., "ort-cpu-x86", precision="int8/uint8")``."""
    import onnxq

    result = onnxq.quantize(str(model), str(calib_path), "ort-cpu-x86", precision="int8/uint8")
    onnx.save(result.model, str(out))


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def accuracy(sess: ort.InferenceSession, data: dict[str, np.ndarray]) -> float:
    data = dict(data)
    labels = data.pop("labels")
    logits = sess.run(None, data)[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def bench(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray], rounds: int,
          reps: int, warmup: int) -> dict[str, list[float]]:
    """Interleaved timing: per round, each variant runs ``reps`` times; a sample is the mean of those."""
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                sess.run(None, feed)
            times[name].append((time.perf_counter() - t0) / reps * 1e3)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stem", default="digits_resnet")
    ap.add_argument("--model", type=Path, default=None, help="model path (default models/<stem>.onnx)")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,32")
    args = ap.parse_args(argv)
    path = args.model or MODELS_DIR / f"{args.stem}.onnx"
    calib_path = path.parent / f"{path.stem}.calib.npz"
    eval_path = path.parent / f"{path.stem}.eval.npz"
    calib, data = _npz(calib_path), _npz(eval_path)
    inp = next(k for k in data if k != "labels")

    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": path, "onnxq int8/uint8": Path(tmp) / "onnxq.onnx",
                 "ORT quantize_static": Path(tmp) / "ort.onnx"}
        onnxq_int8(path, calib_path, paths["onnxq int8/uint8"])
        ort_quantize_static(path, calib, paths["ORT quantize_static"])
        sessions = {k: session(p, args.threads) for k, p in paths.items()}
        acc = {k: accuracy(s, data) for k, s in sessions.items()}
        rows: dict[str, dict[int, tuple[float, float]]] = {k: {} for k in sessions}
        for b in (int(s) for s in args.batches.split(",")):
            feed = {inp: np.ascontiguousarray(data[inp][:b])}
            reps = 10 if b == 1 else 2
            times = bench(sessions, feed, args.rounds, reps, warmup=20 if b == 1 else 5)
            for k, ts in times.items():
                rows[k][b] = (statistics.median(ts), min(ts))
    batches = sorted(next(iter(rows.values())))
    base = rows["fp32"]
    header = "| variant | eval acc | " + " | ".join(
        f"b={b} median ms (min) | b={b} ×fp32" for b in batches) + " |"
    print(f"{path.name}: ORT {ort.__version__}, intra_op_num_threads={args.threads}, ORT_ENABLE_ALL, "
          f"{args.rounds} interleaved rounds")
    print(header)
    print("|" + "---|" * (2 + 2 * len(batches)))
    for k, r in rows.items():
        cells = " | ".join(f"{r[b][0]:.3f} ({r[b][1]:.3f}) | {r[b][0] / base[b][0]:.2f}" for b in batches)
        print(f"| {k} | {acc[k]:.4f} | {cells} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
