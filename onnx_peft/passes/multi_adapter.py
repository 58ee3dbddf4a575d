"""MultiAdapter: one adapter per batch row, in standard ONNX ops stock ONNX Runtime runs.

Each module of a slot model has a branch built from its forms (methods/forms.py, graft in
graph/branch.py). This pass removes it and builds the same forms again, per row: every slot
becomes a bank input holding one row per loaded adapter, gathered by the row's adapter id::

    adapter_ids [batch] int64                              (0 = no adapter)
    <module>.lora_A.bank [N, in, r]  -Gather(ids)->  A_row [batch, in, r]
    y = x W + MatMul(MatMul(x [batch, seq, in], A_row), B_row)          (lora, per row)
    y = x W * Unsqueeze(l_row, 1)                                       (ia3_out, per row)
    y = E[ids] - E[ids] * hit_row + (ids == idx_row) R_row              (tokens: idx padded with -1)
    y = norm(x) + x_hat * dw_row + db_row                               (norm: LN Tuning)

Banks hold every loaded adapter at its own row (smaller ranks padded with zeros, which adds exact
zeros; rows of adapters without a slot hold its no-op default), so each row's output equals
running that row alone with its adapter. The banks are optional inputs defaulting to one no-op
row, so the model runs as the base with ``adapter_ids`` all 0 and nothing else. Forms without a
per-row form (``dense``: LoHa, LoKr, FourierFT, SHiRA, C3A, WaveFT, OSF at low rank) are refused: merge those adapters instead.
``AdapterSession`` builds and refreshes the banks from its loaded adapters without re-creating
the ORT session.

A full-weight slot (a ``modules_to_save`` head: ``<module>.weight``, ``<module>.bias``) becomes
banks of whole weights, the Linear computed per row::

    W_row = Gather(<module>.weight.bank [N, in, out], adapter_ids)    -> [batch, in, out]
    b_row = Gather(<module>.bias.bank [N, out], adapter_ids)          -> [batch, out]
    y = Reshape(x, [batch, -1, in]) @ W_row + b_row[:, None]  reshaped back to x's lead dims + [out]

Row 0 holds the base weight and bias (the banks' defaults), so id 0 = the base head; the session
fills rows of adapters without that module with the base tensors too.

The model keeps its adapter-facing contract (the slots adapter files must fit) and records the
bank layout under ``metadata_props["onnx_peft.multi_adapter"]`` (see ``graph.banks.MultiLayout``).
Needs only onnx_ir and numpy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..errors import NoAdapterSitesError, OnnxPeftError
from ..graph.banks import MULTI_ADAPTER_KEY, BankEntry, MultiLayout
from ..graph.branch import graft, ungraft
from ..graph.contract import FULL_WEIGHT_METHOD, Slot, read_contract
from ..graph.op_sites import find_sites
from ..graph.sites import remove_dead
from ..methods.forms import default_array, form

BANK_ROWS = "num_adapters"


def _const(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    value = ir.Value(name=name, const_value=ir.tensor(np.array(values, dtype=np.int64), name=name))
    graph.register_initializer(value)
    return value


class MultiAdapterPass(ir.passes.InPlacePass):
    """Rebuild every module's branch per row, its slot inputs replaced by banks.

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
        for slot in contract.slots:
            if slot.method != FULL_WEIGHT_METHOD and not form(slot.method).per_row:
                raise OnnxPeftError(
                    f"module {slot.module} has {slot.method} slots (LoHa, LoKr, FourierFT, MiSS 'bat', SHiRA, C3A, WaveFT, OSF: a dense "
                    "weight per adapter), which have no per-row form; merge those adapters (onnx-peft merge) or serve "
                    "them one per run")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        contract = read_contract(model.metadata_props)
        inputs = {v.name: v for v in graph.inputs}
        slot_names = {s.name for s in contract.slots}
        batch_input = next((v.name for v in graph.inputs if v.name not in slot_names), "")
        ids = ir.Value(name=self.ids_input, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch"]))
        layout = MultiLayout(ids_input=self.ids_input, batch_input=batch_input)
        by_module: dict[str, dict[str, list[Slot]]] = {}
        for slot in contract.slots:
            if slot.method != FULL_WEIGHT_METHOD:
                by_module.setdefault(slot.module, {}).setdefault(slot.method, []).append(slot)
        for module, forms in by_module.items():
            missing = [s.name for slots in forms.values() for s in slots if s.name not in inputs]
            if missing:
                raise NoAdapterSitesError(f"slot {missing[0]} is not a graph input (packed or external "
                                          "slots); extract with make_inputs and without pack_inputs")
            if not ungraft(graph, module) and not _ungraft_untagged_lora(graph, module, forms, inputs):
                raise NoAdapterSitesError(f"module {module}: its adapter branch is not one onnx-peft built, nor "
                                          "Add(base, MatMul(MatMul(x, A), B)); insert the adapters again")
        sites = find_sites(model)  # Linears, embeddings (tokens) and norms (LN Tuning)
        gathers: list[ir.Node] = []
        for module, forms in sorted(by_module.items()):
            site = sites.get(module)
            if site is None:
                raise NoAdapterSitesError(f"module {module}: no Linear, embedding or norm with a constant weight "
                                          "left after removing its branch")
            built = []
            for name, slots in forms.items():
                values = {}
                for slot in slots:
                    bank, gathered = self._bank(graph, inputs[slot.name], slot, ids)
                    gathers.append(gathered.producer())
                    values[slot.name[len(module) + 1:]] = gathered
                    layout.banks.append(BankEntry(slot.name, bank.name, "slot", module,
                                                  (site.in_features, site.out_features), slot.dtype,
                                                  slot.shape, slot.default_kind))
                built.append((form(name), values))
            graft(graph, site, built, batched=True)
        graph.insert_before(graph[0], gathers)
        full: dict[str, dict[str, Slot]] = {}
        for slot in contract.slots:
            if slot.method == FULL_WEIGHT_METHOD:
                full.setdefault(slot.module, {})[slot.name.rsplit(".", 1)[-1]] = slot
        for module, parts in full.items():
            self._full_weight_banks(graph, module, parts, inputs, ids, layout)
        graph.inputs.append(ids)
        model.metadata_props[MULTI_ADAPTER_KEY] = layout.to_json()
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _bank(graph: ir.Graph, slot_value: ir.Value, slot: Slot, ids: ir.Value) -> tuple[ir.Value, ir.Value]:
        """Replace slot input ``slot_value`` by a bank input ``[num_adapters, *shape]`` (default:
        one no-op row); return the bank and its rows gathered by ``ids``."""
        if slot_value.uses():
            raise OnnxPeftError(f"slot {slot.name} has uses besides its adapter branch")
        graph.inputs.remove(slot_value)
        graph.initializers.pop(slot_value.name, None)
        name = slot.name[: -len(".weight")] + ".bank" if slot.name.endswith(".weight") else slot.name + ".bank"
        dtype = np.dtype(slot.dtype)
        row = default_array(tuple(d if isinstance(d, int) else 0 for d in slot.shape), slot.default_kind, dtype)
        bank = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(dtype)),
                        shape=ir.Shape([BANK_ROWS, *slot.shape]), const_value=ir.tensor(row[None], name=name))
        graph.inputs.append(bank)
        graph.register_initializer(bank)
        gather = ir.node("Gather", [bank, ids], {"axis": 0}, name=f"{name}/Gather")
        rows = gather.outputs[0]
        rows.name, rows.type, rows.shape = f"{name}/rows", bank.type, ir.Shape(["batch", *slot.shape])
        return bank, rows

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


def _ungraft_untagged_lora(graph: ir.Graph, module: str, forms: dict[str, list[Slot]],
                           inputs: dict[str, ir.Value]) -> bool:
    """Remove a LoRA branch built by another tool (no onnx-peft tags), recognised by structure:
    ``Add(y, MatMul(MatMul(x, A_slot), B_slot))`` (scalar Mul/Cast/Identity between allowed)."""
    if set(forms) != {"lora"}:
        return False
    by_suffix = {s.name.rsplit(".", 2)[-2]: inputs[s.name] for s in forms["lora"]}
    a, b = by_suffix.get("lora_A"), by_suffix.get("lora_B")
    if a is None or b is None:
        return False
    for a_node, index in list(a.uses()):
        if a_node.op_type != "MatMul" or index != 1:
            return False
        chain, value = [a_node], a_node.outputs[0]
        while True:
            uses = list(value.uses())
            if len(uses) != 1:
                return False
            node, _ = uses[0]
            chain.append(node)
            if node.op_type == "Add":
                break
            if node.op_type not in ("MatMul", "Mul", "Div", "Identity", "Cast"):
                return False
            value = node.outputs[0]
        add = chain[-1]
        if not any(n.op_type == "MatMul" and n.inputs[1] is b for n in chain):
            return False
        base = next(v for v in add.inputs if v is not value)
        out = add.outputs[0]
        if out.is_graph_output():
            graph.outputs[list(graph.outputs).index(out)] = base
            out.name, base.name = f"{module}.adapter.removed", out.name
            if base.type is None:
                base.type, base.shape = out.type, out.shape
        out.replace_all_uses_with(base)
        remove_dead(graph, chain)
    return True


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
                  ids_input: str = "adapter_ids", overwrite: bool = False) -> Path:
    """Write ``output_dir/model.onnx``: the slot model at ``model_path`` with per-row banks.

    A non-empty ``output_dir`` is refused unless ``overwrite=True``, which replaces it whole."""
    from ..graph.io import load_model, save_model
    from ..output_folder import check_output_folder, writing_folder
    from .run import run_pass

    output_dir = check_output_folder(output_dir, [model_path], overwrite)
    model = load_model(model_path)
    run_pass(MultiAdapterPass(ids_input), model, model_path)
    with writing_folder(output_dir, [model_path], overwrite) as staged:
        save_model(model, staged / "model.onnx")
    return output_dir / "model.onnx"
