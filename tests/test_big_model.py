"""Models over protobuf's 2 GB limit: loading through the path-based checker, hashing, saving
with external data, and quantizing (int8 weights bring the output under 2 GB, saved inline).

The model is a chain of MatMul(8192×8192 float32, ≈268 MB each) + Relu layers whose weights live
in one external data file, written tensor by tensor so that generating it never holds more than
one weight in memory. Everything is deleted after the module.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_cli
from onnx import TensorProto, helper

from onnxq.model import is_large, load_model, model_sha256, save_model

pytestmark = pytest.mark.slow

DIM = 8192
LAYERS = 9  # 9 × 268 MB ≈ 2.42 GB, just over the limit
TWO_GB = 2**31


def _write_big_model(folder: Path, layers: int = LAYERS, dim: int = DIM, seed: int = 0) -> Path:
    """A MatMul/Relu chain with ``layers`` dim×dim weights in ``big.onnx.data`` beside ``big.onnx``."""
    rng = np.random.default_rng(seed)
    data_path = folder / "big.onnx.data"
    initializers: list[TensorProto] = []
    nodes = []
    previous = "x"
    with open(data_path, "wb") as handle:
        for index in range(layers):
            weight = (rng.standard_normal((dim, dim), dtype=np.float32) * np.float32(1.5 / np.sqrt(dim)))
            offset = handle.tell()
            handle.write(weight.tobytes())
            del weight
            tensor = TensorProto(name=f"w{index}", data_type=TensorProto.FLOAT, dims=[dim, dim])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(dim * dim * 4))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            initializers.append(tensor)
            nodes.append(helper.make_node("MatMul", [previous, f"w{index}"], [f"mm{index}"], name=f"layer{index}"))
            last = index == layers - 1
            output = "y" if last else f"act{index}"
            nodes.append(helper.make_node("Relu", [f"mm{index}"], [output], name=f"relu{index}"))
            previous = output
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxq-tests")
    model.ir_version = 8
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    calib = np.random.default_rng(seed + 1).standard_normal((8, dim), dtype=np.float32)
    np.savez(folder / "big.calib.npz", x=calib)
    return path


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("big")
    free = shutil.disk_usage(folder).free
    if free < 8 * 2**30:
        pytest.skip(f"needs 8 GB of free disk, {free / 2**30:.1f} GB available")
    path = _write_big_model(folder)
    assert (folder / "big.onnx.data").stat().st_size > TWO_GB
    yield path
    shutil.rmtree(folder, ignore_errors=True)


def test_load_hash_and_save_over_2gb(big_model: Path, tmp_path: Path) -> None:
    """load_model takes the path-based checker; save_model writes external data and leaves the proto intact."""
    loaded = load_model(big_model)
    assert is_large(loaded.proto)
    assert loaded.sha256 == model_sha256(loaded.proto)
    out = tmp_path / "copy.onnx"
    save_model(loaded.proto, out)
    assert model_sha256(loaded.proto) == loaded.sha256  # tensors were read back in
    assert all(t.data_location == TensorProto.DEFAULT for t in loaded.proto.graph.initializer)
    assert out.stat().st_size < 10 * 2**20 and (tmp_path / "copy.onnx.data").stat().st_size > TWO_GB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx", "copy.onnx.data"]
    first_sha = loaded.sha256
    del loaded
    gc.collect()
    onnx.checker.check_model(str(out))
    reloaded = load_model(out)
    assert reloaded.sha256 == first_sha
    del reloaded
    gc.collect()
    feed = {"x": np.random.default_rng(3).standard_normal((2, DIM), dtype=np.float32)}
    original = ort.InferenceSession(str(big_model), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    gc.collect()
    copied = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_array_equal(original, copied)
    for name in ("copy.onnx", "copy.onnx.data"):
        (tmp_path / name).unlink()


def test_quantize_over_2gb(big_model: Path, tmp_path: Path) -> None:
    """int8 weights: the output is under 2 GB, saved inline, valid and runs in onnxruntime."""
    out = tmp_path / "big.int8.onnx"
    result = run_cli("quantize", str(big_model), "-o", str(out), "--spec", "ort-cpu-x86", "--precision", "int8/uint8",
                     "--quiet", "--no-cache")
    assert result.code == 0, result.stderr
    assert out.stat().st_size < TWO_GB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.int8.onnx"]
    onnx.checker.check_model(str(out), full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": np.random.default_rng(5).standard_normal((2, DIM), dtype=np.float32)})[0]
    assert y.shape == (2, DIM) and np.isfinite(y).all()
    del session
    out.unlink()
    assert os.listdir(tmp_path) == []


def test_sensitivity_over_2gb(big_model: Path, tmp_path: Path) -> None:
    """The sensitivity analysis takes a model over 2 GB through its cut sessions, with one copy of
    the weights beside the loaded model (peak under 4 × the model + 1 GiB)."""
    out = tmp_path / "sens.json"
    result = run_cli("sensitivity", str(big_model), "--spec", "edge-int-only", "-o", str(out), "--random-plans", "3",
                     "--quiet")
    assert result.code == 0, result.stderr
    sens = json.loads(out.read_text())
    # edge-int-only runs Relu as an integer op of its own, so each Relu is a layer beside its MatMul
    op_types = sorted(layer["op_type"] for layer in sens["layers"])
    assert op_types == ["MatMul"] * LAYERS + ["Relu"] * LAYERS and sens["validation"]["plans"] == 3
    assert all(entry["delta"] >= 0 for layer in sens["layers"] for entry in layer["candidates"].values())
    size_mib = sum(p.stat().st_size for p in big_model.parent.glob("big.onnx*")) / 2**20
    assert sens["memory"]["peak_rss_mib"] < 4 * size_mib + 1024
    assert "fake-quant session" not in result.stderr  # every single-layer job ran on a cut session
    out.unlink()
