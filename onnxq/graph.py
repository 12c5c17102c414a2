"""A networkx view of an ONNX graph: layers, the tensors between them, and their dependencies.

Nodes of the view are ONNX node names; an edge ``a → b`` carries the names of the tensors ``a``
produces and ``b`` consumes. On top of that, layer-level queries look *through* non-compute ops
(Relu, Reshape, Transpose, BatchNormalization, pooling…) so that "which layer feeds this one"
means what an engineer means by it.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import numpy as np
import onnx
import onnx.numpy_helper

from onnxq.model import is_stub
from onnxq.spec.model import DEFAULT_BIAS_INPUTS, DEFAULT_WEIGHT_INPUTS, HardwareSpec
from onnxq.subgraphs import Scope, Wrapped, outer_references, scopes, wrap

__all__ = [
    "DEFAULT_LAYER_OPS",
    "graph_view_for",
    "layer_ops_for",
    "scope_views_for",
    "weight_slots_for",
    "ScopeView",
    "scope_views",
    "WeightLocation",
    "Weight",
    "Layer",
    "GraphView",
    "ensure_node_names",
    "constant_tensors",
]

logger = logging.getLogger(__name__)

#: Compute ops onnxq treats as layers when no spec says otherwise.
DEFAULT_LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"})
#: The weight input of a layer op: the spec module's table, for ops with one weight input (a
#: recurrent op's several weights make it no single-weight layer).
_WEIGHT_INPUT = {op: slots[0] for op, slots in DEFAULT_WEIGHT_INPUTS.items() if len(slots) == 1}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def weight_slots_for(spec: HardwareSpec) -> dict[str, int]:
    """Where each layer op's weight is on this target: the spec's ``weight_inputs`` where its
    rule has exactly one, the spec module's defaults for ops the spec does not list."""
    slots = dict(_WEIGHT_INPUT)
    for op_type, rule in spec.ops.items():
        if len(rule.weight_inputs) == 1:
            slots[op_type] = rule.weight_inputs[0]
        else:
            slots.pop(op_type, None)
    return slots


def graph_view_for(model: onnx.ModelProto, spec: HardwareSpec,
                   value_info: Sequence[onnx.ValueInfoProto] = (),
                   weights: Mapping[str, onnx.TensorProto] | None = None) -> GraphView:
    """The graph view of ``model`` with the layers of ``spec``: its layer ops and weight slots
    (``value_info``, ``weights``: see :class:`GraphView`)."""
    return GraphView(model, layer_ops_for(spec), weight_slots_for(spec), value_info, weights)


def scope_views_for(model: onnx.ModelProto, spec: HardwareSpec) -> list[ScopeView]:
    """:func:`scope_views` with the layers of ``spec``."""
    return scope_views(model, layer_ops_for(spec), weight_slots_for(spec))


def layer_ops_for(spec: HardwareSpec) -> set[str]:
    """Op types that are layers on this target: the defaults plus what the spec quantizes."""
    ops = set(DEFAULT_LAYER_OPS)
    for op_type, rule in spec.ops.items():
        if any(not c.is_float or c.weights.value == "fp16" for c in rule.candidates):
            ops.add(op_type)
    return ops


class WeightLocation(enum.StrEnum):
    INITIALIZER = "initializer"
    CONSTANT_NODE = "constant-node"
    GRAPH_INPUT = "graph-input"


@dataclass(frozen=True)
class Weight:
    """A constant weight tensor of a layer."""

    tensor: str
    location: WeightLocation
    shape: tuple[int, ...]
    dtype: int

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass(frozen=True)
class Layer:
    """One quantizable compute node.

    Attributes:
        name: node name (unique; unnamed nodes get ``<op_type>_<index>``).
        op_type: ONNX op type.
        index: position of the node in the graph's node list.
        inputs: the node's input tensor names.
        activations: input tensors that are not constants (what activation quantization covers).
        output: the node's first output tensor.
        weight: the constant weight, when the layer has one.
        bias: the constant bias tensor (Conv, ConvTranspose, Gemm).
        params: number of weight + bias elements.
        macs: multiply-accumulates per sample (batch dimension 1; unknown dims count as 1).
    """

    name: str
    op_type: str
    index: int
    inputs: tuple[str, ...]
    activations: tuple[str, ...]
    output: str
    weight: Weight | None
    bias: str | None
    params: int
    macs: int
    output_elements: int
    input_elements: int


def ensure_node_names(model: onnx.ModelProto) -> int:
    """Give every unnamed or duplicate-named node a deterministic name; returns how many changed."""
    seen: set[str] = set()
    changed = 0
    for index, node in enumerate(model.graph.node):
        name = node.name
        if not name or name in seen:
            base = f"{node.op_type}_{index}"
            name = base
            suffix = 1
            while name in seen:
                name = f"{base}_{suffix}"
                suffix += 1
            node.name = name
            changed += 1
        seen.add(name)
    return changed


def constant_tensors(graph: onnx.GraphProto) -> dict[str, tuple[WeightLocation, onnx.TensorProto | onnx.NodeProto]]:
    """Every tensor name whose value is fixed: initializers and ``Constant`` node outputs."""
    graph_inputs = {value.name for value in graph.input}
    constants: dict[str, tuple[WeightLocation, onnx.TensorProto | onnx.NodeProto]] = {}
    for init in graph.initializer:
        where = WeightLocation.GRAPH_INPUT if init.name in graph_inputs else WeightLocation.INITIALIZER
        constants[init.name] = (where, init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            constants[node.output[0]] = (WeightLocation.CONSTANT_NODE, node)
    return constants


def constant_value(entry: onnx.TensorProto | onnx.NodeProto) -> np.ndarray | None:
    """The numpy value of an initializer or a ``Constant`` node (None for sparse/list forms)."""
    if isinstance(entry, onnx.TensorProto):
        return onnx.numpy_helper.to_array(entry)
    for attr in entry.attribute:
        if attr.name == "value":
            return onnx.numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
    return None


def _shape_of(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = []
    for dim in tensor_type.shape.dim:
        dims.append(dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else -1)
    return tuple(dims)


def _per_sample_elements(shape: tuple[int, ...] | None) -> int:
    if not shape:
        return 0
    dims = list(shape)
    if dims and dims[0] == -1:
        dims[0] = 1
    return int(np.prod([d if d > 0 else 1 for d in dims]))


class GraphView:
    """Layers and dependencies of an ONNX graph.

    Args:
        model: the model (shape-inferred for MACs; names are made unique in place).
        layer_ops: op types that count as layers.
        weight_slots: input index of each layer op's weight.
        value_info: tensor shapes inferred on a copy of the model (:func:`onnxq.model.shape_skeleton`),
            for models too big to shape-infer in place.
        weights: where the values of the model's stub initializers are (a plan built on a
            :func:`~onnxq.model.shape_skeleton` of the fp32 model reads its weights there).
    """

    def __init__(self, model: onnx.ModelProto, layer_ops: Iterable[str] = DEFAULT_LAYER_OPS,
                 weight_slots: Mapping[str, int] | None = None,
                 value_info: Sequence[onnx.ValueInfoProto] = (),
                 weights: Mapping[str, onnx.TensorProto] | None = None) -> None:
        ensure_node_names(model)
        self.weights = weights or {}
        self.model = model
        self.graph = model.graph
        self.layer_ops = frozenset(layer_ops)
        self.weight_slots: Mapping[str, int] = dict(_WEIGHT_INPUT if weight_slots is None else weight_slots)
        self.constants = constant_tensors(self.graph)
        self.shapes: dict[str, tuple[int, ...] | None] = {}
        self.dtypes: dict[str, int] = {}
        for value in [*self.graph.value_info, *value_info, *self.graph.input, *self.graph.output]:
            self.shapes[value.name] = _shape_of(value)
            self.dtypes[value.name] = value.type.tensor_type.elem_type
        for init in self.graph.initializer:
            self.shapes[init.name] = tuple(init.dims)
            self.dtypes[init.name] = init.data_type
        for name, (where, entry) in self.constants.items():
            if where is WeightLocation.CONSTANT_NODE:
                value = constant_value(entry)
                if value is not None:
                    self.shapes[name] = tuple(value.shape)
                    self.dtypes[name] = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        self.producer: dict[str, str] = {}
        self.consumers: dict[str, list[str]] = {}
        self.nodes: dict[str, onnx.NodeProto] = {}
        self.digraph = nx.DiGraph()
        for index, node in enumerate(self.graph.node):
            self.nodes[node.name] = node
            self.digraph.add_node(node.name, op_type=node.op_type, index=index)
            for out in node.output:
                if out:
                    self.producer[out] = node.name
        for node in self.graph.node:
            for tensor in node.input:
                if not tensor:
                    continue
                self.consumers.setdefault(tensor, []).append(node.name)
                source = self.producer.get(tensor)
                if source is not None and self.nodes[source].op_type != "Constant":
                    if self.digraph.has_edge(source, node.name):
                        self.digraph.edges[source, node.name]["tensors"].append(tensor)
                    else:
                        self.digraph.add_edge(source, node.name, tensors=[tensor])
        for node in self.graph.node:
            # a subgraph (If/Loop/Scan body) reading an outer tensor consumes it too
            subgraphs = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
            subgraphs += [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
            if subgraphs:
                implicit = set().union(*(outer_references(g) for g in subgraphs)) - set(node.input)
                for tensor in sorted(implicit):
                    self.consumers.setdefault(tensor, []).append(node.name)
                    source = self.producer.get(tensor)
                    if source is not None and self.nodes[source].op_type != "Constant" and not self.digraph.has_edge(source, node.name):
                        self.digraph.add_edge(source, node.name, tensors=[tensor])
        self.graph_outputs = {value.name for value in self.graph.output}
        self._finite: dict[str, bool] = {}
        self.layers: dict[str, Layer] = {}
        for index, node in enumerate(self.graph.node):
            layer = self._make_layer(index, node)
            if layer is not None:
                self.layers[layer.name] = layer

    # -- construction ---------------------------------------------------------------------

    def is_constant(self, tensor: str) -> bool:
        return tensor in self.constants

    def is_float(self, tensor: str) -> bool:
        dtype = self.dtypes.get(tensor)
        return dtype is None or dtype == 0 or dtype in _FLOAT_TYPES

    def weight_value(self, tensor: str) -> np.ndarray | None:
        entry = self.constants.get(tensor)
        if entry is None:
            return None
        if isinstance(entry[1], onnx.TensorProto) and tensor in self.weights and is_stub(entry[1]):
            return constant_value(self.weights[tensor])
        return constant_value(entry[1])

    def finite_float_constant(self, tensor: str) -> bool:
        """Whether ``tensor`` is a float constant holding only finite values (cached: a layout
        asks this of embedding tables on every plan)."""
        if tensor not in self._finite:
            value = self.weight_value(tensor)
            self._finite[tensor] = value is not None and value.dtype.kind == "f" and bool(np.isfinite(value).all())
        return self._finite[tensor]

    def _make_layer(self, index: int, node: onnx.NodeProto) -> Layer | None:
        if node.op_type not in self.layer_ops or not node.output:
            return None
        weight_slot = self.weight_slots.get(node.op_type)
        weight: Weight | None = None
        if weight_slot is not None and len(node.input) > weight_slot:
            tensor = node.input[weight_slot]
            if tensor in self.constants:
                where = self.constants[tensor][0]
                dtype = self.dtypes.get(tensor, 0)
                if dtype in _FLOAT_TYPES:
                    weight = Weight(tensor, where, self.shapes.get(tensor) or (), dtype)
        if node.op_type == "Gather" and weight is None:
            return None  # index lookups into activations are not layers
        activations = tuple(
            t for i, t in enumerate(node.input)
            if t and t not in self.constants and not (node.op_type == "Gather" and i == 1) and self.is_float(t)
        )
        if weight is None and not activations:
            return None
        if weight_slot is None and any(t in self.constants for t in node.input if t):
            # an elementwise op with a constant operand (a bias Add, a scale Mul) stays float:
            # its integer kernels need every operand quantized like an activation
            return None
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and weight is None:
            return None  # a Conv/Gemm with activation weights is rare; it stays float
        bias = None
        bias_slot = DEFAULT_BIAS_INPUTS.get(node.op_type, (None,))[0]
        if bias_slot is not None and len(node.input) > bias_slot and node.input[bias_slot] in self.constants:
            bias = node.input[bias_slot]
        params = weight.elements if weight else 0
        if bias is not None:
            params += int(np.prod(self.shapes.get(bias) or (1,)))
        out_shape = self.shapes.get(node.output[0])
        in_elements = sum(_per_sample_elements(self.shapes.get(t)) for t in activations)
        return Layer(
            name=node.name,
            op_type=node.op_type,
            index=index,
            inputs=tuple(node.input),
            activations=activations,
            output=node.output[0],
            weight=weight,
            bias=bias,
            params=params,
            macs=self._macs(node, weight, out_shape),
            output_elements=_per_sample_elements(out_shape),
            input_elements=in_elements,
        )

    def _macs(self, node: onnx.NodeProto, weight: Weight | None, out_shape: tuple[int, ...] | None) -> int:
        out = _per_sample_elements(out_shape)
        if node.op_type in ("Conv", "ConvTranspose") and weight is not None and len(weight.shape) >= 2:
            kernel = int(np.prod(weight.shape[2:])) if len(weight.shape) > 2 else 1
            if node.op_type == "Conv":
                return out * weight.shape[1] * kernel
            in_elements = _per_sample_elements(self.shapes.get(node.input[0]))
            return in_elements * weight.shape[1] * kernel
        if node.op_type in ("Gemm", "MatMul"):
            a_shape = self.shapes.get(node.input[0])
            if a_shape and a_shape[-1] > 0:
                return out * a_shape[-1]
            if weight is not None and weight.shape:
                reduce = weight.shape[0]
                for attr in node.attribute:
                    if attr.name == "transB" and attr.i:
                        reduce = weight.shape[-1]
                return out * reduce
        return 0

    # -- queries --------------------------------------------------------------------------

    @cached_property
    def layer_names(self) -> tuple[str, ...]:
        """Layers in graph order."""
        return tuple(self.layers)

    def layer_of_tensor(self, tensor: str) -> str | None:
        node = self.producer.get(tensor)
        return node if node in self.layers else None

    def _walk(self, start: Iterable[str], forward: bool) -> Iterator[tuple[str, int]]:
        """Yield (layer, hops) reached from nodes ``start`` through non-layer nodes."""
        queue = deque((name, 1) for name in start)
        seen: set[str] = set()
        while queue:
            name, hops = queue.popleft()
            if name in seen:
                continue
            seen.add(name)
            if name in self.layers:
                yield name, hops
                continue
            nexts = self.digraph.successors(name) if forward else self.digraph.predecessors(name)
            for other in sorted(nexts):
                queue.append((other, hops + 1))

    def producers(self, layer: str) -> list[str]:
        """Layers whose outputs reach ``layer``'s activation inputs through non-compute ops."""
        start = [self.producer[t] for t in self.layers[layer].activations if t in self.producer]
        return sorted({name for name, _ in self._walk(start, forward=False)})

    def consumers_of(self, layer: str) -> list[str]:
        """Layers that ``layer``'s output reaches through non-compute ops."""
        start = sorted(self.digraph.successors(layer))
        return sorted({name for name, _ in self._walk(start, forward=True)})

    def residual_joins(self) -> list[tuple[str, tuple[str, ...]]]:
        """Add/Sum nodes that merge ≥2 activation branches, with the nearest layer of each branch."""
        joins = []
        for name, node in self.nodes.items():
            if node.op_type not in ("Add", "Sum"):
                continue
            branches = [t for t in node.input if t and t not in self.constants and t in self.producer]
            if len(branches) < 2:
                continue
            sources = []
            for tensor in branches:
                found = sorted({layer for layer, _ in self._walk([self.producer[tensor]], forward=False)})
                sources.extend(found)
            joins.append((name, tuple(sorted(set(sources)))))
        return joins

    def root_tensor(self, tensor: str) -> str:
        """Follow a tensor back through single-input shape/layout ops to where it was computed."""
        passthrough = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "Dropout"}
        while tensor in self.producer:
            node = self.nodes[self.producer[tensor]]
            if node.op_type not in passthrough or not node.input:
                break
            tensor = node.input[0]
        return tensor

    def shared_input_groups(self) -> list[tuple[str, tuple[str, ...]]]:
        """Groups of ≥2 layers that read the same activation (branches sharing an input)."""
        groups: dict[str, set[str]] = {}
        for layer in self.layers.values():
            for tensor in layer.activations:
                groups.setdefault(self.root_tensor(tensor), set()).add(layer.name)
        return sorted((tensor, tuple(sorted(members))) for tensor, members in groups.items() if len(members) > 1)

    def nearest_consumers(self, layer: str, limit: int) -> list[str]:
        """Up to ``limit`` consumer layers of ``layer``, nearest (fewest ops in between) first.

        A residual stream makes every later layer a consumer; dependency analysis only needs the
        nearest ones, which keeps the pair count linear in the number of layers.
        """
        start = sorted(self.digraph.successors(layer))
        found = sorted(self._walk(start, forward=True), key=lambda item: (item[1], item[0]))
        return [name for name, _ in found[:limit]]

    def dependent_pairs(self, radius: int = 1, max_per_layer: int = 3) -> list[tuple[str, str, str]]:
        """Dependent layer pairs ``(a, b, kind)`` with ``a`` before ``b`` in graph order.

        Kinds: ``chain`` (producer→consumer within ``radius`` layer hops), ``residual`` (branches
        of one join), ``sibling`` (layers sharing an input). Each layer pairs with a bounded
        number of neighbours, so the count grows linearly with the number of layers.
        """
        order = {name: i for i, name in enumerate(self.layer_names)}
        pairs: dict[tuple[str, str], str] = {}

        def add(a: str, b: str, kind: str) -> None:
            if a == b:
                return
            key = (a, b) if order[a] < order[b] else (b, a)
            pairs.setdefault(key, kind)

        for name in self.layer_names:
            frontier = {name}
            for _ in range(max(1, radius)):
                reached: set[str] = set()
                for layer in frontier:
                    reached.update(self.nearest_consumers(layer, max_per_layer))
                for other in reached:
                    add(name, other, "chain")
                frontier = reached
        for _, sources in self.residual_joins():
            ordered = sorted(sources, key=order.__getitem__)
            for a, b in zip(ordered, ordered[1:], strict=False):
                add(a, b, "residual")
        for _, members in self.shared_input_groups():
            ordered = sorted(members, key=order.__getitem__)
            for a, b in zip(ordered, ordered[1:], strict=False):
                add(a, b, "sibling")
        return sorted(((a, b, kind) for (a, b), kind in pairs.items()), key=lambda p: (order[p[0]], order[p[1]]))

    def edges_between_layers(self) -> list[tuple[str, str, int]]:
        """(producer layer, consumer layer, per-sample elements of the tensor between them)."""
        edges = []
        for name in self.layer_names:
            elements = self.layers[name].output_elements
            for other in self.consumers_of(name):
                edges.append((name, other, elements))
        return edges

    def summary_rows(self) -> list[dict[str, str | int]]:
        rows: list[dict[str, str | int]] = []
        for layer in self.layers.values():
            rows.append({
                "layer": layer.name,
                "op_type": layer.op_type,
                "weight": layer.weight.tensor if layer.weight else "-",
                "location": layer.weight.location.value if layer.weight else "activation×activation",
                "shape": "x".join(str(d) for d in layer.weight.shape) if layer.weight else "-",
                "params": layer.params,
                "macs": layer.macs,
                "inputs": ",".join(self.producers(layer.name)) or "(graph input)",
            })
        return rows


@dataclass(frozen=True)
class ScopeView:
    """A subgraph scope with its standalone wrapper model and graph view."""

    scope: Scope
    wrapper: onnx.ModelProto
    wrapped: Wrapped
    view: GraphView


def scope_views(model: onnx.ModelProto, layer_ops: set[str] | frozenset[str],
                weight_slots: Mapping[str, int] | None = None) -> list[ScopeView]:
    """Graph views of every subgraph of ``model`` (empty for models without control flow)."""
    views = []
    for scope in scopes(model):
        wrapper, wrapped = wrap(model, scope)
        views.append(ScopeView(scope, wrapper, wrapped, GraphView(wrapper, layer_ops, weight_slots)))
    return views
