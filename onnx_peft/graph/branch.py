"""The slot branch: LoRA / DoRA computed from slot tensors next to a base Linear.

Shared by ExtractAdapters (rebuilding an exported branch in slot form) and InsertAdapters
(grafting a new branch onto a base model). With ``x [.., in]``, ``W`` the Linear's weight and
``y = x W (+ bias)`` its output (``site.output``)::

    A_slot [in, r]   B_slot [r, out]   factor [out]

    LoRA:  y' = y + MatMul(MatMul(x, A_slot), B_slot)                        [.., out]
    DoRA:  y' = factor * (x W + MatMul(MatMul(x, A_slot), B_slot)) + bias     [.., out]

``x W`` without the bias is the MatMul's own output where a bias Add follows it, else
``y - bias`` (Gemm with C, or a bias before a reshape back, GPT-2 Conv1D style).
"""

from __future__ import annotations

import onnx_ir as ir

from .modules import LinearSite
from .sites import remove_dead


def graft_slot_branch(graph: ir.Graph, site: LinearSite, a: ir.Value, b: ir.Value,
                      factor: ir.Value | None = None, *, replace: ir.Value | None = None,
                      after: ir.Node | None = None) -> ir.Value:
    """Add the slot branch of ``site`` to ``graph``; return ``y'``.

    ``a`` ``[in, r]``, ``b`` ``[r, out]``, ``factor`` ``[out]`` (None: LoRA, else DoRA) are any
    values (slot inputs, initializers, unpacked slots). The new nodes go right after ``after``
    (default: the producer of ``site.output``). Every user of ``replace`` (default
    ``site.output``) other than the new nodes reads ``y'`` instead; where ``replace`` is a graph
    output, ``y'`` takes its place and its name. A bias Add the DoRA form bypasses is removed
    once unused; other nodes left dead (e.g. an old branch feeding ``replace``) are the caller's.
    """
    module = site.module
    replace = site.output if replace is None else replace
    after = site.output.producer() if after is None else after
    new_nodes: list[ir.Node] = []

    def node(op: str, inputs: list[ir.Value], suffix: str) -> ir.Value:
        n = ir.Node("", op, inputs, name=f"{module}/lora/{suffix}", num_outputs=1)
        n.outputs[0].name = f"{module}.lora.{suffix}"
        new_nodes.append(n)
        return n.outputs[0]

    low = node("MatMul", [site.input, a], "A")        # [.., r]
    lora = node("MatMul", [low, b], "B")              # [.., out]
    bypassed: ir.Node | None = None
    if factor is None:
        out = node("Add", [site.output, lora], "add")
    else:
        bias = site.bias
        if bias is None:
            plain = site.output
        elif site.output is not site.node.outputs[0] and site.output.producer().op_type == "Add":
            plain = site.node.outputs[0]
            bypassed = site.output.producer()
        else:
            plain = node("Sub", [site.output, bias], "unbias")
        summed = node("Add", [plain, lora], "add")
        out = node("Mul", [summed, factor], "dora")
        if bias is not None:
            out = node("Add", [out, bias], "bias")
    graph.insert_after(after, new_nodes)
    if replace.type is not None:  # TorchScript/Optimum exports may leave intermediate values untyped
        out.type = replace.type
    out.shape = ir.Shape(replace.shape) if replace.shape is not None else None
    if replace.is_graph_output():
        # keep the graph's output name: the new value takes it, the old one gets a new name
        for i, value in enumerate(graph.outputs):
            if value is replace:
                graph.outputs[i] = out
        replace.name, out.name = f"{module}.lora.base_out", replace.name
    for user, index in list(replace.uses()):
        if user not in new_nodes:
            user.replace_input_with(index, out)
    if bypassed is not None:
        remove_dead(graph, [bypassed])
    return out
