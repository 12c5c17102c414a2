"""Uniform quantization end to end on the bundled models, through onnxruntime."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_cli

import onnxq.api
from onnxq.runtime import make_session, optimized_op_types

FUSED = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}


def _accuracy(model: onnx.ModelProto | str, eval_path: Path) -> float:
    data = np.load(eval_path, allow_pickle=False)
    name = next(k for k in data.files if k != "labels")
    session = make_session(onnx.load(str(model)) if isinstance(model, str) else model)
    logits = session.run(None, {name: data[name]})[0]
    return float(np.mean(np.argmax(logits, axis=-1) == data["labels"]))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("stem", ["digits_cnn", "digits_transformer"])
def test_int8_cli_end_to_end(stem: str, tmp_path: Path) -> None:
    model = Path(__file__).resolve().parent.parent / "models" / f"{stem}.onnx"
    if not model.exists():
        pytest.skip(f"{stem} not bundled")
    before = _sha(model)
    out = tmp_path / "q.onnx"
    report = tmp_path / "report.json"
    result = run_cli("quantize", str(model), "-o", str(out), "--spec", "ort-cpu-x86", "--precision", "int8/uint8",
                     "--report", str(report), "--quiet")
    assert result.code == 0, result.stderr
    assert _sha(model) == before  # the input is never modified
    quantized = onnx.load(str(out))
    onnx.checker.check_model(quantized, full_check=True)
    fp32 = onnx.load(str(model))
    assert [i.name for i in quantized.graph.input] == [i.name for i in fp32.graph.input if i.name not in {t.name for t in fp32.graph.initializer}]
    assert [o.name for o in quantized.graph.output] == [o.name for o in fp32.graph.output]
    ops = Counter(optimized_op_types(quantized, str(tmp_path / "opt.onnx")))
    assert FUSED & set(ops), f"no fused integer kernels in {ops}"
    eval_path = model.with_name(f"{stem}.eval.npz")
    drop = _accuracy(fp32, eval_path) - _accuracy(quantized, eval_path)
    assert drop <= 0.01
    data = json.loads(report.read_text())
    assert data["plan"]["format"] == "onnxq-plan/1"
    assert data["layers"]["quantized"] > 0
    # int8 layer weights take a quarter of their fp32 bytes; constants that are not layer weights
    # (attention biases, LayerNorm) may stay fp32, so compare against what the layers alone save
    from onnxq.api import layer_ops_for
    from onnxq.graph import GraphView
    from onnxq.model import load_model
    from onnxq.spec import load_spec

    view = GraphView(load_model(str(model)).proto, layer_ops_for(load_spec("ort-cpu-x86")))
    layer_weight_bytes = 4 * sum(layer.weight.elements for layer in view.layers.values() if layer.weight is not None)
    # (scales, zero points and Q/DQ nodes cost something: at least half of the 75% must remain)
    assert data["sizes"]["quantized_bytes"] <= data["sizes"]["fp32_bytes"] - 0.5 * layer_weight_bytes
    meta = {p.key: p.value for p in quantized.metadata_props}
    assert meta["onnxq.spec"] == "ort-cpu-x86" and json.loads(meta["onnxq.plan"])["layers"]


@pytest.mark.parametrize("precision", ["int8/int8", "int16/int16", "fp16/fp16"])
def test_other_uniform_precisions(cnn_path: Path, precision: str) -> None:
    result = onnxq.api.quantize(str(cnn_path), str(cnn_path.with_name("digits_cnn.calib.npz")), "ort-cpu-x86",
                                precision=precision)
    onnx.checker.check_model(result.model, full_check=True)
    accuracy = _accuracy(result.model, cnn_path.with_name("digits_cnn.eval.npz"))
    assert accuracy >= _accuracy(str(cnn_path), cnn_path.with_name("digits_cnn.eval.npz")) - 0.02
    assert result.report["layers"]["quantized"] > 0
    types = {init.data_type for init in result.model.graph.initializer}
    expected = {"int8/int8": onnx.TensorProto.INT8, "int16/int16": onnx.TensorProto.INT16, "fp16/fp16": onnx.TensorProto.FLOAT16}
    assert expected[precision] in types


def test_api_accepts_proto_and_iterable(cnn_path: Path) -> None:
    proto = onnx.load(str(cnn_path))
    snapshot = proto.SerializeToString()
    data = np.load(cnn_path.with_name("digits_cnn.calib.npz"), allow_pickle=False)
    feeds = [{"input": data["input"][i:i + 8]} for i in range(0, 64, 8)]
    result = onnxq.api.quantize(proto, feeds, "ort-cpu-x86", precision="int8/uint8")
    assert proto.SerializeToString() == snapshot
    assert result.report["metric"]["drop"] <= 0.05
    assert any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)


@pytest.mark.slow  # test_robustness.py::test_determinism[minmax] runs the same command twice and compares bytes
def test_deterministic_output(cnn_path: Path, tmp_path: Path) -> None:
    outs = []
    for i in range(2):
        out = tmp_path / f"q{i}.onnx"
        assert run_cli("quantize", str(cnn_path), "-o", str(out), "--spec", "ort-cpu-x86", "--precision", "int8/uint8",
                       "--quiet", "--no-cache").code == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("method", ["mse", *(pytest.param(m, marks=pytest.mark.slow) for m in ("percentile", "entropy", "lapq"))])
def test_calibration_methods_give_valid_models(cnn_path: Path, method: str) -> None:
    from onnxq.options import QuantizeOptions

    options = QuantizeOptions(precision="int4/uint8", calibration=method, cache_dir="")
    result = onnxq.api.quantize(str(cnn_path), str(cnn_path.with_name("digits_cnn.calib.npz")), "ort-cpu-x86", options=options)
    onnx.checker.check_model(result.model, full_check=True)
    accuracy = _accuracy(result.model, cnn_path.with_name("digits_cnn.eval.npz"))
    assert accuracy >= _accuracy(str(cnn_path), cnn_path.with_name("digits_cnn.eval.npz")) - 0.03
    assert result.report["calibration"]["method"] == method


@pytest.mark.parametrize("stem", ["digits_cnn", pytest.param("digits_resnet", marks=pytest.mark.slow),
                                  pytest.param("digits_transformer", marks=pytest.mark.slow)])
def test_integer_only_target_quantizes_the_logits_too(stem: str) -> None:
    # an integer-only target has no float fallback: the last layer's output is quantized as well
    # and a final DequantizeLinear hands out the float logits
    from onnxq.spec import load_spec
    from onnxq.validate import validate_model

    models = Path(__file__).resolve().parent.parent / "models"
    if not (models / f"{stem}.onnx").exists():
        pytest.skip(f"{stem} not bundled")
    result = onnxq.api.quantize(str(models / f"{stem}.onnx"), str(models / f"{stem}.calib.npz"), "edge-int-only",
                                precision="int8/int8")
    assert validate_model(result.model, load_spec("edge-int-only")) == []
    producer = {o: n for n in result.model.graph.node for o in n.output}
    assert producer[result.model.graph.output[0].name].op_type == "DequantizeLinear"
    # the target is not onnxruntime's CPU (whose u8s8 kernels saturate on int8 x int8 without
    # VNNI): exact Q/DQ simulates the integer accelerator
    data = np.load(models / f"{stem}.eval.npz", allow_pickle=False)
    name = next(k for k in data.files if k != "labels")
    logits = {label: make_session(model, exact_qdq=True).run(None, {name: data[name]})[0]
              for label, model in (("fp32", onnx.load(str(models / f"{stem}.onnx"))), ("int8", result.model))}
    accuracy = {label: float(np.mean(np.argmax(v, axis=-1) == data["labels"])) for label, v in logits.items()}
    assert accuracy["fp32"] - accuracy["int8"] <= 0.01
