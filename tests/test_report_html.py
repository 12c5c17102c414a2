"""The HTML report: self-contained, escaped, deterministic, renders in a headless browser."""

from __future__ import annotations

import json
import re
import resource
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest
from conftest import QuantizedModel

from onnxq.report_html import precision_colour, render_html

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "models" / "digits_cnn.onnx"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def cli_html(cnn_int8_cli: QuantizedModel) -> tuple[Path, dict]:
    """The bundled CNN quantized through the CLI with --report-html (and --report), once per session."""
    return cnn_int8_cli.html, json.loads(cnn_int8_cli.report.read_text())


def _synthetic_report() -> dict:
    return {
        "format": "onnxq-report/1", "onnxq_version": "0.0", "spec": "ort-cpu-x86", "mode": "max-drop",
        "plan": {"format": "onnxq-plan/1", "spec": "ort-cpu-x86",
                 "layers": {"conv<1>": "int8/uint8", "fc&2": "fp32", "mm": "int4/uint8"}},
        "layers": {"total": 3, "quantized": 2, "fp32": 1, "by_candidate": {"int8/uint8": 1, "int4/uint8": 1}},
        "metric": {"name": "agreement", "fp32": 1.0, "quantized": 0.98, "drop": 0.02, "max_drop": 0.01},
        "sizes": {"fp32_bytes": 1000, "quantized_bytes": 400},
        "sensitivity": [{"layer": "conv<1>", "candidate": "int8/uint8", "delta": 0.1},
                        {"layer": "mm", "candidate": "int4/uint8", "delta": 0.3}],
        "pareto_front": [{"size_bytes": 400, "predicted_loss": 0.02, "measured_drop": 0.02, "chosen": True},
                         {"size_bytes": 700, "predicted_loss": 0.01},
                         {"latency": 3.0}],
        "search": {"evaluations": 3, "shortfall": "<script>alert(1)</script>",
                   "trials": [{"predicted_loss": 0.01, "measured_drop": 0.015}, {"predicted_loss": 0.02, "measured_drop": 0.02}]},
        "time_per_phase": {"calibrate": 0.5, "search": 1.5},
        "seconds": 2.0,
    }


def test_cli_html_is_self_contained(cli_html: tuple[Path, dict]) -> None:
    html_path, report = cli_html
    text = html_path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.IGNORECASE)
    assert "<script" not in text.lower()
    for layer in report["plan"]["layers"]:
        assert layer in text
    assert "ort-cpu-x86" in text
    assert "<svg" in text and "data:image" not in text


def test_render_is_deterministic_and_escaped() -> None:
    report = _synthetic_report()
    first, second = render_html(report), render_html(report)
    assert first == second
    assert "<script>alert(1)</script>" not in first
    assert "&lt;script&gt;" in first
    assert "conv&lt;1&gt;" in first and "fc&amp;2" in first
    assert "Pareto front" in first and "Sensitivity ranking" in first and "Time per phase" in first
    assert "exceeds max_drop" in first


def test_tolerates_minimal_and_odd_reports() -> None:
    text = render_html({})
    assert "<html" in text
    odd = {"plan": {"layers": [{"name": "a", "candidate": "int8/uint8"}]}, "pareto_front": [{"chosen": True}, "x"],
           "search": {"a": None}, "time_per_phase": {"x": "slow"}, "sensitivity": "nonsense"}
    assert "a" in render_html(odd)


def test_precision_colours_are_fixed() -> None:
    assert precision_colour("fp32") != precision_colour("int8/uint8") != precision_colour("int4/uint8")
    assert precision_colour("int8/uint8") == precision_colour("uint8/uint8")


def _png_is_not_blank(path: Path) -> bool:
    """Decode an 8-bit RGB(A) PNG with zlib only and check it has more than one colour."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    assert header is not None
    raw = zlib.decompress(idat)
    # filter bytes aside, more than a handful of distinct byte values means real content
    return len(set(raw[: 1 << 20])) > 8


def _front_report() -> dict:
    """A max-drop search report as passes/search.py writes it, with latency measured per plan."""
    report = _synthetic_report()
    report["pareto_front"] = [
        {"size_bytes": 60000, "latency_seconds": 6e-5, "predicted_loss": 2e-4, "measured_drop": 0.03,
         "measured_latency_ratio": 0.55},
        {"size_bytes": 90000, "latency_seconds": 7e-5, "predicted_loss": 4e-5, "measured_drop": 0.008,
         "measured_latency_ratio": 0.62},
        {"size_bytes": 150000, "latency_seconds": 8e-5, "predicted_loss": 1e-5, "measured_drop": 0.002,
         "measured_latency_ratio": 0.8},
        {"size_bytes": 200000, "latency_seconds": 9e-5, "predicted_loss": 2e-6},
        {"size_bytes": 300000, "latency_seconds": 1e-4, "predicted_loss": 0.0, "measured_drop": 0.0,
         "measured_latency_ratio": 1.0},
    ]
    report["search"] = {"chosen_index": 1, "mode": "max-drop", "max_drop": 0.01, "predicted_loss": 4e-5,
                        "measured_drop": 0.008}
    report["cost"] = {"fp32": {"size_bytes": 300000, "latency_seconds": 1e-4, "bits": 32.0}}
    report["latency"] = {"batch": 1, "fp32_ms": 0.15, "quantized_ms": 0.093, "ratio": 0.62}
    return report


def _charts(text: str) -> dict[str, ET.Element]:
    """Each inline SVG chart of a page, by its title."""
    charts = {}
    for svg in re.findall(r'<svg class="chart-svg".*?</svg>', text, flags=re.S):
        root = ET.fromstring(svg)
        title = next(t.text for t in root.iter("text") if t.get("class") == "chart-title")
        charts[title] = root
    return charts


def _texts(chart: ET.Element, cls: str) -> list[str]:
    return [t.text or "" for t in chart.iter("text") if cls in (t.get("class") or "").split()]


def _points(chart: ET.Element, cls: str = "point") -> list[tuple[float, float]]:
    return [(float(c.get("cx")), float(c.get("cy"))) for c in chart.iter("circle") if c.get("class") == cls]


def test_pareto_charts_have_labelled_axes_and_one_quantity_each() -> None:
    charts = _charts(render_html(_front_report()))
    expected = {"Predicted loss vs size": ("size (% of fp32)", "predicted loss (KL or MSE vs fp32 outputs)", 5),
                "Predicted loss vs latency": ("measured latency (× fp32, onnxruntime on this machine)",
                                              "predicted loss (KL or MSE vs fp32 outputs)", 4),
                "Measured drop vs size": ("size (% of fp32)", "measured drop (agreement, fp32 − quantized)", 4),
                "Measured drop vs latency": ("measured latency (× fp32, onnxruntime on this machine)",
                                             "measured drop (agreement, fp32 − quantized)", 4)}
    assert set(expected) <= set(charts)
    for title, (xlabel, ylabel, count) in expected.items():
        chart = charts[title]
        assert _texts(chart, "x-label") == [xlabel] and _texts(chart, "y-label") == [ylabel], title
        assert len(_texts(chart, "tick")) >= 6, title
        points = _points(chart)
        assert len(points) == count, title
        # the quantity fills the plot instead of sitting on its top and bottom edges
        heights = [y for _, y in points]
        assert max(heights) - min(heights) > 150, title
    for title in ("Measured drop vs size", "Measured drop vs latency"):
        assert "max_drop 0.01" in _texts(charts[title], "ref-label")


def test_chosen_plan_is_marked_on_every_chart() -> None:
    charts = _charts(render_html(_front_report()))
    for title in ("Predicted loss vs size", "Measured drop vs size", "Measured drop vs latency"):
        chosen = _points(charts[title], "chosen")
        assert len(chosen) == 1, title
        by_x = sorted(_points(charts[title]))
        assert chosen[0] == by_x[1], title  # plan 1 is the second smallest and second fastest
        assert _texts(charts[title], "chosen-label") == ["chosen"]


@pytest.mark.parametrize(("drops", "expected"), [((0.03, 0.008, 0.002, 0.0), "Spearman ρ = 1.00, n = 4"),
                                                  ((0.0, 0.002, 0.008, 0.03), "Spearman ρ = -1.00, n = 4"),
                                                  ((0.0, 0.0, 0.0, 0.0), "Spearman ρ undefined, n = 4")])
def test_predicted_vs_measured_scatter_shows_spearman(drops: tuple[float, ...], expected: str) -> None:
    report = _front_report()
    measured = [p for p in report["pareto_front"] if "measured_drop" in p]
    for point, drop in zip(measured, drops, strict=True):
        point["measured_drop"] = drop
    titles = [t for t in _charts(render_html(report)) if t.startswith("Predicted vs measured")]
    assert titles == [f"Predicted vs measured ({expected})"]


def test_latency_axis_falls_back_to_the_cost_model_estimate() -> None:
    report = _front_report()
    for point in report["pareto_front"]:
        point.pop("measured_latency_ratio", None)
    text = render_html(report)
    chart = _charts(text)["Predicted loss vs latency"]
    assert _texts(chart, "x-label") == ["estimated latency (× fp32, spec cost model)"]
    assert "measured for the chosen plan on this machine: 0.62× fp32" in text
    assert [x for x, _ in sorted(_points(chart))] == sorted(x for x, _ in _points(chart))
    assert "0.15 ms → 0.093 ms (0.62× fp32)" in text  # the summary shows measured latency


def _lift_address_space_limit() -> None:
    """Chromium reserves terabytes of address space and crashes under ``ulimit -v``; lift it where allowed."""
    try:
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def _chromium(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           *args, page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                          preexec_fn=_lift_address_space_limit)
    if proc.returncode != 0 and resource.getrlimit(resource.RLIMIT_AS)[1] != resource.RLIM_INFINITY:
        pytest.skip(f"chromium exited {proc.returncode} under an address-space limit (ulimit -v) it cannot lift")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow  # two chromium launches: ~3 s of CPU, 8 s wall under load
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (apt-get install -y chromium)")
def test_renders_in_headless_chromium(tmp_path: Path) -> None:
    """The page as a browser renders it: axis labels in the DOM and a screenshot that is not blank."""
    page = tmp_path / "report.html"
    page.write_text(render_html(_front_report()), encoding="utf-8")
    dom = _chromium(page, tmp_path, "--dump-dom").stdout
    for label in ("size (% of fp32)", "measured latency (× fp32, onnxruntime on this machine)",
                  "predicted loss (KL or MSE vs fp32 outputs)", "measured drop (agreement, fp32 − quantized)",
                  "Predicted vs measured (Spearman ρ = 1.00, n = 4)", ">chosen<"):
        assert label in dom, label
    shot = tmp_path / "shot.png"
    _chromium(page, tmp_path, "--window-size=1100,1800", f"--screenshot={shot}")
    assert shot.exists(), "chromium wrote no screenshot"
    assert _png_is_not_blank(shot)
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_search_report_shape() -> None:
    """The shape the search writes: chosen by ``search["chosen_index"]``, nested plan summaries, a cost block."""
    report = _synthetic_report()
    report["pareto_front"] = [
        {"size_bytes": 73485, "latency_seconds": 3.9e-05, "bits": 7.0, "predicted_loss": 6.5e-4, "measured_drop": 0.0,
         "plan": {"int4/uint8": 4, "int8/uint8": 15}},
        {"size_bytes": 304384, "latency_seconds": 7.7e-05, "bits": 32.0, "predicted_loss": 0.0, "plan": {}},
    ]
    report["search"] = {"chosen_index": 0, "evaluations": 3, "predicted_loss": 6.5e-4, "measured_drop": 0.0}
    report["cost"] = {"chosen": {"size_bytes": 73485, "bits": 7.0}, "fp32": {"size_bytes": 304384, "bits": 32.0},
                      "placeholder_cost_model": False}
    text = render_html(report)
    assert "★ chosen" in text
    assert "int4/uint8: 4, int8/uint8: 15" in text
    assert "Estimated cost" in text and "placeholder_cost_model" in text
    assert "latency_seconds" in text
