"""Sensitivity analysis on the bundled models, with real onnxruntime sessions (no mocks)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import analyze_on_the_fake_quant_session
from onnx import TensorProto, helper, numpy_helper

from onnxq.api import layer_ops_for
from onnxq.cli import main
from onnxq.errors import PlanError
from onnxq.graph import GraphView
from onnxq.model import load_model
from onnxq.precision import Candidate
from onnxq.sensitivity import SENSITIVITY_FORMAT, analyze, predicted_loss
from onnxq.sensitivity.analyze import EVALUATION_COUNTER
from onnxq.spec import load_spec

MODELS = Path(__file__).resolve().parent.parent / "models"
CNN = MODELS / "digits_cnn.onnx"
TRANSFORMER = MODELS / "digits_transformer.onnx"
W8, W4, A8 = Candidate.parse("int8/uint8"), Candidate.parse("int4/uint8"), Candidate.parse("uint8/uint8")


def _feeds(model: Path, samples: int, batch: int) -> list[dict[str, np.ndarray]]:
    with np.load(model.with_name(f"{model.stem}.calib.npz"), allow_pickle=False) as data:
        arrays = {k: data[k][:samples] for k in data.files}
    return [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, samples, batch)]


def _candidates(proto, spec, only=None, weightless=True) -> dict[str, list[Candidate]]:  # type: ignore[no-untyped-def]
    view = GraphView(proto, layer_ops_for(spec))
    out = {}
    for name, layer in view.layers.items():
        if only is not None and name not in only:
            continue
        if layer.weight is not None:
            out[name] = [W8, W4]
        elif only is None and weightless:
            out[name] = [A8]
    return out


@pytest.fixture(scope="module")
def spec():  # type: ignore[no-untyped-def]
    return load_spec("ort-cpu-x86")


@pytest.fixture(scope="module")
def cnn():  # type: ignore[no-untyped-def]
    return load_model(CNN).proto


@pytest.fixture(scope="module")
def cnn_run(cnn, spec, tmp_path_factory):  # type: ignore[no-untyped-def]
    cache = tmp_path_factory.mktemp("sens-cache")
    feeds = _feeds(CNN, 32, 16)
    kwargs = dict(candidates=_candidates(cnn, spec), random_plans=10, cache_dir=cache, seed=0)
    sens = analyze(cnn, feeds, spec, **kwargs)
    return sens, feeds, kwargs


def test_json_has_the_design_format(cnn_run) -> None:  # type: ignore[no-untyped-def]
    sens, _, _ = cnn_run
    sens = json.loads(json.dumps(sens))  # JSON-serialisable as is
    assert sens["format"] == SENSITIVITY_FORMAT
    assert len(sens["model_sha256"]) == 64 and sens["loss"] == "kl"
    assert isinstance(sens["evaluations"], int) and sens["evaluations"] > 0
    assert sens["seconds"] > 0
    for layer in sens["layers"]:
        assert {"name", "op_type", "params", "macs", "candidates"} <= layer.keys()
        for entry in layer["candidates"].values():
            assert np.isfinite(entry["delta"])
    for pair in sens["pairs"]:
        assert {"a", "b", "candidates", "cross"} <= pair.keys() and len(pair["candidates"]) == 2
    names = [layer["name"] for layer in sens["layers"]]
    assert len(names) == len(set(names))


def test_int4_is_more_sensitive_than_int8(cnn_run) -> None:  # type: ignore[no-untyped-def]
    sens, _, _ = cnn_run
    weighted = [layer for layer in sens["layers"] if "int4/uint8" in layer["candidates"]]
    worse = sum(layer["candidates"]["int4/uint8"]["delta"] > layer["candidates"]["int8/uint8"]["delta"]
                for layer in weighted)
    assert len(weighted) == 19 and worse >= 0.8 * len(weighted)


def test_predictions_rank_random_plans(cnn_run) -> None:  # type: ignore[no-untyped-def]
    sens, _, _ = cnn_run
    validation = sens["validation"]
    assert validation["plans"] == 10
    assert validation["spearman_with_pairs"] > 0.6
    assert validation["spearman_without_pairs"] is not None


def test_pairs_grow_linearly(cnn_run) -> None:  # type: ignore[no-untyped-def]
    sens, _, _ = cnn_run
    measured = [p for p in sens["pairs"] if p["scaling"] == "measured"]
    assert 0 < len(measured) <= 4 * len(sens["layers"])
    per_layer = max(len(layer["candidates"]) for layer in sens["layers"])
    # one entry per candidate combination of each measured pair
    assert len(sens["pairs"]) <= per_layer ** 2 * len(measured)
    # evaluations: O(layers × candidates + pairs + plans)
    assert sens["evaluations"] <= 4 * per_layer * len(sens["layers"]) + 2 * len(measured) + 11


def test_predicted_loss_of_single_layers(cnn_run) -> None:  # type: ignore[no-untyped-def]
    sens, _, _ = cnn_run
    layer = sens["layers"][0]
    assert predicted_loss(sens, {}) == 0.0
    assert predicted_loss(sens, {layer["name"]: "fp32/fp32"}) == 0.0
    assert predicted_loss(sens, {layer["name"]: W8}) == pytest.approx(layer["candidates"]["int8/uint8"]["delta"])
    # an Add (weightless) layer accepts the full candidate name and matches its effective one
    add = next(row for row in sens["layers"] if row["op_type"] == "Add")
    assert predicted_loss(sens, {add["name"]: "int8/uint8"}) == pytest.approx(add["candidates"]["uint8/uint8"]["delta"])
    with pytest.raises(PlanError):
        predicted_loss(sens, {layer["name"]: "int16/int16"})


def test_cross_terms_cover_every_candidate_combination(cnn_run) -> None:  # type: ignore[no-untyped-def]
    # the numbers are checked against real quantized models in test_sensitivity_correctness.py
    sens, _, _ = cnn_run
    deltas = {row["name"]: row["candidates"] for row in sens["layers"]}
    groups: dict[tuple[str, str], list[dict]] = {}
    for pair in sens["pairs"]:
        groups.setdefault((pair["a"], pair["b"]), []).append(pair)
    for (a, b), entries in groups.items():
        assert len(entries) == len(deltas[a]) * len(deltas[b])
        assert {tuple(p["candidates"]) for p in entries} == {(c, d) for c in deltas[a] for d in deltas[b]}
        (measured,) = [p for p in entries if p["scaling"] == "measured"]
        assert all(p["measured_at"] == measured["candidates"] for p in entries if p is not measured)


def test_cut_sessions_match_the_fake_quant_session(cnn, spec) -> None:  # type: ignore[no-untyped-def]
    feeds = _feeds(CNN, 16, 16)
    only = ["/blocks/blocks.0/dw/dw.0/Conv", "/blocks/blocks.0/pw/pw.0/Conv", "/blocks/blocks.0/Add"]
    kwargs = dict(candidates={n: [W4, A8] if "Add" not in n else [A8] for n in only}, seed=1)
    fast = analyze(cnn, feeds, spec, **kwargs)
    slow = analyze_on_the_fake_quant_session(cnn, feeds, spec, **kwargs)
    for a, b in zip(fast["layers"], slow["layers"], strict=True):
        for c, entry in a["candidates"].items():
            assert entry["delta"] == pytest.approx(b["candidates"][c]["delta"], rel=0.05, abs=1e-8)
    # the fallback session feeds weights as graph inputs, so onnxruntime runs other conv kernels
    # whose fp32 rounding moves a few activations across quantization steps (1.5e-7 of a 3e-6
    # term here): crosses agree to a small fraction of their Cauchy-Schwarz scale 2 sqrt(da db)
    deltas = {(row["name"], c): max(e["delta"], 0.0) for row in fast["layers"] for c, e in row["candidates"].items()}
    for a, b in zip(fast["pairs"], slow["pairs"], strict=True):
        ca, cb = a["candidates"]
        scale = 2 * np.sqrt(deltas[(a["a"], ca)] * deltas[(a["b"], cb)])
        assert a["cross"] == pytest.approx(b["cross"], rel=0.1, abs=max(2e-7, 0.05 * scale))


def test_sibling_pairs_run_in_one_cut_session_like_the_fake_quant_session(spec, caplog) -> None:  # type: ignore[no-untyped-def]
    # q and k project the same input: each one's cut session recomputes the other, so no chain
    # of their own sessions serves the pair; one session for both must give the same cross term
    # as the whole-model fake-quant session, without falling back to it
    model = load_model(TRANSFORMER).proto
    feeds = _feeds(TRANSFORMER, 16, 16)
    pair = ["/layers.0/attn/q/MatMul", "/layers.0/attn/k/MatMul"]
    kwargs = dict(candidates={n: [W8] for n in pair}, seed=0, loss="mse", cache_dir=None)
    with caplog.at_level(logging.WARNING, logger="onnxq.sensitivity.engine"):
        fast = analyze(model, feeds, spec, **kwargs)
    assert not [r for r in caplog.records if "whole-model" in r.getMessage()]
    slow = analyze_on_the_fake_quant_session(model, feeds, spec, **kwargs)
    (measured,) = [p for p in fast["pairs"] if p["scaling"] == "measured"]
    (reference,) = [p for p in slow["pairs"] if p["scaling"] == "measured"]
    assert (measured["a"], measured["b"]) == (reference["a"], reference["b"])
    assert abs(reference.get("raw_cross", reference["cross"])) > 1e-9
    assert measured.get("raw_cross", measured["cross"]) == pytest.approx(
        reference.get("raw_cross", reference["cross"]), rel=0.05, abs=1e-9)


def test_pair_with_a_float_weightless_layer(cnn, spec) -> None:  # type: ignore[no-untyped-def]
    # the Add at fp16 perturbs nothing: its cut session is empty and must not be built
    candidates = {"/blocks/blocks.0/pw/pw.0/Conv": [W4], "/blocks/blocks.0/Add": [Candidate.parse("fp16/fp16")]}
    sens = analyze(cnn, _feeds(CNN, 16, 16), spec, candidates, seed=0)
    assert sens["pairs"] and all(np.isfinite(p["cross"]) for p in sens["pairs"])


def test_cache_hit_returns_identical_json_without_evaluating(cnn_run, cnn, spec) -> None:  # type: ignore[no-untyped-def]
    sens, feeds, kwargs = cnn_run
    before = EVALUATION_COUNTER.total
    again = analyze(cnn, feeds, spec, **kwargs)
    assert EVALUATION_COUNTER.total == before
    assert json.dumps(again, sort_keys=True) == json.dumps(json.loads(json.dumps(sens)), sort_keys=True)


@pytest.mark.slow  # worker processes each import onnxruntime: ~7 s
def test_workers_give_the_same_numbers(cnn, spec) -> None:  # type: ignore[no-untyped-def]
    feeds = _feeds(CNN, 16, 16)
    only = ["/stem/stem.0/Conv", "/blocks/blocks.0/dw/dw.0/Conv", "/blocks/blocks.0/pw/pw.0/Conv"]
    # a budget of a few samples: the feeds run in chunks, which every worker must cut the same way
    kwargs = dict(candidates=_candidates(cnn, spec, only), random_plans=2, seed=3, memory_budget_mb=0.4)
    serial = analyze(cnn, feeds, spec, workers=0, **kwargs)
    parallel = analyze(cnn, feeds, spec, workers=2, **kwargs)
    assert serial["memory"]["chunks"] > 2
    for key in ("layers", "pairs", "validation", "evaluations"):
        assert serial[key] == parallel[key]
    # the workers' own chunks, cache and peak are reported, not the idle parent's (0 chunks)
    assert parallel["memory"]["chunks"] == serial["memory"]["chunks"]
    assert parallel["memory"]["cached_mib"] == serial["memory"]["cached_mib"] > 0
    assert "worker_peak_rss_mib" not in serial["memory"]
    assert parallel["memory"]["worker_peak_rss_mib"] > 100  # a worker holds onnxruntime and the model


def test_hutchinson_orders_bit_widths(cnn, spec) -> None:  # type: ignore[no-untyped-def]
    feeds = _feeds(CNN, 16, 16)
    only = ["/stem/stem.0/Conv", "/blocks/blocks.2/pw/pw.0/Conv", "/fc2/Gemm"]
    sens = analyze(cnn, feeds, spec, _candidates(cnn, spec, only), method="hutchinson", pairs=False)
    assert sens["method"] == "hutchinson"
    for layer in sens["layers"]:
        c = layer["candidates"]
        assert layer["hessian_trace"] > 0
        assert c["int4/uint8"]["weight"] > c["int8/uint8"]["weight"] > 0


def test_unknown_method_is_a_usage_error(cnn, spec) -> None:  # type: ignore[no-untyped-def]
    from onnxq.errors import UsageError

    with pytest.raises(UsageError):
        analyze(cnn, _feeds(CNN, 16, 16), spec, method="newton")
    with pytest.raises(UsageError):
        analyze(cnn, _feeds(CNN, 16, 16), spec, executor="dask")


def test_ray_missing_is_a_usage_error(cnn, spec) -> None:  # type: ignore[no-untyped-def]
    from onnxq.errors import UsageError

    try:
        import ray  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match="ray"):
            analyze(cnn, _feeds(CNN, 16, 16), spec, executor="ray")
    else:
        pytest.skip("ray is installed")


@pytest.mark.skipif(not TRANSFORMER.exists(), reason="digits_transformer.onnx not built")
def test_transformer_int4_more_sensitive(spec) -> None:  # type: ignore[no-untyped-def]
    model = load_model(TRANSFORMER).proto
    sens = analyze(model, _feeds(TRANSFORMER, 16, 16), spec, _candidates(model, spec, weightless=False),
                   pairs=False)
    assert sens["loss"] == "kl"
    weighted = [layer for layer in sens["layers"] if "int4/uint8" in layer["candidates"]]
    worse = sum(layer["candidates"]["int4/uint8"]["delta"] > layer["candidates"]["int8/uint8"]["delta"]
                for layer in weighted)
    assert weighted and worse >= 0.8 * len(weighted)


@pytest.mark.slow  # starts a ray cluster (~30 s); test_workers_give_the_same_numbers covers parallel executors
def test_ray_executor_matches_local(cnn, spec) -> None:  # type: ignore[no-untyped-def]
    ray = pytest.importorskip("ray")
    feeds = _feeds(CNN, 16, 16)
    kwargs = dict(candidates=_candidates(cnn, spec, ["/fc1/Gemm", "/fc2/Gemm"]), pairs=True, random_plans=2,
                  memory_budget_mb=0.005)
    local = analyze(cnn, feeds, spec, **kwargs)
    assert local["memory"]["chunks"] > 2
    ray.init(num_cpus=2, log_to_driver=False, ignore_reinit_error=True)  # a local cluster of two CPUs
    try:
        remote = analyze(cnn, feeds, spec, executor="ray", workers=3, **kwargs)  # capped at two actors
    finally:
        ray.shutdown()
    for key in ("layers", "pairs", "validation", "evaluations"):
        assert local[key] == remote[key]
    assert remote["memory"]["chunks"] == local["memory"]["chunks"]
    assert remote["memory"]["worker_peak_rss_mib"] > 100


def test_cli_writes_the_file(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ONNXQ_CACHE_DIR", str(tmp_path / "cache"))
    calib = tmp_path / "small.npz"
    with np.load(CNN.with_name("digits_cnn.calib.npz"), allow_pickle=False) as data:
        np.savez(calib, input=data["input"][:8])
    out = tmp_path / "sens.json"
    code = main(["sensitivity", str(CNN), "--spec", "edge-int-only", "--calib", str(calib), "-o", str(out),
                 "--random-plans", "0"])
    assert code == 0
    sens = json.loads(out.read_text())
    assert sens["format"] == SENSITIVITY_FORMAT and sens["layers"]
    printed = capsys.readouterr().out
    assert "candidate" in printed and "delta" in printed and str(out) in printed


def test_cli_bad_model_path_exits_2(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["sensitivity", str(tmp_path / "missing.onnx"), "--spec", "ort-cpu-x86", "-o", str(tmp_path / "s.json")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxq: error:") and len(err.splitlines()) == 1


def test_a_long_analysis_logs_its_progress_off_a_terminal(cnn_path: Path, tmp_path: Path) -> None:
    """Off a terminal (a CI log, a nohup file) the CLI logs count, rate and time left instead of a
    bar. ``ONNXQ_PROGRESS_SECONDS=0`` logs at every update."""
    env = {**os.environ, "ONNXQ_PROGRESS_SECONDS": "0", "ONNXQ_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "onnxq", "sensitivity", str(cnn_path), "--spec", "ort-cpu-x86",
                           "--random-plans", "0", "-o", str(tmp_path / "s.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = re.findall(r"sensitivity \(\d+ evaluations × \d+ chunks?\): (\d+)/(\d+) runs, [\d.]+ (?:run/s|s/run), "
                       r"about [\w ]+ left", proc.stderr)
    assert len(lines) > 10
    done = [int(d) for d, _ in lines]
    assert done == sorted(done) and done[-1] <= int(lines[-1][1]) and len({t for _, t in lines}) == 1


def test_a_quantized_graph_output_runs_on_the_cut_path_like_the_fake_quant_session(caplog) -> None:  # type: ignore[no-untyped-def]
    # on an integer-only target the graph output itself is quantized: nothing downstream reads
    # it, so no cut session serves it; the final value is fake-quantized instead, and the terms
    # must equal those of the whole-model fake-quant session without falling back to it
    rng = np.random.default_rng(0)
    nodes, inits, previous = [], [], "x"
    for i in range(3):
        inits.append(numpy_helper.from_array((rng.standard_normal((32, 32)) / 5).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"mm{i}"], name=f"layer{i}"))
        previous = "y" if i == 2 else f"act{i}"
        nodes.append(helper.make_node("Relu", [f"mm{i}"], [previous], name=f"relu{i}"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": rng.standard_normal((16, 32)).astype(np.float32)}]
    spec = load_spec("edge-int-only")
    kwargs = dict(seed=0, random_plans=0, cache_dir=None)
    with caplog.at_level(logging.WARNING, logger="onnxq.sensitivity.engine"):
        fast = analyze(model, feeds, spec, **kwargs)
    assert not [r for r in caplog.records if "fake-quant session" in r.getMessage()]
    slow = analyze_on_the_fake_quant_session(model, feeds, spec, **kwargs)
    terms = {(row["name"], c): e for row in slow["layers"] for c, e in row["candidates"].items()}
    assert any("y" in e.get("activation_terms", {}) for e in terms.values())
    for row in fast["layers"]:
        for c, entry in row["candidates"].items():
            assert entry["delta"] == pytest.approx(terms[(row["name"], c)]["delta"], rel=1e-3, abs=1e-10)
