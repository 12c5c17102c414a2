"""Benchmark of the sensitivity analysis on the bundled models.

For each ``models/<name>.onnx`` with a ``<name>.calib.npz`` beside it: evaluations, evaluations
per second, total time, and the ratio of the total time to one plain onnxruntime pass over the
same calibration feeds. Prints a Markdown table.

    python benchmarks/bench_sensitivity.py [--samples 64] [--random-plans 10] [--workers 0]
        [--method central] [--candidates spec|w8w4] [--spec ort-cpu-x86]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxq.api import layer_ops_for
from onnxq.graph import GraphView
from onnxq.model import load_model
from onnxq.precision import Candidate
from onnxq.sensitivity import analyze
from onnxq.spec import load_spec

__all__ = ["main"]

logger = logging.getLogger(__name__)

MODELS = Path(__file__).resolve().parent.parent / "models"


def _feeds(path: Path, samples: int, batch: int) -> list[dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k][:samples] for k in data.files}
    count = min(len(v) for v in arrays.values())
    return [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, count, batch)]


def _plain_pass_seconds(model_bytes: bytes, feeds: list[dict[str, np.ndarray]], repeats: int = 5) -> float:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    for feed in feeds:
        session.run(None, feed)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for feed in feeds:
            session.run(None, feed)
        best = min(best, time.perf_counter() - start)
    return best


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="calibration samples per model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--random-plans", type=int, default=10)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--method", default="central", choices=["central", "hutchinson"])
    parser.add_argument("--candidates", default="spec", choices=["spec", "w8w4"],
                        help="spec: every candidate the spec allows; w8w4: int8/uint8 and int4/uint8 only")
    parser.add_argument("--spec", default="ort-cpu-x86")
    parser.add_argument("--models", nargs="*", help="model stems (default: every bundled model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    spec = load_spec(args.spec)
    stems = args.models or sorted(p.stem for p in MODELS.glob("*.onnx"))
    rows = []
    for stem in stems:
        path = MODELS / f"{stem}.onnx"
        calib = MODELS / f"{stem}.calib.npz"
        if not path.exists() or not calib.exists():
            continue
        model = load_model(path).proto
        feeds = _feeds(calib, args.samples, args.batch)
        candidates = None
        if args.candidates == "w8w4":
            view = GraphView(model, layer_ops_for(spec))
            w8, w4, a8 = (Candidate.parse(t) for t in ("int8/uint8", "int4/uint8", "uint8/uint8"))
            candidates = {n: ([w8, w4] if layer.weight is not None else [a8]) for n, layer in view.layers.items()}
        plain = _plain_pass_seconds(model.SerializeToString(), feeds)
        start = time.perf_counter()
        sens = analyze(model, feeds, spec, candidates, method=args.method, random_plans=args.random_plans,
                       workers=args.workers, seed=0)
        total = time.perf_counter() - start
        validation = sens.get("validation", {})
        rows.append([
            stem, str(len(sens["layers"])), str(len(sens["pairs"])), str(sens["evaluations"]),
            f"{sens['evaluations'] / total:.1f}", f"{total:.1f}", f"{plain * 1e3:.1f}", f"{total / plain:.0f}",
            f"{total / sens['evaluations'] / plain:.2f}",
            _fmt(validation.get("spearman_with_pairs")), _fmt(validation.get("spearman_without_pairs")),
        ])
    header = ["model", "layers", "pairs", "evaluations", "eval/s", "total s", "plain pass ms",
              "total / plain pass", "per eval / plain pass", "spearman (pairs)", "spearman (no pairs)"]
    print(f"sensitivity ({args.method}, candidates={args.candidates}, {args.samples} samples, "
          f"{args.random_plans} random plans, workers={args.workers}, spec {spec.name})\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
