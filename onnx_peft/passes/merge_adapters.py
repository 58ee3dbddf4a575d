"""MergeAdapters: fold adapters into the base weights, leaving the plain base graph.

Two sources of adapters::

    in-graph branch   y = x W^T + s (x A^T) B^T      ->  W' = W + s B A            (LoRA)
                                                      ->  W' = m / ||W + s B A|| * (W + s B A)  (DoRA)
    PEFT adapter dir  adapter_config.json + adapter_model.safetensors, matched to base Linears
                      (module paths mapped by structure: a wrapper's ``m.model.layers.0...``)

A slot model (``export --mode inputs``, ``insert``, ``extract``) merges too, into a plain model
without slots (:func:`drop_slots`): with a PEFT dir, the slots are removed (their defaults are
the base) and the adapter is folded into the base weights; without one, an external-initializer
model (``--mode external``) folds the adapter its initializers hold, any other slot model says
to pass the adapter dir. Full-weight head slots keep their default, the base head, unless the
merged adapter trains the head.

The math is methods.lora's (lora_delta_weight, dora_weight). Each merged weight is an
``ir.LazyTensor``: it is computed from the memory-mapped base weight only when the model is
saved, one tensor at a time. Branch nodes and the initializers only they used are removed, so
the result has the base graph's nodes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from ..errors import IncompatibleAdapterError, NoAdapterSitesError, UnsafePathError
from ..graph.banks import MULTI_ADAPTER_KEY
from ..graph.contract import read_contract
from ..graph.io import load_model, save_model
from ..graph.module_map import map_modules
from ..graph.modules import LinearSite, constant_array
from ..graph.op_sites import EmbeddingSite, NormSite, find_sites, tied_heads
from ..graph.sites import AdapterBranch, find_adapter_branches, remove_branch, remove_dead
from ..methods.forms import form
from ..methods.lora import dora_weight
from .drop_slots import drop_slots

if TYPE_CHECKING:
    from ..convert import PeftAdapter


def _exclusive_chain(site: LinearSite) -> bool:
    """True when W reaches only this node (possibly through its own Transpose/Identity)."""
    value = site.weight
    while True:
        if value.is_graph_output() or value.is_graph_input():
            return False
        uses = list(value.uses())
        if len(uses) != 1:
            return False
        user = uses[0].node
        if user is site.node:
            return True
        if user.op_type not in ("Transpose", "Identity"):
            return False
        value = user.outputs[0]


def set_merged_weight(graph: ir.Graph, site: LinearSite,
                      merged_out_in: Callable[[np.ndarray], np.ndarray],
                      errors: dict[str, float] | None = None) -> None:
    """Give ``site`` the weight ``merged_out_in(W [out, in])``, computed lazily at save time.

    The initializer is replaced in place when only this Linear uses it; a shared weight (tied
    embeddings) is left alone and the node gets a new initializer of its own. A 4-bit site is
    dequantized, merged and requantized; ``errors[module]`` then gets the max |error| that adds.
    """
    if site.quantized is not None:
        from .quantize_base import set_requantized_weight

        set_requantized_weight(graph, site, merged_out_in, errors)
        return
    old_tensor = site.weight.const_value
    dtype = old_tensor.dtype
    layout = site.weight_layout
    exclusive = _exclusive_chain(site)
    if not exclusive:  # the node reads the new weight directly, in the layout it consumes
        layout = site.consumed_layout
    shape = (site.out_features, site.in_features) if layout == "out_in" else (site.in_features, site.out_features)
    name = site.weight.name if exclusive else f"{site.module}.weight.merged"

    def compute() -> ir.TensorProtocol:
        stored = old_tensor.numpy()
        weight = (stored if site.weight_layout == "out_in" else stored.T).astype(np.float32)  # a copy
        del stored  # no view of the memory map may outlive release()
        merged = merged_out_in(weight)
        merged = merged if layout == "out_in" else merged.T
        result = ir.tensor(np.ascontiguousarray(merged).astype(dtype.numpy()), name=name)
        if exclusive and hasattr(old_tensor, "release"):  # unmap the base weight's pages now
            old_tensor.release()
        return result

    lazy = ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(shape), name=name)
    if exclusive:
        site.weight.const_value = lazy
        return
    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape), const_value=lazy)
    graph.register_initializer(value)
    site.node.replace_input_with(1, value)


def set_merged_bias(graph: ir.Graph, site: LinearSite, merged_bias: Callable[[np.ndarray], np.ndarray],
                    out_dtype: np.dtype | None = None) -> None:
    """Give ``site`` the bias ``merged_bias(b [out])`` (IA3 scales it; a trained head replaces it),
    computed at save time. A Linear whose bias the exporter dropped (all zeros) gets an Add."""
    bias = site.bias
    old = constant_array(bias) if bias is not None else None
    if bias is not None and old is None:
        raise IncompatibleAdapterError(f"module {site.module}: its bias is computed in the graph, not a constant")
    dtype = np.dtype(old.dtype if old is not None else out_dtype or site.weight.dtype.numpy())
    shape = old.shape if old is not None else (site.out_features,)
    base = old if old is not None else np.zeros(shape, dtype)
    name = f"{site.module}.bias.merged"

    def compute() -> ir.TensorProtocol:
        merged = np.asarray(merged_bias(base.astype(np.float32))).reshape(shape)
        return ir.tensor(merged.astype(dtype), name=name)

    ir_dtype = ir.DataType.from_numpy(dtype)
    value = ir.Value(name=name, type=ir.TensorType(ir_dtype), shape=ir.Shape(shape),
                     const_value=ir.LazyTensor(compute, dtype=ir_dtype, shape=ir.Shape(shape), name=name))
    graph.register_initializer(value)
    if bias is not None:
        site.replace_bias(value)
        remove_dead(graph, [])
        return
    out = site.output
    add = ir.node("Add", [out, value], name=f"{site.module}/merged_bias")
    new = add.outputs[0]
    new.type, new.shape = out.type, out.shape
    graph.insert_after(out.producer(), add)
    if out.is_graph_output():
        graph.outputs[list(graph.outputs).index(out)] = new
        out.name, new.name = f"{site.module}.unbiased", out.name
    else:
        new.name = f"{site.module}.biased"
    for user, index in list(out.uses()):
        if user is not add:
            user.replace_input_with(index, new)


class MergeAdapters(InPlacePass):
    """Fold in-graph adapter branches (or ``adapter_dir``, a PEFT adapter) into the base weights.

    ``strict``: raise NoAdapterSitesError when there is nothing to merge (else report
    ``modified=False``). On a 4-bit base (MatMulBnb4/MatMulNBits) merged weights are requantized;
    ``requantization_errors`` ({module: max |error| added}) fills in as the model is saved.
    """

    def __init__(self, adapter_dir: str | os.PathLike | None = None, strict: bool = True) -> None:
        super().__init__()
        self.adapter_dir = None if adapter_dir is None else Path(adapter_dir)
        self.strict = strict
        self.merged: list[str] = []
        self.requantization_errors: dict[str, float] = {}

    def call(self, model: ir.Model) -> PassResult:
        self.merged = []
        contract = read_contract(model.metadata_props)
        if MULTI_ADAPTER_KEY in model.metadata_props:
            raise IncompatibleAdapterError(
                "MergeAdapters: a MultiAdapter model serves rows of several adapters; merge into the slot model "
                "it was made from (or the base): onnx-peft merge SLOT_MODEL.onnx -o OUT --adapter DIR")
        if contract is not None and contract.slots:
            if self.adapter_dir is None and not contract.external:
                raise IncompatibleAdapterError(
                    "MergeAdapters: the model takes its adapters from slot inputs and holds none itself; name the "
                    "adapter to fold in: onnx-peft merge MODEL.onnx -o OUT --adapter ADAPTER_DIR (the slots are "
                    "dropped: the result is the base with that adapter merged)")
            drop_slots(model, keep_held=self.adapter_dir is None)
        if self.adapter_dir is not None:
            self._merge_dir(model)
        else:
            self._merge_branches(model)
        return PassResult(model, modified=bool(self.merged))

    def _merge_branches(self, model: ir.Model) -> None:
        branches = find_adapter_branches(model)
        inputs = [m for m, b in branches.items() if b.is_input]
        if inputs:
            raise IncompatibleAdapterError(
                f"MergeAdapters: module {inputs[0]} takes its adapter from graph inputs and the model records no "
                "slots; name the adapter to fold in: onnx-peft merge MODEL.onnx -o OUT --adapter ADAPTER_DIR"
            )
        if not branches:
            if self.strict:
                raise NoAdapterSitesError(
                    "MergeAdapters: the model has no in-graph adapter branch to merge; pass a PEFT "
                    "adapter directory (`--adapter DIR`) to merge one into this base model"
                )
            return
        for module, branch in branches.items():
            # The delta is computed inside the lazy tensor, one weight at a time during the
            # save, so merging never holds more than one [out, in] matrix.
            def merged(w: np.ndarray, branch: AdapterBranch = branch) -> np.ndarray:
                delta = branch.delta_weight()
                if branch.method == "dora":
                    return dora_weight(w, delta, branch.dora_magnitude(w, delta))
                return w + delta

            set_merged_weight(model.graph, branch.base, merged, self.requantization_errors)
            remove_branch(model.graph, branch)
            self.merged.append(module)

    def _merge_dir(self, model: ir.Model) -> None:
        """Any method: ``Method.merged_weight`` applied to each target Linear, lazily."""
        from ..convert import PeftAdapter

        adapter = PeftAdapter.read("adapter", self.adapter_dir)
        source = str(self.adapter_dir)
        if find_adapter_branches(model):
            raise IncompatibleAdapterError(
                f"{source}: the model already has adapter branches; merge those first (no --adapter)"
            )
        sites = find_sites(model)
        paths = map_modules(adapter.modules, sites)  # by structure: one prefix rewrite for the adapter
        unmapped = [m for m in adapter.modules if paths[m] is None]
        if unmapped:
            raise IncompatibleAdapterError(
                f"{source}: {len(unmapped)} adapter target(s) match no Linear, embedding or norm of the model, e.g. "
                f"{', '.join(sorted(unmapped)[:3])}; the model has e.g. {', '.join(list(sites)[:3])}"
            )
        targets = set(paths.values())
        for module in sorted(adapter.modules):
            site = sites[paths[module]]
            if not isinstance(site, LinearSite):
                self._merge_op_site(model, adapter, module, site, sites, targets)
                continue
            features = adapter.method.features(adapter.config, module, adapter.modules[module])
            if features is not None and features != (site.in_features, site.out_features):
                raise IncompatibleAdapterError(
                    f"{source}: module {module} was trained on a {features[0]} -> {features[1]} layer but the "
                    f"model's Linear is {site.in_features} -> {site.out_features}"
                )

            def merged(w: np.ndarray, module: str = module) -> np.ndarray:
                return np.asarray(adapter.merged_weight(module, w, None)[0])

            if adapter.method.changes_bias and site.bias is not None:
                weight = site.weight_out_in

                def bias(b: np.ndarray, module: str = module, weight=weight) -> np.ndarray:
                    return np.asarray(adapter.merged_weight(module, weight().astype(np.float32), b)[1])

                set_merged_bias(model.graph, site, bias)
            set_merged_weight(model.graph, site, merged, self.requantization_errors)
            self.merged.append(module)
        self._replace_saved_modules(model, adapter, sites)

    def _merge_op_site(self, model: ir.Model, adapter: PeftAdapter, module: str, site: object,
                       sites: dict[str, object], targets: set[str | None]) -> None:
        """A norm's scale/shift or an embedding's table takes the adapter's values (a head tied to
        the embedding takes the same rows unless the adapter names it too)."""
        kind = getattr(site, "kind", "linear")
        for name in adapter.slot_tensors(module, site.weight_out_in):
            if kind not in form(name).site_kinds:
                raise IncompatibleAdapterError(
                    f"{self.adapter_dir}: module {module} is a {kind} layer in the model, but the adapter's {name} "
                    f"tensors go on a {' or '.join(form(name).site_kinds)} layer; is it for another base model?")
        if isinstance(site, NormSite):
            affine = site.affine()
            if adapter.method.features(adapter.config, module, adapter.modules[module]) != (site.in_features,) * 2:
                raise IncompatibleAdapterError(
                    f"{self.adapter_dir}: module {module} was trained on a norm of another size than the model's "
                    f"({site.in_features} features)")
            scale, shift = adapter.merged_weight(module, affine[0], affine[1] if len(affine) > 1 else None)
            set_node_constant(model.graph, site.node, site.scale_index, scale, f"{site.module}.weight.merged")
            if shift is not None and site.bias is not None:
                set_node_constant(model.graph, site.bias_node, site.bias_index, shift, f"{site.module}.bias.merged")
            elif shift is not None:
                raise IncompatibleAdapterError(
                    f"{self.adapter_dir}: module {module} trains a norm shift but the model's norm has none")
            self.merged.append(module)
            return
        table = site.weight
        if not isinstance(site, EmbeddingSite) or table.const_value is None:
            raise IncompatibleAdapterError(f"{self.adapter_dir}: module {module} cannot be merged into this graph")
        old = table.const_value

        def rows() -> ir.TensorProtocol:
            merged = adapter.merged_weight(module, old.numpy().astype(np.float32), None)[0]
            return ir.tensor(np.ascontiguousarray(merged).astype(old.dtype.numpy()), name=table.name)

        table.const_value = ir.LazyTensor(rows, dtype=old.dtype, shape=old.shape, name=table.name)
        self.merged.append(module)
        for head in tied_heads(sites, site):  # tied word embeddings: the head's rows change too
            if head not in targets:
                set_merged_weight(model.graph, sites[head],
                                  lambda w, module=module: np.asarray(adapter.merged_weight(module, w, None)[0]))
                self.merged.append(head)

    def _replace_saved_modules(self, model: ir.Model, adapter: PeftAdapter, sites: dict[str, LinearSite]) -> None:
        """Modules trained in full (modules_to_save heads) take their trained weight and bias."""
        sites = {m: s for m, s in sites.items() if isinstance(s, LinearSite)}
        paths = map_modules([*adapter.modules, *adapter.tensors.full], sites)
        for module, parts in sorted(adapter.tensors.full.items()):
            target = paths[module]
            weight = parts.get("weight")
            if target is None or weight is None or weight.shape != (sites[target].out_features, sites[target].in_features):
                raise IncompatibleAdapterError(
                    f"{self.adapter_dir}: module {module} is trained in full (modules_to_save) but the model has "
                    "no Linear of that shape for it; only Linear heads can be merged into an ONNX graph")
            site = sites[target]
            set_merged_weight(model.graph, site, lambda w, weight=weight: np.asarray(weight, np.float32))
            if "bias" in parts:
                set_merged_bias(model.graph, site, lambda b, bias=parts["bias"]: np.asarray(bias, np.float32))
            self.merged.append(module)


def set_node_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, name: str) -> None:
    """Give ``node`` a constant of its own at input ``index`` (the old one may be shared: exporters
    merge equal initializers, e.g. every fresh norm's ones)."""
    old = node.inputs[index]
    dtype = old.dtype or old.const_value.dtype
    array = np.asarray(array, np.float32).reshape(old.shape if old.shape is not None else (-1,))
    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(array.shape),
                     const_value=ir.tensor(array.astype(dtype.numpy()), name=name))
    graph.register_initializer(value)
    node.replace_input_with(index, value)
    if old.is_initializer() and not old.uses() and not old.is_graph_input() and old.name in graph.initializers:
        graph.initializers.pop(old.name)


def merge_adapters(model_path: str | os.PathLike, output_path: str | os.PathLike,
                   adapter_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Merge the adapters of ``model_path`` (or ``adapter_dir``) and save to ``output_path``.

    ``output_path``: a ``.onnx`` file (weights in ``<file>.data`` beside it), or a folder that
    gets ``model.onnx``. An existing file or non-empty folder is refused unless ``overwrite=True``
    (a folder is then replaced whole). Returns the model path written."""
    from ..output_folder import check_output_folder, writing_folder

    output_path = Path(output_path)
    is_folder = output_path.suffix != ".onnx"
    inputs = [model_path] + ([adapter_dir] if adapter_dir is not None else [])
    if is_folder:
        check_output_folder(output_path, inputs, overwrite)
    elif output_path.exists() and not overwrite:
        raise UnsafePathError(f"{output_path} exists; choose a new file, or pass overwrite=True to replace it")
    model = load_model(model_path)
    merge = MergeAdapters(adapter_dir=adapter_dir)
    merge(model)
    if is_folder:
        with writing_folder(output_path, inputs, overwrite) as staged:
            save_model(model, staged / "model.onnx", external_data=True)
        path = output_path / "model.onnx"
    else:
        path = save_model(model, output_path, external_data=True)
    if merge.requantization_errors:  # known once the lazy weights were written
        module, error = max(merge.requantization_errors.items(), key=lambda item: item[1])
        logging.getLogger(__name__).info("requantizing %d merged 4-bit weights added at most %.3g (%s)",
                                         len(merge.requantization_errors), error, module)
    return path
