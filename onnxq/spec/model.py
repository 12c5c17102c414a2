"""Frozen dataclasses that describe what a hardware target runs.

Raw JSON never leaves the loader (:mod:`onnxq.spec.loader`); everything downstream (search,
rewrite, validate, cost model) reads these types.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from onnxq.precision import FP32, Candidate, Precision, is_integer

__all__ = [
    "DEFAULT_BIAS_INPUTS",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_LAYOUT_OPS",
    "DEFAULT_MIN_OPSET",
    "DEFAULT_WEIGHT_INPUTS",
    "CostParams",
    "Granularity",
    "HardwareSpec",
    "OpRule",
    "QuantizerRule",
    "RuntimeTarget",
]


#: What ai.onnx Q/DQ needs to express each feature (onnx operator changelog).
DEFAULT_MIN_OPSET: Mapping[str, int] = MappingProxyType(
    {"per_channel": 13, "per_block": 21, "int16": 21, "uint16": 21, "int4": 21, "uint4": 21,
     "fp8e4m3": 19, "dynamic": 11}
)


#: Block size of block-wise weights when a per_block quantizer lists no block sizes.
DEFAULT_BLOCK_SIZE = 32

#: Ops that only move, reshape or select data: they never compute, so they may carry any
#: dtype and are never reported as "runs in float" on integer-only targets.
DEFAULT_LAYOUT_OPS: frozenset[str] = frozenset(
    {
        "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Shape", "Size",
        "Cast", "Constant", "ConstantOfShape", "Slice", "Split", "Expand", "Tile", "Pad",
        "DepthToSpace", "SpaceToDepth", "Range", "NonZero",
    }
)


#: Weight and bias input indices of common op types, used when a rule does not say.
DEFAULT_WEIGHT_INPUTS: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {
        "Conv": (1,), "ConvTranspose": (1,), "Gemm": (1,), "MatMul": (1,), "Gather": (0,),
        "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2), "Attention": (1,),
    }
)
DEFAULT_BIAS_INPUTS: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {"Conv": (2,), "ConvTranspose": (2,), "Gemm": (2,), "LSTM": (3,), "GRU": (3,), "RNN": (3,)}
)


class Granularity(enum.StrEnum):
    """How many scale/zero-point pairs a quantized tensor has."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_BLOCK = "per_block"


@dataclass(frozen=True)
class QuantizerRule:
    """How one tensor of one precision may be quantized.

    Attributes:
        precision: the integer (or float8) format of the quantized tensor.
        granularities: allowed granularities, the preferred one first.
        symmetric: True when the zero point must be the grid's centre (0 for signed types);
            False when any zero point is allowed.
        narrow_range: True when the most negative value of a signed grid is not used.
        reduce_range: True when only half the grid is used (7 of 8 bits), because the target's
            kernels would overflow on the full one.
        block_sizes: allowed block sizes for per-block quantization.
    """

    precision: Precision
    granularities: tuple[Granularity, ...] = (Granularity.PER_TENSOR,)
    symmetric: bool = False
    narrow_range: bool = False
    reduce_range: bool = False
    block_sizes: tuple[int, ...] = ()

    @property
    def preferred_granularity(self) -> Granularity:
        return self.granularities[0]


@dataclass(frozen=True)
class OpRule:
    """What the target runs for one ONNX op type.

    Attributes:
        op_type: ONNX op type (``Conv``, ``MatMul``, ``Gather``…).
        candidates: allowed ``weights/activations`` pairs; includes ``fp32/fp32`` unless the
            target is integer-only.
        weight_inputs: indices of the inputs that carry weights (``(1,)`` for Conv/Gemm/MatMul,
            ``(0,)`` for Gather).
        weight_quantizers: rule per weight precision.
        activation_quantizers: rule per activation precision.
        bias_inputs: indices of bias inputs (int32 DQ or float, never a "weight" precision).
        accumulators: optional accumulator format per candidate (``int32``, ``fp32``…).
        shared_input_scales: True when all quantized activation inputs (and the quantized
            output) must share one scale and zero point (e.g. an integer Add without
            requantization).
        requires_quantized_output: True when the target only runs the integer kernel if the
            op's output is quantized (onnxruntime's fused Conv); informative for rewrite.
    """

    op_type: str
    candidates: tuple[Candidate, ...]
    weight_inputs: tuple[int, ...] = ()
    weight_quantizers: Mapping[Precision, QuantizerRule] = field(
        default_factory=lambda: MappingProxyType({})
    )
    activation_quantizers: Mapping[Precision, QuantizerRule] = field(
        default_factory=lambda: MappingProxyType({})
    )
    bias_inputs: tuple[int, ...] = ()
    accumulators: Mapping[Candidate, str] = field(default_factory=lambda: MappingProxyType({}))
    shared_input_scales: bool = False
    requires_quantized_output: bool = False


@dataclass(frozen=True)
class CostParams:
    """Roofline cost model parameters.

    Attributes:
        macs_per_second: sustained multiply-accumulates per second, keyed by the precision a
            layer computes in (the activation precision of an integer candidate, the float
            format otherwise).
        bytes_per_second: memory bandwidth.
        conversion_ns_per_element: cost of a Q or DQ at a precision boundary, per element.
        op_overhead_seconds: fixed cost per executed op.
        latency_table: optional measured latencies ``{layer or op_type: {candidate: seconds}}``.
        candidate_macs_per_second: throughput overrides for whole candidates (``int4/uint8``)
            whose speed does not follow from the compute precision alone.
        placeholder: True while the numbers are guesses not yet calibrated by a benchmark.
        candidate_overhead_seconds: fixed cost per layer call on top of ``op_overhead_seconds``,
            keyed by candidate text (``int8/uint8``) or compute precision (``uint8``, ``fp32``):
            what makes small integer layers no faster than float ones (requantization, the
            NHWC reorders, kernel set-up). Equivalent to an efficiency curve
            ``macs / (macs + overhead · rate)`` that approaches the full rate for large layers.
        candidate_ns_per_element: cost per activation element a layer reads and writes (input
            plus output elements), keyed like ``candidate_overhead_seconds``: the part of a
            layer's time that grows with its tensors rather than its MACs (depthwise convs,
            elementwise QLinear ops, layout reorders of integer kernels).
        run_overhead_seconds: fixed cost of one inference (a session ``Run()``), charged once
            by whole-model estimates (``estimate(..., view=...)``).
        nonlayer_ns_per_element: time per output element of the float ops that are not layers
            (LayerNormalization, GELU pieces, bias Adds …); with ``op_overhead_seconds`` per op
            it prices them in whole-model estimates. They run in fp32 under every plan, so they
            shift absolute latency but never the ranking of plans.
        conversion_op_seconds: fixed cost of one standalone Q/DQ/Cast node at a precision
            boundary, on top of ``conversion_ns_per_element`` per element.
    """

    macs_per_second: Mapping[Precision, float]
    bytes_per_second: float
    conversion_ns_per_element: float = 1.0
    op_overhead_seconds: float = 2e-6
    latency_table: Mapping[str, Mapping[str, float]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    candidate_macs_per_second: Mapping[Candidate, float] = field(
        default_factory=lambda: MappingProxyType({})
    )
    placeholder: bool = False
    candidate_overhead_seconds: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType({})
    )
    candidate_ns_per_element: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType({})
    )
    run_overhead_seconds: float = 0.0
    nonlayer_ns_per_element: float = 0.0
    conversion_op_seconds: float = 0.0

    def candidate_value(self, table: Mapping[str, float], candidate: Candidate) -> float:
        """``table``'s entry for ``candidate``: its text, else its compute precision, else 0."""
        text = str(candidate)
        if text in table:
            return float(table[text])
        return float(table.get(self.compute_precision(candidate).value, 0.0))

    def compute_precision(self, candidate: Candidate) -> Precision:
        """The precision whose throughput a candidate runs at (see ``macs_per_second``)."""
        # Integer kernels run at the activation format's rate; weight-only quantization
        # (``int4/fp32``) dequantizes and computes in the activation's float format.
        return candidate.activations

    def throughput(self, candidate: Candidate) -> float:
        """Sustained MACs per second of a candidate (falls back to the fp32 throughput)."""
        if candidate in self.candidate_macs_per_second:
            return self.candidate_macs_per_second[candidate]
        precision = self.compute_precision(candidate)
        if precision in self.macs_per_second:
            return self.macs_per_second[precision]
        return self.macs_per_second.get(Precision.FP32, 1e9)


@dataclass(frozen=True)
class RuntimeTarget:
    """A target that is a runtime onnxq can start: onnxruntime with one execution provider on
    the listed machine architectures (``platform.machine()``, lower case)."""

    engine: str
    execution_provider: str
    machines: tuple[str, ...]


@dataclass(frozen=True)
class HardwareSpec:
    """A hardware target: what it runs, in which formats, and at what cost.

    Attributes:
        name: the spec's name (``ort-cpu-x86``).
        description: human description with the sources of its facts.
        integer_only: True when the target has no float fallback (every compute op must be
            quantized).
        ops: rule per quantizable op type.
        shared_scale_ops: ops whose output must share its input's quantization parameters
            (MaxPool, Reshape, Transpose, Concat…).
        float_only_ops: ops the target only runs in float.
        fusion_groups: op-type sequences decided as one (``("Conv", "Relu")``).
        min_opset: feature → minimum ai.onnx opset (``int4``: 21, ``per_channel``: 13…).
        cost: cost model parameters.
        summary: one-line summary for ``onnxq specs``.
        layout_ops: ops that only move data (never counted as compute).
        max_opset: the highest ai.onnx opset the target accepts (None: no limit known).
        source: where the spec was loaded from (built-in name or file path).
        runtime: the runtime the target is, when onnxq can run it itself (see
            :class:`RuntimeTarget`); None for targets that only a cost model describes.
    """

    name: str
    description: str
    integer_only: bool
    ops: Mapping[str, OpRule]
    cost: CostParams
    shared_scale_ops: frozenset[str] = frozenset()
    float_only_ops: frozenset[str] = frozenset()
    fusion_groups: tuple[tuple[str, ...], ...] = ()
    min_opset: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    summary: str = ""
    layout_ops: frozenset[str] = DEFAULT_LAYOUT_OPS
    max_opset: int | None = None
    source: str = ""
    runtime: RuntimeTarget | None = None

    def candidates_for(self, op_type: str) -> tuple[Candidate, ...]:
        """Allowed candidates of an op type; ``(fp32/fp32,)`` or ``()`` when it is not listed."""
        rule = self.ops.get(op_type)
        if rule is None:
            return () if self.integer_only else (FP32,)
        return rule.candidates

    def allows(self, op_type: str, candidate: Candidate) -> bool:
        """True when the spec lists ``candidate`` for ``op_type``.

        A block-wise candidate (``int4b64/fp32``) is also allowed when the spec lists the plain
        word (``int4/fp32``) and that weight quantizer is block-wise with this block size: the
        block size is then a granularity detail of the listed candidate.
        """
        listed = self.candidates_for(op_type)
        if candidate in listed:
            return True
        if not candidate.block_size:
            return False
        plain = replace(candidate, block_size=0)
        rule = self.weight_rule(op_type, candidate.weights)
        return (plain in listed and rule is not None and Granularity.PER_BLOCK in rule.granularities
                and (not rule.block_sizes or candidate.block_size in rule.block_sizes))

    def weight_block_size(self, op_type: str, candidate: Candidate) -> int:
        """The block size a layer's weights are quantized with at ``candidate``; 0: not block-wise.

        Block-wise weights only for weight-only candidates (float activations): onnxruntime fuses
        ``DQ(block-wise) -> MatMul`` into MatMulNBits, but a block-wise weight next to quantized
        activations builds a session whose ``Run()`` fails (ORT_FACTS.md). The block size is the
        candidate's own (``int4b32``) or, for a plain word, the first of the weight rule's
        ``block_sizes`` when the rule prefers ``per_block``.
        """
        if is_integer(candidate.activations) or not is_integer(candidate.weights):
            return 0
        if candidate.block_size:
            return candidate.block_size
        rule = self.weight_rule(op_type, candidate.weights)
        if rule is None or rule.preferred_granularity != Granularity.PER_BLOCK:
            return 0
        return rule.block_sizes[0] if rule.block_sizes else DEFAULT_BLOCK_SIZE

    def weight_rule(self, op_type: str, precision: Precision) -> QuantizerRule | None:
        rule = self.ops.get(op_type)
        return None if rule is None else rule.weight_quantizers.get(precision)

    def activation_rule(self, op_type: str, precision: Precision) -> QuantizerRule | None:
        rule = self.ops.get(op_type)
        return None if rule is None else rule.activation_quantizers.get(precision)

    def opset_needed(self, candidate: Candidate, per_channel: bool) -> int:
        """The minimum ai.onnx opset that expresses ``candidate`` in Q/DQ."""
        def need(feature: str) -> int:
            return self.min_opset.get(feature, DEFAULT_MIN_OPSET.get(feature, 10))

        needed = max(need(candidate.weights.value), need(candidate.activations.value), 10)
        if per_channel:
            needed = max(needed, need("per_channel"))
        if candidate.block_size:
            needed = max(needed, need("per_block"))
        if candidate.dynamic:
            needed = max(needed, need("dynamic"))
        return needed

    def feature_opset(self, feature: str) -> int:
        """Minimum ai.onnx opset of one feature (a precision name, ``per_channel``…)."""
        return self.min_opset.get(feature, DEFAULT_MIN_OPSET.get(feature, 10))

    def weight_granularity(self, op_type: str, candidate: Candidate) -> Granularity:
        """How a layer's weights are quantized at ``candidate`` (what rewrite, sensitivity and
        cost all follow): block-wise when :meth:`weight_block_size` says so, else the rule's
        preferred granularity, per-channel instead of a preferred per_block that cannot be used
        (quantized activations), per-channel when the spec has no rule."""
        if self.weight_block_size(op_type, candidate):
            return Granularity.PER_BLOCK
        return self.unblocked_weight_granularity(op_type, candidate.weights)

    def unblocked_weight_granularity(self, op_type: str, precision: Precision) -> Granularity:
        """The granularity of ``precision`` weights that are not block-wise: the rule's preferred
        one, per-channel instead of a preferred per_block, per-channel when there is no rule."""
        rule = self.weight_rule(op_type, precision)
        if rule is None:
            return Granularity.PER_CHANNEL
        if rule.preferred_granularity != Granularity.PER_BLOCK:
            return rule.preferred_granularity
        if Granularity.PER_CHANNEL in rule.granularities:
            return Granularity.PER_CHANNEL
        return Granularity.PER_TENSOR

    def rule_for(self, op_type: str) -> OpRule | None:
        """The op rule of an op type, or None when the spec does not list it."""
        return self.ops.get(op_type)

    def all_candidates(self) -> tuple[Candidate, ...]:
        """Every candidate any op allows, sorted."""
        return tuple(sorted({c for rule in self.ops.values() for c in rule.candidates}))
