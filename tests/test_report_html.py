"""The HTML report: self-contained, escaped, deterministic, renders in a headless browser."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from onnxq.report_html import precision_colour, render_html

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "models" / "digits_cnn.onnx"
CHROMIUM = Path("/usr/bin/chromium")


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def cli_html(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Quantize the bundled CNN through the CLI with --report-html (and --report)."""
    import json

    out = tmp_path_factory.mktemp("html")
    html_path, report_path = out / "report.html", out / "report.json"
    cmd = [sys.executable, "-m", "onnxq", "quantize", str(CNN), "-o", str(out / "q.onnx"), "--spec", "ort-cpu-x86",
           "--precision", "int8/uint8", "--report", str(report_path), "--report-html", str(html_path), "--quiet",
           "--no-cache"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return html_path, json.loads(report_path.read_text())


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
    if _have_matplotlib():
        assert "data:image/png;base64," in text
    else:
        assert "<svg" in text


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


def test_svg_fallback_without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxq.report_html as module

    monkeypatch.setattr(module, "_have_matplotlib", lambda: False)
    text = module.render_html(_synthetic_report())
    assert "<svg" in text and "data:image/png" not in text


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


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed")
def test_renders_in_headless_chromium(cli_html: tuple[Path, dict], tmp_path: Path) -> None:
    html_path, _ = cli_html
    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--window-size=1200,1600", f"--screenshot={shot}", html_path.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
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
