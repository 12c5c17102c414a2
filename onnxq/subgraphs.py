"""Layers inside control flow: ``If``, ``Loop`` and ``Scan`` subgraphs.

onnxruntime's quantizer never looks inside subgraphs, so a model whose whole network sits in an
``If`` (recurrent voice-activity detectors are built that way) comes out unquantized. onnxq
treats every subgraph as a *scope*:

* :func:`scopes` lists them (recursively, in a deterministic order) with the path of owner
  nodes that leads to each;
* :func:`wrap` turns a scope into a standalone model (outer-scope constants copied in, other
  outer-scope tensors as inputs) so the graph view, layout and rewrite work on it unchanged, and
  :func:`unwrap` writes the rewritten graph back;
* :func:`expose` threads subgraph tensors out to main-graph outputs (an extra branch output of
  ``If`` — a neutral ``[0]`` in the other branch —, an extra scan output of ``Loop``/``Scan``)
  so one calibration sweep over the main graph sees them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["Scope", "scopes", "find_graph", "outer_references", "wrap", "unwrap", "expose", "Wrapped"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Scope:
    """A subgraph: reached from the main graph through ``owners`` ((node name, attribute), …)."""

    owners: tuple[tuple[str, str], ...]

    @property
    def key(self) -> str:
        return "/".join(f"{node}.{attr}" for node, attr in self.owners)

    @property
    def depth(self) -> int:
        return len(self.owners)


def _graph_attributes(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for index, graph in enumerate(attr.graphs):
                yield f"{attr.name}[{index}]", graph


def scopes(model: onnx.ModelProto) -> list[Scope]:
    """Every subgraph of the model, outer scopes before the scopes nested in them."""
    found: list[Scope] = []

    def visit(graph: onnx.GraphProto, owners: tuple[tuple[str, str], ...]) -> None:
        for node in graph.node:
            for attr_name, sub in _graph_attributes(node):
                scope = Scope(owners + ((node.name, attr_name),))
                found.append(scope)
                visit(sub, scope.owners)

    visit(model.graph, ())
    return found


def find_graph(model: onnx.ModelProto, scope: Scope) -> onnx.GraphProto:
    """The live subgraph proto of ``scope`` inside ``model``."""
    graph = model.graph
    for node_name, attr_name in scope.owners:
        node = next(n for n in graph.node if n.name == node_name)
        graph = dict(_graph_attributes(node))[attr_name]
    return graph


def find_owner(model: onnx.ModelProto, scope: Scope) -> tuple[onnx.GraphProto, onnx.NodeProto]:
    """The graph holding the node that owns ``scope``, and that node."""
    graph = model.graph
    node = None
    for depth, (node_name, attr_name) in enumerate(scope.owners):
        node = next(n for n in graph.node if n.name == node_name)
        if depth < len(scope.owners) - 1:
            graph = dict(_graph_attributes(node))[attr_name]
    assert node is not None
    return graph, node


def defined_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {i.name for i in graph.initializer}
    names |= {o for n in graph.node for o in n.output if o}
    return names


def outer_references(graph: onnx.GraphProto) -> set[str]:
    """Tensors a graph (and the subgraphs inside it) reads but does not define."""
    defined = defined_names(graph)
    used: set[str] = set()
    for node in graph.node:
        used.update(t for t in node.input if t)
        for _, sub in _graph_attributes(node):
            used.update(outer_references(sub))
    used.update(o.name for o in graph.output)
    return used - defined


def ensure_unique_node_names(model: onnx.ModelProto) -> None:
    """Node names unique across all scopes (plans name subgraph layers by node name)."""
    seen: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for index, node in enumerate(graph.node):
            name = node.name or f"{node.op_type}_{index}"
            base, suffix = name, 1
            while name in seen:
                name = f"{base}_{suffix}"
                suffix += 1
            node.name = name
            seen.add(name)
        for node in graph.node:
            for _, sub in _graph_attributes(node):
                visit(sub)

    visit(model.graph)


def _constants_in(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    found = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(attr.t)
                    tensor.name = node.output[0]
                    found[node.output[0]] = tensor
    return found


@dataclass(frozen=True)
class Wrapped:
    """What :func:`wrap` added, so :func:`unwrap` can take it away again."""

    copied_constants: frozenset[str]
    outer_inputs: frozenset[str]


def wrap(model: onnx.ModelProto, scope: Scope) -> tuple[onnx.ModelProto, Wrapped]:
    """A standalone model of ``scope``'s subgraph."""
    chain = [model.graph]
    graph = model.graph
    for node_name, attr_name in scope.owners:
        node = next(n for n in graph.node if n.name == node_name)
        graph = dict(_graph_attributes(node))[attr_name]
        chain.append(graph)
    sub = chain[-1]
    outer_constants: dict[str, onnx.TensorProto] = {}
    outer_types: dict[str, onnx.ValueInfoProto] = {}
    for enclosing in chain[:-1]:
        outer_constants.update(_constants_in(enclosing))
        for value in list(enclosing.value_info) + list(enclosing.input) + list(enclosing.output):
            outer_types[value.name] = value
    wrapper_graph = onnx.GraphProto()
    wrapper_graph.CopyFrom(sub)
    references = outer_references(sub)
    copied, inputs = set(), set()
    for name in sorted(references):
        if name in outer_constants:
            wrapper_graph.initializer.append(outer_constants[name])
            copied.add(name)
        else:
            value = outer_types.get(name)
            info = onnx.ValueInfoProto()
            if value is not None:
                info.CopyFrom(value)
            else:
                info.CopyFrom(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            wrapper_graph.input.append(info)
            inputs.add(name)
    wrapper = helper.make_model(wrapper_graph, opset_imports=list(model.opset_import))
    wrapper.ir_version = model.ir_version
    return wrapper, Wrapped(frozenset(copied), frozenset(inputs))


def unwrap(model: onnx.ModelProto, scope: Scope, wrapper: onnx.ModelProto, wrapped: Wrapped) -> None:
    """Write the rewritten ``wrapper`` back into ``scope``'s live subgraph."""
    graph = onnx.GraphProto()
    graph.CopyFrom(wrapper.graph)
    keep_inputs = [v for v in graph.input if v.name not in wrapped.outer_inputs]
    del graph.input[:]
    graph.input.extend(keep_inputs)
    keep_inits = [i for i in graph.initializer if i.name not in wrapped.copied_constants]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    del graph.value_info[:]
    find_graph(model, scope).CopyFrom(graph)


def _owner_scope_of(model: onnx.ModelProto, tensor: str, all_scopes: Sequence[Scope]) -> Scope | None:
    """The innermost scope that defines ``tensor`` (None: the main graph)."""
    if tensor in defined_names(model.graph):
        return None
    for scope in sorted(all_scopes, key=lambda s: -s.depth):
        if tensor in defined_names(find_graph(model, scope)):
            return scope
    return None


def expose(model: onnx.ModelProto, tensors: Sequence[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` where each subgraph tensor also reaches a main-graph output.

    Returns the copy and a map tensor → main-graph name that carries its values (main-graph
    tensors map to themselves).
    """
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    all_scopes = scopes(exposed)
    mapping: dict[str, str] = {}
    for tensor in tensors:
        scope = _owner_scope_of(exposed, tensor, all_scopes)
        name = tensor
        while scope is not None:
            outer_graph, owner = find_owner(exposed, scope)
            sub = find_graph(exposed, scope)
            outer_name = f"onnxq_calib/{name}"
            known = {v.name: v for v in list(sub.value_info) + list(sub.output) + list(sub.input)}
            # a fresh copy: onnxruntime's Scan cannot emit a body input directly as an output
            copy_name = f"{name}/onnxq_copy"
            sub.node.append(helper.make_node("Identity", [name], [copy_name], name=f"{copy_name}/Identity"))
            info = helper.make_tensor_value_info(copy_name, onnx.TensorProto.FLOAT, None)
            if name in known and known[name].type.tensor_type.HasField("shape"):
                # Scan needs concrete per-iteration output shapes: keep what inference found
                info.type.CopyFrom(known[name].type)
            sub.output.append(info)
            if owner.op_type == "If":
                other_attr = "else_branch" if scope.owners[-1][1] == "then_branch" else "then_branch"
                other = dict(_graph_attributes(owner))[other_attr]
                dummy = f"{name}/onnxq_neutral"
                # 0 lies inside every calibrated range (ranges always include zero), so the
                # branch that did not run adds nothing to min/max statistics
                other.node.append(helper.make_node("Constant", [], [dummy], name=f"{dummy}/Constant",
                                                   value=numpy_helper.from_array(np.zeros(1, np.float32))))
                other.output.append(helper.make_tensor_value_info(dummy, onnx.TensorProto.FLOAT, None))
            elif owner.op_type == "Scan":
                for attr in owner.attribute:
                    if attr.name in ("scan_output_axes", "scan_output_directions"):
                        attr.ints.append(0)
            owner.output.append(outer_name)
            name = outer_name
            parent = Scope(scope.owners[:-1])
            scope = parent if parent.owners else None
            if scope is None and outer_graph is not exposed.graph:
                raise AssertionError("scope chain broken")
        if name != tensor:
            exposed.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        mapping[tensor] = name
    return exposed, mapping
