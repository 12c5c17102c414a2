"""Benchmark of onnxq's calibration against plain inference and onnxruntime's calibrators.

Usage::

    python benchmarks/bench_calibration.py models/digits_cnn.onnx [--calib DATA.npz]
        [--samples 512] [--batch-size 16] [--repeat 3]

Every float activation of the main graph (graph inputs and node outputs) is calibrated. The
calibration samples (``<stem>.calib.npz`` by default) are tiled deterministically to the
requested number of samples and fed in batches built on demand. Reported, in one run:

* time of onnxq ``minmax`` / ``percentile`` / ``entropy`` / ``mse`` calibration divided by the
  time of plain onnxruntime inference over the same batches (targets: ≤ 1.5× for minmax,
  ≤ 3× for percentile and entropy); the baseline is a default session (``ORT_ENABLE_ALL``),
  the time of an unoptimised one is shown as well; session creation is included in all;
* onnxruntime's own calibrators (``create_calibrator`` with MinMax, Entropy, Percentile) on the
  same data, for comparison;
* the peak RSS (``VmHWM``) of a calibration with 512 vs 64 samples, each in a fresh
  subprocess (target ratio ≤ 1.2), and how much it grew during the calibration itself.

Prints a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.calibration import collect_ranges
from onnxq.calibration.sweep import FLOAT_TYPES

__all__ = ["LazyFeeds", "float_activations", "main"]

logger = logging.getLogger("bench_calibration")


class LazyFeeds(Sequence[Mapping[str, np.ndarray]]):
    """``samples`` samples tiled from ``data``, cut into batches built only when indexed."""

    def __init__(self, data: Mapping[str, np.ndarray], samples: int, batch: int) -> None:
        self.data = {k: np.asarray(v) for k, v in data.items()}
        self.base = next(iter(self.data.values())).shape[0]
        self.samples = samples
        self.batch = batch

    def __len__(self) -> int:
        return (self.samples + self.batch - 1) // self.batch

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        start = index * self.batch
        rows = np.arange(start, min(start + self.batch, self.samples)) % self.base
        return {k: np.ascontiguousarray(v[rows]) for k, v in self.data.items()}


def float_activations(model: onnx.ModelProto) -> list[str]:
    """Graph inputs and node outputs of the main graph whose inferred type is float."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*inferred.value_info, *inferred.input, *inferred.output]
    }
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    names += [o for n in model.graph.node if n.op_type != "Constant" for o in n.output if o]
    return [n for n in dict.fromkeys(names) if types.get(n) in FLOAT_TYPES]


def _batch_size(model: onnx.ModelProto, requested: int) -> int:
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return requested


def _timed(fns: Mapping[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Best-of-``repeat`` wall time of each function, the runs interleaved (robust to load)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def _inference(model_bytes: bytes, feeds: Sequence[Mapping[str, np.ndarray]], optimize: bool) -> None:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    for feed in feeds:
        sess.run(names, feed)


class _Reader:
    """An onnxruntime ``CalibrationDataReader`` over a feed sequence."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self.i = 0

    def get_next(self) -> Mapping[str, np.ndarray] | None:
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self) -> None:
        self.i = 0


def _ort_calibrator(model_path: Path, feeds: Sequence[Mapping[str, np.ndarray]], method: str) -> None:
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(
            model_path,
            None,
            augmented_model_path=os.path.join(tmp, "augmented.onnx"),
            calibrate_method=getattr(CalibrationMethod, method),
            extra_options={"symmetric": False},
        )
        calibrator.collect_data(_Reader(feeds))
        calibrator.compute_data()


def _vm_hwm_kb() -> int:
    """Peak resident set of this process (``VmHWM``; ``ru_maxrss`` survives ``exec`` on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _rss_child(args: argparse.Namespace) -> None:
    model = onnx.load(args.model)
    data = dict(np.load(args.calib, allow_pickle=False))
    feeds = LazyFeeds(data, args.samples, _batch_size(model, args.batch_size))
    tensors = float_activations(model)
    collect_ranges(model, [feeds[0]], tensors[:1], method="minmax")  # warm up imports, arenas
    before = _vm_hwm_kb()
    collect_ranges(model, feeds, tensors, method=args.method)
    after = _vm_hwm_kb()
    print(json.dumps({"before_kb": before, "peak_kb": after}))


def _peak_rss(args: argparse.Namespace, samples: int, method: str) -> dict[str, int]:
    cmd = [
        sys.executable, __file__, args.model, "--calib", str(args.calib), "--samples", str(samples),
        "--batch-size", str(args.batch_size), "--rss-child", "--method", method,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-ort", action="store_true", help="skip onnxruntime's calibrators")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="entropy", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.calib is None:
        args.calib = args.model.with_name(args.model.stem + ".calib.npz")
    if args.rss_child:
        _rss_child(args)
        return 0
    logging.basicConfig(level=logging.WARNING)

    model = onnx.load(args.model)
    model_bytes = model.SerializeToString()
    data = dict(np.load(args.calib, allow_pickle=False))
    batch = _batch_size(model, args.batch_size)
    feeds = LazyFeeds(data, args.samples, batch)
    feeds_list = [feeds[i] for i in range(len(feeds))]
    tensors = float_activations(model)

    fns: dict[str, Callable[[], object]] = {
        "inference": lambda: _inference(model_bytes, feeds_list, True),
        "inference_raw": lambda: _inference(model_bytes, feeds_list, False),
    }
    targets = {"minmax": 1.5, "percentile": 3.0, "entropy": 3.0, "mse": None}
    for method in targets:
        fns[method] = lambda m=method: collect_ranges(model, feeds_list, tensors, method=m)
    times = _timed(fns, args.repeat)
    t_inf = times["inference"]
    rows: list[tuple[str, float, str]] = [
        ("onnxruntime inference (ORT_ENABLE_ALL)", t_inf, ""),
        ("onnxruntime inference (ORT_DISABLE_ALL)", times["inference_raw"], ""),
    ]
    for method, target in targets.items():
        rows.append((f"onnxq {method}", times[method], f"≤ {target}×" if target else ""))
    if not args.no_ort:
        for method in ("MinMax", "Entropy", "Percentile"):
            with contextlib.redirect_stdout(sys.stderr):
                t = _timed({method: lambda m=method: _ort_calibrator(args.model, feeds_list, m)},
                           1)[method]
            rows.append((f"onnxruntime.quantization {method}", t, ""))

    print(f"## Calibration benchmark: `{args.model.name}`\n")
    print(f"{args.samples} samples in {len(feeds)} batches of {batch}, {len(tensors)} tensors, "
          f"best of {args.repeat} interleaved runs (onnxruntime calibrators: 1 run), "
          f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs\n")
    print("| what | seconds | × inference | × unoptimised inference | target |")
    print("|---|---:|---:|---:|---|")
    for name, t, target in rows:
        ratio = t / t_inf
        ok = ""
        if target:
            ok = " ✓" if ratio <= float(target.split()[1].rstrip("×")) else " ✗"
        raw = t / times["inference_raw"]
        print(f"| {name} | {t:.3f} | {ratio:.2f} | {raw:.2f} | {target}{ok} |")

    print("\n| peak RSS (fresh process) | 64 samples (MB) | 512 samples (MB) | ratio | target "
          "| growth during calibration, 64 / 512 (MB) |")
    print("|---|---:|---:|---:|---|---|")
    for method in ("minmax", "entropy"):
        small = _peak_rss(args, 64, method)
        large = _peak_rss(args, 512, method)
        ratio = large["peak_kb"] / small["peak_kb"]
        mark = "✓" if ratio <= 1.2 else "✗"
        print(f"| onnxq {method} | {small['peak_kb'] / 1024:.1f} | {large['peak_kb'] / 1024:.1f} "
              f"| {ratio:.3f} | ≤ 1.2 {mark} "
              f"| {(small['peak_kb'] - small['before_kb']) / 1024:.1f} / "
              f"{(large['peak_kb'] - large['before_kb']) / 1024:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
