"""Graft (and ungraft) a module's adapter branch: its forms (methods/forms.py) around one Linear.

With ``x [.., in]`` the Linear's input and ``y = x W (+ bias)`` its output (``site.output``)::

    x ─ [stage-0 forms] ─ x' ─ Linear(W) ─ y ─ [stage-1/2 forms, reading x'] ─ y' ─▶ old users of y

Every node added carries ``metadata_props["onnx_peft.branch"] = <module>``, and the last node of
each side records the value it stands in for, so :func:`ungraft` can restore the plain base
(MultiAdapter rebuilds a module's branch per row that way: one graph form per method, built
once, plain or batched).

``batched``: slot values carry a leading per-row axis (``A [batch, in, r]``); ``x`` is viewed as
``[batch, -1, in]`` (reshaped when its rank is not known to be 3) and results are shaped back.

Embedding and norm sites (graph/op_sites.py) take the output-side forms the same way (an
embedding's ``x`` is its ids, viewed as ``[batch, -1]`` per row); a form may also replace an
input of the site's node (the ``norm`` form's ``w + dw``): the new value's node records the value
it stands in for, so :func:`ungraft` restores it like any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from ..methods.forms import Form
from .modules import LinearSite
from .sites import remove_dead

BRANCH_KEY = "onnx_peft.branch"
REPLACES_KEY = "onnx_peft.replaces"


class BranchBuilder:
    """What a form sees: the current ``x`` / ``y``, the site's bias, and ``op`` to add nodes."""

    def __init__(self, graph: ir.Graph, site: LinearSite, batched: bool) -> None:
        self.graph, self.site, self.batched = graph, site, batched
        self.module = site.module
        self.nodes: list[ir.Node] = []
        self.x: ir.Value = site.input
        self.y: ir.Value = site.branch_output
        self.bias: ir.Value | None = site.bias
        self.replaced: list[tuple[ir.Node, int, ir.Value]] = []  # (node, input index, new value)

    @property
    def dtype(self) -> ir.DataType:
        """The model's float type: the site's parameter's."""
        weight = self.site.weight
        return weight.dtype or weight.const_value.dtype

    @property
    def float_type(self) -> int:
        """The model's float type (of the site's parameter), for Cast."""
        return int(self.dtype)

    def op(self, op_type: str, inputs: Sequence[ir.Value], suffix: str, domain: str = "",
           **attributes: object) -> ir.Value:
        node = ir.node(op_type, list(inputs), attributes, domain=domain, name=f"{self.module}/adapter/{suffix}")
        node.outputs[0].name = f"{self.module}.adapter.{suffix}.{len(self.nodes)}"
        node.metadata_props[BRANCH_KEY] = self.module
        self.nodes.append(node)
        return node.outputs[0]

    def replace_input(self, node: ir.Node, index: int, value: ir.Value) -> None:
        """Make ``node`` read ``value`` (built by this builder) at input ``index`` once grafted."""
        self.replaced.append((node, index, value))

    def const(self, values: list[int]) -> ir.Value:
        name = "onnx_peft/const_" + "_".join(str(v) for v in values).replace("-", "m")
        if name not in self.graph.initializers:
            value = ir.Value(name=name, const_value=ir.tensor(np.array(values, dtype=np.int64), name=name))
            self.graph.register_initializer(value)
        return self.graph.initializers[name]

    def scalar(self, number: int) -> ir.Value:
        """A 0-d int64 constant (Range's bounds)."""
        name = f"onnx_peft/scalar_{number}".replace("-", "m")
        if name not in self.graph.initializers:
            value = ir.Value(name=name, const_value=ir.tensor(np.array(number, dtype=np.int64), name=name))
            self.graph.register_initializer(value)
        return self.graph.initializers[name]

    def array(self, values: np.ndarray) -> ir.Value:
        """A constant in the model's float dtype, owned by this module's branch."""
        name = f"{self.module}.adapter.const_{len(self.nodes)}"
        while name in self.graph.initializers:
            name += "_"
        array = np.asarray(values).astype(self.dtype.numpy())
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def flat(self, value: ir.Value, features: int, suffix: str) -> ir.Value:
        """``value`` as ``[batch, -1, features]`` (unchanged when already rank 3)."""
        if value.shape is not None and len(value.shape) == 3:
            return value
        return self.op("Reshape", [value, self.const([0, -1, features])], suffix)

    def unflat(self, value: ir.Value, like: ir.Value, suffix: str) -> ir.Value:
        if value is like or (like.shape is not None and len(like.shape) == 3):
            return value
        return self.op("Reshape", [value, self.op("Shape", [like], suffix + "_shape")], suffix)


def _linear_input_use(site: LinearSite) -> tuple[ir.Node, int]:
    """The (node, index) through which ``site.input`` enters the Linear (the MatMul, or the
    flattening Reshape in front of it)."""
    node = site.node
    if node.inputs[0] is site.input:
        return node, 0
    return node.inputs[0].producer(), 0


def graft(graph: ir.Graph, site: LinearSite, forms: Sequence[tuple[Form, Mapping[str, ir.Value]]],
          batched: bool = False) -> ir.Value:
    """Build ``forms`` (each with its slot values by suffix) around ``site``; return ``y'``."""
    if not isinstance(site, LinearSite):
        return _graft_op_site(graph, site, forms, batched)
    g = BranchBuilder(graph, site, batched)
    ordered = sorted(forms, key=lambda item: item[0].stage)
    x0, y0 = site.input, site.branch_output
    d_in, d_out = site.in_features, site.out_features
    pre = [(f, v) for f, v in ordered if f.stage == 0]
    post = [(f, v) for f, v in ordered if f.stage > 0]
    if pre:
        g.x = g.flat(x0, d_in, "x_rows") if batched else x0
        for form, values in pre:
            form.build(g, values)
        g.x = g.unflat(g.x, x0, "x_back") if batched else g.x
        last = g.nodes[-1]
        last.metadata_props[REPLACES_KEY] = x0.name
        consumer, index = _linear_input_use(site)
        graph.insert_before(consumer, list(g.nodes))
        consumer.replace_input_with(index, g.x)
    if not post:
        return y0
    start = len(g.nodes)
    if batched:
        g.x = g.flat(g.x, d_in, "x_rows_post")
        g.y = g.flat(y0, d_out, "y_rows")
    else:
        g.y = y0
    for form, values in post:
        form.build(g, values)
    out = g.unflat(g.y, y0, "y_back") if batched else g.y
    new_nodes = g.nodes[start:]
    new_nodes[-1].metadata_props[REPLACES_KEY] = y0.name
    graph.insert_after(y0.producer(), new_nodes)
    if y0.type is not None:  # TorchScript/Optimum exports may leave intermediate values untyped
        out.type = y0.type
        out.shape = ir.Shape(y0.shape) if y0.shape is not None else None
    if y0.is_graph_output():  # keep the graph's output name: the new value takes it
        for i, value in enumerate(graph.outputs):
            if value is y0:
                graph.outputs[i] = out
        y0.name, out.name = f"{site.module}.adapter.base_out", y0.name
        new_nodes[-1].metadata_props[REPLACES_KEY] = y0.name
    ours = set(g.nodes)
    for user, index in list(y0.uses()):
        if user not in ours:
            user.replace_input_with(index, out)
    return out


def _graft_op_site(graph: ir.Graph, site, forms: Sequence[tuple[Form, Mapping[str, ir.Value]]],
                   batched: bool) -> ir.Value:
    """:func:`graft` on an embedding or norm site: output-side forms, and input replacements."""
    g = BranchBuilder(graph, site, batched)
    y0 = site.branch_output
    if batched:
        g.x = g.op("Reshape", [site.input, g.const([0, -1])], "ids_rows") if site.kind == "embedding" \
            else g.flat(site.input, site.in_features, "x_rows")
        g.y = g.flat(y0, site.out_features, "y_rows")
    start = g.y
    for form, values in sorted(forms, key=lambda item: item[0].stage):
        form.build(g, values)
    pre = [value.producer() for _, _, value in g.replaced]
    if pre:  # in front of the node, which reads the new values
        for node, index, value in g.replaced:
            value.producer().metadata_props[REPLACES_KEY] = node.inputs[index].name
        graph.insert_before(site.node, pre)
        for node, index, value in g.replaced:
            node.replace_input_with(index, value)
    if g.y is start:
        return y0
    out = g.unflat(g.y, y0, "y_back") if batched else g.y
    post = [n for n in g.nodes if n not in pre]
    post[-1].metadata_props[REPLACES_KEY] = y0.name
    graph.insert_after(y0.producer(), post)
    if y0.type is not None:
        out.type, out.shape = y0.type, ir.Shape(y0.shape) if y0.shape is not None else None
    if y0.is_graph_output():
        graph.outputs[list(graph.outputs).index(y0)] = out
        y0.name, out.name = f"{site.module}.adapter.base_out", y0.name
        post[-1].metadata_props[REPLACES_KEY] = y0.name
    ours = set(g.nodes)
    for user, index in list(y0.uses()):
        if user not in ours:
            user.replace_input_with(index, out)
    return out


def ungraft(graph: ir.Graph, module: str) -> int:
    """Remove the branch :func:`graft` built for ``module``; the Linear reads and feeds what it
    did before. Returns the number of nodes removed (0: the module has no tagged branch)."""
    nodes = [n for n in graph if n.metadata_props.get(BRANCH_KEY) == module]
    if not nodes:
        return 0
    for node in nodes:
        replaced = node.metadata_props.get(REPLACES_KEY)
        if replaced is None:
            continue
        out = node.outputs[0]
        original = _find_input(nodes, replaced)
        if out.is_graph_output():
            index = list(graph.outputs).index(out)
            graph.outputs[index] = original
            out.name, original.name = f"{module}.adapter.removed", out.name
            if original.type is None:
                original.type, original.shape = out.type, out.shape
        for user, index in list(out.uses()):
            if user not in nodes:
                user.replace_input_with(index, original)
    for node in reversed(nodes):  # users before producers
        for i in range(len(node.inputs)):
            node.replace_input_with(i, None)
    graph.remove(nodes, safe=False)
    return len(nodes)


def _find_input(nodes: Sequence[ir.Node], name: str) -> ir.Value:
    for node in nodes:
        for value in node.inputs:
            if value is not None and value.name == name:
                return value
    raise ValueError(f"branch nodes do not read {name!r}")


def graft_slot_branch(graph: ir.Graph, site: LinearSite, a: ir.Value, b: ir.Value,
                      factor: ir.Value | None = None) -> ir.Value:
    """The LoRA (``factor`` None) or DoRA branch of ExtractAdapters: ``lora`` (+ ``dora``) forms."""
    from ..methods.forms import FORMS, DoraForm, LoraForm

    forms: list[tuple[Form, Mapping[str, ir.Value]]] = [(FORMS["lora"], {LoraForm.A: a, LoraForm.B: b})]
    if factor is not None:
        forms.append((FORMS["dora"], {DoraForm.suffix: factor}))
    out = graft(graph, site, forms)
    remove_dead(graph, [])
    return out
