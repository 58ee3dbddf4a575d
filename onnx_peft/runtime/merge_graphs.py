"""The two graphs of the merge-on-swap strategy, built from a slot model at session start.

    main   the base graph (slots and branches dropped, graph/drop_slots); each adapted Linear
           reads its weight from an input ``<module>.weight.active`` (its bias, when an output
           form changes it, from ``<module>.bias.active``); full-weight head slots stay
           overridable initializers. No adapter = the base weights bound = the base's kernels.
    merge  per adapted Linear: ``W' [consumed layout] = forms(W, slots)``, the same form code
           the branches are built from (methods/forms.py), evaluated on the identity::

               stage 0 (ia3_in, rotate_in)  M = forms(I [in, in]);  Y = M W      (else M = I, Y = W)
               stage 1 (lora, dense)        Y = Y + (M A) B ...
               stage 2 (dora, ia3_out, ...) W' = forms(Y) with no bias;  b' = forms(b) with the bias

           in float32 (cast from and back to the model's dtype). ONNX Runtime runs it on the
           session's device, so a swap needs no PyTorch and no host round trip.

Only Linear sites merge; embeddings (tokens), norms (LN tuning), 4-bit weights and forms with
no merged math (X-LoRA, adaption prompts) are refused when the session starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..errors import IncompatibleAdapterError
from ..graph.branch import BranchBuilder
from ..graph.contract import FULL_WEIGHT_METHOD, Contract, Slot
from ..graph.io import load_model
from ..graph.modules import LinearSite, constant_array
from ..graph.op_sites import find_sites
from ..graph.packing import slot_default
from ..graph.sites import remove_dead
from ..methods.forms import FORMS

_STAGE_2_BIAS = ("dora", "ia3_out", "rotate_out")  # output forms that change a bias too


@dataclass(frozen=True)
class MergeTarget:
    """One adapted Linear: its main-graph inputs, the merge graph's outputs, the base tensors."""

    module: str
    weight_input: str            # "<module>.weight.active", in the layout the node consumes
    weight_output: str           # "<module>.weight.merged"
    base_weight: np.ndarray
    bias_input: str | None = None
    bias_output: str | None = None
    base_bias: np.ndarray | None = None


@dataclass
class MergeGraphs:
    main: ir.Model
    merge: ir.Model
    targets: list[MergeTarget]
    heads: list[str]             # full-weight slots: overridable initializers of the main graph
    contract: Contract


def build_merge_graphs(model_path: Path) -> MergeGraphs:
    """Both graphs for the slot model at ``model_path``; refuses models whose adapters cannot merge."""
    from ..graph.banks import MULTI_ADAPTER_KEY
    from ..graph.contract import read_contract
    from ..graph.packing import read_packing
    from ..passes.drop_slots import drop_slots
    from ..prompt_feeds import PromptLayout

    model = load_model(model_path)
    metadata = model.metadata_props
    why = ("a MultiAdapter model (it mixes adapters per row)" if MULTI_ADAPTER_KEY in metadata else
           "a model with packed slot inputs" if read_packing(metadata) else
           "a prompt-ready model (prompt adapters feed inputs; they have no merged form)"
           if PromptLayout.from_metadata(metadata) is not None else "")
    if why:
        raise IncompatibleAdapterError(f"{model_path.name} is {why}; strategy 'merge' takes a slot model "
                                       "(export --mode inputs/external, extract, insert); use strategy 'slots'")
    contract = read_contract(metadata)
    if contract is None:
        raise IncompatibleAdapterError(f"{model_path.name} records no adapter contract (not built by onnx-peft); "
                                       "strategy 'merge' needs one: onnx-peft extract MODEL.onnx -o OUT_DIR")
    by_module: dict[str, list[Slot]] = {}
    for slot in contract.slots:
        if slot.method != FULL_WEIGHT_METHOD:
            by_module.setdefault(slot.module, []).append(slot)
    for module, slots in by_module.items():
        odd = next((s.method for s in slots if s.method not in FORMS or "linear" not in FORMS[s.method].site_kinds
                    or s.method == "tokens"), None)
        if odd is not None:
            raise IncompatibleAdapterError(
                f"{model_path.name}: module {module} carries a {odd!r} slot, which has no merged form; "
                "use strategy 'slots' for this model")
    heads = [s.name for s in contract.slots if s.method == FULL_WEIGHT_METHOD]
    drop_slots(model)
    sites = find_sites(model)
    graph = model.graph
    merge = ir.Graph([], [], nodes=[], opset_imports={"": max(model.opset_imports.get("", 17), 17)},
                     name="onnx_peft_merge")
    targets = []
    for module, slots in by_module.items():
        site = sites.get(module)
        if not isinstance(site, LinearSite) or site.quantized is not None:
            why = "a 4-bit weight" if isinstance(site, LinearSite) else "not a Linear"
            raise IncompatibleAdapterError(f"{model_path.name}: module {module} is {why}; strategy 'merge' folds "
                                           "adapters into float Linear weights only; use strategy 'slots'")
        targets.append(_retarget(graph, site, slots))
        _add_merge(merge, site, slots, targets[-1])
    remove_dead(graph, list(graph))
    for name in heads:  # a head slot stays an initializer holding the base head, fed to swap it
        value = graph.initializers.get(name)
        if value is not None and not value.is_graph_input():
            graph.inputs.append(value)
    merge_model = ir.Model(merge, ir_version=model.ir_version)
    return MergeGraphs(model, merge_model, targets, heads, contract)


def _retarget(graph: ir.Graph, site: LinearSite, slots: list[Slot]) -> MergeTarget:
    """Make ``site`` read its weight (and a bias an output form changes) from new inputs."""
    module = site.module
    layout = site.consumed_layout
    out_in = np.asarray(site.weight_out_in())
    base = np.ascontiguousarray(out_in if layout == "out_in" else out_in.T)
    dtype = site.weight.const_value.dtype
    weight = ir.Value(name=f"{module}.weight.active", type=ir.TensorType(dtype), shape=ir.Shape(base.shape))
    graph.inputs.append(weight)
    site.node.replace_input_with(1, weight)
    target = MergeTarget(module, weight.name, f"{module}.weight.merged", base)
    bias = site.bias
    if bias is None or not any(s.method in _STAGE_2_BIAS for s in slots):
        return target
    base_bias = constant_array(bias)
    if base_bias is None:
        raise IncompatibleAdapterError(f"module {module}: its bias is computed in the graph, not a constant; "
                                       "use strategy 'slots'")
    value = ir.Value(name=f"{module}.bias.active", type=ir.TensorType(ir.DataType.from_numpy(base_bias.dtype)),
                     shape=ir.Shape(base_bias.shape))
    graph.inputs.append(value)
    site.replace_bias(value)
    return MergeTarget(module, weight.name, target.weight_output, base, value.name, f"{module}.bias.merged",
                       np.ascontiguousarray(base_bias))


class _MergeBuilder(BranchBuilder):
    """A BranchBuilder over the merge graph: ``x``/``y`` are matrices, the dtype float32.

    Products with the identity are skipped, so a swap costs the adapter's own math: ``I A`` is
    ``A`` (LoRA: ``r in out`` flops, not ``in^2 r``), ``I[:, :d] D`` is ``D`` padded with zero
    rows (LoHa/LoKr/FourierFT). Stage-0 forms (IA3 on inputs, OFT/BOFT rotations) still build
    ``M = forms(I)`` and ``M W``: a swap of those costs about a prefill of ``in`` tokens."""

    def __init__(self, graph: ir.Graph, site: LinearSite, x: ir.Value, y: ir.Value, bias: ir.Value | None):
        self.graph, self.site, self.batched = graph, site, False
        self.module = site.module
        self.nodes: list[ir.Node] = []
        self.x, self.y, self.bias = x, y, bias
        self.replaced = []
        self.identity: ir.Value | None = None
        self._columns: dict[int, ir.Value] = {}  # id(I[:, :d]) -> d as a [1] tensor

    @property
    def dtype(self) -> ir.DataType:
        return ir.DataType.FLOAT

    def op(self, op_type, inputs, suffix, domain="", **attributes):
        first = inputs[0] if inputs else None
        if op_type == "MatMul" and first is not None and first is self.identity:
            return inputs[1]
        if op_type == "MatMul" and first is not None and id(first) in self._columns:
            rows = self._columns[id(first)]
            missing = super().op("Sub", [self.const([self.site.in_features]), rows], suffix + "_missing")
            pads = super().op("Concat", [self.const([0, 0]), missing, self.const([0])], suffix + "_pads", axis=0)
            return super().op("Pad", [inputs[1], pads], suffix)
        out = super().op(op_type, inputs, suffix, domain, **attributes)
        if op_type == "Slice" and first is self.identity and len(inputs) >= 4:
            self._columns[id(out)] = inputs[2]  # Slice(I, [0], d, [-1]) = I[:, :d]
        return out

    def prune(self) -> None:
        """Drop the nodes nothing uses (the identity when every product with it was skipped)."""
        alive = list(self.nodes)
        changed = True
        while changed:
            changed = False
            for node in list(alive):
                if not any(out.uses() or out.is_graph_output() for out in node.outputs):
                    for i in range(len(node.inputs)):
                        node.replace_input_with(i, None)
                    alive.remove(node)
                    changed = True
        self.nodes = alive


def _add_merge(merge: ir.Graph, site: LinearSite, slots: list[Slot], target: MergeTarget) -> None:
    """Nodes computing ``target``'s merged weight (and bias) from its inputs and slots."""
    model_dtype = site.weight.const_value.dtype
    weight_in = ir.Value(name=target.weight_input, type=ir.TensorType(model_dtype),
                         shape=ir.Shape(target.base_weight.shape))
    merge.inputs.append(weight_in)
    g = _MergeBuilder(merge, site, weight_in, weight_in, None)
    to_float = int(ir.DataType.FLOAT)
    values: dict[str, dict[str, ir.Value]] = {}
    for slot in slots:  # symbolic dims made per module: older contracts share "lora_r" across modules
        value = ir.Value(name=slot.name, type=ir.TensorType(ir.DataType.from_numpy(np.dtype(slot.dtype))),
                         shape=ir.Shape([d if isinstance(d, int) else f"{d}@{slot.module}" for d in slot.shape]))
        value.const_value = ir.tensor(slot_default(slot), name=slot.name)  # the no-op when not fed
        merge.inputs.append(value)
        merge.register_initializer(value)
        suffix = slot.name[len(slot.module) + 1:]
        cast = g.op("Cast", [value], f"merge_{suffix}", to=to_float)
        cast.shape, cast.type = value.shape, ir.TensorType(ir.DataType.FLOAT)  # forms read fixed dims (rotations)
        values.setdefault(slot.method, {})[suffix] = cast
    w = g.op("Cast", [weight_in], "merge_w", to=to_float)
    if site.consumed_layout == "out_in":
        w = g.op("Transpose", [w], "merge_w_in_out", perm=[1, 0])
    ordered = sorted(values, key=lambda name: FORMS[name].stage)
    size = g.const([site.in_features, site.in_features])
    g.x = g.identity = g.op("EyeLike", [g.op("ConstantOfShape", [size], "merge_zeros",
                                             value=ir.tensor(np.zeros(1, np.float32)))], "merge_identity")
    g.y = w
    pre = [name for name in ordered if FORMS[name].stage == 0]
    for name in pre:
        FORMS[name].build(g, values[name])
    if pre:
        g.y = g.op("MatMul", [g.x, w], "merge_pre")
    for name in ordered:
        if FORMS[name].stage == 1:
            FORMS[name].build(g, values[name])
    for name in ordered:
        if FORMS[name].stage == 2:
            FORMS[name].build(g, values[name])
    merged = g.y
    if site.consumed_layout == "out_in":
        merged = g.op("Transpose", [merged], "merge_out_in", perm=[1, 0])
    out = g.op("Cast", [merged], "merge_cast", to=int(model_dtype))
    out.name = target.weight_output
    merge.outputs.append(out)
    if target.bias_input is not None:
        bias = ir.Value(name=target.bias_input + ".base", const_value=ir.tensor(target.base_bias))
        merge.register_initializer(bias)
        b = g.op("Cast", [bias], "merge_b", to=to_float)
        g.y, g.bias = g.op("Unsqueeze", [b, g.const([0])], "merge_b_row"), b
        for name in ordered:
            if FORMS[name].stage == 2:
                FORMS[name].build(g, values[name])
        merged_b = g.op("Squeeze", [g.y, g.const([0])], "merge_b_back")
        out_b = g.op("Cast", [merged_b], "merge_b_cast", to=int(ir.DataType.from_numpy(target.base_bias.dtype)))
        out_b.name = target.bias_output
        merge.outputs.append(out_b)
    g.prune()
    merge.extend(g.nodes)


def main_feeds_of(targets: list[MergeTarget]) -> Mapping[str, np.ndarray]:
    """The base's value of every main-graph weight/bias input."""
    feeds: dict[str, np.ndarray] = {}
    for t in targets:
        feeds[t.weight_input] = t.base_weight
        if t.bias_input is not None:
            feeds[t.bias_input] = t.base_bias
    return feeds
