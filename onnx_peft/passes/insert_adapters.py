"""InsertAdapters: graft PEFT LoRA branches onto a base ONNX model, no PyTorch needed.

For each linear layer an adapter targets (found by :func:`graph.modules.find_linear_sites`,
whatever exporter wrote the graph), the pass adds::

    x ─┬─ MatMul/Gemm(W) ──────────────────── y ─┐
       └─ MatMul(A_slot [in, r]) ─ MatMul(B_slot [r, out]) ─ Add ─▶ y' (old consumers of y)

and for a DoRA module (its adapter has ``lora_magnitude_vector``) the form of
:func:`graph.branch.graft_slot_branch`, ``y' = factor * (x W + (x A) B) + bias``, with a
``<module>.dora_factor`` ``[out]`` slot (default ones: no feed = the base; a plain LoRA adapter
fills it with ones). The factor ``m / ||W + s B A||_row`` comes from the base weight
(convert.dora_factor_for).

``mode="slots"``: ``A_slot``/``B_slot`` are optional graph inputs named
``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (rank dim symbolic, one per module) whose
defaults are zero-rank tensors ``[in, 0]`` / ``[0, out]``, so with nothing fed the model is the
base; the union of all adapters' modules gets slots and each adapter becomes an adapter file.
``mode="in-graph"``: one adapter, its tensors baked in as initializers.

The scale is folded into B (``(s B)^T``), as convert-adapters writes it; the contract (slots +
base fingerprint) goes to ``metadata_props``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from ..convert import (
    A_SUFFIX,
    B_SUFFIX,
    MAGNITUDE_SUFFIX,
    dora_factor_for,
    group_peft_tensors,
    lora_slot_tensors,
)
from ..errors import CheckpointError, IncompatibleAdapterError, NoAdapterSitesError
from ..formats import read_peft_adapter, save_adapter_file, suffix_for
from ..graph.branch import graft_slot_branch
from ..graph.contract import (
    Contract,
    Slot,
    check_adapter,
    rank_dim,
    read_contract,
    slot_name,
    weight_fingerprint,
    write_contract,
)
from ..methods.lora import LoraConfig
from ..targets import is_target

Mode = Literal["slots", "in-graph"]
DORA_SUFFIX = "dora_factor"


@dataclass
class PeftAdapter:
    """A PEFT adapter read from disk: its config and its tensors grouped by module path."""

    name: str
    source: str
    config: LoraConfig
    modules: dict[str, dict[str, np.ndarray]]

    @classmethod
    def read(cls, name: str, directory: str | os.PathLike, allow_pickle: bool = False) -> PeftAdapter:
        config, tensors = read_peft_adapter(directory, allow_pickle=allow_pickle)
        source = f"adapter {name!r} ({directory})"
        if not isinstance(config, LoraConfig):
            raise IncompatibleAdapterError(
                f"{source}: peft_type {config.peft_type} cannot be inserted; only LoRA can"
            )
        modules = group_peft_tensors(tensors, source)
        for module, parts in sorted(modules.items()):
            if config.use_dora and MAGNITUDE_SUFFIX not in parts:
                raise CheckpointError(f"{source}: DoRA module {module} has no {MAGNITUDE_SUFFIX}")
        return cls(name, source, config, modules)

    def is_dora(self, module: str) -> bool:
        return MAGNITUDE_SUFFIX in self.modules.get(module, {})


def _base_weights_out_in(sites: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every linear weight as a lazy ``[out, in]`` view (for the fingerprint: few reads)."""
    weights = {}
    for module, site in sites.items():
        if site.weight.const_value is None:
            continue
        array = site.weight.const_value.numpy()
        weights[module] = array.T if site.weight_layout == "in_out" else array
    return weights


def base_fingerprint(sites: Mapping[str, Any]) -> str:
    """Fingerprint of the base: all linear weights, ``[out, in]``, whatever the layout."""
    return weight_fingerprint(_base_weights_out_in(sites))


class InsertAdapters(ir.passes.InPlacePass):
    """Add LoRA branches for ``adapters`` ({name: PEFT dir or PeftAdapter}) to a base model."""

    def __init__(self, adapters: Mapping[str, str | os.PathLike | PeftAdapter], mode: Mode = "slots",
                 allow_pickle: bool = False) -> None:
        super().__init__()
        if mode not in ("slots", "in-graph"):
            raise ValueError(f"mode must be 'slots' or 'in-graph', got {mode!r}")
        if not adapters:
            raise ValueError("InsertAdapters needs at least one adapter")
        if mode == "in-graph" and len(adapters) != 1:
            raise ValueError("mode='in-graph' bakes in exactly one adapter; use mode='slots' for several")
        self.mode = mode
        self.adapters = {
            name: a if isinstance(a, PeftAdapter) else PeftAdapter.read(name, a, allow_pickle)
            for name, a in adapters.items()
        }
        self.contract: Contract | None = None
        self.base_weights: dict[str, np.ndarray] = {}  # module -> W [out, in] (lazy views), after the call

    def requires(self, model: ir.Model) -> None:
        contract = read_contract(model.metadata_props)
        if contract is not None and contract.slots:
            raise IncompatibleAdapterError(
                "the model already has adapter slots; insert adapters into the base model instead"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from ..graph.modules import find_linear_sites

        sites = find_linear_sites(model)
        if not sites:
            raise NoAdapterSitesError(
                "the model has no linear layer (MatMul/Gemm with a constant weight) that could be "
                "mapped to a module path; export it with module names kept (torch.onnx dynamo or Optimum)"
            )
        modules = self._check_against(sites)
        self.base_weights = _base_weights_out_in(sites)
        slots: list[Slot] = []
        for module in sorted(modules):
            slots.extend(self._graft(model.graph, sites[module]))
        self.contract = Contract(slots=slots, fingerprint=weight_fingerprint(self.base_weights))
        write_contract(model.metadata_props, self.contract)
        return ir.passes.PassResult(model, modified=bool(modules))

    # -- checks -----------------------------------------------------------------------------
    def _check_against(self, sites: Mapping[str, Any]) -> set[str]:
        """Modules to graft (union over adapters); raise at the first adapter that does not fit."""
        union: set[str] = set()
        for adapter in self.adapters.values():
            for module in sorted(adapter.modules):
                site = sites.get(module)
                if site is None:
                    near = [m for m in sites if m.rsplit(".", 1)[-1] == module.rsplit(".", 1)[-1]]
                    raise IncompatibleAdapterError(
                        f"{adapter.source}: target module {module} has no linear layer in the model "
                        f"(similar: {near[:3] or sorted(sites)[:3]}); is this adapter for another base model?"
                    )
                a, b = adapter.modules[module][A_SUFFIX], adapter.modules[module][B_SUFFIX]
                if a.shape[1] != site.in_features or b.shape[0] != site.out_features:
                    raise IncompatibleAdapterError(
                        f"{adapter.source}: module {module} has A {list(a.shape)}, B {list(b.shape)} "
                        f"but the model's layer maps {site.in_features} -> {site.out_features} "
                        "features; the adapter was trained on another base model"
                    )
                magnitude = adapter.modules[module].get(MAGNITUDE_SUFFIX)
                if magnitude is not None and np.size(magnitude) != site.out_features:
                    raise IncompatibleAdapterError(
                        f"{adapter.source}: module {module} has a DoRA magnitude of {np.size(magnitude)} "
                        f"values but the model's layer has {site.out_features} output features"
                    )
            missing = sorted(m for m in sites if is_target(m, adapter.config) and m not in adapter.modules)
            if missing:
                raise CheckpointError(
                    f"{adapter.source}: the config targets {missing[0]} but the checkpoint has no "
                    "tensors for it; the adapter_model.safetensors is incomplete"
                )
            union |= set(adapter.modules)
        return union

    # -- graph surgery ----------------------------------------------------------------------
    def _graft(self, graph: ir.Graph, site: Any) -> list[Slot]:
        """Add the slot branch (graph.branch.graft_slot_branch) after ``site``; return its slots."""
        node = site.node
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            raise IncompatibleAdapterError(f"module {site.module}: Gemm with transA=1 is not supported")
        module = site.module
        dtype = site.weight.dtype or site.weight.const_value.dtype
        np_dtype = dtype.numpy()
        dora = any(a.is_dora(module) for a in self.adapters.values())
        names = [slot_name(module, A_SUFFIX), slot_name(module, B_SUFFIX)]
        rank = rank_dim(module)
        shapes = [(site.in_features, rank), (rank, site.out_features)]
        if dora:
            names.append(slot_name(module, DORA_SUFFIX))
            shapes.append((site.out_features,))
        if self.mode == "slots":
            defaults = [np.zeros((site.in_features, 0), np_dtype), np.zeros((0, site.out_features), np_dtype),
                        np.ones(site.out_features, np_dtype)]
            values = [self._slot_input(graph, n, dtype, shape, default)
                      for n, shape, default in zip(names, shapes, defaults)]
        else:
            (adapter,) = self.adapters.values()
            tensors = module_slot_tensors(adapter, module, np_dtype, self.base_weights.get)
            values = [self._initializer(graph, n, tensors[n]) for n in names]
        # x is taken before a flattening Reshape when the output is reshaped back (GPT-2)
        graft_slot_branch(graph, site, *values)
        if self.mode != "slots":
            return []
        method = "dora" if dora else "lora"
        return [Slot(n, np_dtype.name, shape, module, method) for n, shape in zip(names, shapes)]

    @staticmethod
    def _slot_input(graph: ir.Graph, name: str, dtype: ir.DataType, shape: tuple, default: np.ndarray
                    ) -> ir.Value:
        value = ir.val(name, dtype, list(shape))
        value.const_value = ir.tensor(default, name=name)  # zero-rank default: "no adapter"
        graph.inputs.append(value)
        graph.register_initializer(value)
        return value

    @staticmethod
    def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
        value = ir.val(name, ir.DataType.from_numpy(array.dtype), list(array.shape),
                       const_value=ir.tensor(array, name=name))
        graph.register_initializer(value)
        return value


# -- the public entry point ------------------------------------------------------------------
def module_slot_tensors(adapter: PeftAdapter, module: str, dtype: Any,
                        base_weight: Callable[[str], np.ndarray | None]) -> dict[str, np.ndarray]:
    """Slot tensors of one module of ``adapter``: A^T, (s B)^T and, for DoRA, the factor ``[out]``
    computed from ``base_weight(module)`` (``[out, in]``)."""
    parts = adapter.modules[module]
    tensors = lora_slot_tensors(module, parts, adapter.config, dtype, adapter.source)
    if adapter.is_dora(module):
        weight = base_weight(module)
        if weight is None:
            raise IncompatibleAdapterError(f"{adapter.source}: DoRA module {module} needs its base weight, "
                                           "which is not a constant of the model")
        factor = dora_factor_for(module, parts, adapter.config, weight)
        tensors[slot_name(module, DORA_SUFFIX)] = np.asarray(factor, np.float32).reshape(-1).astype(dtype)
    return tensors


def adapter_file_tensors(adapter: PeftAdapter, contract: Contract,
                         base_weight: Callable[[str], np.ndarray | None] | None = None) -> dict[str, np.ndarray]:
    """The slot tensors of ``adapter`` in the model's dtype, checked against ``contract``.

    ``base_weight(module) -> W [out, in]`` is needed for DoRA modules (the factor); a plain
    LoRA module whose slots include a DoRA factor (another adapter is DoRA there) gets ones.
    """
    dtype = np.dtype(contract.slots[0].dtype) if contract.slots else np.float32
    slots = contract.slot_map()
    tensors: dict[str, np.ndarray] = {}
    for module in sorted(adapter.modules):
        tensors.update(module_slot_tensors(adapter, module, dtype, base_weight or (lambda m: None)))
        factor = slot_name(module, DORA_SUFFIX)
        if factor in slots and factor not in tensors:
            tensors[factor] = np.ones([int(d) for d in slots[factor].shape], dtype)
    shapes = {n: (tuple(t.shape), t.dtype.name) for n, t in tensors.items()}
    check_adapter(contract, shapes, contract.fingerprint, source=adapter.source)
    return tensors


def insert_adapters(base_model_path: str | os.PathLike, adapters: Mapping[str, str | os.PathLike],
                    output_dir: str | os.PathLike, mode: Mode = "slots", allow_pickle: bool = False,
                    adapter_format: str = "onnx_adapter") -> Path:
    """Base model + PEFT adapter dirs -> ``OUT/model.onnx`` (+ ``OUT/adapters/NAME.onnx_adapter``).

    Returns the path of the written model. Raises IncompatibleAdapterError naming the first
    target module or tensor that does not fit the base model.
    """
    from ..graph.io import load_model, save_model

    output_dir = Path(output_dir)
    model = load_model(base_model_path)
    insert = InsertAdapters(adapters, mode=mode, allow_pickle=allow_pickle)
    files = {}
    result = insert(model)
    contract = insert.contract
    if mode == "slots":
        # convert (and check) every adapter before anything is written
        files = {name: adapter_file_tensors(a, contract, insert.base_weights.get)
                 for name, a in insert.adapters.items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = save_model(result.model, output_dir / "model.onnx")
    suffix = suffix_for(adapter_format)
    for name, tensors in files.items():
        save_adapter_file(output_dir / "adapters" / f"{name}{suffix}", tensors, contract.fingerprint)
    return model_path
