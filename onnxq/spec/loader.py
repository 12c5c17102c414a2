"""Load and check hardware spec JSON files (format ``onnxq-spec/1``).

A spec file goes through three stages: JSON parsing, the JSON Schema in
``hardware_specs/schema.json`` and meaning checks (op types exist in ONNX, references to
quantizers and templates resolve, candidates have quantizers, opsets are consistent). Only
a file without problems becomes a :class:`~onnxq.spec.model.HardwareSpec`; raw dicts never
leave this module.

The format in brief::

    {"format": "onnxq-spec/1", "name": "...", "summary": "...", "description": "...",
     "integer_only": false,
     "quantizers": {"w8": {"precision": "int8", "granularity": ["per_channel"],
                           "symmetric": true}},
     "defaults":  {"activation_quantizers": {"uint8": "a8u"}},
     "templates": {"linear": {"candidates": ["int8/uint8", "fp32/fp32"],
                              "weight_quantizers": {"int8": "w8"}}},
     "ops": {"Conv": {"template": "linear", "bias_inputs": [2]}},
     "shared_scale_ops": ["MaxPool"], "float_only_ops": [], "fusion_groups": [["Conv", "Relu"]],
     "min_opset": {"per_channel": 13, "int4": 21}, "max_opset": 26,
     "cost": {"macs_per_second": {"fp32": 1e11}, "bytes_per_second": 2e10}}

An op rule is ``defaults`` updated by its template, updated by its own fields (quantizer maps
merge per precision).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jsonschema
import onnx.defs

from onnxq.errors import OnnxqError, SpecError
from onnxq.precision import Candidate, Precision, is_integer
from onnxq.spec.model import (
    DEFAULT_BIAS_INPUTS,
    DEFAULT_LAYOUT_OPS,
    DEFAULT_MIN_OPSET,
    DEFAULT_WEIGHT_INPUTS,
    CostParams,
    Granularity,
    HardwareSpec,
    OpRule,
    QuantizerRule,
)

__all__ = [
    "SPEC_FORMAT",
    "SpecProblem",
    "builtin_specs",
    "check_spec_file",
    "load_spec",
    "spec_schema",
]

logger = logging.getLogger(__name__)

#: The ``format`` value of every spec file this version reads.
SPEC_FORMAT = "onnxq-spec/1"

_PACKAGE = "onnxq.hardware_specs"
_SCHEMA_FILE = "schema.json"

_QUANTIZER_MAPS = ("weight_quantizers", "activation_quantizers", "accumulators")
_PRECISION_NAMES = frozenset(p.value for p in Precision)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class SpecProblem:
    """One problem in a spec file.

    Attributes:
        path: JSON path of the offending value (``$.ops.Conv.candidates[2]``).
        message: what is wrong.
        hint: what to do about it (may be empty).
    """

    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# Built-ins and the schema


def _builtin_dir() -> Any:
    return resources.files(_PACKAGE)


@lru_cache(maxsize=1)
def _builtin_names() -> tuple[str, ...]:
    names = [
        entry.name[: -len(".json")]
        for entry in _builtin_dir().iterdir()
        if entry.name.endswith(".json") and entry.name != _SCHEMA_FILE
    ]
    return tuple(sorted(names))


def _builtin_hint() -> str:
    return "built-in specs: " + ", ".join(_builtin_names())


@lru_cache(maxsize=1)
def spec_schema() -> Mapping[str, Any]:
    """The JSON Schema (draft 2020-12) of the spec format."""
    text = (_builtin_dir() / _SCHEMA_FILE).read_text(encoding="utf-8")
    return MappingProxyType(json.loads(text))


@lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(dict(spec_schema()))


def builtin_specs() -> list[tuple[str, str]]:
    """Built-in spec names with their one-line summaries, sorted by name."""
    result: list[tuple[str, str]] = []
    for name in _builtin_names():
        text = (_builtin_dir() / f"{name}.json").read_text(encoding="utf-8")
        try:
            summary = str(json.loads(text).get("summary", ""))
        except (json.JSONDecodeError, AttributeError):
            summary = "(invalid spec file)"
        result.append((name, " ".join(summary.split())))
    return result


# --------------------------------------------------------------------------------------------
# Reading and checking


def _json_path(parts: Iterator[Any] | Any) -> str:
    path = "$"
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _IDENT.match(str(part)):
            path += f".{part}"
        else:
            path += f"[{json.dumps(str(part))}]"
    return path


def _join(path: str, key: Any) -> str:
    """``path`` extended by one key or index."""
    return path + _json_path([key])[1:]


def _read_text(path: Path) -> tuple[Any, list[SpecProblem]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return None, [SpecProblem("$", f"cannot read {path}: {e}", "check the path")]
    return _parse_text(text)


def _parse_text(text: str) -> tuple[Any, list[SpecProblem]]:
    try:
        return json.loads(text), []
    except json.JSONDecodeError as e:
        return None, [
            SpecProblem(
                "$",
                f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}",
                "fix the JSON syntax",
            )
        ]


def _schema_problems(data: Any) -> list[SpecProblem]:
    problems = []
    for error in _validator().iter_errors(data):
        message = error.message
        if len(message) > 200:
            message = message[:197] + "..."
        problems.append(
            SpecProblem(_json_path(error.absolute_path), message, "see hardware_specs/schema.json")
        )
    return problems


@dataclass(frozen=True)
class _Field:
    """A resolved op-rule field and the JSON path it was written at."""

    value: Any
    path: str


def _resolve_op(
    op_type: str, raw: Mapping[str, Any], data: Mapping[str, Any]
) -> dict[str, Any]:
    """defaults <- template <- op fields; quantizer maps merge per key. Values are _Fields."""
    layers: list[tuple[Mapping[str, Any], str]] = []
    defaults = data.get("defaults")
    if isinstance(defaults, Mapping):
        layers.append((defaults, "$.defaults"))
    templates = data.get("templates")
    template = raw.get("template")
    if isinstance(template, str) and isinstance(templates, Mapping):
        body = templates.get(template)
        if isinstance(body, Mapping):
            layers.append((body, _json_path(["templates", template])))
    layers.append((raw, _json_path(["ops", op_type])))
    fields: dict[str, Any] = {}
    for body, base in layers:
        for key, value in body.items():
            if key in ("template", "comment"):
                continue
            path = f"{base}.{key}"
            if key in _QUANTIZER_MAPS and isinstance(value, Mapping):
                merged = dict(fields.get(key, {}))
                for sub, ref in value.items():
                    merged[sub] = _Field(ref, _join(path, sub))
                fields[key] = merged
            else:
                fields[key] = _Field(value, path)
    return fields


def _map_field(fields: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A merged map field, or {} when the spec wrote something else there (the schema reports it)."""
    value = fields.get(key, {})
    return value if isinstance(value, dict) else {}


def _parse_candidate(text: Any) -> Candidate | None:
    try:
        return Candidate.parse(str(text))
    except OnnxqError:
        return None


def _is_onnx_op(op_type: Any) -> bool:
    return isinstance(op_type, str) and onnx.defs.has(op_type)


def _meaning_problems(data: Any) -> list[SpecProblem]:
    """Checks beyond the schema. Defensive: malformed parts (already reported) are skipped."""
    if not isinstance(data, Mapping):
        return []
    problems: list[SpecProblem] = []
    add = problems.append
    integer_only = data.get("integer_only") is True
    quantizers = data.get("quantizers") if isinstance(data.get("quantizers"), Mapping) else {}
    templates = data.get("templates") if isinstance(data.get("templates"), Mapping) else {}
    ops = data.get("ops") if isinstance(data.get("ops"), Mapping) else {}
    known_precisions = " ".join(p.value for p in Precision)
    features_used: dict[str, str] = {}

    # Quantizer definitions.
    for name, q in quantizers.items():
        if not isinstance(q, Mapping):
            continue
        base = _json_path(["quantizers", name])
        precision = q.get("precision")
        grans = q.get("granularity") if isinstance(q.get("granularity"), list) else []
        if q.get("block_sizes") and "per_block" not in grans:
            add(SpecProblem(f"{base}.block_sizes", "block_sizes given but per_block is not an "
                            "allowed granularity", "add per_block to granularity"))
        if q.get("narrow_range") is True and isinstance(precision, str) \
                and precision.startswith("u"):
            add(SpecProblem(f"{base}.narrow_range", f"narrow_range has no meaning for unsigned "
                            f"{precision}", "use narrow_range only with signed precisions"))

    # Op types named anywhere must be ONNX ops.
    for key in ("shared_scale_ops", "float_only_ops", "layout_ops"):
        items = data.get(key)
        if isinstance(items, list):
            for i, op in enumerate(items):
                if isinstance(op, str) and not _is_onnx_op(op):
                    add(SpecProblem(_json_path([key, i]), f"{op!r} is not an ONNX op type",
                                    "op types are case-sensitive ai.onnx names, e.g. MaxPool"))
    float_only = set(data.get("float_only_ops") or []) if isinstance(
        data.get("float_only_ops"), list) else set()

    # Templates: check the quantizer references they hold (ops re-check them resolved).
    referenced_templates = {
        raw.get("template") for raw in ops.values() if isinstance(raw, Mapping)
    }
    for tname in templates:
        if tname not in referenced_templates:
            logger.debug("template %s is not used by any op", tname)

    for op_type, raw in ops.items():
        if not isinstance(raw, Mapping):
            continue
        base = _json_path(["ops", op_type])
        if not _is_onnx_op(op_type):
            add(SpecProblem(base, f"{op_type!r} is not an ONNX op type",
                            "op types are case-sensitive ai.onnx names, e.g. Conv, MatMul"))
        if op_type in float_only:
            add(SpecProblem(base, f"{op_type} has a quantization rule but is listed in "
                            "float_only_ops", "remove it from one of the two"))
        template = raw.get("template")
        if isinstance(template, str) and template not in templates:
            known = ", ".join(sorted(templates)) or "none defined"
            add(SpecProblem(f"{base}.template", f"unknown template {template!r}",
                            f"templates: {known}"))
        fields = _resolve_op(op_type, raw, data)
        for key in ("weight_quantizers", "activation_quantizers"):
            for precision, ref in _map_field(fields, key).items():
                if not isinstance(ref.value, str):
                    continue
                q = quantizers.get(ref.value)
                if q is None:
                    known = ", ".join(sorted(quantizers)) or "none defined"
                    add(SpecProblem(ref.path, f"unknown quantizer {ref.value!r}",
                                    f"quantizers: {known}"))
                elif isinstance(q, Mapping) and isinstance(q.get("precision"), str) \
                        and q.get("precision") in _PRECISION_NAMES and q.get("precision") != precision:
                    add(SpecProblem(ref.path, f"quantizer {ref.value!r} is "
                                    f"{q.get('precision')}, not {precision}",
                                    "map each precision to a quantizer of that precision"))
                elif isinstance(q, Mapping):
                    grans = q.get("granularity") or ["per_tensor"]
                    for g in grans:
                        if g in ("per_channel", "per_block"):
                            features_used.setdefault(g, ref.path)
        cand_field = fields.get("candidates")
        weight_field = fields.get("weight_inputs")
        bias_field = fields.get("bias_inputs")
        weight_inputs = (weight_field.value if weight_field and isinstance(weight_field.value,
                         list) else list(DEFAULT_WEIGHT_INPUTS.get(op_type, ())))
        bias_inputs = (bias_field.value if bias_field and isinstance(bias_field.value, list)
                       else list(DEFAULT_BIAS_INPUTS.get(op_type, ())))
        overlap = sorted(set(weight_inputs) & set(bias_inputs))
        if overlap:
            add(SpecProblem(f"{base}.bias_inputs", f"inputs {overlap} are both weight and bias "
                            "inputs", "list each input once"))
        if cand_field is None:
            add(SpecProblem(base, f"{op_type} has no candidates",
                            "give candidates in the op, its template or defaults"))
            continue
        if not isinstance(cand_field.value, list):
            continue
        parsed: set[Candidate] = set()
        for i, text in enumerate(cand_field.value):
            path = f"{cand_field.path}[{i}]"
            cand = _parse_candidate(text)
            if cand is None:
                add(SpecProblem(path, f"candidate {text!r} names an unknown precision",
                                f"known precisions: {known_precisions}"))
                continue
            parsed.add(cand)
            for problem in _refinement_problems(cand, op_type, fields, quantizers, path):
                add(problem)
            if cand.block_size:
                features_used.setdefault("per_block", path)
            if cand.dynamic:
                features_used.setdefault("dynamic", path)
            if integer_only and not (is_integer(cand.weights) and is_integer(cand.activations)):
                add(SpecProblem(path, f"float candidate {cand} on an integer_only target",
                                "integer_only targets allow integer candidates only"))
            for side, precision, key in (
                ("weight", cand.weights, "weight_quantizers"),
                ("activation", cand.activations, "activation_quantizers"),
            ):
                if side == "weight" and not weight_inputs:
                    continue
                if is_integer(precision) or precision == Precision.FP8E4M3:
                    features_used.setdefault(precision.value, path)
                    if precision.value not in fields.get(key, {}):
                        add(SpecProblem(path, f"candidate {cand} of {op_type} has no {side} "
                                        f"quantizer for {precision}",
                                        f"add {precision} to {key}"))
                elif precision in (Precision.FP16, Precision.BF16):
                    features_used.setdefault(precision.value, path)
        for cand_text, acc in _map_field(fields, "accumulators").items():
            if not acc.path.startswith(base + "."):
                continue  # inherited from a template or defaults: it may cover other ops
            cand = _parse_candidate(cand_text)
            if cand is None or cand not in parsed:
                add(SpecProblem(acc.path, f"accumulator given for {cand_text!r}, which is not a "
                                f"candidate of {op_type}", "list it in candidates first"))

    # Fusion groups: the head must be a quantizable op of this spec, members ONNX ops.
    groups = data.get("fusion_groups")
    if isinstance(groups, list):
        for g, group in enumerate(groups):
            if not isinstance(group, list):
                continue
            for i, op in enumerate(group):
                path = _json_path(["fusion_groups", g, i])
                if isinstance(op, str) and not _is_onnx_op(op):
                    add(SpecProblem(path, f"{op!r} is not an ONNX op type",
                                    "op types are case-sensitive ai.onnx names"))
                elif i == 0 and isinstance(op, str) and op not in ops:
                    add(SpecProblem(path, f"fusion group starts with {op}, which the spec's "
                                    "ops do not list", "add a rule for it under ops"))
                elif op in float_only:
                    add(SpecProblem(path, f"fusion group member {op} is float_only",
                                    "remove it from float_only_ops or the group"))

    # Opsets: never below what ONNX needs, never above the target's maximum.
    min_opset = data.get("min_opset") if isinstance(data.get("min_opset"), Mapping) else {}
    for feature, value in min_opset.items():
        need = DEFAULT_MIN_OPSET.get(feature)
        if isinstance(value, int) and need is not None and value < need:
            add(SpecProblem(_json_path(["min_opset", feature]), f"min_opset for {feature} is "
                            f"{value}, but ONNX Q/DQ needs opset {need} for it",
                            f"set it to {need} or more"))
    max_opset = data.get("max_opset")
    if isinstance(max_opset, int):
        for feature, where in sorted(features_used.items()):
            need = min_opset.get(feature, DEFAULT_MIN_OPSET.get(feature, 10))
            if isinstance(need, int) and need > max_opset:
                add(SpecProblem(where, f"{feature} needs opset {need} but max_opset is "
                                f"{max_opset}", "remove the feature or raise max_opset"))

    # Cost model keys.
    cost = data.get("cost") if isinstance(data.get("cost"), Mapping) else {}
    table = cost.get("candidate_macs_per_second")
    if isinstance(table, Mapping):
        for key in table:
            if _parse_candidate(key) is None:
                add(SpecProblem(_json_path(["cost", "candidate_macs_per_second", key]),
                                f"candidate {key!r} names an unknown precision",
                                f"known precisions: {known_precisions}"))
    for table_name in ("candidate_overhead_seconds", "candidate_ns_per_element"):
        table = cost.get(table_name)
        if isinstance(table, Mapping):
            for key in table:
                ok = (_parse_candidate(key) is not None if "/" in str(key)
                      else str(key) in {p.value for p in Precision})
                if not ok:
                    add(SpecProblem(_json_path(["cost", table_name, key]),
                                    f"key {key!r} is neither a candidate nor a precision",
                                    f"known precisions: {known_precisions}"))
    latency = cost.get("latency_table")
    if isinstance(latency, Mapping):
        for layer, row in latency.items():
            if isinstance(row, Mapping):
                for key in row:
                    if _parse_candidate(key) is None:
                        add(SpecProblem(_json_path(["cost", "latency_table", layer, key]),
                                        f"candidate {key!r} names an unknown precision",
                                        f"known precisions: {known_precisions}"))
    return problems


def _refinement_problems(cand: Candidate, op_type: str, fields: Mapping[str, Any],
                         quantizers: Mapping[str, Any], path: str) -> list[SpecProblem]:
    """Problems of a block-wise (``int4b32/fp32``) or dynamic (``int8/dyn-uint8``) candidate."""
    problems: list[SpecProblem] = []
    if cand.block_size:
        if is_integer(cand.activations):
            problems.append(SpecProblem(path, f"block-wise weights with quantized activations ({cand})",
                                        "block-wise candidates are weight-only: write e.g. "
                                        f"{cand.weights.value}b{cand.block_size}/fp32"))
        ref = _map_field(fields, "weight_quantizers").get(cand.weights.value)
        q = quantizers.get(ref.value) if ref is not None and isinstance(ref.value, str) else None
        if isinstance(q, Mapping):
            grans = q.get("granularity") if isinstance(q.get("granularity"), list) else []
            sizes = q.get("block_sizes") if isinstance(q.get("block_sizes"), list) else []
            if "per_block" not in grans:
                problems.append(SpecProblem(path, f"candidate {cand} of {op_type} is block-wise but "
                                            f"quantizer {ref.value!r} has no per_block granularity",
                                            "add per_block to its granularity"))
            elif sizes and cand.block_size not in sizes:
                problems.append(SpecProblem(path, f"block size {cand.block_size} of {cand} is not in "
                                            f"the block_sizes of quantizer {ref.value!r}",
                                            "list it in block_sizes"))
    if cand.dynamic:
        ref = _map_field(fields, "activation_quantizers").get(cand.activations.value)
        q = quantizers.get(ref.value) if ref is not None and isinstance(ref.value, str) else None
        grans = q.get("granularity") if isinstance(q, Mapping) and isinstance(q.get("granularity"), list) else []
        if grans and "per_tensor" not in grans:
            problems.append(SpecProblem(path, f"dynamic candidate {cand} needs per_tensor activations",
                                        "DynamicQuantizeLinear computes one scale per call"))
    return problems


def _cost_key(key: str) -> str:
    """Normalised key of a per-candidate cost table: candidate text or a precision name."""
    return str(Candidate.parse(key)) if "/" in key else Precision(key).value


def _problems_of(data: Any) -> list[SpecProblem]:
    problems = _schema_problems(data)
    try:
        problems.extend(_meaning_problems(data))
    except (TypeError, AttributeError, KeyError, ValueError):
        # the meaning checks assume the structure the schema describes; when the structure is
        # broken, the schema problems above already say what to fix
        if not problems:
            raise
    return sorted(set(problems), key=lambda p: (p.path, p.message))


def _locate(name_or_path: str | os.PathLike[str]) -> tuple[str, Path | None, str | None]:
    """(source label, file path or None, built-in name or None)."""
    text = os.fspath(name_or_path)
    path = Path(text)
    if path.is_file():
        return str(path), path, None
    if text in _builtin_names():
        return text, None, text
    if text.endswith(".json") or os.sep in text or "/" in text:
        raise SpecError(f"spec file {text} does not exist", _builtin_hint())
    raise SpecError(f"unknown hardware spec {text!r}", _builtin_hint())


def check_spec_file(path: str | os.PathLike[str]) -> list[SpecProblem]:
    """Every problem of a spec file (or built-in name): syntax, schema and meaning.

    Returns an empty list for a good spec. Problems are sorted by JSON path.
    """
    try:
        _label, file, builtin = _locate(path)
    except SpecError as e:
        return [SpecProblem("$", e.message, e.hint or "")]
    if file is not None:
        data, problems = _read_text(file)
    else:
        data, problems = _parse_text(
            (_builtin_dir() / f"{builtin}.json").read_text(encoding="utf-8"))
    if problems:
        return problems
    return _problems_of(data)


# --------------------------------------------------------------------------------------------
# Building the dataclasses


def _quantizer(raw: Mapping[str, Any]) -> QuantizerRule:
    return QuantizerRule(
        precision=Precision(raw["precision"]),
        granularities=tuple(Granularity(g) for g in raw.get("granularity", ["per_tensor"])),
        symmetric=bool(raw.get("symmetric", False)),
        narrow_range=bool(raw.get("narrow_range", False)),
        reduce_range=bool(raw.get("reduce_range", False)),
        block_sizes=tuple(int(b) for b in raw.get("block_sizes", ())),
    )


def _build(data: Mapping[str, Any], source: str) -> HardwareSpec:
    quantizers = {name: _quantizer(q) for name, q in data["quantizers"].items()}
    ops: dict[str, OpRule] = {}
    for op_type in sorted(data["ops"]):
        fields = _resolve_op(op_type, data["ops"][op_type], data)

        def value(key: str, default: Any, _fields: dict[str, Any] = fields) -> Any:
            return _fields[key].value if key in _fields else default

        weight_q = {Precision(p): quantizers[f.value]
                    for p, f in sorted(_map_field(fields, "weight_quantizers").items())}
        act_q = {Precision(p): quantizers[f.value]
                 for p, f in sorted(_map_field(fields, "activation_quantizers").items())}
        accs = {Candidate.parse(c): str(f.value)
                for c, f in sorted(_map_field(fields, "accumulators").items())}
        ops[op_type] = OpRule(
            op_type=op_type,
            candidates=tuple(Candidate.parse(c) for c in value("candidates", [])),
            weight_inputs=tuple(value("weight_inputs", DEFAULT_WEIGHT_INPUTS.get(op_type, ()))),
            weight_quantizers=MappingProxyType(weight_q),
            activation_quantizers=MappingProxyType(act_q),
            bias_inputs=tuple(value("bias_inputs", DEFAULT_BIAS_INPUTS.get(op_type, ()))),
            accumulators=MappingProxyType(accs),
            shared_input_scales=bool(value("shared_input_scales", False)),
            requires_quantized_output=bool(value("requires_quantized_output", False)),
        )
    cost = data["cost"]
    latency = {
        str(k): MappingProxyType({str(Candidate.parse(c)): float(s) for c, s in row.items()})
        for k, row in sorted(cost.get("latency_table", {}).items())
    }
    cost_params = CostParams(
        macs_per_second=MappingProxyType(
            {Precision(p): float(v) for p, v in sorted(cost["macs_per_second"].items())}),
        bytes_per_second=float(cost["bytes_per_second"]),
        conversion_ns_per_element=float(cost.get("conversion_ns_per_element", 1.0)),
        op_overhead_seconds=float(cost.get("op_overhead_seconds", 2e-6)),
        latency_table=MappingProxyType(latency),
        candidate_macs_per_second=MappingProxyType(
            {Candidate.parse(c): float(v)
             for c, v in sorted(cost.get("candidate_macs_per_second", {}).items())}),
        placeholder=bool(cost.get("placeholder", False)),
        candidate_overhead_seconds=MappingProxyType(
            {_cost_key(k): float(v) for k, v in sorted(cost.get("candidate_overhead_seconds", {}).items())}),
        candidate_ns_per_element=MappingProxyType(
            {_cost_key(k): float(v) for k, v in sorted(cost.get("candidate_ns_per_element", {}).items())}),
        run_overhead_seconds=float(cost.get("run_overhead_seconds", 0.0)),
        nonlayer_ns_per_element=float(cost.get("nonlayer_ns_per_element", 0.0)),
        conversion_op_seconds=float(cost.get("conversion_op_seconds", 0.0)),
    )
    layout = data.get("layout_ops")
    return HardwareSpec(
        name=str(data["name"]),
        description=str(data["description"]),
        integer_only=bool(data["integer_only"]),
        ops=MappingProxyType(ops),
        cost=cost_params,
        shared_scale_ops=frozenset(data.get("shared_scale_ops", ())),
        float_only_ops=frozenset(data.get("float_only_ops", ())),
        fusion_groups=tuple(tuple(g) for g in data.get("fusion_groups", ())),
        min_opset=MappingProxyType({str(k): int(v)
                                    for k, v in sorted(data.get("min_opset", {}).items())}),
        summary=" ".join(str(data["summary"]).split()),
        layout_ops=frozenset(layout) if layout is not None else DEFAULT_LAYOUT_OPS,
        max_opset=int(data["max_opset"]) if "max_opset" in data else None,
        source=source,
    )


def load_spec(name_or_path: str | os.PathLike[str]) -> HardwareSpec:
    """Load a built-in spec by name (``ort-cpu-x86``) or a spec JSON file.

    Raises:
        SpecError: unknown name, missing file, or a file with problems (the first one is
            named; ``onnxq spec-check`` lists all of them).
    """
    label, file, builtin = _locate(name_or_path)
    if builtin is not None:
        return _load_builtin(builtin)
    assert file is not None  # _locate returns a file or a built-in name
    data, problems = _read_text(file)
    if not problems:
        problems = _problems_of(data)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SpecError(
            f"invalid hardware spec {label}: {problems[0]}{more}",
            f"run `onnxq spec-check {label}` to list every problem; {_builtin_hint()}",
        )
    logger.debug("loaded hardware spec %s from %s", data.get("name"), label)
    return _build(data, label)


@cache
def _load_builtin(name: str) -> HardwareSpec:
    text = (_builtin_dir() / f"{name}.json").read_text(encoding="utf-8")
    data, problems = _parse_text(text)
    if not problems:
        problems = _problems_of(data)
    if problems:
        raise SpecError(f"built-in spec {name} is invalid: {problems[0]}",
                        "this is a bug in onnxq; please report it")
    return _build(data, name)
