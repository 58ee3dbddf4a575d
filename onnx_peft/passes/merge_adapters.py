"""MergeAdapters: fold adapters into the base weights, leaving the plain base graph.

Two sources of adapters::

    in-graph branch   y = x W^T + s (x A^T) B^T      ->  W' = W + s B A            (LoRA)
                                                      ->  W' = m / ||W + s B A|| * (W + s B A)  (DoRA)
    PEFT adapter dir  adapter_config.json + adapter_model.safetensors, matched to base Linears

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

from ..errors import IncompatibleAdapterError, NoAdapterSitesError
from ..graph.io import load_model, save_model
from ..graph.modules import LinearSite, constant_array, find_linear_sites, match_module
from ..graph.sites import AdapterBranch, find_adapter_branches, remove_branch, remove_dead
from ..methods.lora import dora_weight

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
        trans_b = site.node.op_type == "Gemm" and site.node.attributes.get("transB") is not None \
            and bool(site.node.attributes["transB"].value)
        layout = "out_in" if trans_b else "in_out"
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
        consumer = site.node if site.node.op_type == "Gemm" else site.output.producer()
        consumer.replace_input_with(next(i for i, v in enumerate(consumer.inputs) if v is bias), value)
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
                f"MergeAdapters: module {inputs[0]} takes its adapter from graph inputs (an extracted "
                "model); merge the PEFT adapter dir with adapter_dir=... (`--adapter DIR`) instead"
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
        sites = find_linear_sites(model)
        unmapped = [m for m in adapter.modules if match_module(m, sites) is None]
        if unmapped:
            raise IncompatibleAdapterError(
                f"{source}: {len(unmapped)} adapter target(s) match no Linear of the model, e.g. "
                f"{', '.join(sorted(unmapped)[:3])}; the model has e.g. {', '.join(list(sites)[:3])}"
            )
        for module in sorted(adapter.modules):
            site = sites[match_module(module, sites)]
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

    def _replace_saved_modules(self, model: ir.Model, adapter: PeftAdapter, sites: dict[str, LinearSite]) -> None:
        """Modules trained in full (modules_to_save heads) take their trained weight and bias."""
        for module, parts in sorted(adapter.tensors.full.items()):
            target = match_module(module, sites)
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


def merge_adapters(model_path: str | os.PathLike, output_path: str | os.PathLike,
                   adapter_dir: str | os.PathLike | None = None) -> Path:
    """Merge the adapters of ``model_path`` (or ``adapter_dir``) and save to ``output_path``."""
    model = load_model(model_path)
    merge = MergeAdapters(adapter_dir=adapter_dir)
    merge(model)
    path = save_model(model, output_path, external_data=True)
    if merge.requantization_errors:  # known once the lazy weights were written
        module, error = max(merge.requantization_errors.items(), key=lambda item: item[1])
        logging.getLogger(__name__).info("requantizing %d merged 4-bit weights added at most %.3g (%s)",
                                         len(merge.requantization_errors), error, module)
    return path
