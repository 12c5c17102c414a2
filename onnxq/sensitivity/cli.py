"""``onnxq sensitivity MODEL --spec SPEC [--calib DATA] -o SENS.json``.

Loads the model, the spec and the calibration feeds, runs :func:`onnxq.sensitivity.analyze`,
writes the JSON atomically and prints a ranked table (most sensitive first) and the Spearman
correlations of the validation plans.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from onnxq.data import load_feeds, resolve_calibration_path
from onnxq.errors import UsageError
from onnxq.model import atomic_write_text, check_output_path, load_model
from onnxq.options import default_cache_dir
from onnxq.sensitivity.analyze import analyze
from onnxq.spec import load_spec

__all__ = ["run_sensitivity_command", "ranked_rows"]

logger = logging.getLogger(__name__)

#: Rows of the ranked table printed by the CLI (the JSON has them all).
TABLE_ROWS = 25


def ranked_rows(sens: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per layer × candidate, largest delta first (ties by layer, candidate)."""
    rows = []
    for layer in sens["layers"]:
        for candidate, entry in layer["candidates"].items():
            rows.append({"layer": layer["name"], "op": layer["op_type"], "params": layer["params"],
                         "candidate": candidate, "delta": float(entry["delta"])})
    rows.sort(key=lambda r: (-r["delta"], r["layer"], r["candidate"]))
    return rows


def _format_table(rows: list[dict[str, Any]]) -> str:
    columns = ["layer", "op", "params", "candidate", "delta"]
    cells = [{**r, "delta": f"{r['delta']:.3e}"} for r in rows]
    widths = {c: max([len(c)] + [len(str(r[c])) for r in cells]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in cells]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_sensitivity_command(args: argparse.Namespace) -> int:
    """Run the ``sensitivity`` sub-command; returns the exit code (errors raise OnnxqError)."""
    if args.random_plans < 0:
        raise UsageError(f"--random-plans {args.random_plans} is negative", "e.g. --random-plans 20")
    if args.workers < 0:
        raise UsageError(f"--workers {args.workers} is negative", "0 runs in-process")
    if args.radius < 1:
        raise UsageError(f"--radius {args.radius} must be at least 1", "e.g. --radius 1")
    budget = getattr(args, "memory_budget", None)
    if budget is not None and budget <= 0:
        raise UsageError(f"--memory-budget {budget} must be positive", "e.g. --memory-budget 512 (MB)")
    loaded = load_model(args.model)
    out = check_output_path(args.output, [Path(args.model)])
    spec = load_spec(args.spec)
    calib = resolve_calibration_path(args.model, args.calib)
    feeds = load_feeds(calib, loaded.proto, batch_size=64, held_back_fraction=0.0)
    quiet = bool(getattr(args, "quiet", False))
    sens = analyze(
        loaded.proto, list(feeds.all), spec, method=args.method, radius=args.radius,
        random_plans=args.random_plans, workers=args.workers, executor=args.executor,
        cache_dir=default_cache_dir(), progress=not quiet, seed=args.seed,
        calibration=getattr(args, "calibration", None) or "minmax",
        memory_budget_mb=budget,
    )
    atomic_write_text(out, json.dumps(sens, indent=2, sort_keys=True) + "\n")
    if getattr(args, "json", False):
        print(json.dumps(sens, indent=2, sort_keys=True))
        return 0
    if quiet:
        return 0
    rows = ranked_rows(sens)
    print(_format_table(rows[:TABLE_ROWS]))
    if len(rows) > TABLE_ROWS:
        print(f"… {len(rows) - TABLE_ROWS} more rows in {out}")
    validation = sens.get("validation")
    if validation:
        print(f"validation on {validation['plans']} random plans: Spearman(predicted, measured) = "
              f"{_fmt(validation['spearman_with_pairs'])} with pair terms, "
              f"{_fmt(validation['spearman_without_pairs'])} without")
    print(f"{len(sens['layers'])} layers, {len(sens['pairs'])} pairs, {sens['evaluations']} evaluations, "
          f"{sens['seconds']:.1f} s ({sens['loss']} loss); wrote {out}")
    memory = sens.get("memory")
    if memory:
        workers = f", each worker {memory['worker_peak_rss_mib']:.0f} MiB" if "worker_peak_rss_mib" in memory else ""
        print(f"peak memory {memory['peak_rss_mib']:.0f} MiB{workers} (cached activations {memory['cached_mib']:.0f} "
              f"MiB in {memory['chunks']} chunk(s), budget {memory['budget_mib']:.0f} MiB per worker)")
    return 0
