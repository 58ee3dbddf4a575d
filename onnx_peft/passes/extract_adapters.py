"""ExtractAdapters: move adapter tensors out of the graph into swappable slots.

Every LoRA/DoRA branch found by structure (graph/sites.py) is rebuilt in the slot layout of
graph/contract.py, the scale folded into B so no Transpose or Mul is left::

    LoRA:  y = base(x) + MatMul(MatMul(x, A_slot), B_slot)
    DoRA:  y = factor * (x W + MatMul(MatMul(x, A_slot), B_slot)) + bias
           A_slot = A^T [in, r]   B_slot = (s B)^T [r, out]   factor [out]

``factor = m / ||W + s B A||_row`` (methods.lora.dora_factor), precomputed here because it
depends on the base weight only through the adapter; the DoRA slot ``<module>.dora_factor``
defaults to ones so the model without feeds is the base. The model records the contract (the
logical slots above, whatever the mode, and a fingerprint of the base weights).

How the slots reach the graph:

``make_inputs=True`` (default): one graph input per slot. The rank dim is symbolic and one per
module (``lora_r.<module>``, contract.rank_dim): with one shared ``lora_r`` ONNX Runtime crashes
as soon as modules get different ranks in one run. ``optional_inputs`` gives each input a
default (:func:`slot_default`: ``[in, 0]``, ``[0, out]``, DoRA ones) so no feed = the base.

``pack_inputs=True`` (with make_inputs): the slots of one dtype travel in ONE flat input, cut
apart in the graph (opset >= 13)::

    packed_adapters.float32        [packed_adapters.float32.size]  slots raveled, contract order
    packed_adapters.float32.sizes  [n_slots] int64                 element count of each slot
        └─ Split(sizes) ─┬─ Reshape [in, -1]  ─▶ <module>.lora_A.weight
                         ├─ Reshape [-1, out] ─▶ <module>.lora_B.weight
                         └─ Reshape [out]     ─▶ <module>.dora_factor

  The sizes carry each module's rank (size 0 = rank 0 = not adapted); the defaults pack the
  zero-rank slots, so no feed = the base. :func:`pack_adapter_tensors` turns slot tensors (any
  adapter file for this model, partial ones too) into these feeds, :func:`unpack_adapter_tensors`
  reverses it; metadata ``onnx_peft.packing`` names the inputs and their slots. The adapter
  file :func:`extract_adapters` writes holds the packed feeds.

Full-weight slots (``full_weight_modules``, a head trained in full as PEFT ``modules_to_save``):
the Linear's own weight initializer becomes the slot, renamed, so its default is the base
weight and no feed = the base at the base's cost::

    Gemm(x, <module>.weight, <module>.bias, transB=1)       layout "out_in": W [out, in]
    Add(MatMul(x, <module>.weight), <module>.bias)          layout "in_out": W [in, out]

A module in ``full_weight_biases`` whose graph shows no bias (the exporter drops an all-zero
bias) gets a ``<module>.bias`` slot defaulting to zeros, added after the Linear.

``make_inputs=False``: the slots stay initializers of fixed shape holding the extracted adapter.

``external=True`` (Olive's external-initializer mode): the slots are initializers holding the
extracted adapter AND graph inputs with the per-module symbolic rank (ONNX Runtime's overridable
initializers, ``InferenceSession.get_overridable_initializers()``). :func:`save_extracted_model`
stores their data in ``<model>.adapter.data`` next to the model, apart from ``<model>.data``, and
metadata ``onnx_peft.external_adapters`` lists them; the contract says ``external``. So:

    no feed                       the extracted adapter (the model runs as written)
    slot feeds, any rank          that adapter instead, per run (AdapterSession, ``infer``)
    zero-rank feeds (defaults)    the base: what AdapterSession feeds when no adapter is chosen
    add_external_initializers     another adapter of the same ranks at session creation
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from ..errors import NoAdapterSitesError, OnnxPeftError
from ..formats import suffix_for
from ..graph.branch import graft_slot_branch
from ..graph.contract import (
    FULL_WEIGHT_METHOD,
    Contract,
    Slot,
    rank_dim,
    slot_name,
    weight_fingerprint,
    write_contract,
)
from ..graph.io import load_model, save_model, save_model_with_side_data
from ..graph.modules import LinearSite, constant_array, find_linear_sites
from ..graph.packing import (  # noqa: F401  (public here too: the pass writes what these read)
    PACKED_PREFIX,
    PACKING_KEY,
    pack_adapter_tensors,
    packed_input_names,
    packing_groups,
    read_packing,
    slot_default,
    unpack_adapter_tensors,
)
from ..graph.sites import AdapterBranch, find_adapter_branches, remove_branch, remove_dead
from ..methods.lora import dora_factor
from .run import run_pass

A_SLOT = "lora_A.weight"
B_SLOT = "lora_B.weight"
DORA_SLOT = "dora_factor"
SAVE_FORMATS = ("onnx_adapter", "safetensors", "npz")
EXTERNAL_KEY = "onnx_peft.external_adapters"
_SPLIT_MIN_OPSET = 13  # Split takes its sizes as an input from opset 13 on


def slot_tensors(branch: AdapterBranch, dtype: np.dtype) -> dict[str, np.ndarray]:
    """The slot tensors of one branch: A^T ``[in, r]``, (s B)^T ``[r, out]``, DoRA factor ``[out]``."""
    a, b = branch.a_matrix().astype(np.float32), branch.b_matrix().astype(np.float32)
    tensors = {
        slot_name(branch.module, A_SLOT): np.ascontiguousarray(a.T).astype(dtype),
        slot_name(branch.module, B_SLOT): np.ascontiguousarray((b * branch.scale).T).astype(dtype),
    }
    if branch.method == "dora":
        if branch.factor is not None:
            factor = branch.factor
        else:
            weight = branch.base.weight_out_in().astype(np.float32)
            delta = branch.delta_weight()
            factor = dora_factor(weight, delta, branch.dora_magnitude(weight, delta))
        tensors[slot_name(branch.module, DORA_SLOT)] = np.asarray(factor, np.float32).reshape(-1).astype(dtype)
    return tensors


class ExtractAdapters(InPlacePass):
    """Replace in-graph adapter weights by named slots.

    After the call, ``contract`` holds the slots, ``slot_arrays`` the extracted slot tensors and
    ``tensors`` what the adapter file holds: the slot tensors, or their packed feeds.

    ``full_weight_modules``: module paths of Linears whose weight (and bias) become full-weight
    slots (see the module docstring); ``full_weight_biases``: those of them that have a bias
    even where the graph shows none.
    """

    def __init__(self, make_inputs: bool = True, pack_inputs: bool = False, optional_inputs: bool = True,
                 external: bool = False, save_format: str = "onnx_adapter",
                 full_weight_modules: Sequence[str] = (), full_weight_biases: Sequence[str] = ()) -> None:
        super().__init__()
        if save_format not in SAVE_FORMATS:
            raise OnnxPeftError(f"ExtractAdapters: save_format must be one of {SAVE_FORMATS}, got {save_format!r}")
        if make_inputs and external:
            raise OnnxPeftError("ExtractAdapters: choose make_inputs or external, not both")
        if pack_inputs and not make_inputs:
            raise OnnxPeftError("ExtractAdapters: pack_inputs packs graph inputs; use it with make_inputs")
        if pack_inputs and full_weight_modules:
            raise OnnxPeftError("ExtractAdapters: pack_inputs cannot pack full-weight slots "
                                f"({', '.join(full_weight_modules)}); extract without pack_inputs")
        unknown = sorted(set(full_weight_biases) - set(full_weight_modules))
        if unknown:
            raise OnnxPeftError(f"ExtractAdapters: full_weight_biases names {unknown[0]!r}, which is not "
                                "in full_weight_modules")
        self.full_weight_modules = list(dict.fromkeys(full_weight_modules))
        self.full_weight_biases = set(full_weight_biases)
        self.make_inputs = make_inputs
        self.pack_inputs = pack_inputs
        self.optional_inputs = optional_inputs
        self.external = external
        self.save_format = save_format
        self.tensors: dict[str, np.ndarray] = {}
        self.slot_arrays: dict[str, np.ndarray] = {}
        self.contract: Contract | None = None

    def requires(self, model: ir.Model) -> None:
        opset = model.opset_imports.get("", 0)
        if self.pack_inputs and opset < _SPLIT_MIN_OPSET:
            raise OnnxPeftError(f"ExtractAdapters: pack_inputs needs opset >= {_SPLIT_MIN_OPSET}, the model has "
                                f"{opset}; export with a newer opset or extract without pack_inputs")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        branches = {m: b for m, b in find_adapter_branches(model).items() if not b.is_input}
        if not branches and not self.full_weight_modules:
            raise NoAdapterSitesError(
                "ExtractAdapters: the model has no in-graph adapter branch (Add(MatMul(x, W), "
                "MatMul(MatMul(x, A), B))); export the PeftModel unmerged, or use `onnx-peft insert`"
            )
        # The fingerprint covers every base Linear (as InsertAdapters does), so a model that got
        # its slots by extraction and one that got them by insertion agree on the same base.
        sites = find_linear_sites(model)
        base_weights = {m: s.weight_out_in() for m, s in sites.items()}
        full_sites = self._full_weight_sites(sites, branches)
        self.slot_arrays, slots = {}, []
        for module, branch in branches.items():
            tensors = slot_tensors(branch, branch.base.weight.const_value.dtype.numpy())
            self.slot_arrays.update(tensors)
            slots.extend(self._slot(name, array, module) for name, array in tensors.items())
        for site in full_sites.values():
            for slot, array in self._full_weight_slots(site):
                self.slot_arrays[slot.name] = array
                slots.append(slot)
        self.contract = Contract(slots=slots, fingerprint=weight_fingerprint(base_weights), external=self.external)
        for branch in branches.values():  # insert --mode in-graph names A/B as the slots: make room
            for value in (branch.lora_A, branch.lora_B):
                if value.is_initializer() and value.name in self.slot_arrays:
                    value.name = f"{value.name}.in_graph"
        for slot in slots:  # full-weight slots reuse their own initializer's name (see _expose)
            if slot.method != FULL_WEIGHT_METHOD and (
                    slot.name in graph.initializers or any(v.name == slot.name for v in graph.inputs)):
                raise OnnxPeftError(f"ExtractAdapters: the graph already has a value named {slot.name!r}")
        if self.pack_inputs:
            values = self._packed_values(graph)
            model.metadata_props[PACKING_KEY] = json.dumps(self.packing, sort_keys=True)
            self.tensors = pack_adapter_tensors(self.contract, self.slot_arrays)
        else:
            values = {s.name: self._slot_value(graph, s, self.slot_arrays[s.name]) for s in slots
                      if s.method != FULL_WEIGHT_METHOD}
            self.tensors = dict(self.slot_arrays)
        if self.external:
            model.metadata_props[EXTERNAL_KEY] = json.dumps([s.name for s in slots])
        for branch in branches.values():
            self._rebuild(graph, branch, values)
        for site in full_sites.values():
            self._expose_full_weight(graph, site, self.contract.slot_map())
        write_contract(model.metadata_props, self.contract)
        return PassResult(model, modified=True)

    # -- full-weight slots ----------------------------------------------------------------------

    def _full_weight_sites(self, sites: Mapping[str, LinearSite], branches: Mapping[str, AdapterBranch]
                           ) -> dict[str, LinearSite]:
        found = {}
        for module in self.full_weight_modules:
            if module in branches:
                raise OnnxPeftError(f"ExtractAdapters: module {module} has a LoRA branch; it cannot also be a "
                                    "full-weight (modules_to_save) slot")
            site = sites.get(module)
            if site is None or f"{module}#1" in sites:
                why = "is used more than once (shared weights)" if site is not None else "is not a Linear of the graph"
                raise NoAdapterSitesError(
                    f"ExtractAdapters: full-weight module {module!r} {why}; a modules_to_save slot needs one "
                    f"MatMul/Gemm with a constant weight (Linear modules found: {', '.join(sorted(sites)[:5])}...)")
            found[module] = site
        return found

    def _full_weight_slots(self, site: LinearSite) -> list[tuple[Slot, np.ndarray]]:
        """(slot, current tensor) for the weight, as stored, and the bias of ``site``."""
        weight = site.weight.const_value.numpy()
        out = [(Slot(slot_name(site.module, "weight"), weight.dtype.name, tuple(int(d) for d in weight.shape),
                     site.module, FULL_WEIGHT_METHOD, site.weight_layout), weight)]
        bias = constant_array(site.bias) if site.bias is not None else None
        if site.bias is not None and (bias is None or bias.shape != (site.out_features,)):
            raise OnnxPeftError(f"ExtractAdapters: the bias of full-weight module {site.module} is not a constant "
                                f"[{site.out_features}] tensor")
        if bias is None and site.module in self.full_weight_biases:
            bias = np.zeros(site.out_features, weight.dtype)
        if bias is not None:
            bias = np.asarray(bias, weight.dtype)
            out.append((Slot(slot_name(site.module, "bias"), bias.dtype.name, (site.out_features,), site.module,
                             FULL_WEIGHT_METHOD), bias))
        return out

    def _expose_full_weight(self, graph: ir.Graph, site: LinearSite, slots: Mapping[str, Slot]) -> None:
        """Make the weight (and bias) of ``site`` its slots: renamed in place where only this
        Linear uses them, copied otherwise; a missing bias is added after the Linear."""
        weight_name, bias_name = slot_name(site.module, "weight"), slot_name(site.module, "bias")
        self._expose(graph, *_constant_use(site.node, 1), weight_name)
        if bias_name not in slots:
            return
        if site.bias is not None:
            consumer = site.node if site.node.op_type == "Gemm" else site.output.producer()
            index = next(i for i, v in enumerate(consumer.inputs) if v is site.bias)
            self._expose(graph, *_constant_use(consumer, index), bias_name)
            return
        zeros = self.slot_arrays[bias_name]
        bias = (self._input(graph, bias_name, zeros.shape, zeros) if self.make_inputs
                else self._slot_value(graph, slots[bias_name], zeros))
        old = site.output
        add = ir.node("Add", [old, bias], name=f"{site.module}/bias")
        graph.insert_after(old.producer(), add)
        new = add.outputs[0]
        new.type, new.shape = old.type, old.shape
        if old.is_graph_output():
            index = list(graph.outputs).index(old)
            name, old.name = old.name, f"{site.module}.unbiased"
            new.name = name
            graph.outputs[index] = new
        else:
            new.name = f"{site.module}.biased"
        for user, i in list(old.uses()):
            if user is not add:
                user.replace_input_with(i, new)

    def _expose(self, graph: ir.Graph, node: ir.Node, index: int, name: str) -> None:
        """Turn constant ``node.inputs[index]`` into slot ``name`` (an input with it as default, or
        a named initializer)."""
        value = node.inputs[index]
        exclusive = value.is_initializer() and len(value.uses()) == 1 and not value.is_graph_output()
        clash = graph.initializers.get(name)
        if clash is not None and not (exclusive and clash is value):
            if clash.uses() and clash is not value or clash.is_graph_output():
                raise OnnxPeftError(f"ExtractAdapters: the graph already has a value named {name!r}")
            if clash is value:  # shared with other nodes: they keep it under another name
                value.name = f"{name}.shared"
            else:
                graph.initializers.pop(name)
        if exclusive:
            value.name = name
        else:
            old, array = value, constant_array(value)
            value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                             shape=ir.Shape(array.shape), const_value=ir.tensor(np.array(array), name=name))
            graph.register_initializer(value)
            node.replace_input_with(index, value)
            if old.producer() is not None:
                remove_dead(graph, [old.producer()])
        if self.make_inputs or self.external:
            graph.inputs.append(value)
            if self.make_inputs and not self.optional_inputs:
                graph.initializers.pop(name)
                value.const_value = None

    # -- building -------------------------------------------------------------------------------

    def _slot(self, name: str, array: np.ndarray, module: str) -> Slot:
        """The slot of one extracted tensor: the ``lora`` form's A/B, or the ``dora`` form's factor."""
        method, default = ("dora", "ones") if name.endswith(DORA_SLOT) else ("lora", "zeros")
        shape: tuple[int | str, ...] = tuple(int(d) for d in array.shape)
        swappable = self.make_inputs or self.external
        if swappable and name.endswith(A_SLOT):
            shape = (shape[0], rank_dim(module))
        elif swappable and name.endswith(B_SLOT):
            shape = (rank_dim(module), shape[1])
        return Slot(name, array.dtype.name, shape, module, method, default=default)

    def _input(self, graph: ir.Graph, name: str, shape: tuple, default: np.ndarray) -> ir.Value:
        """A graph input; with ``optional_inputs`` its initializer default too."""
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(default.dtype)), shape=ir.Shape(shape))
        graph.inputs.append(value)
        if self.optional_inputs:
            value.const_value = ir.tensor(default, name=name)
            graph.register_initializer(value)
        return value

    def _slot_value(self, graph: ir.Graph, slot: Slot, array: np.ndarray) -> ir.Value:
        if self.make_inputs:
            return self._input(graph, slot.name, slot.shape, slot_default(slot))
        shape = slot.shape if self.external else array.shape  # external: overridable, any rank
        value = ir.Value(name=slot.name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         shape=ir.Shape(shape), const_value=ir.tensor(array, name=slot.name))
        graph.register_initializer(value)
        if self.external:
            graph.inputs.append(value)
        return value

    def _packed_values(self, graph: ir.Graph) -> dict[str, ir.Value]:
        """Packed inputs + Split/Reshape nodes at the top of the graph; slot name -> Reshape output."""
        values: dict[str, ir.Value] = {}
        targets: dict[tuple[int, ...], ir.Value] = {}
        nodes: list[ir.Node] = []
        self.packing: dict[str, dict[str, Any]] = {}
        for dtype, group in packing_groups(self.contract).items():
            data_name, sizes_name = packed_input_names(dtype)
            defaults = [slot_default(s) for s in group]
            data = self._input(graph, data_name, (f"{data_name}.size",),
                               np.concatenate([d.reshape(-1) for d in defaults]).astype(dtype))
            sizes = self._input(graph, sizes_name, (len(group),), np.array([d.size for d in defaults], np.int64))
            split = ir.node("Split", [data, sizes], {"axis": 0}, num_outputs=len(group), name=f"{data_name}/Split")
            nodes.append(split)
            for slot, piece in zip(group, split.outputs):
                piece.name = f"{slot.name}.packed"
                target = tuple(-1 if isinstance(d, str) else d for d in slot.shape)
                if target not in targets:
                    label = "x".join("r" if d < 0 else str(d) for d in target)
                    targets[target] = ir.Value(name=f"{PACKED_PREFIX}.shape.{label}",
                                               const_value=ir.tensor(np.array(target, np.int64)))
                    graph.register_initializer(targets[target])
                reshape = ir.node("Reshape", [piece, targets[target]], name=f"{slot.name}/unpack")
                out = reshape.outputs[0]
                out.name, out.type, out.shape = slot.name, ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype))),                     ir.Shape(slot.shape)
                values[slot.name] = out
                nodes.append(reshape)
            self.packing[dtype] = {"data": data_name, "sizes": sizes_name, "slots": [s.name for s in group]}
        graph.insert_before(graph[0], nodes)
        return values

    def _rebuild(self, graph: ir.Graph, branch: AdapterBranch, values: dict[str, ir.Value]) -> None:
        """Put the base output back in the old branch's place, drop the old branch, graft the slot one."""
        site, module = branch.base, branch.module
        remove_branch(graph, branch)
        factor = values[slot_name(module, DORA_SLOT)] if branch.method != "lora" else None
        graft_slot_branch(graph, site, values[slot_name(module, A_SLOT)], values[slot_name(module, B_SLOT)], factor)


def add_full_weight_slots(graph: ir.Graph, sites: Mapping[str, LinearSite], modules: Sequence[str],
                          biases: Sequence[str] = ()) -> list[Slot]:
    """Full-weight slot inputs (defaults: the base tensors) for the Linears ``modules`` of ``graph``,
    as :class:`ExtractAdapters` makes them; InsertAdapters' heads trained in full (modules_to_save).
    ``biases``: those of them that get a bias slot even where the graph shows none."""
    extract = ExtractAdapters(make_inputs=True, full_weight_modules=modules, full_weight_biases=biases)
    found = extract._full_weight_sites(sites, {})
    slots = []
    for site in found.values():
        for slot, array in extract._full_weight_slots(site):
            extract.slot_arrays[slot.name] = array
            slots.append(slot)
    by_name = {s.name: s for s in slots}
    for site in found.values():
        extract._expose_full_weight(graph, site, by_name)
    return slots


def _constant_use(node: ir.Node, index: int) -> tuple[ir.Node, int]:
    """Follow ``node.inputs[index]`` up through Identity/Transpose to the (node, index) that
    reads the constant itself (an initializer or a Constant node's output)."""
    value = node.inputs[index]
    while not value.is_initializer():
        producer = value.producer()
        if producer is None or producer.op_type == "Constant":
            break
        if producer.op_type not in ("Identity", "Transpose"):
            raise OnnxPeftError(f"ExtractAdapters: {value.name} is computed by {producer.op_type}, not a constant")
        node, index, value = producer, 0, producer.inputs[0]
    return node, index


def _write_adapter_file(path: Path, tensors: dict[str, np.ndarray], fingerprint: str, save_format: str) -> Path:
    """Write the adapter file with the shared adapter-file writer (onnx_peft.formats)."""
    from ..formats import save_adapter_file

    return save_adapter_file(path, tensors, fingerprint, save_format)


def adapter_data_name(model_path: str | os.PathLike) -> str:
    """``model.onnx`` -> ``model.onnx.adapter.data``: where external mode stores the adapter tensors."""
    return Path(model_path).name + ".adapter.data"


def save_extracted_model(model: ir.Model, path: str | os.PathLike, extract: ExtractAdapters) -> Path:
    """Save a model ``extract`` ran on: weights in ``<name>.data``; in external mode the adapter
    initializers in :func:`adapter_data_name` instead (so never inside ``<name>.data``)."""
    if extract.external and extract.contract is not None:
        return save_model_with_side_data(model, path, [s.name for s in extract.contract.slots],
                                         adapter_data_name(path))
    return save_model(model, path, external_data=True)


def extract_adapters(model_path: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False,
                     **options: Any) -> tuple[Path, Path]:
    """Extract the adapters of ``model_path`` into ``output_dir``: (model path, adapter file path).

    ``options`` are :class:`ExtractAdapters`' (make_inputs, pack_inputs, optional_inputs,
    external, save_format). The model is saved as ``output_dir/<name>.onnx`` with external data
    (external mode: adapter tensors in ``<name>.onnx.adapter.data``); the adapter file as
    ``output_dir/<stem>.<format suffix>``, recording the base fingerprint. With pack_inputs the
    adapter file holds the packed feeds. A non-empty ``output_dir`` is refused unless
    ``overwrite=True``, which replaces it whole.
    """
    from ..output_folder import check_output_folder, writing_folder

    model_path = Path(model_path)
    output_dir = check_output_folder(output_dir, [model_path], overwrite)
    extract = ExtractAdapters(**options)
    model = load_model(model_path)
    run_pass(extract, model, model_path)
    adapter_name = model_path.stem + suffix_for(extract.save_format)
    with writing_folder(output_dir, [model_path], overwrite) as staged:
        save_extracted_model(model, staged / model_path.name, extract)
        _write_adapter_file(staged / adapter_name, extract.tensors, extract.contract.fingerprint,
                            extract.save_format)
    return output_dir / model_path.name, output_dir / adapter_name
