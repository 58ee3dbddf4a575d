"""InsertAdapters: graft PEFT adapter branches onto a base ONNX model, no PyTorch needed.

Any method of the seam (methods/base.py): each adapter's method turns its tensors at a module
into slot tensors of one or more branch forms (methods/forms.py), and the forms are built
around the module's Linear (found by :func:`graph.modules.find_linear_sites`, whatever exporter
wrote the graph)::

    x ─ [ia3_in | rotate_in] ─ x' ─ MatMul/Gemm(W) ─ y ─ [lora | dense] ─ [dora | ia3_out] ─▶ y'

A module gets the union of the forms its adapters use; every form's default is an exact no-op,
so an adapter fills only its own forms' slots and adapters of different methods (and ranks)
share one model.

Heads an adapter trains in full (PEFT ``modules_to_save``, every sequence-classification
adapter's ``classifier``/``score``) become full-weight slots ``<module>.weight``/``.bias`` whose
defaults are the base head (extract_adapters.add_full_weight_slots), whatever the method; in-graph
mode bakes the trained head in.

``mode="slots"``: slots are optional graph inputs named ``<module>.<suffix>``
(``model.layers.0.self_attn.q_proj.lora_A.weight``; symbolic dims one per module) whose
defaults are the no-op values (zero rank, ones, identity), so with nothing fed the model is the
base; each adapter becomes an adapter file. ``mode="in-graph"``: one adapter, its slot tensors
baked in as initializers. The contract (slots + base fingerprint) goes to ``metadata_props``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir

from ..convert import PeftAdapter, adapter_slots, float_dtype, mirror_tied
from ..errors import (
    AdapterConfigError,
    CheckpointError,
    IncompatibleAdapterError,
    NoAdapterSitesError,
)
from ..formats import save_adapter_file, suffix_for
from ..graph.branch import graft
from ..graph.contract import (
    FULL_WEIGHT_METHOD,
    Contract,
    Slot,
    check_adapter,
    read_contract,
    slot_name,
    weight_fingerprint,
    write_contract,
)
from ..graph.module_map import map_modules
from ..graph.modules import LinearSite
from ..graph.op_sites import EmbeddingSite, find_sites, tied_heads
from ..methods.forms import default_array, form
from ..targets import is_target

Mode = Literal["slots", "in-graph"]


def base_weights_out_in(sites: Mapping[str, LinearSite]) -> dict[str, np.ndarray]:
    """Every linear weight as a lazy ``[out, in]`` view (for the fingerprint: few reads)."""
    return {m: s.weight_out_in() for m, s in sites.items() if s.weight.const_value is not None}


def base_fingerprint(sites: Mapping[str, LinearSite]) -> str:
    """Fingerprint of the base: all linear weights, ``[out, in]``, whatever the layout."""
    return weight_fingerprint(base_weights_out_in(sites))


class InsertAdapters(ir.passes.InPlacePass):
    """Add the branches of ``adapters`` ({name: PEFT dir or PeftAdapter}) to a base model."""

    def __init__(self, adapters: Mapping[str, str | os.PathLike | PeftAdapter], mode: Mode = "slots",
                 allow_pickle: bool = False) -> None:
        super().__init__()
        if mode not in ("slots", "in-graph"):
            raise ValueError(f"mode must be 'slots' or 'in-graph', got {mode!r}")
        if not adapters:
            raise ValueError("InsertAdapters needs at least one adapter")
        if mode == "in-graph" and len(adapters) != 1:
            raise AdapterConfigError("mode='in-graph' bakes in exactly one adapter; use mode='slots' for several")
        self.mode = mode
        self.adapters = {
            name: a if isinstance(a, PeftAdapter) else PeftAdapter.read(name, a, allow_pickle)
            for name, a in adapters.items()
        }
        self.contract: Contract | None = None
        self.module_maps: dict[str, dict[str, str]] = {}  # adapter -> {its module: graph module}
        self.base_weights: dict[str, np.ndarray] = {}  # module -> W [out, in] (lazy views), after the call
        self.tied: dict[str, str] = {}  # tied head -> embedding whose token rows it mirrors
        self.full_maps: dict[str, dict[str, str]] = {}  # adapter -> {its modules_to_save Linear: graph module}
        self.full_biases: set[str] = set()  # graph modules whose trained head has a bias
        self._sites: dict[str, object] = {}

    def requires(self, model: ir.Model) -> None:
        contract = read_contract(model.metadata_props)
        if contract is not None and contract.slots:
            raise IncompatibleAdapterError(
                "the model already has adapter slots; insert adapters into the base model instead"
            )

    def base_weight(self, module: str) -> np.ndarray:
        """A Linear's ``W [out, in]``; an embedding's table; a norm's ``[scale, shift?]`` rows."""
        if module in self.base_weights:
            return np.asarray(self.base_weights[module], np.float32)
        site = self._sites.get(module)
        if site is None or isinstance(site, LinearSite):
            raise IncompatibleAdapterError(f"module {module}: its base weight is not a constant of the model")
        return np.asarray(site.weight_out_in(), np.float32)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites = find_sites(model)
        linear = {m: s for m, s in sites.items() if isinstance(s, LinearSite)}
        if not linear:
            raise NoAdapterSitesError(
                "the model has no linear layer (MatMul/Gemm with a constant weight) that could be "
                "mapped to a module path; export it with module names kept (torch.onnx dynamo or Optimum)"
            )
        self._sites = sites
        self.base_weights = base_weights_out_in(linear)  # the fingerprint reads Linears only
        forms = self._forms_per_module(sites)
        slots: list[Slot] = []
        for module in sorted(forms):
            slots.extend(self._graft(model.graph, sites[module], forms[module]))
        slots.extend(self._full_weights(model.graph, linear, set(forms)))
        self.contract = Contract(slots=slots, fingerprint=weight_fingerprint(self.base_weights))
        write_contract(model.metadata_props, self.contract)
        return ir.passes.PassResult(model, modified=bool(forms))

    # -- checks -----------------------------------------------------------------------------
    def _forms_per_module(self, sites: Mapping[str, LinearSite]) -> dict[str, dict[str, dict[str, np.ndarray]]]:
        """``{graph module: {form: example slot tensors}}`` over all adapters; raises at the first
        adapter module that has no Linear, another size, or slots of another shape."""
        forms: dict[str, dict[str, tuple[str, dict[str, np.ndarray]]]] = {}
        for adapter in self.adapters.values():
            self._map_full(adapter, sites)
            mapping = self.module_maps.setdefault(adapter.name, {})
            token_rows: dict[str, str] = {}  # graph embedding -> the adapter module training its rows
            graph_paths = map_modules(adapter.modules, sites)  # one prefix rewrite for the whole adapter
            for module in sorted(adapter.modules):
                target = graph_paths[module]
                if target is None:
                    near = [m for m in sites if m.rsplit(".", 1)[-1] == module.rsplit(".", 1)[-1]]
                    raise IncompatibleAdapterError(
                        f"{adapter.source}: target module {module} has no linear, embedding or norm layer in the "
                        f"model (similar: {near[:3] or sorted(sites)[:3]}); is this adapter for another base model?")
                site = sites[target]
                mapping[module] = target
                features = adapter.method.features(adapter.config, module, adapter.modules[module])
                if features is not None and features != (site.in_features, site.out_features):
                    raise IncompatibleAdapterError(
                        f"{adapter.source}: module {module} was trained on a {features[0]} -> {features[1]} layer "
                        f"but the model's layer maps {site.in_features} -> {site.out_features} features; "
                        "the adapter was trained on another base model")
                per_form = adapter.slot_tensors(module, lambda t=target: self.base_weight(t))
                for name, tensors in per_form.items():
                    _check_site_kind(adapter, target, site, name)
                    self._check_shapes(adapter, target, site, name, tensors, forms.setdefault(target, {}))
                if "tokens" in per_form and isinstance(site, EmbeddingSite):
                    token_rows[target] = module
                    for head in tied_heads(sites, site):  # the head shares the table: same rows
                        self.tied.setdefault(head, target)
            for head, embedding in self.tied.items():
                if embedding in token_rows and head not in mapping.values():
                    tensors = adapter.slot_tensors(token_rows[embedding], lambda: None)["tokens"]
                    self._check_shapes(adapter, head, sites[head], "tokens", tensors, forms.setdefault(head, {}))
            self._check_complete(adapter, sites, mapping)
        return {m: {f: example for f, (_, example) in by_form.items()} for m, by_form in forms.items()}

    def _map_full(self, adapter: PeftAdapter, sites: Mapping[str, object]) -> None:
        """Map ``adapter``'s modules_to_save Linears to the graph's; each must be a Linear of the
        trained weight's shape."""
        linear = {m: s for m, s in sites.items() if isinstance(s, LinearSite)}
        paths = map_modules(adapter.tensors.full, linear)
        mapping = self.full_maps.setdefault(adapter.name, {})
        for module, parts in sorted(adapter.tensors.full.items()):
            target, weight = paths[module], parts.get("weight")
            site = linear.get(target) if target is not None else None
            if site is None or weight is None or tuple(weight.shape) != (site.out_features, site.in_features):
                found = f"a {site.in_features} -> {site.out_features} Linear" if site is not None else "no Linear"
                raise IncompatibleAdapterError(
                    f"{adapter.source}: module {module} is trained in full (modules_to_save, weight "
                    f"{list(weight.shape) if weight is not None else 'missing'}) but the model has {found} for it; "
                    "export the base with the adapters' number of labels (onnx-peft export BASE -o OUT --adapter "
                    "NAME=DIR --mode inputs) or merge the adapter")
            mapping[module] = target
            if "bias" in parts:
                self.full_biases.add(target)

    def _full_weights(self, graph: ir.Graph, sites: Mapping[str, LinearSite], grafted: set[str]) -> list[Slot]:
        """Full-weight slots for the heads the adapters train in full (slots mode), or the trained
        head baked in (in-graph mode)."""
        targets = sorted({t for mapping in self.full_maps.values() for t in mapping.values()})
        both = [t for t in targets if t in grafted]
        if both:
            raise IncompatibleAdapterError(
                f"module {both[0]} is trained in full (modules_to_save) by one adapter and adapted by another; "
                "insert such adapters into separate models")
        if not targets:
            return []
        if self.mode == "in-graph":
            from .merge_adapters import set_merged_bias, set_merged_weight

            (adapter,) = self.adapters.values()
            for module, target in self.full_maps[adapter.name].items():
                parts = adapter.tensors.full[module]
                set_merged_weight(graph, sites[target], lambda w, t=parts["weight"]: np.asarray(t, np.float32))
                if "bias" in parts:
                    set_merged_bias(graph, sites[target], lambda b, t=parts["bias"]: np.asarray(t, np.float32))
            return []
        from .extract_adapters import add_full_weight_slots

        return add_full_weight_slots(graph, sites, targets, sorted(self.full_biases & set(targets)))

    @staticmethod
    def _check_shapes(adapter: PeftAdapter, module: str, site: LinearSite, name: str,
                      tensors: Mapping[str, np.ndarray], seen: dict[str, tuple[str, dict[str, np.ndarray]]]) -> None:
        """The adapter's tensors fit the form's slots, whose fixed dims the first adapter set."""
        first_source, first = seen.setdefault(name, (adapter.source, dict(tensors)))
        for spec in form(name).slot_specs(module, site.in_features, site.out_features, first):
            array = tensors.get(spec.suffix)
            if array is None:
                raise IncompatibleAdapterError(f"{adapter.source}: module {module} lacks slot tensor {spec.suffix}")
            if not (len(array.shape) == len(spec.shape) and all(
                    isinstance(want, str) or want == got for want, got in zip(spec.shape, array.shape))):
                by = f" (set by {first_source})" if first_source != adapter.source else ""
                raise IncompatibleAdapterError(
                    f"{adapter.source}: module {module} has {name} slot {spec.suffix} of shape "
                    f"{list(array.shape)}, the model's slot is {list(spec.shape)}{by}; insert such adapters "
                    "into separate models")

    @staticmethod
    def _check_complete(adapter: PeftAdapter, sites: Mapping[str, LinearSite], mapping: Mapping[str, str]) -> None:
        targets = getattr(adapter.config, "target_modules", None)
        if targets is None or targets == "all-linear":
            return
        covered = set(mapping.values())
        kinds = {type(sites[m]) for m in covered}  # a LoRA adapter targets Linears, LN Tuning norms, ...
        missing = sorted(m for m in sites if is_target(m, adapter.config) and m not in covered
                         and type(sites[m]) in kinds)
        if missing:
            raise CheckpointError(
                f"{adapter.source}: the config targets {missing[0]} but the checkpoint has no tensors for it; "
                "the adapter_model.safetensors is incomplete")

    # -- graph surgery ----------------------------------------------------------------------
    def _graft(self, graph: ir.Graph, site: LinearSite, forms: Mapping[str, Mapping[str, np.ndarray]]) -> list[Slot]:
        """Build the module's forms after ``site``; return its slots (none in in-graph mode)."""
        node = site.node
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            raise IncompatibleAdapterError(f"module {site.module}: Gemm with transA=1 is not supported")
        dtype = site.weight.dtype or site.weight.const_value.dtype
        np_dtype = dtype.numpy()
        slots: list[Slot] = []
        built = []
        if self.mode == "in-graph":
            (adapter,) = self.adapters.values()
            graph_module = site.module if site.module in self.module_maps[adapter.name].values() \
                else self.tied[site.module]  # a tied head takes its embedding's rows
            module = next(m for m, t in self.module_maps[adapter.name].items() if t == graph_module)
            per_form = adapter.slot_tensors(module, lambda: self.base_weight(graph_module))
            if graph_module != site.module:
                per_form = {"tokens": per_form["tokens"]}
            for name, tensors in per_form.items():
                values = {k: _initializer(graph, slot_name(site.module, k), _slot_dtype(np.asarray(v), np_dtype))
                          for k, v in tensors.items()}
                built.append((form(name), values))
        else:
            for name, example in forms.items():
                values = {}
                for spec in form(name).slot_specs(site.module, site.in_features, site.out_features, example):
                    slot_dtype = np.dtype(spec.dtype) if spec.dtype else np_dtype
                    slot = Slot(slot_name(site.module, spec.suffix), slot_dtype.name, spec.shape, site.module,
                                name, default=spec.default, tied_to=self.tied.get(site.module, ""))
                    shape = tuple(d if isinstance(d, int) else 0 for d in spec.shape)
                    values[spec.suffix] = _slot_input(graph, slot, ir.DataType.from_numpy(slot_dtype),
                                                      default_array(shape, spec.default, slot_dtype))
                    slots.append(slot)
                built.append((form(name), values))
        graft(graph, site, built)
        return slots


def _slot_dtype(array: np.ndarray, float_dtype: np.dtype) -> np.ndarray:
    """A slot tensor in the model's float dtype; integer slots (token ids) stay int64."""
    return array.astype(float_dtype if array.dtype.kind == "f" else np.int64)


def _check_site_kind(adapter: PeftAdapter, module: str, site: object, name: str) -> None:
    """The form must be one built on this kind of site (``Form.site_kinds``): ``norm`` on a norm,
    ``tokens`` on an embedding or a Linear head, the rest on a Linear."""
    kind = getattr(site, "kind", "linear")
    fits = form(name).site_kinds
    if kind not in fits:
        raise IncompatibleAdapterError(
            f"{adapter.source}: module {module} is a {kind} layer in the model but the adapter gives it {name} "
            f"slots, which go on a {' or '.join(fits)} layer; is this adapter for another base model?")


def _slot_input(graph: ir.Graph, slot: Slot, dtype: ir.DataType, default: np.ndarray) -> ir.Value:
    value = ir.val(slot.name, dtype, list(slot.shape))
    value.const_value = ir.tensor(default, name=slot.name)  # the no-op default: "no adapter"
    graph.inputs.append(value)
    graph.register_initializer(value)
    return value


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.val(name, ir.DataType.from_numpy(array.dtype), list(array.shape),
                   const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


# -- the public entry point ------------------------------------------------------------------
def adapter_file_tensors(adapter: PeftAdapter, contract: Contract,
                         base_weight: Callable[[str], np.ndarray] | None = None,
                         module_map: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """The slot tensors of ``adapter`` in the model's dtype, checked against ``contract``.

    ``base_weight(module) -> W [out, in]`` is needed by methods whose slots depend on it (DoRA,
    HRA). Slots of other forms at the same modules are left out: their defaults are no-ops.
    """
    dtype = float_dtype(contract)
    if module_map is None:
        known = {s.module for s in contract.slots}
        module_map = {m: t or m for m, t in map_modules(adapter.modules, known).items()}
    full = _full_slot_tensors(adapter, contract, dtype)
    if adapter.tensors.full:  # served by the full-weight slots, not by the method's forms
        adapter = dataclasses.replace(adapter, tensors=dataclasses.replace(adapter.tensors, full={}))

    def no_base(module: str) -> np.ndarray:
        raise IncompatibleAdapterError(f"{adapter.source}: module {module} needs its base weight, "
                                       "which is not a constant of the model")

    tensors = mirror_tied({**adapter_slots(adapter, dtype, base_weight or no_base, module_map), **full}, contract)
    shapes = {n: (tuple(t.shape), t.dtype.name) for n, t in tensors.items()}
    check_adapter(contract, shapes, contract.fingerprint, source=adapter.source)
    return tensors


def _full_slot_tensors(adapter: PeftAdapter, contract: Contract, dtype: np.dtype) -> dict[str, np.ndarray]:
    """The adapter's modules_to_save Linears as full-weight slot tensors (weight in the slot's
    layout, bias as is); IncompatibleAdapterError when the model has no such slot."""
    if not adapter.tensors.full:
        return {}
    slots = {s.name: s for s in contract.slots if s.method == FULL_WEIGHT_METHOD}
    paths = map_modules(adapter.tensors.full, {s.module for s in slots.values()})
    out = {}
    for module, parts in sorted(adapter.tensors.full.items()):
        for part, array in sorted(parts.items()):
            slot = slots.get(slot_name(paths[module], part)) if paths[module] is not None else None
            if slot is None:
                raise IncompatibleAdapterError(
                    f"{adapter.source}: module {module} is trained in full (modules_to_save) and the model has no "
                    f"full-weight slot {slot_name(module, part)!r} for it; insert the adapter into the base model "
                    "(onnx-peft insert BASE.onnx -o OUT --adapter NAME=DIR) to get one")
            array = np.asarray(array, np.float32)
            array = array.T if slot.layout == "in_out" and array.ndim == 2 else array
            out[slot.name] = np.ascontiguousarray(array).astype(dtype)
    return out


def insert_adapters(base_model_path: str | os.PathLike, adapters: Mapping[str, str | os.PathLike],
                    output_dir: str | os.PathLike, mode: Mode = "slots", allow_pickle: bool = False,
                    adapter_format: str = "onnx_adapter", overwrite: bool = False) -> Path:
    """Base model + PEFT adapter dirs -> ``OUT/model.onnx`` (+ ``OUT/adapters/NAME.onnx_adapter``).

    Returns the path of the written model. Raises IncompatibleAdapterError naming the first
    target module or tensor that does not fit the base model. A non-empty ``output_dir`` is
    refused unless ``overwrite=True``, which replaces it whole.
    """
    from ..graph.io import load_model, save_model
    from ..output_folder import check_output_folder, writing_folder
    from .run import run_pass

    inputs = [base_model_path, *adapters.values()]
    output_dir = check_output_folder(output_dir, inputs, overwrite)
    model = load_model(base_model_path)
    insert = InsertAdapters(adapters, mode=mode, allow_pickle=allow_pickle)
    files = {}
    result = run_pass(insert, model, base_model_path)
    contract = insert.contract
    if mode == "slots":
        # convert (and check) every adapter before anything is written
        files = {name: adapter_file_tensors(a, contract, insert.base_weight, insert.module_maps[name])
                 for name, a in insert.adapters.items()}
    suffix = suffix_for(adapter_format)
    with writing_folder(output_dir, inputs, overwrite) as staged:
        save_model(result.model, staged / "model.onnx")
        for name, tensors in files.items():
            save_adapter_file(staged / "adapters" / f"{name}{suffix}", tensors, contract.fingerprint)
    return output_dir / "model.onnx"

