"""MultiAdapter: one adapter per batch row, in standard ONNX ops stock ONNX Runtime runs.

Each adapter site of a slot model ``y = x W + (x A_slot) B_slot`` becomes a per-row branch::

    adapter_ids [batch] int64                         (0 = no adapter)
    A_row = Gather(<module>.lora_A.bank [N, in, r], adapter_ids)    -> [batch, in, r]
    B_row = Gather(<module>.lora_B.bank [N, r, out], adapter_ids)   -> [batch, r, out]
    y = x W + MatMul(MatMul(x [batch, seq, in], A_row), B_row)      -> [batch, seq, out]

Banks hold every loaded adapter at its own row (scale folded into B as in the slots, smaller
ranks padded with zeros, which adds exact zeros), so each row's output equals running that row
alone with its adapter. The banks are optional inputs defaulting to ``[1, in, 0]`` zeros, so the
model runs as the base with ``adapter_ids`` all 0 and nothing else. ``AdapterSession`` builds
and refreshes the banks from its loaded adapters without re-creating the ORT session.

A full-weight slot (a ``modules_to_save`` head: ``<module>.weight``, ``<module>.bias``) becomes
banks of whole weights, the Linear computed per row::

    W_row = Gather(<module>.weight.bank [N, in, out], adapter_ids)    -> [batch, in, out]
    b_row = Gather(<module>.bias.bank [N, out], adapter_ids)          -> [batch, out]
    y = Reshape(x, [batch, -1, in]) @ W_row + b_row[:, None]  reshaped back to x's lead dims + [out]

Row 0 holds the base weight and bias (the banks' defaults), so id 0 = the base head; the session
fills rows of adapters without that module with the base tensors too.

The model keeps its adapter-facing contract (the slots adapter files must fit) and records the
bank layout under ``metadata_props["onnx_peft.multi_adapter"]`` (see ``runtime.MultiLayout``).
Inputs of another rank than 3 (or of unknown rank) are reshaped to ``[batch, -1, in]`` around the
branch and back. Needs only onnx_ir and numpy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..errors import NoAdapterSitesError, OnnxPeftError
from ..graph.contract import FULL_WEIGHT_METHOD, Slot, rank_dim, read_contract
from ..graph.sites import remove_dead
from ..runtime import MULTI_ADAPTER_KEY, BankEntry, MultiLayout

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
BANK_ROWS = "num_adapters"


def _const(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    value = ir.Value(name=name, const_value=ir.tensor(np.array(values, dtype=np.int64), name=name))
    graph.register_initializer(value)
    return value


def _b_node_of(a_node: ir.Node, b_slot: ir.Value) -> ir.Node:
    """The MatMul that takes B_slot and (through scalar Mul/Identity/Cast) A's output."""
    frontier, seen = [a_node.outputs[0]], set()
    while frontier:
        value = frontier.pop()
        for user, _ in value.uses():
            if id(user) in seen:
                continue
            seen.add(id(user))
            if user.op_type == "MatMul" and user.inputs[1] is b_slot:
                return user
            if user.op_type in ("Mul", "Div", "Identity", "Cast", "Dropout"):
                frontier.append(user.outputs[0])
    raise NoAdapterSitesError(f"{a_node.name or a_node.op_type}: its lora_A MatMul does not lead to {b_slot.name}")


class MultiAdapterPass(ir.passes.InPlacePass):
    """Replace every slot pair (lora_A/lora_B inputs) by banks gathered per row.

    ``ids_input``: name of the ``[batch]`` int64 input of row adapter ids (0 = no adapter).
    """

    def __init__(self, ids_input: str = "adapter_ids"):
        super().__init__()
        self.ids_input = ids_input

    def requires(self, model: ir.Model) -> None:
        if MULTI_ADAPTER_KEY in model.metadata_props:
            raise OnnxPeftError("the model is already a MultiAdapter model")
        contract = read_contract(model.metadata_props)
        if contract is None or not contract.slots:
            raise NoAdapterSitesError("the model has no adapter slots (no onnx-peft contract); run "
                                      "`onnx-peft extract` or `onnx-peft insert` first")
        other = [s for s in contract.slots if not s.name.endswith((A_SUFFIX, B_SUFFIX))
                 and s.method != FULL_WEIGHT_METHOD]
        if other:
            raise OnnxPeftError(f"slot {other[0].name!r} ({other[0].method}) has no per-row form; "
                                "MultiAdapter supports LoRA slots (merge DoRA adapters instead)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        contract = read_contract(model.metadata_props)
        inputs = {v.name: v for v in graph.inputs}
        slot_names = {s.name for s in contract.slots}
        batch_input = next((v.name for v in graph.inputs if v.name not in slot_names), "")
        ids = ir.Value(name=self.ids_input, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch"]))
        layout = MultiLayout(ids_input=self.ids_input, batch_input=batch_input)
        slots = contract.slot_map()
        for a_slot in [s for s in contract.slots if s.name.endswith(A_SUFFIX)]:
            b_name = a_slot.name[: -len(A_SUFFIX)] + B_SUFFIX
            a_value, b_value = inputs.get(a_slot.name), inputs.get(b_name)
            if a_value is None or b_value is None or b_name not in slots:
                raise NoAdapterSitesError(f"slot pair {a_slot.name} / {b_name} is not a pair of graph inputs")
            d_in, d_out = a_slot.shape[0], slots[b_name].shape[-1]
            if not isinstance(d_in, int) or not isinstance(d_out, int):
                raise OnnxPeftError(f"slot {a_slot.name}: in/out sizes must be fixed, got {a_slot.shape} / {slots[b_name].shape}")
            dtype = a_value.dtype
            np_dtype = dtype.numpy()
            banks = {}
            rank = rank_dim(a_slot.module)  # one rank dim per module, as in the slots
            for kind, slot_value, shape, default in [
                ("A", a_value, [BANK_ROWS, d_in, rank], (1, d_in, 0)),
                ("B", b_value, [BANK_ROWS, rank, d_out], (1, 0, d_out)),
            ]:
                bank_name = slot_value.name[: -len(".weight")] + ".bank"
                bank = ir.Value(name=bank_name, type=ir.TensorType(dtype), shape=ir.Shape(shape),
                                const_value=ir.tensor(np.zeros(default, np_dtype), name=bank_name))
                banks[kind] = bank
                layout.banks.append(BankEntry(slot_value.name, bank_name, kind, a_slot.module, (d_in, d_out), np_dtype.name))
            a_nodes = [user for user, index in a_value.uses() if user.op_type == "MatMul" and index == 1]
            if not a_nodes:
                raise NoAdapterSitesError(f"slot {a_slot.name} feeds no MatMul as its right operand")
            for a_node in a_nodes:
                self._rewire(graph, a_node, _b_node_of(a_node, b_value), ids, banks, a_slot.module, d_in)
            for slot_value, bank in [(a_value, banks["A"]), (b_value, banks["B"])]:
                if slot_value.uses():
                    raise OnnxPeftError(f"slot {slot_value.name} has uses besides its adapter MatMuls")
                graph.inputs.remove(slot_value)
                graph.initializers.pop(slot_value.name, None)
                graph.inputs.append(bank)
                graph.register_initializer(bank)
        full: dict[str, dict[str, Slot]] = {}
        for slot in contract.slots:
            if slot.method == FULL_WEIGHT_METHOD:
                full.setdefault(slot.module, {})[slot.name.rsplit(".", 1)[-1]] = slot
        for module, parts in full.items():
            self._full_weight_banks(graph, module, parts, inputs, ids, layout)
        graph.inputs.append(ids)
        model.metadata_props[MULTI_ADAPTER_KEY] = layout.to_json()
        return ir.passes.PassResult(model, modified=True)

    def _full_weight_banks(self, graph: ir.Graph, module: str, parts: dict[str, Slot],
                           inputs: dict[str, ir.Value], ids: ir.Value, layout: MultiLayout) -> None:
        """Replace the Linear fed by full-weight slots ``parts`` ("weight", "bias") by its per-row form."""
        w_slot, b_slot = parts.get("weight"), parts.get("bias")
        values = {k: inputs.get(s.name) for k, s in parts.items()}
        if w_slot is None or any(v is None or v.const_value is None for v in values.values()):
            raise OnnxPeftError(f"full-weight slots of {module} must be graph inputs with their base tensors as "
                                "defaults (extract with make_inputs and optional_inputs)")
        linear, index, chain = _consumer(values["weight"], ("MatMul", "Gemm"))
        if linear is None or index != 1:
            raise NoAdapterSitesError(f"slot {w_slot.name} does not feed a MatMul/Gemm as its weight")
        base = values["weight"].const_value.numpy()
        base = base.T if w_slot.layout == "out_in" else base  # banks are MatMul-ready [in, out]
        d_in, d_out = (int(d) for d in base.shape)
        dtype = values["weight"].dtype
        x, old, extra = linear.inputs[0], linear.outputs[0], None
        bias_node = None
        if linear.op_type == "Gemm" and len(linear.inputs) > 2 and linear.inputs[2] is not None:
            if linear.inputs[2] is not values.get("bias"):
                extra = linear.inputs[2]  # a constant bias that is not a slot stays as it is
        elif b_slot is not None:
            bias_node, _, _ = _consumer(old, ("Add",))
            if bias_node is None or values["bias"] not in bias_node.inputs:
                raise NoAdapterSitesError(f"slot {b_slot.name} is not added right after {w_slot.name}'s MatMul")
            old = bias_node.outputs[0]
        banks = {}
        for kind, slot, row in (("W", w_slot, base), ("b", b_slot, None)):
            if slot is None:
                continue
            if row is None:
                row = values["bias"].const_value.numpy().reshape(-1)
            bank_name = f"{slot.name}.bank"
            shape = [BANK_ROWS, *row.shape]
            bank = ir.Value(name=bank_name, type=ir.TensorType(dtype), shape=ir.Shape(shape),
                            const_value=ir.tensor(np.ascontiguousarray(row[None]), name=bank_name))
            banks[kind] = bank
            layout.banks.append(BankEntry(slot.name, bank_name, kind, module, (d_in, d_out), row.dtype.name))
        prefix = f"{module}/multi_adapter"
        nodes: list[ir.Node] = []

        def add(op: str, args: list[ir.Value], name: str, **attrs: int) -> ir.Value:
            node = ir.node(op, args, attrs, name=f"{prefix}/{name}")
            node.outputs[0].name = f"{prefix}/{name}"
            nodes.append(node)
            return node.outputs[0]

        flat = add("Reshape", [x, _const(graph, f"multi_adapter/shape_0_-1_{d_in}", [0, -1, d_in])], "Reshape_in")
        rows = add("Gather", [banks["W"], ids], "weight_rows", axis=0)
        y = add("MatMul", [flat, rows], "MatMul")
        if "b" in banks:
            bias_rows = add("Gather", [banks["b"], ids], "bias_rows", axis=0)
            bias3 = add("Reshape", [bias_rows, _const(graph, f"multi_adapter/shape_0_1_{d_out}", [0, 1, d_out])],
                        "bias_rows3")
            y = add("Add", [y, bias3], "Add")
        if extra is not None:
            y = add("Add", [y, extra], "Add_constant")
        shape = add("Shape", [x], "Shape")
        lead = add("Slice", [shape, _const(graph, "multi_adapter/zero", [0]),
                             _const(graph, "multi_adapter/minus_one", [-1])], "Slice")
        target = add("Concat", [lead, _const(graph, f"multi_adapter/dim_{d_out}", [d_out])], "Concat", axis=0)
        out = add("Reshape", [y, target], "Reshape_out")
        out.type, out.shape = old.type, old.shape
        graph.insert_after(old.producer(), nodes)
        if old.is_graph_output():
            index = list(graph.outputs).index(old)
            name, old.name = old.name, f"{prefix}/replaced"
            out.name = name
            graph.outputs[index] = out
        old.replace_all_uses_with(out)
        remove_dead(graph, [n for n in (bias_node, linear) if n is not None] + chain)
        for kind, slot in (("W", w_slot), ("b", b_slot)):
            if slot is None:
                continue
            value = values["weight" if kind == "W" else "bias"]
            if value.uses():
                raise OnnxPeftError(f"slot {slot.name} has uses besides its Linear")
            graph.inputs.remove(value)
            graph.initializers.pop(value.name, None)
            graph.inputs.append(banks[kind])
            graph.register_initializer(banks[kind])

    def _rewire(self, graph: ir.Graph, a_node: ir.Node, b_node: ir.Node, ids: ir.Value,
                banks: dict[str, ir.Value], module: str, d_in: int) -> None:
        gathered = {}
        for kind in ("A", "B"):
            gather = ir.node("Gather", [banks[kind], ids], {"axis": 0}, name=f"{banks[kind].name}/Gather")
            gather.outputs[0].name = f"{banks[kind].name}/rows"
            graph.insert_before(a_node, gather)
            gathered[kind] = gather.outputs[0]
        x = a_node.inputs[0]
        if x.shape is None or len(x.shape) != 3:
            # any other rank (or unknown): x -> [batch, -1, in], branch, then back to x's lead dims
            prefix = f"{module}/multi_adapter"
            flat = ir.node("Reshape", [x, _const(graph, f"multi_adapter/shape_0_-1_{d_in}", [0, -1, d_in])],
                           name=f"{prefix}/Reshape_in")
            shape = ir.node("Shape", [x], name=f"{prefix}/Shape")
            lead = ir.node("Slice", [shape.outputs[0], _const(graph, "multi_adapter/zero", [0]),
                                     _const(graph, "multi_adapter/minus_one", [-1])], name=f"{prefix}/Slice")
            graph.insert_before(a_node, [flat, shape, lead])
            a_node.replace_input_with(0, flat.outputs[0])
            out = b_node.outputs[0]
            d_out = banks["B"].shape[-1]
            target = ir.node("Concat", [lead.outputs[0], _const(graph, f"multi_adapter/dim_{d_out}", [d_out])],
                             {"axis": 0}, name=f"{prefix}/Concat")
            restored = ir.Value(name=f"{prefix}/restored", type=out.type, shape=out.shape)
            out.replace_all_uses_with(restored)
            out.shape = None
            back = ir.node("Reshape", [out, target.outputs[0]], outputs=[restored], name=f"{prefix}/Reshape_out")
            graph.insert_after(b_node, [target, back])
        a_node.replace_input_with(1, gathered["A"])
        b_node.replace_input_with(1, gathered["B"])


def _consumer(value: ir.Value, ops: tuple[str, ...]) -> tuple[ir.Node | None, int, list[ir.Node]]:
    """The (node, input index) of type ``ops`` that ``value`` alone feeds, through Identity/Transpose
    (those nodes listed third)."""
    chain: list[ir.Node] = []
    while True:
        uses = list(value.uses())
        if len(uses) != 1:
            return None, -1, chain
        node, index = uses[0]
        if node.op_type in ops:
            return node, index, chain
        if node.op_type not in ("Identity", "Transpose"):
            return None, -1, chain
        chain.append(node)
        value = node.outputs[0]


def multi_adapter(model_path: str | os.PathLike, output_dir: str | os.PathLike,
                  ids_input: str = "adapter_ids") -> Path:
    """Write ``output_dir/model.onnx``: the slot model at ``model_path`` with per-row banks."""
    from ..graph.io import load_model, save_model

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(model_path)
    try:
        MultiAdapterPass(ids_input)(model)
    except ir.passes.PreconditionError as exc:  # surface our own error, not the wrapper
        if isinstance(exc.__cause__, OnnxPeftError):
            raise type(exc.__cause__)(f"{model_path}: {exc.__cause__}") from exc.__cause__
        raise
    return save_model(model, output_dir / "model.onnx")
