"""Benchmark of the sensitivity analysis on the bundled models.

For each ``models/<name>.onnx`` with a ``<name>.calib.npz`` beside it: evaluations, evaluations
per second, total time, and the ratio of the total time to one plain onnxruntime pass over the
same calibration feeds; the Spearman correlation of the predicted loss (with and without the
pair terms) with the fake-quant loss of ``--random-plans`` seeded plans, and with the REAL loss
of ``--real-plans`` seeded plans quantized by ``onnxq.quantize(..., plan=...)`` (the Q/DQ
rewrite, run by onnxruntime) — KL(softmax(fp32) ‖ softmax(quantized)) on ``<name>.eval.npz``,
the label-free loss the analysis predicts. Prints a Markdown table.

    python benchmarks/bench_sensitivity.py [--samples 64] [--random-plans 10] [--real-plans 24]
        [--workers 0] [--method central] [--candidates spec|w8w4] [--spec ort-cpu-x86]

Plain pass: the best of 5 runs of the fp32 model over the same 64 samples (2 batches of 32).
Measured on a shared 2-CPU machine (load average ~9 from other jobs, so absolute times are noisy):

| version | model | evaluations | eval/s | total s | total / plain pass | per eval / plain pass | ρ fake-quant (pairs / none) |
|---|---|---|---|---|---|---|---|
| before (one Where fake-quant session, every weight an input) | digits_cnn | 328 | 9.9 | 33.1 | 38912 | 118.6 | 0.588 / 0.600 |
| before | digits_transformer | 313 | 3.4 | 90.9 | 1095 | 3.50 | 0.988 / 0.988 |

| after (cut sessions, 1×64 batch, baked plan models, no spinning) | digits_cnn | 328 | 63.9 | 5.1 | 3039 | 9.27 | 0.612 / 0.600 |
| after | digits_transformer | 327 | 20.9 | 15.6 | 323 | 0.99 | 0.988 / 0.988 |

(The "after" plain pass was 1.7 ms for the CNN, 48 ms for the transformer in that run; under the
load the median plain pass is several times its best, so "total / plain pass" overstates the
cost, most for the CNN whose runs last about a millisecond.)

Against real quantized models (24 random plans through ``onnxq.quantize(..., plan=)``, KL on
the eval set), Spearman with / without pairs: digits_transformer 0.894 / 0.911; digits_cnn
0.611 / 0.603 — the CNN's real losses are 4–10× the simulated ones for int8 layers and one
layer (``/blocks/blocks.7/pw/pw.0/Conv`` at ``int16/int16``) loses 0.023 for real against
1e-11 simulated, which the fake-quant simulation does not reproduce (without the plans that
contain it: 0.736 / 0.721).

2026-11-30, bounded-memory engine (shared weights, chunked feeds, pairs on cut sessions), 64
samples, every candidate of ort-cpu-x86, 24 real plans, seed 0, machine load average 9-13 (times
not comparable across rows), ρ real with / without pair terms:

| method | digits_cnn | digits_resnet | digits_transformer |
|---|---|---|---|
| onesided (new default; 242 / 210 / 243 evaluations) | 0.922 / 0.908 | 0.898 / 0.788 | 0.914 / 0.857 |
| central, this engine (318 / 274 / 322 evaluations) | 0.927 / 0.928 | 0.897 / 0.807 | 0.911 / 0.860 |
| central, engine before (eef2698; 318 / 274 / 323 evaluations) | 0.927 / 0.928 | 0.897 / 0.807 | 0.911 / 0.860 |

2026-11-30, fewer evaluations where the maths allows (uint8 and asymmetric int8 activations share
one measured grid; 16-bit activations and fp16/bf16/int16 weights predicted from the measured
8-bit term by noise power; pair cross terms against the pair-free prediction, no single-layer
runs per pair; sibling pairs in one cut session). Default options (onesided, 64 samples, every
candidate, 24 real plans), ρ real with / without pair terms, evaluations; the two rows ran one
after the other at load 5-9:

| engine | digits_cnn | digits_resnet | digits_transformer |
|---|---|---|---|
| before (873605d) | 0.907 / 0.920, 262 evaluations | 0.963 / 0.904, 231 | 0.971 / 0.979, 331 |
| after | 0.907 / 0.920, 121 evaluations | 0.964 / 0.904, 108 | 0.978 / 0.979, 181 |

The two central rows ran at the same time (same load): total seconds before → after 40.8 → 21.2
(CNN), 94.4 → 75.6 (ResNet), 148.7 → 90.6 (transformer). The README's 0.96 / 0.94 / 0.92 came
from an earlier version; the engine before this change gives the central row above in this setting.
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
from onnxq.errors import OnnxqError
from onnxq.graph import GraphView
from onnxq.model import load_model
from onnxq.precision import Candidate
from onnxq.sensitivity import analyze, predicted_loss
from onnxq.sensitivity.analyze import _random_plans, _spearman
from onnxq.sensitivity.engine import loss_between
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
    """Best of ``repeats`` plain passes over ``feeds`` (the first version's measure)."""
    return min(_plain_pass_times(model_bytes, feeds, repeats))


def _plain_pass_times(model_bytes: bytes, feeds: list[dict[str, np.ndarray]], repeats: int) -> list[float]:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    for feed in feeds:
        session.run(None, feed)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for feed in feeds:
            session.run(None, feed)
        times.append(time.perf_counter() - start)
    return times


def _real_validation(model, stem: str, spec_name: str, sens: dict, count: int,  # type: ignore[no-untyped-def]
                     seed: int) -> tuple[float | None, float | None]:
    """Spearman(predicted, real KL on the eval set) over ``count`` random plans, with and
    without the pair terms; each plan is quantized for real (``onnxq.quantize(..., plan=)``)."""
    import onnxq  # noqa: PLC0415

    eval_path = MODELS / f"{stem}.eval.npz"
    calib = MODELS / f"{stem}.calib.npz"
    if count < 3 or not eval_path.exists():
        return None, None
    with np.load(eval_path, allow_pickle=False) as data:
        inputs = [i.name for i in model.graph.input]
        feeds = [{k: data[k][i:i + 120] for k in inputs} for i in range(0, len(data[inputs[0]]), 120)]
    fp32 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = [fp32.run(None, f) for f in feeds]
    options = {row["name"]: [Candidate.parse(c) for c in row["candidates"]] for row in sens["layers"]}
    plans = _random_plans(list(options), options, 3 * count, seed + 7)
    no_pairs = {"layers": sens["layers"], "pairs": []}
    real, with_pairs, without = [], [], []
    for plan in plans:
        if len(real) >= count:
            break
        try:
            quantized = onnxq.quantize(model, str(calib), spec_name,
                                       plan={k: str(v) for k, v in plan.items()}).model
        except OnnxqError as exc:  # a plan the rewrite rejects: skip it, draw the next one
            logger.warning("plan skipped: %s", str(exc).splitlines()[0][:200])
            continue
        session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
        real.append(loss_between("kl", reference, [session.run(None, f) for f in feeds]))
        with_pairs.append(predicted_loss(sens, plan))
        without.append(predicted_loss(no_pairs, plan))
    return _spearman(with_pairs, real), _spearman(without, real)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="calibration samples per model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--random-plans", type=int, default=10)
    parser.add_argument("--real-plans", type=int, default=24,
                        help="random plans quantized for real (onnxq.quantize) to validate against")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--method", default="onesided", choices=["onesided", "central", "hutchinson"])
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
        times = _plain_pass_times(model.SerializeToString(), feeds, 25)
        plain, plain_median = min(times[:5]), float(np.median(times))
        start = time.perf_counter()
        sens = analyze(model, feeds, spec, candidates, method=args.method, random_plans=args.random_plans,
                       workers=args.workers, seed=0)
        total = time.perf_counter() - start
        validation = sens.get("validation", {})
        real_with, real_without = _real_validation(model, stem, args.spec, sens, args.real_plans, 0)
        rows.append([
            stem, str(len(sens["layers"])), str(len(sens["pairs"])), str(sens["evaluations"]),
            f"{sens['evaluations'] / total:.1f}", f"{total:.1f}", f"{plain * 1e3:.1f}", f"{total / plain:.0f}",
            f"{total / sens['evaluations'] / plain:.2f}", f"{plain_median * 1e3:.1f}",
            f"{total / plain_median:.0f}",
            _fmt(validation.get("spearman_with_pairs")), _fmt(validation.get("spearman_without_pairs")),
            _fmt(real_with), _fmt(real_without),
        ])
    header = ["model", "layers", "pairs", "evaluations", "eval/s", "total s", "plain pass ms",
              "total / plain pass", "per eval / plain pass",
              "plain pass ms (median of 25)", "total / median plain pass", "ρ fake-quant (pairs)", "ρ fake-quant (no pairs)",
              "ρ real (pairs)", "ρ real (no pairs)"]
    print(f"sensitivity ({args.method}, candidates={args.candidates}, {args.samples} samples, "
          f"{args.random_plans} random plans, workers={args.workers}, spec {spec.name})\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
