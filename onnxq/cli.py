"""The ``onnxq`` command line (DESIGN.md fixes the commands, options and exit codes).

Exit codes: 0 success; 1 target not met (best model still written) or validation violations;
2 bad input or usage; 141 (128 + SIGPIPE, the shell's code for ``yes | head``) when the reader
of stdout went away, with nothing printed. Errors are one line on stderr unless ``--debug``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import onnx

from onnxq.api import quantize
from onnxq.data import find_sibling_calibration, resolve_calibration_path
from onnxq.errors import OnnxqError, UsageError
from onnxq.graph import GraphView, scope_views
from onnxq.model import atomic_write_text, check_output_path, check_quantizable_dtypes, load_model, save_model
from onnxq.options import QuantizeOptions
from onnxq.report_html import render_html
from onnxq.sensitivity.cli import run_sensitivity_command
from onnxq.spec import builtin_specs, check_spec_file, load_spec
from onnxq.subgraphs import ensure_unique_node_names
from onnxq.validate import validate_model
from onnxq.version import __version__

__all__ = ["main"]

logger = logging.getLogger("onnxq")

#: Exit code when stdout's reader closed the pipe early: 128 + SIGPIPE, as a shell reports it.
EXIT_READER_GONE = 141


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message, f"see `{self.prog} --help`")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars and no summary")
    p.add_argument("--debug", action="store_true", help="full tracebacks and debug logging")
    p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")


def _parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="parallel workers for sensitivity evaluations (default 0: in this process)")
    p.add_argument("--executor", default="local", metavar="local|ray[:ADDRESS]",
                   help="where the workers run: local processes or a Ray cluster (default local)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed; the same seed gives the same model (default 0)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxq", description="Mixed-precision post-training quantization for ONNX.")
    parser.add_argument("--version", action="version", version=f"onnxq {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a model for a hardware spec")
    q.add_argument("model", help="fp32 ONNX model to quantize")
    q.add_argument("-o", "--output", required=True, help="output .onnx path")
    q.add_argument("--spec", required=True, help="built-in spec name or spec JSON path")
    q.add_argument("--calib", help="calibration .npz or folder (default: <model stem>.calib.npz beside the model)")
    mode = q.add_mutually_exclusive_group()
    mode.add_argument("--precision", help="uniform candidate, e.g. int8/uint8 (no search)")
    mode.add_argument("--plan", help="apply an explicit plan JSON (or a report) (no search)")
    mode.add_argument("--target-size", type=float, metavar="MB", help="budget: size of the written model file in MB")
    mode.add_argument("--target-latency-ratio", type=float, metavar="R", help="budget: batch-1 latency relative to fp32 (planned with the cost model, checked by measurement)")
    mode.add_argument("--target-bits", type=float, metavar="B", help="budget: average weight bits")
    q.add_argument("--max-drop", type=float, default=0.01, help="accuracy-degradation range for the search (default 0.01)")
    q.add_argument("--metric", default="auto", choices=["auto", "soft-agreement", "agreement", "cosine", "sqnr"],
                   help="label-free fidelity to fp32 on held-back feeds (auto: soft agreement, 1 - total variation of the class "
                        "distributions, for classifier logits; cosine for embeddings and other outputs)")
    q.add_argument("--evaluator", help="MODULE:FUNCTION, f(onnx_path) -> float, higher is better")
    q.add_argument("--calibration", default="minmax", choices=["minmax", "percentile", "entropy", "mse", "lapq"],
                   help="how activation ranges are chosen from the calibration data (default minmax)")
    q.add_argument("--report", help="write the report JSON here")
    q.add_argument("--report-html", help="write a self-contained HTML report here")
    _parallel(q)
    q.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="samples per batch when cutting a stacked .npz along its batch axis (default 16)")
    q.add_argument("--objective", choices=("latency", "size", "balanced"), default="latency",
                   help="what the --max-drop search optimises inside the range: measured latency first, then "
                        "size (latency, default), the written size (size), or their sum relative to fp32 (balanced)")
    q.add_argument("--deploy-batch", type=int, default=1, metavar="N",
                   help="batch size latency is measured at, as you deploy (default 1); sequence lengths come "
                        "from the calibration feeds")
    q.add_argument("--exclude", action="append", default=[], metavar="LAYER",
                   help="keep layers in fp32: a layer name, re:PATTERN (whole name) or op:TYPE; repeatable")
    q.add_argument("--no-cache", action="store_true", help="do not read or write the on-disk analysis cache")
    q.add_argument("--memory-budget", type=float, metavar="MB",
                   help="bound on the activations the sensitivity analysis caches, per worker (default: a quarter of the model size, at least 128 MB, at most 1/4 of available memory)")
    _common(q)

    s = sub.add_parser("sensitivity", help="per-layer sensitivity analysis")
    s.add_argument("model", help="fp32 ONNX model to analyse")
    s.add_argument("--spec", required=True, help="built-in spec name or spec JSON path (its candidates are measured)")
    s.add_argument("--calib", help="calibration .npz or folder (default: <model stem>.calib.npz beside the model)")
    s.add_argument("-o", "--output", required=True, help="sensitivity JSON to write")
    s.add_argument("--method", default="onesided", choices=["onesided", "central", "hutchinson"],
                   help="per-layer weight term: one-sided difference along the quantization noise (default), "
                        "central differences, or a Hutchinson trace")
    s.add_argument("--radius", type=int, default=1, help="graph distance up to which layer pairs get cross terms (default 1)")
    s.add_argument("--random-plans", type=int, default=20, help="random mixed plans measured to check the prediction (default 20)")
    _parallel(s)
    s.add_argument("--memory-budget", type=float, metavar="MB",
                   help="bound on the activations cached between evaluations, per worker (default: a quarter of the model size, at least 128 MB, at most 1/4 of available memory)")
    _common(s)

    v = sub.add_parser("validate", help="check a QDQ model against a hardware spec")
    v.add_argument("model", help="quantized (Q/DQ) ONNX model to check")
    v.add_argument("--spec", required=True, help="built-in spec name or spec JSON path")
    _common(v)

    i = sub.add_parser("inspect", help="list layers, weights, params and MACs")
    i.add_argument("model", help="ONNX model to list")
    _common(i)

    sp = sub.add_parser("specs", help="list built-in hardware specs")
    _common(sp)

    sc = sub.add_parser("spec-check", help="check a hardware spec file")
    sc.add_argument("spec", help="hardware spec JSON file")
    _common(sc)
    return parser


class _SaidAtTheEnd(logging.Filter):
    """A missed target ends the run with one line naming the shortfall and the file written; the
    passes' warning of the same shortfall (for API users) would say it twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("onnxq.passes") and record.getMessage().startswith("target not met:"))


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="onnxq: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_SaidAtTheEnd())
    for noisy in ("onnxq.calibration", "onnxq.passes", "onnxq.rewrite", "onnxq.graph", "onnxq.model"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.debug else logging.WARNING)


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    for row in rows:
        lines.append("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))
    return "\n".join(lines)


def _cmd_inspect(args: argparse.Namespace) -> int:
    loaded = load_model(args.model)
    ensure_unique_node_names(loaded.proto)
    view = GraphView(loaded.proto)
    rows = [{**row, "scope": "main"} for row in view.summary_rows()]
    for scoped in scope_views(loaded.proto, view.layer_ops):
        rows.extend({**row, "scope": scoped.scope.key} for row in scoped.view.summary_rows())
    if args.json:
        print(json.dumps({"model": args.model, "opset": loaded.opset, "layers": rows,
                          "residual_joins": [{"node": n, "branches": list(b)} for n, b in view.residual_joins()],
                          "shared_inputs": [{"tensor": t, "layers": list(m)} for t, m in view.shared_input_groups()]}, indent=2))
        return 0
    print(f"{args.model}: opset {loaded.opset}, {len(loaded.proto.graph.node)} nodes, {len(rows)} layers, "
          f"{sum(int(r['params']) for r in rows):,} params, {sum(int(r['macs']) for r in rows):,} MACs per sample")
    columns = ["layer", "op_type", "weight", "location", "shape", "params", "macs", "inputs"]
    if any(row["scope"] != "main" for row in rows):
        columns.insert(1, "scope")
    print(_table(rows, columns))
    joins = view.residual_joins()
    if joins:
        print("\nresidual joins:")
        for node, branches in joins:
            print(f"  {node}: {' + '.join(branches) or '(graph inputs)'}")
    shared = view.shared_input_groups()
    if shared:
        print("\nlayers sharing an input:")
        for tensor, members in shared:
            print(f"  {tensor}: {', '.join(members)}")
    return 0


def _cmd_specs(args: argparse.Namespace) -> int:
    specs = builtin_specs()
    if args.json:
        print(json.dumps([{"name": n, "summary": s} for n, s in specs], indent=2))
    else:
        width = max(len(n) for n, _ in specs)
        for name, summary in specs:
            print(f"{name.ljust(width)}  {summary}")
    return 0


def _cmd_spec_check(args: argparse.Namespace) -> int:
    if Path(args.spec).is_dir():
        raise UsageError(f"spec path {args.spec!r} is a directory", "pass the path of a spec JSON file")
    if not Path(args.spec).is_file():
        raise UsageError(f"spec file {args.spec!r} does not exist", "pass the path of a spec JSON file")
    problems = check_spec_file(args.spec)
    if args.json:
        print(json.dumps([{"path": p.path, "message": p.message, "hint": p.hint} for p in problems], indent=2))
    for problem in problems:
        print(str(problem), file=sys.stderr if not args.json else sys.stdout)
    if problems:
        return 2
    if not args.json:
        print(f"{args.spec}: valid")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    loaded = load_model(args.model)
    violations = validate_model(loaded.proto, spec)
    if args.json:
        print(json.dumps({"conforms": not violations, "violations": [v.__dict__ for v in violations]}, indent=2, default=str))
    else:
        for violation in violations:
            print(str(violation))
        if not violations:
            print(f"{args.model}: conforms to {spec.name}")
    return 1 if violations else 0


def _refuse_half_precision(model_path: Path) -> None:
    """Refuse float16/bfloat16 models before any work (the rewrite quantizes float32 graphs only).

    Only the graph is parsed (external data stays on disk); a file that does not parse is left
    to :func:`onnxq.model.load_model`, which reports it properly.
    """
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # reported by load_model with a proper message
        logger.debug("pre-check could not parse %s; load_model will report it", model_path)
        return
    check_quantizable_dtypes(proto)


def _cmd_quantize(args: argparse.Namespace) -> int:
    model_path = Path(args.model)
    if not model_path.is_file():
        load_model(args.model)  # raises the standard missing-file / directory error
    _refuse_half_precision(model_path)

    sibling = None if args.calib else find_sibling_calibration(model_path)
    inputs: list[Path | None] = [model_path, sibling,
                                 *(Path(p) for p in (args.calib, args.plan, args.spec) if p and Path(p).exists())]
    out = check_output_path(args.output, inputs)
    report_path = check_output_path(args.report, [*inputs, out]) if args.report else None
    html_path = check_output_path(args.report_html, [*inputs, out, report_path]) if args.report_html else None
    if args.deploy_batch < 1:
        raise UsageError(f"--deploy-batch {args.deploy_batch} is not a batch size", "give 1 or more")
    if args.max_drop < 0 or args.max_drop >= 1:
        raise UsageError(f"--max-drop {args.max_drop} is outside [0, 1)", "give an absolute drop such as 0.01")
    if args.memory_budget is not None and args.memory_budget <= 0:
        raise UsageError(f"--memory-budget {args.memory_budget} must be positive", "e.g. --memory-budget 512 (MB)")
    options = QuantizeOptions(
        precision=args.precision, plan_path=args.plan, max_drop=args.max_drop, target_size_mb=args.target_size,
        target_latency_ratio=args.target_latency_ratio, target_bits=args.target_bits, metric=args.metric,
        evaluator=args.evaluator, calibration=args.calibration, seed=args.seed, workers=args.workers,
        executor=args.executor, progress=not args.quiet, batch_size=args.batch_size,
        cache_dir="" if args.no_cache else None, exclude=tuple(args.exclude),
        objective=args.objective, deploy_batch=args.deploy_batch,
        memory_budget_mb=args.memory_budget,
    )
    calib = resolve_calibration_path(args.model, args.calib)
    result = quantize(args.model, calib, args.spec, options=options)
    save_model(result.model, out)
    report = dict(result.report)
    report["output"] = str(out)
    if report_path is not None:
        atomic_write_text(report_path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    if html_path is not None:
        atomic_write_text(html_path, render_html(report))
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    elif not args.quiet:
        _print_summary(report, str(out), str(report_path) if report_path else None)
    if not result.target_met:
        print(f"onnxq: target not met: {report.get('shortfall', 'see the report')}; the best model found was written to {out}",
              file=sys.stderr)
        return 1
    return 0


def _print_summary(report: dict[str, Any], out: str, report_path: str | None) -> None:
    layers = report["layers"]
    by = ", ".join(f"{n}× {c}" for c, n in layers["by_candidate"].items()) or "none"
    sizes = report["sizes"]
    metric = report.get("metric", {})
    print(f"quantized {layers['quantized']}/{layers['total']} layers ({by}); {layers['fp32']} stay fp32")
    if sizes.get("fp32_bytes"):
        print(f"size {sizes['fp32_bytes'] / 1e6:.2f} MB -> {sizes['quantized_bytes'] / 1e6:.2f} MB "
              f"({100 * sizes['quantized_bytes'] / sizes['fp32_bytes']:.1f}% of fp32)")
    latency = report.get("latency") or {}
    if latency.get("fp32_ms"):
        print(f"onnxruntime CPU latency (batch {latency.get('batch', 1)}, this machine): {latency['fp32_ms']:.3f} ms -> "
              f"{latency['quantized_ms']:.3f} ms ({latency['ratio']:.2f}x fp32)")
    _print_measured_plans(report)
    if metric:
        print(f"fidelity to fp32 ({metric['name']}, held-back calibration feeds): {metric['quantized']:.4f} "
              f"(drop {metric['drop']:.4f}, allowed {metric.get('max_drop', 0):.4f})")
    print(f"wrote {out}" + (f" and {report_path}" if report_path else "") + f" in {report['seconds']:.1f} s")


def _print_measured_plans(report: dict[str, Any]) -> None:
    """The trade-off the search saw: every plan it measured, latency and size relative to fp32."""
    search = report.get("search") or {}
    front = report.get("pareto_front") or []
    measured = [(i, e) for i, e in enumerate(front) if "measured_latency_ratio" in e]
    if measured:
        chosen = search.get("chosen_index")
        cells = [f"{'*' if i == chosen else ''}#{i} {e['measured_latency_ratio']:.2f}x/{100 * e.get('measured_size_ratio', 1):.0f}%"
                 f"/drop {e['measured_drop']:.4f}" for i, e in measured]
        print(f"plans measured inside the range (latency x fp32 / size / drop; * written): {', '.join(cells)}")


_COMMANDS = {
    "quantize": _cmd_quantize,
    "inspect": _cmd_inspect,
    "validate": _cmd_validate,
    "specs": _cmd_specs,
    "spec-check": _cmd_spec_check,
}


def _reader_gone() -> int:
    """The reader of stdout went away (``onnxq validate M --spec S | head``): stop quietly.

    What's left to print goes to /dev/null (else the interpreter's exit flush fails again), and
    the exit code is the shell's for a process ended by SIGPIPE, as coreutils tools do, so
    ``set -o pipefail`` scripts see what they see for ``yes | head``.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout has no descriptor (an in-process caller's buffer)
        logger.debug("stdout has no file descriptor to redirect")
    finally:
        os.close(devnull)
    return EXIT_READER_GONE


#: Allocations at least this big get their own memory mapping (glibc ``M_MMAP_THRESHOLD``)...
MMAP_THRESHOLD_BYTES = 4 << 20
#: ... when the model file is at least this big.
LARGE_MODEL_BYTES = 256 << 20


def _return_large_frees_to_the_system(args: argparse.Namespace) -> None:
    """For a large model, serve every allocation of :data:`MMAP_THRESHOLD_BYTES` or more from
    its own mapping, so that freeing it returns the memory at once. glibc raises this
    threshold as large blocks are freed (up to 32 MB), after which weight copies and
    activations of a few MB come from the heap, whose freed pages fragment and stay resident:
    on a 110M encoder 250-300 MB more through the sensitivity analysis. Small models keep
    glibc's default: their buffers are small and page faults on fresh mappings cost them more
    time (a 22M encoder's analysis took a third longer) than the memory saved is worth."""
    model = getattr(args, "model", None)
    if not model:
        return
    try:
        data = f"{model}.data"  # the usual name of external data (torch.onnx, onnx.save)
        size = os.path.getsize(model) + (os.path.getsize(data) if os.path.exists(data) else 0)
        if size < LARGE_MODEL_BYTES:
            return
    except (OSError, TypeError):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD_BYTES)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its allocator's default behaviour
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help(sys.stderr)
            return 2
        _setup_logging(args)
        _return_large_frees_to_the_system(args)
        if args.command == "sensitivity":
            code = run_sensitivity_command(args)
        else:
            code = _COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return code
    except BrokenPipeError:
        return _reader_gone()
    except OnnxqError as error:
        if debug:
            raise
        print(f"onnxq: error: {error.one_line()}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("onnxq: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("onnxq: error: out of memory — use fewer calibration samples or a smaller --batch-size", file=sys.stderr)
        return 2
    except Exception as error:  # an onnxq bug or an input nothing above anticipated: still one line
        if debug:
            raise
        logger.debug("internal error", exc_info=True)
        detail = " ".join(str(error).split())[:300]
        print(f"onnxq: error: internal error: {type(error).__name__}: {detail} — rerun with --debug for the traceback "
              "and report it", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
