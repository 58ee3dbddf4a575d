"""drop_slots: a slot model (``export --mode inputs``/``external``, ``insert``, ``extract``) back
to a plain model, so MergeAdapters can fold an adapter into it.

    slot inputs + branches   ->  the base graph (every form ungrafted; defaults were the no-op)
    external initializers    ->  with ``keep_held``: plain initializers, the branches in-graph ones
    full-weight head slots   ->  plain initializers holding their default (the base head)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..errors import IncompatibleAdapterError
from ..graph.contract import CONTRACT_KEY, FULL_WEIGHT_METHOD, read_contract
from ..graph.sites import remove_dead


def drop_slots(model: ir.Model, keep_held: bool = False) -> list[str]:
    """Turn a slot model back into a plain one; returns the modules whose branches went.

    ``keep_held=False``: every low-rank/form branch is removed (ungraft; LoRA branches of other
    tools by structure), so the model is the base. ``keep_held=True`` (an external-initializer
    model): the slots become plain initializers holding the adapter they hold, so the branches
    are in-graph ones that :class:`MergeAdapters` then folds. Full-weight slots stop being inputs
    and keep their initializer (the base head). The contract and packing metadata go."""
    from ..graph.branch import ungraft
    from .extract_adapters import EXTERNAL_KEY, PACKING_KEY, read_packing
    from .multi_adapter import _ungraft_untagged_lora

    graph = model.graph
    contract = read_contract(model.metadata_props)
    packing = read_packing(model.metadata_props) or {}
    inputs = {v.name: v for v in graph.inputs}
    removed: list[str] = []
    by_module: dict[str, dict[str, list]] = {}
    for slot in contract.slots:
        if slot.method != FULL_WEIGHT_METHOD:
            by_module.setdefault(slot.module, {}).setdefault(slot.method, []).append(slot)
    if keep_held:  # modules the held adapter leaves out (rank 0) lose their branch all the same
        by_module = {m: forms for m, forms in by_module.items() if any(
            _held_size(inputs.get(s.name)) == 0 for slots in forms.values() for s in slots)}
    if by_module:
        values = {**{v.name: v for n in graph for v in n.outputs if v.name}, **inputs}
        for module, forms in by_module.items():
            if not ungraft(graph, module) and not _ungraft_untagged_lora(graph, module, forms, values):
                raise IncompatibleAdapterError(
                    f"MergeAdapters: module {module}: its slot branch is not one onnx-peft built, nor "
                    "Add(base, MatMul(MatMul(x, A), B)); merge the adapter into the base model instead")
            removed.append(module)
        remove_dead(graph, list(graph))
    slot_inputs = {s.name for s in contract.slots} | {g[k] for g in packing.values() for k in ("data", "sizes")}
    for name in slot_inputs:
        value = inputs.get(name)
        if value is None:
            continue
        graph.inputs.remove(value)
        if value.const_value is None and value.uses():
            raise IncompatibleAdapterError(f"MergeAdapters: slot {name} has no default value in the model and is "
                                           "still used; merge the adapter into the base model instead")
        if not value.uses() and name in graph.initializers:
            graph.initializers.pop(name)
        elif keep_held and value.shape is not None and value.const_value is not None:
            value.shape = ir.Shape(value.const_value.shape)  # a plain constant: its own shape
    for key in (CONTRACT_KEY, PACKING_KEY, EXTERNAL_KEY):
        model.metadata_props.pop(key, None)
    return removed


def _held_size(value: ir.Value | None) -> int | None:
    """Elements of the tensor a slot input holds (None: not an input with a value)."""
    if value is None or value.const_value is None:
        return None
    return int(np.prod(value.const_value.shape.numpy()))
