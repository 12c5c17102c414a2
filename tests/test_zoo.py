"""The onnx wheel's "light" model-zoo graphs (opset 9) quantize to valid models that run.

The light models are structure-only: every weight is a ``ConstantOfShape`` node fed by a shape
initializer. Preparing the test input replaces each such node by an initializer of that shape
holding seeded random values (He-style scale for weights, positive values for batch-norm
scales and variances). That is test input, not onnxq behaviour. Calibration: a few seeded random
feeds of the input shape written to an ``.npz``.
"""

from __future__ import annotations

import importlib.resources
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_cli
from onnx import numpy_helper

LIGHT = Path(str(importlib.resources.files("onnx"))) / "backend" / "test" / "data" / "light"
#: The default run quantizes one graph (the quickest, ~3 s of CPU); the rest run with ``-m slow``: they exercise
#: the same CLI path on other architectures, some with hundreds of MB of weights.
FAST = {"light_squeezenet"}
ALL = sorted(p.stem for p in LIGHT.glob("light_*.onnx")) if LIGHT.is_dir() else []


def _random_weight(shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator, positive: bool) -> np.ndarray:
    if positive:  # batch-norm scale and variance
        return rng.uniform(0.5, 1.5, shape).astype(dtype)
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:])) or 1
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)
    return (rng.standard_normal(shape) * 0.01).astype(dtype)


def materialize(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Replace ``ConstantOfShape(shape initializer)`` weight generators by seeded random initializers."""
    rng = np.random.default_rng(seed)
    positive = {n.input[i] for n in model.graph.node if n.op_type == "BatchNormalization" for i in (1, 4) if len(n.input) > i}
    initializers = {init.name: init for init in model.graph.initializer}
    keep_nodes = []
    used_shapes: set[str] = set()
    new_inits = []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in initializers:
            shape = tuple(int(d) for d in numpy_helper.to_array(initializers[node.input[0]]))
            dtype = np.dtype(np.float32)
            for attr in node.attribute:
                if attr.name == "value":
                    dtype = numpy_helper.to_array(attr.t).dtype
            new_inits.append(numpy_helper.from_array(_random_weight(shape, dtype, rng, node.output[0] in positive), node.output[0]))
            used_shapes.add(node.input[0])
            continue
        keep_nodes.append(node)
    still_used = {name for node in keep_nodes for name in node.input}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend(keep_nodes)
    remaining = [init for init in model.graph.initializer if init.name not in used_shapes or init.name in still_used]
    del result.graph.initializer[:]
    result.graph.initializer.extend(remaining + new_inits)
    outputs = {init.name for init in new_inits}
    inputs = [value for value in result.graph.input if value.name not in used_shapes - still_used or value.name in outputs]
    del result.graph.input[:]
    result.graph.input.extend(inputs)
    result.ir_version = max(result.ir_version, 7)  # IR ≥ 4: initializers need not be graph inputs
    onnx.checker.check_model(result)
    return result


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in ALL])
def test_light_zoo_model_quantizes(name: str, tmp_path: Path) -> None:
    model = materialize(onnx.load(str(LIGHT / f"{name}.onnx")))
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    initializers = {init.name for init in model.graph.initializer}
    (graph_input,) = [v for v in model.graph.input if v.name not in initializers]
    shape = tuple(d.dim_value for d in graph_input.type.tensor_type.shape.dim)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", **{graph_input.name: rng.standard_normal((4, *shape[1:])).astype(np.float32)})
    out = tmp_path / f"{name}.int8.onnx"
    started = time.perf_counter()
    result = run_cli("quantize", str(path), "-o", str(out), "--spec", "ort-cpu-x86", "--precision", "int8/uint8",
                     "--calib", str(tmp_path / "calib.npz"), "--quiet", "--no-cache")
    seconds = time.perf_counter() - started
    assert result.code == 0, result.stderr
    quantized = onnx.load(str(out))
    onnx.checker.check_model(quantized, full_check=True)
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [graph_input.name]
    assert [o.name for o in session.get_outputs()] == [o.name for o in model.graph.output]
    feed = {graph_input.name: rng.standard_normal(shape).astype(np.float32)}
    (y,) = session.run(None, feed)
    (reference,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    assert y.shape == reference.shape and np.isfinite(y).all()
    print(f"{name}: quantized in {seconds:.1f} s")
