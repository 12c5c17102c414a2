"""Benchmark the search against uniform quantization and onnxruntime's quantize_static.

For each bundled model (``models/<stem>.onnx`` with ``<stem>.calib.npz`` and ``<stem>.eval.npz``):
fp32, uniform int8 (onnxq), onnxruntime ``quantize_static`` (QDQ, per-channel), onnxq
``--max-drop 0.01``, a 4.5-bit budget with and without pair terms, and uniform int4 weights.
Columns: task accuracy on the eval labels, size, onnxruntime latency at batch 1 and 32 (median,
same process), time to quantize. Prints a Markdown table.

    python benchmarks/bench_search.py [--models digits_cnn,digits_transformer] [--repeats 50]
"""

# ruff: noqa: B023  (the variant closures run inside the iteration that defines them)

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from onnxq.api import quantize
from onnxq.options import QuantizeOptions
from onnxq.runtime import make_session

__all__ = ["main"]

logger = logging.getLogger("bench_search")
MODELS = Path(__file__).resolve().parents[1] / "models"


def _accuracy(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> float:
    session = make_session(model)
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: data[name][i:i + 32]})[0] for i in range(0, len(data["labels"]), 32)])
    return float(np.mean(np.argmax(logits, axis=-1) == data["labels"]))


def _latency(model: onnx.ModelProto, data: dict[str, np.ndarray], batch: int, repeats: int) -> float:
    session = make_session(model)
    name = session.get_inputs()[0].name
    feed = {name: data[name][:batch]}
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def _ort_static(path: Path, calib: dict[str, np.ndarray]) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            name = next(iter(calib))
            self.batches = iter([{name: calib[name][i:i + 16]} for i in range(0, len(calib[name]), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "ort.onnx"
        quantize_static(str(path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return onnx.load(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits_cnn,digits_transformer")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--spec", default="ort-cpu-x86")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import onnxq.passes.search as search_pass

    rows = []
    for stem in args.models.split(","):
        path, calib_path = MODELS / f"{stem}.onnx", MODELS / f"{stem}.calib.npz"
        if not path.exists():
            continue
        evaluation = dict(np.load(MODELS / f"{stem}.eval.npz", allow_pickle=False))
        calib = {k: v for k, v in np.load(calib_path, allow_pickle=False).items()}
        cache = tempfile.mkdtemp(prefix="onnxq-bench-")

        def run(**kwargs: object) -> onnx.ModelProto:
            precision = kwargs.pop("precision", None)
            options = QuantizeOptions(cache_dir=cache, progress=False, **kwargs)  # type: ignore[arg-type]
            return quantize(path, calib_path, args.spec, precision=precision, options=options).model

        def no_pairs() -> onnx.ModelProto:
            search_pass.USE_PAIRS = False
            try:
                return run(target_bits=4.5)
            finally:
                search_pass.USE_PAIRS = True

        variants: list[tuple[str, Callable[[], onnx.ModelProto]]] = [
            ("fp32", lambda: onnx.load(str(path))),
            ("onnxq int8/uint8", lambda: run(precision="int8/uint8")),
            ("ORT quantize_static QDQ per-channel", lambda: _ort_static(path, calib)),
            ("onnxq --max-drop 0.01", lambda: run(max_drop=0.01)),
            ("onnxq --target-bits 4.5 (pairs)", lambda: run(target_bits=4.5)),
            ("onnxq --target-bits 4.5 (no pairs)", no_pairs),
            ("onnxq int4/uint8 (uniform)", lambda: run(precision="int4/uint8")),
        ]
        for label, build in variants:
            started = time.perf_counter()
            try:
                model = build()
            except Exception as error:  # noqa: BLE001 - a failing variant is a row, not a crash
                rows.append((stem, label, f"failed: {type(error).__name__}", "", "", "", ""))
                continue
            seconds = time.perf_counter() - started
            rows.append((stem, label, f"{_accuracy(model, evaluation):.4f}", f"{model.ByteSize() / 1e3:.1f}",
                         f"{_latency(model, evaluation, 1, args.repeats) * 1e3:.3f}",
                         f"{_latency(model, evaluation, 32, args.repeats) * 1e3:.3f}", f"{seconds:.1f}"))
    header = ("model", "variant", "accuracy", "size kB", "latency b1 ms", "latency b32 ms", "quantize s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    print("\n".join(lines))  # the benchmark's output is the table


if __name__ == "__main__":
    main()
