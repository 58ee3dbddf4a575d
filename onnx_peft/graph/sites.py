"""Find LoRA-family adapter branches in a graph by their structure, not their names.

LoRA (PEFT export, TorchScript or torch.onnx dynamo, optimized or not)::

    x ─┬─ MatMul/Gemm(x, W) [+ b] ─────────────────────────┐
       └─ [Mul s] MatMul(., A) [Mul s] MatMul(., B) [Mul s] ─ Add ─▶ y
           (A, B: initializers, through Transpose/Identity, or graph inputs)

DoRA as PEFT exports it (``f = m / ||W + s B A||_row``, constant-folded or computed in-graph)::

    y = (x W^T + b) + [ (f - 1) * (x W^T) + f * s * (x A^T B^T) ]

Each branch found is an :class:`AdapterBranch` holding the base :class:`LinearSite`, the A/B
values with their layouts, the scale and the nodes that only the branch uses. Packed inputs
(Slice of one big input) are not recognised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..methods.lora import lora_delta_weight, row_norm
from .modules import (
    LinearSite,
    constant_array,
    find_linear_sites,
    is_graph_input,
    resolve_weight,
    skip_pass_through,
)

_PASS_THROUGH = ("Identity", "Dropout", "Cast")
_MAX_BRANCH_NODES = 80


@dataclass
class AdapterBranch:
    """One adapter branch ``y = base(x) + s * (x A^T) B^T`` (or its DoRA form).

    Layouts: ``lora_A_layout`` is "in_r" (MatMul-ready A^T ``[in, r]``) or "r_in" (PEFT's
    ``[r, in]``, fed through a Transpose); ``lora_B_layout`` is "r_out" or "out_r".
    """

    module: str
    base: LinearSite
    lora_A: ir.Value
    lora_A_layout: str
    lora_B: ir.Value
    lora_B_layout: str
    scale: float
    add: ir.Node                     # the Add that joins base and branch
    nodes: list[ir.Node] = field(default_factory=list)   # nodes computing the branch (Add included)
    method: str = "lora"             # "lora" | "dora"
    magnitude: ir.Value | None = None        # DoRA m [out], when the graph computes the norm
    factor: np.ndarray | None = None         # DoRA m / ||W + dW|| [out], when constant-folded

    @property
    def output(self) -> ir.Value:
        return self.add.outputs[0]

    @property
    def is_input(self) -> bool:
        """True when A/B are graph inputs (a model our extract pass wrote)."""
        return is_graph_input(self.lora_A) or is_graph_input(self.lora_B)

    def a_matrix(self) -> np.ndarray:
        """A as PEFT stores it: ``[r, in]``."""
        a = self.lora_A.const_value.numpy()
        return a.T if self.lora_A_layout == "in_r" else a

    def b_matrix(self) -> np.ndarray:
        """B as PEFT stores it: ``[out, r]``."""
        b = self.lora_B.const_value.numpy()
        return b.T if self.lora_B_layout == "r_out" else b

    def delta_weight(self) -> np.ndarray:
        """``s * B @ A`` as ``[out, in]`` float (methods.lora does the math)."""
        return lora_delta_weight(self.a_matrix(), self.b_matrix(), self.scale)

    def dora_magnitude(self, base_out_in: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """DoRA's m ``[out]``; recovered as ``f * ||W + dW||`` when only f survived folding."""
        if self.magnitude is not None:
            return self.magnitude.const_value.numpy().reshape(-1)
        return self.factor.reshape(-1) * row_norm(base_out_in + delta)


def _scalar(value: ir.Value) -> float | None:
    array = constant_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def _mul_scalar(node: ir.Node, value: ir.Value) -> float | None:
    """If ``node`` multiplies ``value`` by a scalar constant (or divides by one), that factor."""
    if node.op_type == "Mul":
        other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
        return _scalar(other)
    if node.op_type == "Div" and node.inputs[0] is value:
        s = _scalar(node.inputs[1])
        return None if not s else 1.0 / s
    return None


def _walk_up(value: ir.Value) -> tuple[ir.Value, float, list[ir.Node]]:
    """Walk up through pass-through ops and scalar Muls; return (value, scale product, nodes)."""
    scale, nodes = 1.0, []
    while (producer := value.producer()) is not None:
        if producer.op_type in _PASS_THROUGH:
            nodes.append(producer)
            value = producer.inputs[0]
            continue
        if producer.op_type in ("Mul", "Div"):
            for candidate in producer.inputs[:1] if producer.op_type == "Div" else producer.inputs:
                s = _mul_scalar(producer, candidate)
                if s is not None and constant_array(candidate) is None:
                    scale *= s
                    nodes.append(producer)
                    value = candidate
                    break
            else:
                break
            continue
        break
    return value, scale, nodes


def _matrix(value: ir.Value, as_first: str, as_second: str) -> tuple[ir.Value, str] | None:
    """The A/B weight behind a MatMul's second input with its layout, or None."""
    if is_graph_input(value):
        return value, as_first
    resolved = resolve_weight(value)
    if resolved is None:
        return None
    weight, transposed = resolved
    return weight, as_second if transposed else as_first


def _product_weight(node: ir.Node | None, as_first: str, as_second: str) -> tuple[ir.Value, str] | None:
    """The weight of ``x @ W`` computed by a MatMul, or by a bias-free Gemm (2-D inputs export
    Linear layers as ``Gemm(x, W, transB=1)``), with its layout; None for anything else."""
    if node is None:
        return None
    if node.op_type == "MatMul":
        return _matrix(node.inputs[1], as_first, as_second)
    if node.op_type != "Gemm" or (len(node.inputs) > 2 and node.inputs[2] is not None):
        return None
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
        return None
    found = _matrix(node.inputs[1], as_first, as_second)
    if found is None or not attrs.get("transB", 0):
        return found
    weight, layout = found
    return weight, as_second if layout == as_first else as_first


def _lora_chain(value: ir.Value, x: ir.Value) -> tuple | None:
    """Match ``[Mul] MatMul([Mul] MatMul([Mul] x, A), B)`` (or bias-free Gemms) ending at ``value``."""
    top, s1, nodes = _walk_up(value)
    b_node = top.producer()
    b = _product_weight(b_node, "r_out", "out_r")
    if b is None:
        return None
    mid, s2, more = _walk_up(b_node.inputs[0])
    a_node = mid.producer()
    a = _product_weight(a_node, "in_r", "r_in")
    if a is None:
        return None
    start, s3, first = _walk_up(a_node.inputs[0])
    if skip_pass_through(start) is not skip_pass_through(x):
        return None
    return a, b, s1 * s2 * s3, [*nodes, b_node, *more, a_node, *first]


def _cone(value: ir.Value, stop: set[int]) -> list[ir.Node] | None:
    """Nodes computing ``value``, stopping at ``stop`` values and constants; None if too many."""
    nodes: list[ir.Node] = []
    seen: set[int] = set()
    stack = [value]
    while stack:
        current = stack.pop()
        if current is None or id(current) in stop:
            continue
        producer = current.producer()
        if producer is None or id(producer) in seen:
            continue
        seen.add(id(producer))
        nodes.append(producer)
        if len(nodes) > _MAX_BRANCH_NODES:
            return None
        stack.extend(producer.inputs)
    return nodes


def _dora_factor(value: ir.Value) -> tuple[np.ndarray | None, ir.Value | None]:
    """The DoRA factor behind ``value``: folded constant f, or the magnitude m of Div(m, norm)."""
    array = constant_array(value)
    if array is not None:
        return array, None
    while (producer := value.producer()) is not None and producer.op_type in (*_PASS_THROUGH, "Reshape",
                                                                                "Unsqueeze"):
        value = producer.inputs[0]
    if producer is not None and producer.op_type == "Div":
        numerator = producer.inputs[0]
        m = constant_array(numerator)
        if m is not None and m.ndim == 1:
            resolved = numerator
            while resolved.producer() is not None and resolved.producer().op_type == "Identity":
                resolved = resolved.producer().inputs[0]
            return None, resolved
    return None, None


def _dora_chain(value: ir.Value, x: ir.Value, out_features: int) -> tuple | None:
    """Match DoRA's ``(f - 1) * base + f * s * lora`` at ``value`` (an Add)."""
    add = value.producer()
    if add is None or add.op_type != "Add":
        return None
    for lora_side in add.inputs:
        scale, _nodes = 1.0, []
        current = lora_side
        factor = magnitude = None
        while (producer := current.producer()) is not None and producer.op_type in ("Mul", *_PASS_THROUGH):
            if producer.op_type in _PASS_THROUGH:
                current = producer.inputs[0]
                continue
            left, right = producer.inputs
            s_left, s_right = _scalar(left), _scalar(right)
            if s_right is not None:
                scale, current = scale * s_right, left
            elif s_left is not None:
                scale, current = scale * s_left, right
            elif factor is None and magnitude is None:
                for f_side, other in ((left, right), (right, left)):
                    f, m = _dora_factor(f_side)
                    f_ok = f is not None and f.size == out_features
                    m_ok = m is not None and m.const_value is not None and m.const_value.size == out_features
                    if f_ok or m_ok:
                        factor, magnitude, current = f, m, other
                        break
                else:
                    break
            else:
                break
        if factor is None and magnitude is None:
            continue
        chain = _lora_chain(current, x)
        if chain is not None:
            a, b, s, _ = chain
            return a, b, s * scale, factor, magnitude
    return None


def find_adapter_branches(model: ir.Model, sites: dict[str, LinearSite] | None = None
                          ) -> dict[str, AdapterBranch]:
    """Module path -> AdapterBranch for every LoRA/DoRA branch joined onto a base Linear."""
    sites = find_linear_sites(model) if sites is None else sites
    branches: dict[str, AdapterBranch] = {}
    for module, site in sites.items():
        x = site.input
        for use in list(site.output.uses()):
            add = use.node
            if add.op_type != "Add":
                continue
            other = add.inputs[1] if add.inputs[0] is site.output else add.inputs[0]
            stop = {id(site.output), id(site.node.outputs[0]), id(x), id(skip_pass_through(x))}
            chain = _lora_chain(other, x)
            method, factor, magnitude = "lora", None, None
            if chain is not None:
                a, b, scale, _ = chain
            else:
                dora = _dora_chain(other, x, site.out_features)
                if dora is None:
                    continue
                a, b, scale, factor, magnitude = dora
                method = "dora"
            cone = _cone(other, stop)
            if cone is None:
                continue
            branches[module] = AdapterBranch(
                module=module, base=site, lora_A=a[0], lora_A_layout=a[1], lora_B=b[0],
                lora_B_layout=b[1], scale=scale, add=add, nodes=[*cone, add], method=method,
                magnitude=magnitude, factor=None if factor is None else np.asarray(factor).reshape(-1),
            )
            break
    return branches


def remove_branch(graph: ir.Graph, branch: AdapterBranch, keep: ir.Value | None = None) -> int:
    """Route ``branch.output``'s users to ``keep`` (default: the base output) and delete the
    branch nodes and initializers nobody else uses. Returns the number of nodes removed."""
    keep = branch.base.output if keep is None else keep
    out = branch.output
    if out.is_graph_output():
        index = list(graph.outputs).index(out)
        name = out.name
        out.name = None
        keep.name = name
        graph.outputs[index] = keep
    ir.convenience.replace_all_uses_with(out, keep)
    return remove_dead(graph, branch.nodes)


def remove_dead(graph: ir.Graph, candidates: list[ir.Node]) -> int:
    """Delete the ``candidates`` whose outputs nobody uses (repeatedly), then orphaned initializers."""
    alive = list(candidates)
    removed = 0
    touched: list[ir.Value] = []
    changed = True
    while changed:
        changed = False
        for node in list(alive):
            if any(o.uses() or o.is_graph_output() for o in node.outputs):
                continue
            touched.extend(v for v in node.inputs if v is not None)
            graph.remove(node, safe=True)
            alive.remove(node)
            removed += 1
            changed = True
    for value in touched:
        if value.is_initializer() and not value.uses() and not value.is_graph_input() \
                and not value.is_graph_output() and value.name in graph.initializers:
            graph.initializers.pop(value.name)
    return removed
