"""ExtractAdapters: move adapter tensors out of the graph into swappable slots.

Every LoRA/DoRA branch found by structure (graph/sites.py) is rebuilt in the slot layout of
graph/contract.py, the scale folded into B so no Transpose or Mul is left::

    LoRA:  y = base(x) + MatMul(MatMul(x, A_slot), B_slot)
    DoRA:  y = factor * (x W + MatMul(MatMul(x, A_slot), B_slot)) + bias
           A_slot = A^T [in, lora_r]   B_slot = (s B)^T [lora_r, out]   factor [out]

``factor = m / ||W + s B A||_row`` (methods.lora.dora_factor), precomputed here because it
depends on the base weight only through the adapter; the DoRA slot ``<module>.dora_factor``
defaults to ones so the model without feeds is the base.

Options: ``make_inputs`` turns slots into graph inputs (rank symbolic ``lora_r``);
``optional_inputs`` also gives each an initializer default of rank 0 (``[in, 0]``/``[0, out]``)
so running with no feeds is the base model; ``pack_inputs`` (one input per dtype, sliced in
the graph) is not implemented yet and raises. Without ``make_inputs`` the slots stay
initializers (``external``: :func:`extract_adapters` writes them to their own data file).
The model records the contract: slots and a fingerprint of the adapted base weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from ..errors import NoAdapterSitesError, OnnxPeftError
from ..graph.contract import RANK_DIM, Contract, Slot, slot_name, weight_fingerprint, write_contract
from ..graph.io import load_model, save_model
from ..graph.modules import find_linear_sites
from ..graph.sites import AdapterBranch, find_adapter_branches, remove_dead
from ..methods.lora import dora_factor

A_SLOT = "lora_A.weight"
B_SLOT = "lora_B.weight"
DORA_SLOT = "dora_factor"
SAVE_FORMATS = ("onnx_adapter", "safetensors", "npz")
_SUFFIX = {"onnx_adapter": ".onnx_adapter", "safetensors": ".safetensors", "npz": ".npz"}


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
    """Replace in-graph adapter weights by named slots; ``self.tensors`` holds what was taken out."""

    def __init__(self, make_inputs: bool = True, pack_inputs: bool = False, optional_inputs: bool = True,
                 external: bool = False, save_format: str = "onnx_adapter") -> None:
        super().__init__()
        if save_format not in SAVE_FORMATS:
            raise OnnxPeftError(f"ExtractAdapters: save_format must be one of {SAVE_FORMATS}, got {save_format!r}")
        if pack_inputs:
            raise OnnxPeftError("ExtractAdapters: pack_inputs is not implemented yet; extract without it")
        if make_inputs and external:
            raise OnnxPeftError("ExtractAdapters: choose make_inputs or external, not both")
        self.make_inputs = make_inputs
        self.optional_inputs = optional_inputs
        self.external = external
        self.save_format = save_format
        self.tensors: dict[str, np.ndarray] = {}
        self.contract: Contract | None = None

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        branches = {m: b for m, b in find_adapter_branches(model).items() if not b.is_input}
        if not branches:
            raise NoAdapterSitesError(
                "ExtractAdapters: the model has no in-graph adapter branch (Add(MatMul(x, W), "
                "MatMul(MatMul(x, A), B))); export the PeftModel unmerged, or use `onnx-peft insert`"
            )
        # The fingerprint covers every base Linear (as InsertAdapters does), so a model that got
        # its slots by extraction and one that got them by insertion agree on the same base.
        base_weights = {m: s.weight_out_in() for m, s in find_linear_sites(model).items()}
        self.tensors, slots = {}, []
        for module, branch in branches.items():
            dtype = branch.base.weight.const_value.dtype.numpy()
            tensors = slot_tensors(branch, dtype)
            self.tensors.update(tensors)
            values = {name: self._slot_value(graph, name, array, branch) for name, array in tensors.items()}
            for name, value in values.items():
                dims = list(value.shape) if value.shape is not None else list(tensors[name].shape)
                slots.append(Slot(name, np.dtype(dtype).name, tuple(d if isinstance(d, int) else str(d)
                                                                     for d in dims), module, branch.method))
            self._rebuild(graph, branch, values)
        self.contract = Contract(slots=slots, fingerprint=weight_fingerprint(base_weights))
        write_contract(model.metadata_props, self.contract)
        return PassResult(model, modified=True)

    # -- building -------------------------------------------------------------------------------

    def _slot_value(self, graph: ir.Graph, name: str, array: np.ndarray, branch: AdapterBranch) -> ir.Value:
        dtype = ir.DataType.from_numpy(array.dtype)
        if name.endswith(A_SLOT):
            shape, empty = [array.shape[0], RANK_DIM], np.zeros((array.shape[0], 0), array.dtype)
        elif name.endswith(B_SLOT):
            shape, empty = [RANK_DIM, array.shape[1]], np.zeros((0, array.shape[1]), array.dtype)
        else:  # DoRA factor: fixed [out], default ones = the base
            shape, empty = [array.shape[0]], np.ones(array.shape, array.dtype)
        if name in graph.initializers or any(v.name == name for v in graph.inputs):
            raise OnnxPeftError(f"ExtractAdapters: the graph already has a value named {name!r}")
        if not self.make_inputs:
            value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(array.shape),
                             const_value=ir.tensor(array, name=name))
            graph.register_initializer(value)
            return value
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        graph.inputs.append(value)
        if self.optional_inputs:
            value.const_value = ir.tensor(empty, name=name)
            graph.register_initializer(value)
        return value

    def _rebuild(self, graph: ir.Graph, branch: AdapterBranch, values: dict[str, ir.Value]) -> None:
        site, module = branch.base, branch.module
        a = values[slot_name(module, A_SLOT)]
        b = values[slot_name(module, B_SLOT)]
        anchor = branch.add
        new_nodes: list[ir.Node] = []

        def node(op: str, inputs: list[ir.Value], suffix: str) -> ir.Value:
            n = ir.Node("", op, inputs, name=f"{module}/lora/{suffix}", num_outputs=1)
            n.outputs[0].name = f"{module}.lora.{suffix}"
            new_nodes.append(n)
            return n.outputs[0]

        low = node("MatMul", [site.input, a], "A")
        lora = node("MatMul", [low, b], "B")
        extra: list[ir.Node] = []
        if branch.method == "lora":
            out = node("Add", [site.output, lora], "add")
        else:
            factor = values[slot_name(module, DORA_SLOT)]
            bias = site.bias
            if bias is None:
                plain = site.output
            elif site.output is not site.node.outputs[0] and site.output.producer().op_type == "Add":
                plain = site.node.outputs[0]
                extra.append(site.output.producer())
            else:
                plain = node("Sub", [site.output, bias], "unbias")
            summed = node("Add", [plain, lora], "add")
            out = node("Mul", [summed, factor], "dora")
            if bias is not None:
                out = node("Add", [out, bias], "bias")
        graph.insert_after(anchor, new_nodes)
        old = branch.output
        if old.is_graph_output():
            index = list(graph.outputs).index(old)
            name = old.name
            old.name = None
            out.name = name
            graph.outputs[index] = out
        ir.convenience.replace_all_uses_with(old, out)
        remove_dead(graph, [*branch.nodes, *extra])


def _write_adapter_file(path: Path, tensors: dict[str, np.ndarray], fingerprint: str, save_format: str) -> Path:
    """Write the extracted slot tensors with the shared adapter-file writer (onnx_peft.formats)."""
    from ..formats import save_adapter_file

    return save_adapter_file(path, tensors, fingerprint, save_format)


def extract_adapters(model_path: str | os.PathLike, output_dir: str | os.PathLike, **options: Any
                     ) -> tuple[Path, Path]:
    """Extract the adapters of ``model_path`` into ``output_dir``: (model path, adapter file path).

    ``options`` are :class:`ExtractAdapters`' (make_inputs, pack_inputs, optional_inputs,
    external, save_format). The model is saved as ``output_dir/<name>.onnx`` with external data;
    the adapter file as ``output_dir/<stem>.<format suffix>``, recording the base fingerprint.
    """
    model_path = Path(model_path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    extract = ExtractAdapters(**options)
    model = load_model(model_path)
    extract(model)
    out_model = output_dir / model_path.name
    adapter_path = output_dir / (model_path.stem + _SUFFIX[extract.save_format])
    save_model(model, out_model, external_data=True)
    _write_adapter_file(adapter_path, extract.tensors, extract.contract.fingerprint, extract.save_format)
    return out_model, adapter_path
