"""A self-contained HTML rendering of an onnxq report (``onnxq quantize --report-html``).

``render_html(report)`` turns the report dict built by :func:`onnxq.api.build_report` (plus the
``output`` key the CLI adds) into one HTML file: inline CSS, charts embedded as base64 PNG data
URIs drawn with matplotlib's Agg backend, or as inline SVG when matplotlib is not installed (it
is an optional dependency, imported lazily). Nothing is fetched from the network.

Sections, each shown only when the report has the data:

* title (model, spec, mode) and a summary: layers per precision, size before/after, metric
  before/after, drop vs ``max_drop``;
* per-layer precision map (``report["plan"]["layers"]``), each row coloured by its precision;
* sensitivity ranking (``report["sensitivity"]``: a list of ``{layer, candidate, delta}``, or an
  ``onnxq-sensitivity/1`` dict);
* the Pareto front (``report["pareto_front"]``: dicts with cost keys such as ``size_bytes``,
  ``latency``, ``bits``; ``predicted_loss``; ``measured_drop``; ``chosen``), missing keys tolerated;
* predicted vs measured metric (``report["search"]``);
* time per phase (``report["time_per_phase"]``).

Every string taken from the report is escaped with :func:`html.escape`. The output is
deterministic: the same report always renders to the same bytes (sorted iteration, fixed
figure sizes, PNG metadata stripped).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["render_html", "precision_colour", "COST_KEYS"]

logger = logging.getLogger(__name__)

#: Keys of a Pareto point that can serve as its cost (x axis), in order of preference.
COST_KEYS: tuple[str, ...] = ("size_bytes", "latency_seconds", "latency", "latency_ratio", "latency_ms", "bits",
                              "avg_bits", "bitops", "cost")
_LATENCY_KEYS: tuple[str, ...] = ("latency_seconds", "latency", "latency_ratio", "latency_ms")
#: Keys of a Pareto point that measure its quality loss (y axis), in order of preference.
LOSS_KEYS: tuple[str, ...] = ("measured_drop", "predicted_loss", "predicted_drop", "drop")

_FLOAT_COLOURS = {"fp32": "#b0b0b0", "float32": "#b0b0b0", "fp16": "#7fb3e6", "bf16": "#9ec8ef",
                  "float16": "#7fb3e6"}
_BITS_COLOURS = {2: "#d62728", 3: "#e8543c", 4: "#ff7f0e", 6: "#f2b134", 8: "#2ca02c", 16: "#9467bd"}

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fff;max-width:1100px}
h1{font-size:1.5em;margin-bottom:0.2em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.6em}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37;font-weight:bold}.bad{color:#c62828;font-weight:bold}
.chip{display:inline-block;padding:1px 6px;border-radius:3px;font-family:monospace}
.chart{margin:8px 0}.legend span{margin-right:10px}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:0.85em}
.grid{display:flex;flex-wrap:wrap;gap:16px}
footer{margin-top:2em;color:#888;font-size:0.8em}
"""


# -- small helpers ---------------------------------------------------------------------------------

def _e(value: Any) -> str:
    """Escape any value for HTML text or attribute content."""
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    """``value`` as a finite float, or None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _fmt(value: Any, digits: int = 4) -> str:
    """Format a number compactly; other values as text."""
    number = _num(value)
    if number is None:
        return "—" if value is None else str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if number != 0 and (abs(number) < 1e-3 or abs(number) >= 1e6):
        return f"{number:.{digits - 1}e}"
    return f"{number:.{digits}g}" if abs(number) >= 1 else f"{number:.{digits}f}".rstrip("0").rstrip(".") or "0"


def _bytes(value: Any) -> str:
    """Human-readable size."""
    number = _num(value)
    if number is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(number) < 1024 or unit == "GiB":
            return f"{number:,.0f} {unit}" if unit == "B" else f"{number:,.1f} {unit}"
        number /= 1024
    return str(value)  # pragma: no cover


def _weight_bits(candidate: str) -> int | None:
    """Weight bits of a candidate name such as ``int8/uint8`` or ``int4b32/uint16`` (None if float)."""
    weights = candidate.split("/")[0].strip().lower()
    if weights.startswith(("fp", "float", "bf")):
        return None
    match = re.search(r"(\d+)", weights)
    return int(match.group(1)) if match else None


def precision_colour(candidate: str) -> str:
    """A fixed background colour for a precision: grey for fp32, blue for fp16, by weight bits otherwise."""
    key = candidate.split("/")[0].strip().lower()
    if key in _FLOAT_COLOURS:
        return _FLOAT_COLOURS[key]
    bits = _weight_bits(candidate)
    if bits is None:
        return "#cccccc"
    if bits in _BITS_COLOURS:
        return _BITS_COLOURS[bits]
    nearest = min(_BITS_COLOURS, key=lambda b: (abs(b - bits), b))
    return _BITS_COLOURS[nearest]


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (then the caller escaped them)."""
    out = ["<table>"]
    if any(headers):
        out.append("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        cells = []
        for cell in row:
            text = cell if raw else _e(cell)
            cls = ' class="num"' if _num(str(cell).replace(",", "")) is not None else ""
            cells.append(f"<td{cls}>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


# -- charts ----------------------------------------------------------------------------------------

def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _png_uri(fig: Any) -> str:
    """Serialise a matplotlib Figure as a deterministic base64 PNG data URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, metadata={"Software": None}, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<div class="chart"><img alt="{_e(alt)}" src="{uri}"></div>'


def _bar_chart(title: str, labels: Sequence[str], values: Sequence[float], colours: Sequence[str] | None = None,
               xlabel: str = "") -> str:
    """A horizontal bar chart (PNG via matplotlib, or inline SVG)."""
    colours = list(colours) if colours else ["#4878a8"] * len(values)
    if _have_matplotlib():
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.0, max(1.6, 0.28 * len(labels) + 0.9)))
        ax = fig.add_subplot(1, 1, 1)
        positions = list(range(len(labels)))[::-1]
        ax.barh(positions, values, color=colours, edgecolor="#555555", linewidth=0.4)
        ax.set_yticks(positions)
        ax.set_yticklabels([_short(label, 48) for label in labels], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        return _img(_png_uri(fig), title)
    return _svg_bars(title, labels, values, colours, xlabel)


def _scatter_chart(title: str, series: Sequence[tuple[str, Sequence[float], Sequence[float], str]],
                   highlight: tuple[float, float] | None, xlabel: str, ylabel: str, diagonal: bool = False,
                   connect: bool = True) -> str:
    """A scatter plot of one or more series ``(label, xs, ys, colour)``; ``highlight`` is the chosen point."""
    if _have_matplotlib():
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.4, 3.8))
        ax = fig.add_subplot(1, 1, 1)
        for label, xs, ys, colour in series:
            order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
            ax.plot([xs[i] for i in order], [ys[i] for i in order], "o-" if connect else "o", color=colour, label=label,
                    markersize=4, linewidth=1, alpha=0.85)
        if highlight is not None:
            ax.plot([highlight[0]], [highlight[1]], marker="*", color="#d62728", markersize=16, linestyle="none",
                    label="chosen", zorder=5)
        if diagonal:
            values = [v for _, xs, ys, _ in series for v in (*xs, *ys)]
            if values:
                lo, hi = min(values), max(values)
                ax.plot([lo, hi], [lo, hi], "--", color="#888888", linewidth=0.8, label="y = x")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return _img(_png_uri(fig), title)
    return _svg_scatter(title, series, highlight, xlabel, ylabel)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _svg_bars(title: str, labels: Sequence[str], values: Sequence[float], colours: Sequence[str], xlabel: str) -> str:
    """Inline SVG horizontal bars (no matplotlib)."""
    row, left, width = 18, 260, 360
    height = row * len(labels) + 46
    top = max([v for v in values if v > 0], default=1.0) or 1.0
    parts = [f'<svg width="{left + width + 90}" height="{height}" '
             f'role="img" aria-label="{_e(title)}">',
             f'<text x="4" y="14" font-size="12" font-weight="bold">{_e(title)}</text>']
    for i, (label, value, colour) in enumerate(zip(labels, values, colours, strict=True)):
        y = 24 + i * row
        w = max(0.0, value) / top * width
        parts.append(f'<text x="{left - 4}" y="{y + 12}" font-size="10" text-anchor="end">{_e(_short(label, 40))}</text>')
        parts.append(f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="{row - 4}" fill="{_e(colour)}" stroke="#555"/>')
        parts.append(f'<text x="{left + w + 4:.1f}" y="{y + 12}" font-size="10">{_e(_fmt(value))}</text>')
    parts.append(f'<text x="{left}" y="{height - 4}" font-size="10">{_e(xlabel)}</text></svg>')
    return '<div class="chart">' + "".join(parts) + "</div>"


def _svg_scatter(title: str, series: Sequence[tuple[str, Sequence[float], Sequence[float], str]],
                 highlight: tuple[float, float] | None, xlabel: str, ylabel: str) -> str:
    """Inline SVG scatter (no matplotlib)."""
    w, h, pad = 520, 320, 50
    xs_all = [x for _, xs, _, _ in series for x in xs] + ([highlight[0]] if highlight else [])
    ys_all = [y for _, _, ys, _ in series for y in ys] + ([highlight[1]] if highlight else [])
    if not xs_all:
        return ""
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1

    def px(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad)

    def py(y: float) -> float:
        return h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)

    parts = [f'<svg width="{w}" height="{h}" role="img" aria-label="{_e(title)}">',
             f'<text x="4" y="14" font-size="12" font-weight="bold">{_e(title)}</text>',
             f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="none" stroke="#aaa"/>',
             f'<text x="{pad}" y="{h - 8}" font-size="10">{_e(xlabel)}: {_e(_fmt(x0))} … {_e(_fmt(x1))}</text>',
             f'<text x="4" y="{pad - 6}" font-size="10">{_e(ylabel)}: {_e(_fmt(y0))} … {_e(_fmt(y1))}</text>']
    legend = []
    for label, xs, ys, colour in series:
        for x, y in zip(xs, ys, strict=True):
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{_e(colour)}"/>')
        legend.append(f'<span style="color:{_e(colour)}">● {_e(label)}</span>')
    if highlight is not None:
        parts.append(f'<circle cx="{px(highlight[0]):.1f}" cy="{py(highlight[1]):.1f}" r="7" fill="none" '
                     f'stroke="#d62728" stroke-width="2"/>')
        legend.append('<span style="color:#d62728">○ chosen</span>')
    parts.append("</svg>")
    return '<div class="chart">' + "".join(parts) + '<div class="legend">' + "".join(legend) + "</div></div>"


# -- sections --------------------------------------------------------------------------------------

def _model_name(report: Mapping[str, Any]) -> str:
    for key in ("model", "model_name", "input", "output"):
        value = report.get(key)
        if isinstance(value, str) and value:
            return value
    return "model"


def _plan_layers(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(layer, candidate)`` pairs of the plan, sorted by layer name."""
    plan = report.get("plan") or {}
    layers = plan.get("layers") if isinstance(plan, Mapping) else None
    pairs: list[tuple[str, str]] = []
    if isinstance(layers, Mapping):
        pairs = [(str(k), v if isinstance(v, str) else str(v.get("candidate", v)) if isinstance(v, Mapping) else str(v))
                 for k, v in layers.items()]
    elif isinstance(layers, list):
        for item in layers:
            if isinstance(item, Mapping):
                pairs.append((str(item.get("name", item.get("layer", "?"))), str(item.get("candidate", item.get("precision", "?")))))
    return sorted(pairs)


def _summary(report: Mapping[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    layers = report.get("layers") or {}
    if isinstance(layers, Mapping) and layers:
        rows.append(("layers", f"{layers.get('quantized', '—')} quantized of {layers.get('total', '—')} "
                               f"({layers.get('fp32', '—')} float)"))
    sizes = report.get("sizes") or {}
    before, after = _num(sizes.get("fp32_bytes")), _num(sizes.get("quantized_bytes"))
    if before is not None or after is not None:
        ratio = f" ({after / before:.1%} of fp32)" if before and after is not None else ""
        rows.append(("size", f"{_bytes(before)} → {_bytes(after)}{ratio}"))
    metric = report.get("metric") or {}
    out = "<h2>Summary</h2>"
    if metric:
        rows.append(("metric", f"{metric.get('name', 'metric')}: fp32 {_fmt(metric.get('fp32'))} → quantized "
                               f"{_fmt(metric.get('quantized'))}"))
    if report.get("seconds") is not None:
        rows.append(("time to quantize", f"{_fmt(report.get('seconds'))} s"))
    calibration = report.get("calibration") or {}
    if isinstance(calibration, Mapping) and calibration:
        rows.append(("calibration", ", ".join(f"{k}={calibration[k]}" for k in sorted(calibration))))
    if report.get("pipeline"):
        rows.append(("pipeline", str(report["pipeline"])))
    body = [(f"<b>{_e(k)}</b>", _e(v)) for k, v in rows]
    drop, max_drop = _num(metric.get("drop")), _num(metric.get("max_drop"))
    if drop is not None:
        ok = max_drop is None or drop <= max_drop + 1e-12
        verdict = ("" if max_drop is None else
                   f' <span class="{"ok" if ok else "bad"}">{"within" if ok else "exceeds"} max_drop {_e(_fmt(max_drop))}</span>')
        body.append(("<b>drop</b>", f"{_e(_fmt(drop))}{verdict}"))
    out += _table(["", ""], body, raw=True)
    by_candidate = layers.get("by_candidate") if isinstance(layers, Mapping) else None
    counts: dict[str, int] = {}
    if isinstance(by_candidate, Mapping):
        counts = {str(k): int(v) for k, v in by_candidate.items() if _num(v) is not None}
    float_layers = _num(layers.get("fp32")) if isinstance(layers, Mapping) else None
    if float_layers:
        counts.setdefault("fp32", int(float_layers))
    if counts:
        names = sorted(counts, key=lambda c: (-counts[c], c))
        out += "<h3>Layers per precision</h3>"
        out += _table(["precision", "layers"],
                      [(_chip(n), _e(counts[n])) for n in names], raw=True)
        out += _bar_chart("Layers per precision", names, [float(counts[n]) for n in names],
                          [precision_colour(n) for n in names], "layers")
    return out


def _chip(candidate: str) -> str:
    return f'<span class="chip" style="background:{precision_colour(candidate)}">{_e(candidate)}</span>'


def _precision_map(report: Mapping[str, Any]) -> str:
    pairs = _plan_layers(report)
    if not pairs:
        return ""
    notes = report.get("notes") if isinstance(report.get("notes"), Mapping) else {}
    rows = []
    for name, candidate in pairs:
        colour = precision_colour(candidate)
        rows.append((f'<span style="font-family:monospace">{_e(name)}</span>',
                     f'<span class="chip" style="background:{colour}">{_e(candidate)}</span>',
                     _e(notes.get(name, "")) if notes else ""))
    legend = "".join(f'{_chip(c)} ' for c in sorted({c for _, c in pairs}))
    return ("<h2>Per-layer precision map</h2>" + f'<div class="legend">{legend}</div>'
            + _table(["layer", "precision", "note"], rows, raw=True))


def _sensitivity_rows(sens: Any) -> list[tuple[str, str, float]]:
    """``(layer, candidate, delta)`` from either a list of dicts or an onnxq-sensitivity/1 dict."""
    rows: list[tuple[str, str, float]] = []
    if isinstance(sens, Mapping) and isinstance(sens.get("layers"), list):
        for layer in sens["layers"]:
            if not isinstance(layer, Mapping):
                continue
            for cand, item in sorted((layer.get("candidates") or {}).items()):
                delta = _num(item.get("delta")) if isinstance(item, Mapping) else _num(item)
                if delta is not None:
                    rows.append((str(layer.get("name", "?")), str(cand), delta))
    elif isinstance(sens, list):
        for item in sens:
            if isinstance(item, Mapping):
                delta = _num(item.get("delta"))
                if delta is not None:
                    rows.append((str(item.get("layer", item.get("name", "?"))), str(item.get("candidate", "")), delta))
    return sorted(rows, key=lambda r: (-r[2], r[0], r[1]))


def _sensitivity(report: Mapping[str, Any], top: int = 25) -> str:
    if "sensitivity" not in report:
        return ""
    rows = _sensitivity_rows(report["sensitivity"])
    if not rows:
        return "<h2>Sensitivity ranking</h2><p>No per-layer deltas in the report.</p>"
    shown = rows[:top]
    out = f"<h2>Sensitivity ranking</h2><p>{len(rows)} (layer, candidate) deltas; the {len(shown)} largest:</p>"
    out += _bar_chart("Predicted loss increase per layer (largest first)", [f"{r[0]} @ {r[1]}" for r in shown],
                      [r[2] for r in shown], [precision_colour(r[1]) for r in shown], "delta")
    out += _table(["rank", "layer", "candidate", "delta"],
                  [(str(i + 1), r[0], r[1], _fmt(r[2])) for i, r in enumerate(rows)])
    return out


def _cell_text(value: Any) -> str:
    """A table cell for a Pareto point value: numbers formatted, small mappings as ``k: v`` lists."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_fmt(value[k])}" for k in sorted(value, key=str))
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return _fmt(value) if value is not None else ""


def _chosen_index(report: Mapping[str, Any], points: Sequence[Mapping[str, Any]]) -> int | None:
    """The chosen point: the one flagged ``chosen``, else ``search["chosen_index"]``."""
    for i, point in enumerate(points):
        if point.get("chosen"):
            return i
    search = report.get("search")
    index = search.get("chosen_index") if isinstance(search, Mapping) else None
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(points):
        return index
    return None


def _pareto(report: Mapping[str, Any]) -> str:
    front = report.get("pareto_front")
    if not isinstance(front, list) or not front:
        return ""
    points = [p for p in front if isinstance(p, Mapping)]
    if not points:
        return ""
    chosen = _chosen_index(report, points)
    present = [k for k in COST_KEYS if any(_num(p.get(k)) is not None for p in points)]
    if not present:  # any numeric key that is not a loss
        present = sorted({k for p in points for k, v in p.items() if _num(v) is not None and k not in LOSS_KEYS
                          and k != "chosen"})
    cost_key = present[0] if present else None
    axes = [k for k in ("size_bytes",) if k in present]
    axes += [k for k in _LATENCY_KEYS if k in present][:1]
    axes += [k for k in ("bits", "avg_bits") if k in present and len(axes) < 2][:1]
    axes = axes or ([cost_key] if cost_key else [])
    keys = sorted({k for p in points for k in p if k != "chosen"},
                  key=lambda k: (k not in COST_KEYS, k not in LOSS_KEYS, k))
    out = f"<h2>Pareto front</h2><p>{len(points)} points"
    if chosen is not None:
        point = points[chosen]
        out += "; chosen: " + _e(", ".join(f"{k} {_fmt(point.get(k))}" for k in (*axes, *LOSS_KEYS)
                                           if point.get(k) is not None))
    out += "</p>"
    colours = {"measured_drop": "#1f77b4", "predicted_loss": "#ff7f0e", "predicted_drop": "#2ca02c", "drop": "#9467bd"}
    charts = []
    for axis in axes:
        series = []
        highlight = None
        for loss_key in LOSS_KEYS:
            valid = [(x, y) for x, y in ((_num(p.get(axis)), _num(p.get(loss_key))) for p in points)
                     if x is not None and y is not None]
            if valid:
                series.append((loss_key, [x for x, _ in valid], [y for _, y in valid], colours[loss_key]))
                if highlight is None and chosen is not None:
                    x, y = _num(points[chosen].get(axis)), _num(points[chosen].get(loss_key))
                    highlight = (x, y) if x is not None and y is not None else None
        if series:
            charts.append(_scatter_chart(f"Pareto front: {axis} vs loss", series, highlight, axis, "loss / drop"))
    if charts:
        out += '<div class="grid">' + "".join(charts) + "</div>"
    order = sorted(range(len(points)), key=lambda i: (_num(points[i].get(cost_key)) if cost_key and
                                                      _num(points[i].get(cost_key)) is not None else math.inf, i))
    rows = []
    for i in order:
        mark = '<span class="ok">★ chosen</span>' if i == chosen else ""
        rows.append([str(i), mark, *(_e(_cell_text(points[i].get(k))) for k in keys)])
    out += _table(["#", "", *keys], rows, raw=True)
    return out


def _search(report: Mapping[str, Any]) -> str:
    search = report.get("search")
    if not isinstance(search, Mapping) or not search:
        return ""
    out = "<h2>Search: predicted vs measured</h2>"
    scalars = [(k, search[k]) for k in sorted(search) if not isinstance(search[k], (Mapping, list))]
    if scalars:
        out += _table(["key", "value"], [(k, _fmt(v)) for k, v in scalars])
    pairs: list[tuple[float, float]] = []
    for key in sorted(search):
        value = search[key]
        if isinstance(value, list):
            for item in value:
                if isinstance(item, Mapping):
                    pred = next((_num(item.get(k)) for k in ("predicted_loss", "predicted", "predicted_drop")
                                 if _num(item.get(k)) is not None), None)
                    meas = next((_num(item.get(k)) for k in ("measured_drop", "measured", "drop")
                                 if _num(item.get(k)) is not None), None)
                    if pred is not None and meas is not None:
                        pairs.append((pred, meas))
    front = report.get("pareto_front")
    if not pairs and isinstance(front, list):
        for item in front:
            if isinstance(item, Mapping) and _num(item.get("predicted_loss")) is not None \
                    and _num(item.get("measured_drop")) is not None:
                pairs.append((_num(item["predicted_loss"]), _num(item["measured_drop"])))  # type: ignore[arg-type]
    if pairs:
        out += _scatter_chart("Predicted loss vs measured drop", [("plans", [p for p, _ in pairs], [m for _, m in pairs],
                                                                    "#1f77b4")],
                              None, "predicted loss", "measured drop", diagonal=True, connect=False)
    nested = {k: search[k] for k in sorted(search) if isinstance(search[k], (Mapping, list))}
    if nested:
        text = json.dumps(nested, indent=1, sort_keys=True, default=str)
        if len(text) > 20000:
            text = text[:20000] + "\n…"
        out += f"<details><summary>search details (JSON)</summary><pre>{_e(text)}</pre></details>"
    return out


def _phases(report: Mapping[str, Any]) -> str:
    phases = report.get("time_per_phase")
    if not isinstance(phases, Mapping) or not phases:
        return ""
    items = sorted(((str(k), _num(v)) for k, v in phases.items() if _num(v) is not None), key=lambda kv: (-kv[1], kv[0]))
    if not items:
        return ""
    total = sum(v for _, v in items)
    out = "<h2>Time per phase</h2>"
    out += _bar_chart("Time per phase", [k for k, _ in items], [v for _, v in items], None, "seconds")
    out += _table(["phase", "seconds", "share"],
                  [(k, f"{v:.4f}", f"{v / total:.1%}" if total else "—") for k, v in items])
    return out


def _extras(report: Mapping[str, Any]) -> str:
    cost = report.get("cost")
    if not isinstance(cost, Mapping) or not cost:
        return ""
    columns = [k for k in sorted(cost) if isinstance(cost[k], Mapping)]
    scalars = [k for k in sorted(cost) if not isinstance(cost[k], (Mapping, list))]
    out = "<h2>Estimated cost (spec cost model)</h2>"
    if columns:
        metrics = sorted({m for c in columns for m in cost[c]})
        out += _table(["", *columns], [(m, *(_cell_text(cost[c].get(m)) for c in columns)) for m in metrics])
    if scalars:
        out += _table(["", ""], [(k, _cell_text(cost[k])) for k in scalars])
    return out


def render_html(report: Mapping[str, Any]) -> str:
    """Render ``report`` (an onnxq report dict) as one self-contained HTML document."""
    model = _model_name(report)
    spec = str(report.get("spec", "?"))
    mode = str(report.get("mode", ""))
    title = f"onnxq report: {model} for {spec}"
    sections = []
    for builder in (_summary, _precision_map, _sensitivity, _pareto, _search, _phases, _extras):
        try:
            sections.append(builder(report))
        except Exception as error:  # a malformed optional section must not lose the whole report
            logger.warning("report_html: section %s failed: %s", builder.__name__, error)
            sections.append(f"<p class=\"bad\">section {_e(builder.__name__.strip('_'))} could not be rendered: "
                            f"{_e(error)}</p>")
    charts = "PNG (matplotlib)" if _have_matplotlib() else "inline SVG (matplotlib not installed)"
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">mode {_e(mode)} · onnxq {_e(report.get("onnxq_version", "?"))} · '
        f'{_e(report.get("format", ""))}</p>',
        *sections,
        f"<footer>Generated by onnxq {_e(report.get('onnxq_version', '?'))}; charts: {_e(charts)}.</footer>",
        "</body></html>\n",
    ])
