"""A self-contained HTML rendering of an onnxq report (``onnxq quantize --report-html``).

``render_html(report)`` turns the report dict built by :func:`onnxq.api.build_report` (plus the
``output`` key the CLI adds) into one HTML file: inline CSS and charts drawn as inline SVG, with
no plotting dependency and nothing fetched from the network.

Sections, each shown only when the report has the data:

* title (model, spec, mode) and a summary: layers per precision, size and measured latency
  before/after, metric before/after, drop vs ``max_drop``;
* per-layer precision map (``report["plan"]["layers"]``), each row coloured by its precision;
* sensitivity ranking (``report["sensitivity"]``: a list of ``{layer, candidate, delta}``, or an
  ``onnxq-sensitivity/1`` dict);
* the Pareto front (``report["pareto_front"]``): predicted loss and measured drop, each on its own
  chart, against size (% of fp32) and against latency (× fp32: measured per plan when the points
  carry ``measured_latency_ratio``, else the spec cost model's estimate), the chosen plan ringed,
  ``max_drop`` drawn; missing keys tolerated;
* predicted loss vs measured drop as a scatter with its Spearman ρ (``report["search"]``);
* time per phase (``report["time_per_phase"]``).

Every chart's axes carry labels with units. Every string taken from the report is escaped with
:func:`html.escape`. The output is deterministic: the same report always renders to the same bytes.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from onnxq.statistics import spearman

__all__ = ["render_html", "precision_colour", "COST_KEYS", "LOSS_KEYS", "MEASURED_LATENCY_KEY"]

logger = logging.getLogger(__name__)

#: Keys of a Pareto point that can serve as its cost (x axis), in order of preference.
COST_KEYS: tuple[str, ...] = ("size_bytes", "latency_seconds", "latency", "latency_ratio", "latency_ms", "bits",
                              "avg_bits", "bitops", "cost")
#: Keys of a Pareto point that measure its quality loss (y axis), in order of preference.
LOSS_KEYS: tuple[str, ...] = ("measured_drop", "predicted_loss", "predicted_drop", "drop")
#: Key of a Pareto point holding its latency measured on this machine, as a ratio to fp32.
MEASURED_LATENCY_KEY = "measured_latency_ratio"

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
.chart{margin:8px 0}.legend span{margin-right:10px}.note{color:#555;font-size:0.85em;max-width:500px}
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


# -- charts (inline SVG, no dependency) ------------------------------------------------------------

@dataclass(frozen=True)
class Series:
    """One set of points on a chart; ``connect`` joins them in x order (a front)."""

    label: str
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    colour: str
    connect: bool = False


@dataclass(frozen=True)
class Chart:
    """A scatter chart with labelled axes; ``chosen`` is the chosen plan, ``hlines`` labelled references."""

    title: str
    xlabel: str
    ylabel: str
    series: tuple[Series, ...]
    chosen: tuple[float, float] | None = None
    hlines: tuple[tuple[float, str], ...] = ()
    vlines: tuple[tuple[float, str], ...] = ()
    note: str = ""


_W, _H = 500, 340
_LEFT, _RIGHT, _TOP, _BOTTOM = 72, 18, 52, 50
_CHOSEN = "#d62728"


def _nice_step(span: float, count: int) -> float:
    """A 1/2/5×10^k step giving about ``count`` ticks over ``span``."""
    raw = span / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _axis_range(values: Sequence[float], count: int = 5, integer: bool = False) -> tuple[float, float, list[float]]:
    """Axis limits padded by 5% of the span (so no point sits on the frame) and the ticks inside them."""
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    step = max(1.0, _nice_step(hi - lo, count)) if integer else _nice_step(hi - lo, count)
    first = math.ceil(lo / step)
    ticks = [k * step for k in range(first, math.floor(hi / step) + 1)]
    return lo, hi, ticks


def _tick_text(value: float, ticks: Sequence[float]) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    largest = max(abs(t) for t in ticks)
    if largest and (largest < 1e-3 or largest >= 1e5):
        return f"{value:.1e}" if value else "0"
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:.{decimals}f}"


def _svg_text(x: float, y: float, text: str, cls: str, size: int = 11, anchor: str = "start", extra: str = "") -> str:
    return (f'<text class="{cls}" x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>'
            f"{_e(text)}</text>")


def _svg_chart(chart: Chart) -> str:
    """Render ``chart`` as an inline SVG scatter with ticks, gridlines, axis labels, legend and chosen marker."""
    xs = [x for s in chart.series for x in s.xs] + [x for x, _ in chart.vlines]
    ys = [y for s in chart.series for y in s.ys] + [y for y, _ in chart.hlines]
    if chart.chosen is not None:
        xs.append(chart.chosen[0])
        ys.append(chart.chosen[1])
    if not xs or not ys:
        return ""
    x0, x1, xticks = _axis_range(xs)
    y0, y1, yticks = _axis_range(ys)
    right, bottom = _W - _RIGHT, _H - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + (x - x0) / (x1 - x0) * (right - _LEFT)

    def py(y: float) -> float:
        return bottom - (y - y0) / (y1 - y0) * (bottom - _TOP)

    parts = [f'<svg class="chart-svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img" '
             f'aria-label="{_e(chart.title)}" font-family="Helvetica,Arial,sans-serif">',
             f'<rect x="0" y="0" width="{_W}" height="{_H}" fill="#fff"/>',
             _svg_text(8, 18, chart.title, "chart-title", 13, extra=' font-weight="bold"')]
    for tick in xticks:
        parts.append(f'<line x1="{px(tick):.1f}" y1="{_TOP}" x2="{px(tick):.1f}" y2="{bottom}" stroke="#e6e6e6"/>')
        parts.append(_svg_text(px(tick), bottom + 15, _tick_text(tick, xticks), "tick", 10, "middle"))
    for tick in yticks:
        parts.append(f'<line x1="{_LEFT}" y1="{py(tick):.1f}" x2="{right}" y2="{py(tick):.1f}" stroke="#e6e6e6"/>')
        parts.append(_svg_text(_LEFT - 5, py(tick) + 3.5, _tick_text(tick, yticks), "tick", 10, "end"))
    parts.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{right - _LEFT}" height="{bottom - _TOP}" fill="none" '
                 f'stroke="#888"/>')
    parts.append(_svg_text((_LEFT + right) / 2, _H - 10, chart.xlabel, "axis-label x-label", 12, "middle"))
    parts.append(_svg_text(14, (_TOP + bottom) / 2, chart.ylabel, "axis-label y-label", 12, "middle",
                           f' transform="rotate(-90 14 {(_TOP + bottom) / 2:.1f})"'))
    for value, label in chart.hlines:
        parts.append(f'<line x1="{_LEFT}" y1="{py(value):.1f}" x2="{right}" y2="{py(value):.1f}" stroke="#c62828" '
                     f'stroke-dasharray="5,4"/>')
        parts.append(_svg_text(right - 4, py(value) - 4, label, "ref-label", 10, "end", ' fill="#c62828"'))
    for value, label in chart.vlines:
        parts.append(f'<line x1="{px(value):.1f}" y1="{_TOP}" x2="{px(value):.1f}" y2="{bottom}" stroke="#777" '
                     f'stroke-dasharray="3,3"/>')
        parts.append(_svg_text(px(value) - 4, _TOP + 12, label, "ref-label", 10, "end", ' fill="#555"'))
    parts += _svg_series(chart.series, px, py)
    if chart.chosen is not None:
        cx, cy = px(chart.chosen[0]), py(chart.chosen[1])
        parts.append(f'<circle class="chosen" cx="{cx:.1f}" cy="{cy:.1f}" r="8" fill="none" stroke="{_CHOSEN}" '
                     f'stroke-width="2.5"/>')
        anchor, dx = ("end", -11) if cx > (_LEFT + right) / 2 else ("start", 11)
        parts.append(_svg_text(cx + dx, cy - 8, "chosen", "chosen-label", 11, anchor,
                               f' fill="{_CHOSEN}" font-weight="bold"'))
    parts.append(_svg_legend(chart))
    parts.append("</svg>")
    note = f'<div class="note">{_e(chart.note)}</div>' if chart.note else ""
    return '<figure class="chart">' + "".join(parts) + note + "</figure>"


def _svg_series(series: Sequence[Series], px: Any, py: Any) -> list[str]:
    parts = []
    for s in series:
        points = sorted(zip(s.xs, s.ys, strict=True))
        if s.connect and len(points) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{_e(s.colour)}" stroke-width="1.3" '
                         f'stroke-opacity="0.7"/>')
        for x, y in points:
            parts.append(f'<circle class="point" cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{_e(s.colour)}" '
                         f'fill-opacity="0.85">'
                         f"<title>{_e(s.label)}: ({_e(_fmt(x))}, {_e(_fmt(y))})</title></circle>")
    return parts


def _svg_legend(chart: Chart) -> str:
    items = [(s.label, s.colour, False) for s in chart.series]
    if chart.chosen is not None:
        items.append(("chosen plan", _CHOSEN, True))
    parts, x = [], float(_LEFT)
    for label, colour, ring in items:
        fill = "none" if ring else _e(colour)
        parts.append(f'<circle cx="{x + 5:.1f}" cy="37" r="{5 if ring else 4}" fill="{fill}" stroke="{_e(colour)}" '
                     f'stroke-width="{2 if ring else 1}"/>')
        parts.append(_svg_text(x + 14, 41, label, "legend", 11))
        x += 24 + 6.2 * len(label)
    return "".join(parts)


def _svg_bars(title: str, labels: Sequence[str], values: Sequence[float], colours: Sequence[str] | None,
              xlabel: str) -> str:
    """Horizontal bars with a labelled value axis (inline SVG)."""
    colours = list(colours) if colours else ["#4878a8"] * len(values)
    row, left, width = 18, 280, 420
    top, height = 28, 18 * len(labels) + 28 + 46
    _, hi, ticks = _axis_range([0.0, *[max(0.0, v) for v in values]], integer=all(float(v).is_integer() for v in values))
    ticks = [t for t in ticks if t >= 0]
    scale = width / (hi or 1.0)
    bottom = top + row * len(labels)
    parts = [f'<svg class="chart-svg" width="{left + width + 70}" height="{height}" role="img" '
             f'aria-label="{_e(title)}" font-family="Helvetica,Arial,sans-serif">',
             _svg_text(4, 16, title, "chart-title", 13, extra=' font-weight="bold"')]
    for tick in ticks:
        parts.append(f'<line x1="{left + tick * scale:.1f}" y1="{top}" x2="{left + tick * scale:.1f}" y2="{bottom}" '
                     f'stroke="#e6e6e6"/>')
        parts.append(_svg_text(left + tick * scale, bottom + 14, _tick_text(tick, ticks), "tick", 10, "middle"))
    for i, (label, value, colour) in enumerate(zip(labels, values, colours, strict=True)):
        y = top + i * row
        w = max(0.0, value) * scale
        parts.append(_svg_text(left - 6, y + 13, _short(label, 44), "bar-label", 11, "end"))
        parts.append(f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="{row - 4}" fill="{_e(colour)}" '
                     f'stroke="#555" stroke-width="0.5"><title>{_e(label)}: {_e(_fmt(value))}</title></rect>')
        parts.append(_svg_text(left + w + 4, y + 13, _fmt(value), "bar-value", 10))
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{left + width}" y2="{bottom}" stroke="#888"/>')
    parts.append(_svg_text(left + width / 2, bottom + 32, xlabel, "axis-label x-label", 12, "middle"))
    parts.append("</svg>")
    return '<figure class="chart">' + "".join(parts) + "</figure>"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


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
    latency = report.get("latency") or {}
    if isinstance(latency, Mapping) and _num(latency.get("fp32_ms")) is not None:
        ratio = _num(latency.get("ratio"))
        rows.append((f"latency (measured, batch {latency.get('batch', 1)})",
                     f"{_fmt(latency.get('fp32_ms'))} ms → {_fmt(latency.get('quantized_ms'))} ms"
                     + (f" ({ratio:.2f}× fp32)" if ratio is not None else "")))
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
        out += _svg_bars("Layers per precision", names, [float(counts[n]) for n in names],
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
    out += _svg_bars("Predicted loss increase per layer (largest first)", [f"{r[0]} @ {r[1]}" for r in shown],
                     [r[2] for r in shown], [precision_colour(r[1]) for r in shown],
                     "predicted loss increase, delta (KL or MSE vs fp32 outputs)")
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


@dataclass(frozen=True)
class _Axis:
    """One quantity of the Pareto points as a chart axis: its label, per-point values and reference line."""

    name: str
    label: str
    values: tuple[float | None, ...]
    reference: tuple[float, str] | None = None
    note: str = ""
    unit: str = ""

    def describe(self, index: int) -> str:
        """``index``'s value with its unit, as the chosen-plan line shows it."""
        value = self.values[index]
        return f"{self.label.split(' (')[0]} {_fmt(value, 3)}{self.unit}"


def _fp32_cost(report: Mapping[str, Any], key: str) -> float | None:
    cost = report.get("cost")
    fp32 = cost.get("fp32") if isinstance(cost, Mapping) else None
    value = _num(fp32.get(key)) if isinstance(fp32, Mapping) else None
    return value if value else None


def _ratio_axis(points: Sequence[Mapping[str, Any]], key: str, reference: float | None, scale: float) -> tuple[float | None, ...]:
    values = [_num(p.get(key)) for p in points]
    return tuple(None if v is None else (v / reference * scale if reference else v * scale) for v in values)


def _size_axis(report: Mapping[str, Any], points: Sequence[Mapping[str, Any]]) -> _Axis | None:
    if not any(_num(p.get("size_bytes")) is not None for p in points):
        return None
    sizes = report.get("sizes") if isinstance(report.get("sizes"), Mapping) else {}
    reference = _fp32_cost(report, "size_bytes") or _num(sizes.get("fp32_bytes"))
    if reference:
        return _Axis("size", "size (% of fp32)", _ratio_axis(points, "size_bytes", reference, 100.0), (100.0, "fp32"),
                     unit="% of fp32")
    return _Axis("size", "size (KiB)", _ratio_axis(points, "size_bytes", None, 1 / 1024), unit=" KiB")


def _latency_axis(report: Mapping[str, Any], points: Sequence[Mapping[str, Any]]) -> _Axis | None:
    if any(_num(p.get(MEASURED_LATENCY_KEY)) is not None for p in points):
        return _Axis("latency", "measured latency (× fp32, onnxruntime on this machine)",
                     tuple(_num(p.get(MEASURED_LATENCY_KEY)) for p in points), (1.0, "fp32"), unit="× fp32")
    if not any(_num(p.get("latency_seconds")) is not None for p in points):
        return None
    latency = report.get("latency") if isinstance(report.get("latency"), Mapping) else {}
    measured = _num(latency.get("ratio"))
    note = ("Latency estimated by the spec's cost model" +
            (f"; measured for the chosen plan on this machine: {measured:.2f}× fp32 (onnxruntime, batch "
             f"{latency.get('batch', 1)})." if measured is not None else "; not measured per plan."))
    reference = _fp32_cost(report, "latency_seconds")
    if reference:
        return _Axis("latency", "estimated latency (× fp32, spec cost model)",
                     _ratio_axis(points, "latency_seconds", reference, 1.0), (1.0, "fp32"), note, "× fp32")
    return _Axis("latency", "estimated latency (ms, spec cost model)",
                 _ratio_axis(points, "latency_seconds", None, 1e3), None, note, " ms")


def _fallback_axis(points: Sequence[Mapping[str, Any]]) -> _Axis | None:
    for key, label in (("bits", "average weight bits"), ("avg_bits", "average weight bits"), ("cost", "cost")):
        if any(_num(p.get(key)) is not None for p in points):
            return _Axis(key, label, tuple(_num(p.get(key)) for p in points))
    return None


def _loss_axes(report: Mapping[str, Any], points: Sequence[Mapping[str, Any]]) -> list[tuple[_Axis, str]]:
    """The y quantities: predicted loss and measured drop, each with its colour."""
    metric = report.get("metric") if isinstance(report.get("metric"), Mapping) else {}
    name = str(metric.get("name") or "metric")
    max_drop = _num(metric.get("max_drop"))
    if max_drop is None and isinstance(report.get("search"), Mapping):
        max_drop = _num(report["search"].get("max_drop"))
    predicted = tuple(next((_num(p.get(k)) for k in ("predicted_loss", "predicted_drop") if _num(p.get(k)) is not None),
                           None) for p in points)
    measured = tuple(next((_num(p.get(k)) for k in ("measured_drop", "drop") if _num(p.get(k)) is not None), None)
                     for p in points)
    axes = []
    if any(v is not None for v in predicted):
        axes.append((_Axis("predicted", "predicted loss (KL or MSE vs fp32 outputs)", predicted), "#ff7f0e"))
    if any(v is not None for v in measured):
        reference = (max_drop, f"max_drop {_fmt(max_drop)}") if max_drop is not None else None
        axes.append((_Axis("measured", f"measured drop ({name}, fp32 − quantized)", measured, reference), "#1f77b4"))
    return axes


def _pareto_chart(x: _Axis, y: _Axis, colour: str, chosen: int | None) -> str:
    pairs = [(a, b) for a, b in zip(x.values, y.values, strict=True) if a is not None and b is not None]
    if not pairs:
        return ""
    highlight = None
    if chosen is not None and x.values[chosen] is not None and y.values[chosen] is not None:
        highlight = (x.values[chosen], y.values[chosen])
    plans = "plans on the front" if y.name == "predicted" else "plans measured"
    chart = Chart(f"{'Predicted loss' if y.name == 'predicted' else 'Measured drop'} vs {x.name}", x.label, y.label,
                  (Series(plans, tuple(a for a, _ in pairs), tuple(b for _, b in pairs), colour, connect=True),),
                  highlight, hlines=(y.reference,) if y.reference else (), vlines=(x.reference,) if x.reference else ())
    return _svg_chart(chart)


def _pareto(report: Mapping[str, Any]) -> str:
    front = report.get("pareto_front")
    if not isinstance(front, list) or not front:
        return ""
    points = [p for p in front if isinstance(p, Mapping)]
    if not points:
        return ""
    chosen = _chosen_index(report, points)
    xs = [a for a in (_size_axis(report, points), _latency_axis(report, points)) if a is not None]
    xs = xs or [a for a in (_fallback_axis(points),) if a is not None]
    ys = _loss_axes(report, points)
    out = f"<h2>Pareto front</h2><p>{len(points)} plans"
    measured = sum(1 for p in points if _num(p.get("measured_drop")) is not None)
    out += f", {measured} measured for real" if measured else ""
    if chosen is not None:
        facts = [a.describe(chosen) for a in (*xs, *(y for y, _ in ys)) if a.values[chosen] is not None]
        out += "; <b>chosen</b>: " + _e(", ".join(facts))
    out += "</p>" + "".join(f'<p class="note">{_e(a.note)}</p>' for a in xs if a.note)
    charts = [_pareto_chart(x, y, colour, chosen) for y, colour in ys for x in xs]
    search = report.get("search")
    charts.append(_predicted_vs_measured(report, search if isinstance(search, Mapping) else {}))
    if any(charts):
        out += '<div class="grid">' + "".join(charts) + "</div>"
    keys = sorted({k for p in points for k in p if k != "chosen"}, key=lambda k: (k not in COST_KEYS, k not in LOSS_KEYS, k))
    cost_key = next((k for k in COST_KEYS if k in keys), None)
    order = sorted(range(len(points)), key=lambda i: (_num(points[i].get(cost_key)) if cost_key and
                                                      _num(points[i].get(cost_key)) is not None else math.inf, i))
    rows = []
    for i in order:
        mark = '<span class="ok">★ chosen</span>' if i == chosen else ""
        rows.append([str(i), mark, *(_e(_cell_text(points[i].get(k))) for k in keys)])
    out += _table(["#", "", *keys], rows, raw=True)
    return out


def _predicted_measured_pairs(report: Mapping[str, Any]) -> list[tuple[float, float]]:
    """(predicted loss, measured drop) of every plan measured for real: from search lists, else the front."""
    search = report.get("search") if isinstance(report.get("search"), Mapping) else {}
    pairs: list[tuple[float, float]] = []
    for key in sorted(search):
        items = search[key] if isinstance(search[key], list) else []
        for item in items:
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
            if isinstance(item, Mapping):
                pred, meas = _num(item.get("predicted_loss")), _num(item.get("measured_drop"))
                if pred is not None and meas is not None:
                    pairs.append((pred, meas))
    return pairs


def _predicted_vs_measured(report: Mapping[str, Any], search: Mapping[str, Any]) -> str:
    pairs = _predicted_measured_pairs(report)
    if not pairs:
        return ""
    xs, ys = tuple(p for p, _ in pairs), tuple(m for _, m in pairs)
    rho = spearman(xs, ys)
    rho_text = f"Spearman ρ = {rho:.2f}" if rho is not None else "Spearman ρ undefined"
    chosen = (_num(search.get("predicted_loss")), _num(search.get("measured_drop")))
    highlight = chosen if chosen[0] is not None and chosen[1] is not None else None
    metric = report.get("metric") if isinstance(report.get("metric"), Mapping) else {}
    max_drop = _num(metric.get("max_drop")) if _num(metric.get("max_drop")) is not None else _num(search.get("max_drop"))
    chart = Chart(f"Predicted vs measured ({rho_text}, n = {len(pairs)})", "predicted loss (KL or MSE vs fp32 outputs)",
                  f"measured drop ({metric.get('name') or 'metric'}, fp32 − quantized)",
                  (Series("plans measured", xs, ys, "#1f77b4"),), highlight,  # type: ignore[arg-type]
                  hlines=((max_drop, f"max_drop {_fmt(max_drop)}"),) if max_drop is not None else (),
                  note="A good predictor ranks plans as they measure: ρ near 1." if rho is not None else
                  "ρ needs at least 3 measured plans with different values.")
    return _svg_chart(chart)


def _search(report: Mapping[str, Any]) -> str:
    search = report.get("search")
    if not isinstance(search, Mapping) or not search:
        return ""
    out = "<h2>Search: predicted vs measured</h2>"
    scalars = [(k, search[k]) for k in sorted(search) if not isinstance(search[k], (Mapping, list))]
    if scalars:
        out += _table(["key", "value"], [(k, _fmt(v)) for k, v in scalars])
    if not isinstance(report.get("pareto_front"), list):  # else the Pareto section shows it
        out += _predicted_vs_measured(report, search)
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
    out += _svg_bars("Time per phase", [k for k, _ in items], [v for _, v in items], None, "seconds")
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
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">mode {_e(mode)} · onnxq {_e(report.get("onnxq_version", "?"))} · '
        f'{_e(report.get("format", ""))}</p>',
        *sections,
        f"<footer>Generated by onnxq {_e(report.get('onnxq_version', '?'))}.</footer>",
        "</body></html>\n",
    ])
