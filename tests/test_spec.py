"""Hardware specs: built-ins load, broken files report every problem with its JSON path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxq.errors import SpecError
from onnxq.precision import Candidate, Precision
from onnxq.spec import (
    Granularity,
    HardwareSpec,
    SpecProblem,
    builtin_specs,
    check_spec_file,
    load_spec,
)

DATA = Path(__file__).parent / "data" / "specs"
BUILTINS = ["arm-cpu-dotprod", "edge-int-only", "hexagon-npu", "ort-cpu-x86", "tensorrt-gpu"]


def _paths(problems: list[SpecProblem]) -> set[str]:
    return {p.path for p in problems}


def test_builtin_specs_listed_sorted_with_summaries() -> None:
    listed = builtin_specs()
    assert [name for name, _ in listed] == BUILTINS
    for _, summary in listed:
        assert summary and "\n" not in summary


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_loads_and_checks_clean(name: str) -> None:
    assert check_spec_file(name) == []
    spec = load_spec(name)
    assert isinstance(spec, HardwareSpec)
    assert spec.name == name
    assert spec.description and spec.summary
    assert spec.ops, "a spec with no quantizable ops is useless"
    for op_type, rule in spec.ops.items():
        assert rule.candidates, op_type
        if spec.integer_only:
            assert not any(c.is_float for c in rule.candidates), op_type
        for cand in rule.candidates:
            if cand.weights not in (Precision.FP32, Precision.FP16, Precision.BF16) \
                    and rule.weight_inputs:
                assert spec.weight_rule(op_type, cand.weights) is not None, (op_type, cand)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_by_path_too(name: str) -> None:
    from importlib import resources

    path = resources.files("onnxq.hardware_specs") / f"{name}.json"
    spec = load_spec(str(path))
    assert spec.ops.keys() == load_spec(name).ops.keys()


def test_ort_cpu_x86_facts() -> None:
    spec = load_spec("ort-cpu-x86")
    assert not spec.integer_only
    fast = Candidate.parse("int8/uint8")
    for op in ("Conv", "Gemm", "MatMul"):
        assert spec.allows(op, fast)
        assert spec.allows(op, Candidate.parse("int8/int8"))
        assert spec.allows(op, Candidate.parse("fp32/fp32"))
        w = spec.weight_rule(op, Precision.INT8)
        assert w is not None and w.symmetric
        assert Granularity.PER_CHANNEL in w.granularities
        a = spec.activation_rule(op, Precision.UINT8)
        assert a is not None and not a.symmetric
        assert a.granularities == (Granularity.PER_TENSOR,)
    assert spec.allows("Add", Candidate.parse("uint8/uint8"))
    assert {"MaxPool", "Reshape", "Transpose"} <= spec.shared_scale_ops
    assert ("Conv", "Relu") in spec.fusion_groups
    assert spec.min_opset["per_channel"] == 13 and spec.min_opset["int4"] == 21
    assert spec.opset_needed(Candidate.parse("int4/uint8"), per_channel=True) == 21
    assert spec.opset_needed(fast, per_channel=True) == 13
    cost = spec.cost
    fp32 = cost.throughput(Candidate.parse("fp32/fp32"))
    assert cost.throughput(fast) > fp32
    # int16 and int4 run on this CPU but are not faster than fp32
    assert cost.throughput(Candidate.parse("int16/int16")) < fp32
    assert cost.throughput(Candidate.parse("int4/uint8")) < fp32
    assert cost.throughput(Candidate.parse("int8/int8")) < fp32
    # calibrated on this machine by benchmarks/calibrate_cost_model.py, not placeholders
    assert not cost.placeholder


def test_other_builtins_facts() -> None:
    trt = load_spec("tensorrt-gpu")
    for op in ("Conv", "MatMul"):
        assert not trt.allows(op, Candidate.parse("int8/uint8"))
        assert trt.allows(op, Candidate.parse("fp8e4m3/fp8e4m3"))
        a = trt.activation_rule(op, Precision.INT8)
        assert a is not None and a.symmetric
    hexagon = load_spec("hexagon-npu")
    for cand in ("int8/uint16", "int8/int16", "int8/uint8", "int4/uint8", "fp16/fp16"):
        assert hexagon.allows("Conv", Candidate.parse(cand)), cand
    edge = load_spec("edge-int-only")
    assert edge.integer_only
    assert edge.candidates_for("Sigmoid") == ()
    assert not edge.allows("Conv", Candidate.parse("fp32/fp32"))
    assert edge.allows("Conv", Candidate.parse("int4/int8"))
    arm = load_spec("arm-cpu-dotprod")
    assert arm.cost.throughput(Candidate.parse("fp16/fp16")) > arm.cost.throughput(
        Candidate.parse("fp32/fp32"))


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(SpecError) as info:
        load_spec("ort-cpu-x87")
    assert "ort-cpu-x87" in info.value.message
    assert info.value.hint is not None and "ort-cpu-x86" in info.value.hint
    assert "\n" not in info.value.one_line()


def test_missing_file() -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_spec("no/such/spec.json")


def test_syntax_error_has_line_and_column() -> None:
    problems = check_spec_file(DATA / "bad_syntax.json")
    assert len(problems) == 1
    assert problems[0].path == "$"
    assert "line 4 column 48" in problems[0].message
    with pytest.raises(SpecError, match="line 4 column 48"):
        load_spec(DATA / "bad_syntax.json")


def test_schema_errors_all_reported_with_paths() -> None:
    problems = check_spec_file(DATA / "bad_schema.json")
    paths = _paths(problems)
    assert {
        "$",  # missing cost
        "$.integer_only",
        "$.quantizers.w8.precision",
        "$.quantizers.w8.granularity[0]",
        "$.ops.Conv",  # unknown field "colour"
    } <= paths
    messages = " ".join(str(p) for p in problems)
    assert "cost" in messages and "colour" in messages and "int3" in messages


def test_meaning_errors_all_reported_with_paths() -> None:
    problems = check_spec_file(DATA / "bad_meaning.json")
    by_path = {p.path: p for p in problems}
    assert set(by_path) == {
        "$.ops.Convv",
        "$.ops.Conv.candidates[2]",
        "$.ops.Conv.weight_quantizers.int8",
        "$.ops.MatMul.template",
        "$.fusion_groups[0][0]",
        "$.fusion_groups[1][1]",
        "$.min_opset.int4",
    }
    assert "not an ONNX op" in by_path["$.ops.Convv"].message
    assert "int9" in by_path["$.ops.Conv.candidates[2]"].message
    assert "w_missing" in by_path["$.ops.Conv.weight_quantizers.int8"].message
    assert "lineaer" in by_path["$.ops.MatMul.template"].message
    assert "linear" in by_path["$.ops.MatMul.template"].hint
    assert "Gemm" in by_path["$.fusion_groups[0][0]"].message
    assert "21" in by_path["$.min_opset.int4"].message
    for p in problems:
        assert "\n" not in str(p) and str(p).startswith(p.path + ": ")


def test_float_candidates_on_integer_only_target() -> None:
    problems = check_spec_file(DATA / "float_on_int_only.json")
    by_path = {p.path: p.message for p in problems}
    assert "float candidate fp32/fp32" in by_path["$.ops.Conv.candidates[1]"]
    assert "float candidate fp16/fp16" in by_path["$.ops.Add.candidates[1]"]
    assert "no activation quantizer for int8" in by_path["$.ops.Add.candidates[0]"]
    assert "max_opset is 19" in by_path["$.ops.Conv.candidates[2]"]


def test_load_spec_names_first_problem_and_count(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(DATA / "bad_meaning.json")
    text = info.value.one_line()
    assert "bad_meaning.json" in text and "6 more" in text and "ort-cpu-x86" in text


def test_custom_spec_round_trip(tmp_path: Path) -> None:
    from importlib import resources

    data = json.loads(
        (resources.files("onnxq.hardware_specs") / "edge-int-only.json").read_text("utf-8"))
    data["name"] = "my-edge"
    data["ops"]["Conv"]["candidates"] = ["int8/int8"]
    path = tmp_path / "my-edge.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert check_spec_file(path) == []
    spec = load_spec(path)
    assert spec.name == "my-edge" and spec.source == str(path)
    assert spec.candidates_for("Conv") == (Candidate.parse("int8/int8"),)
    # the template still gives Gemm both candidates
    assert Candidate.parse("int4/int8") in spec.candidates_for("Gemm")
    rule = spec.ops["Conv"]
    assert rule.weight_inputs == (1,) and rule.bias_inputs == (2,)
    assert rule.requires_quantized_output


def test_fast_candidates_declared_per_target() -> None:
    """Dynamic int8 and block-wise weight-only are declared where onnxruntime fuses them."""
    dyn, int4_blocks = Candidate.parse("int8/dyn-uint8"), Candidate.parse("int4b32/fp32")
    x86 = load_spec("ort-cpu-x86")
    for op in ("MatMul", "Gemm"):
        assert x86.allows(op, dyn)
    assert not x86.allows("Conv", dyn)  # ConvInteger is not a fast kernel
    assert x86.allows("MatMul", int4_blocks) and x86.weight_block_size("MatMul", int4_blocks) == 32
    assert x86.weight_rule("MatMul", Precision.INT8).reduce_range  # AVX2 U8S8 saturation
    assert x86.opset_needed(int4_blocks, per_channel=False) == 21
    assert x86.cost.throughput(dyn) > x86.cost.throughput(Candidate.parse("fp32/fp32"))
    arm = load_spec("arm-cpu-dotprod")
    assert arm.allows("MatMul", dyn) and arm.allows("Gemm", dyn)
    assert not arm.weight_rule("MatMul", Precision.INT8).reduce_range  # dot products add in int32
    for name in ("tensorrt-gpu", "hexagon-npu", "edge-int-only"):
        spec = load_spec(name)
        assert not any(c.dynamic for c in spec.all_candidates()), name
    # int4 beside quantized activations: a per_block preference falls back to per-channel
    assert x86.weight_granularity("MatMul", Candidate.parse("int4/uint8")) == Granularity.PER_CHANNEL
    assert x86.weight_granularity("MatMul", int4_blocks) == Granularity.PER_BLOCK


def test_refined_candidates_are_checked(tmp_path: Path) -> None:
    from importlib import resources

    data = json.loads((resources.files("onnxq.hardware_specs") / "ort-cpu-x86.json").read_text("utf-8"))
    data["ops"]["MatMul"]["candidates"] += ["int4b32/uint8", "int4b24/fp32", "int8b32/fp32"]
    path = tmp_path / "refined.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    problems = {p.message for p in check_spec_file(path)}
    assert any("block-wise weights with quantized activations (int4b32/uint8)" in m for m in problems)
    assert any("block size 24" in m for m in problems)
    assert any("int8b32/fp32" in m and "no per_block" in m for m in problems)
    assert not any("dyn-uint8" in m for m in problems)
    data["ops"]["MatMul"]["candidates"].append("int8/dyn-fp32")
    path.write_text(json.dumps(data), encoding="utf-8")
    assert any("dyn-fp32" in str(p) for p in check_spec_file(path))
