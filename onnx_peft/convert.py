"""convert-adapters: a PEFT adapter dir -> an adapter file that fits a model's slots.

The method of the adapter (``peft_type``, methods/base.py) turns its PEFT tensors into slot
tensors of one or more branch forms (methods/forms.py); for LoRA, per target module
(``W: [out, in]``, ``x: [..., in]``)::

    PEFT:  lora_A.weight  A  [r, in]     lora_B.weight  B  [out, r]     y = x W^T + s (x A^T) B^T
    slots: <module>.lora_A.weight   A^T  [in, r]     <module>.lora_B.weight   (s B)^T  [r, out]

Methods whose slots depend on the base weight (DoRA's factor ``m / ||W + s B A||_row``, HRA's
folded reflections) read it from the model, one weight at a time.

A module trained in full (PEFT ``modules_to_save``, e.g. ``base_model.model.classifier.weight``
``[out, in]`` and ``.bias`` ``[out]``) fills the model's full-weight slots ``<module>.weight`` /
``<module>.bias``, the weight transposed when the slot's layout is ``in_out``; an adapter without
that module leaves the slots at their defaults (the base head).

A file already written by ``olive convert-adapters`` (same names, already transposed and
scaled) is passed through, checked against the model's contract when a model is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import AdapterConfig
from .errors import CheckpointError, IncompatibleAdapterError
from .formats import (
    AdapterFileFormat,
    load_adapter_file,
    read_peft_adapter,
    resolve_fingerprint,
    save_adapter_file,
)
from .graph.contract import (
    FULL_WEIGHT_METHOD,
    PEFT_PREFIX,
    Contract,
    check_adapter,
    read_contract,
    slot_name,
    strip_peft_prefix,
)
from .methods.base import AdapterTensors, Method, method_for
from .safe_write import refuse_overwriting_inputs

_DTYPES = {"float32": np.float32, "fp32": np.float32, "float16": np.float16, "fp16": np.float16}

BaseWeights = Callable[[str], np.ndarray]
"""``module -> W [out, in]`` (float32); read only by methods whose slots need the base."""


def numpy_dtype(dtype: str | np.dtype | type) -> np.dtype:
    """``"fp16"``/``"float16"``/``np.float16`` -> ``np.dtype('float16')``; fp32 likewise."""
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"dtype must be float32/fp32 or float16/fp16, got {dtype!r}")
        return np.dtype(_DTYPES[dtype.lower()])
    return np.dtype(dtype)


@dataclass
class PeftAdapter:
    """A PEFT adapter read from disk: config, method, tensors by module (paths without PEFT's
    ``base_model.model.`` prefix), and the slot tensors computed from them (cached)."""

    name: str
    source: str
    config: AdapterConfig
    method: Method
    tensors: AdapterTensors
    _slots: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict, repr=False)

    @classmethod
    def read(cls, name: str, directory: str | os.PathLike, allow_pickle: bool = False,
             variant: str | None = None) -> PeftAdapter:
        config, tensors = read_peft_adapter(directory, allow_pickle=allow_pickle)
        return cls.from_tensors(name, f"adapter {name!r} ({directory})", config, tensors, variant)

    @classmethod
    def from_tensors(cls, name: str, source: str, config: AdapterConfig,
                     tensors: Mapping[str, np.ndarray], variant: str | None = None) -> PeftAdapter:
        """``variant``: one of the adapters a checkpoint holds (``Method.variants``: Poly's
        ``"task1"``), or None for the checkpoint as one adapter."""
        method = method_for(config)
        saved = list(getattr(config, "modules_to_save", None) or [])
        if getattr(config, "task_type", None) == "SEQ_CLS":  # PEFT adds the head for this task
            saved += [h for h in ("classifier", "score") if h not in saved]
        grouped = method.group(tensors, source, saved)
        if variant is not None:
            try:
                config, grouped = method.select_variant(config, grouped, variant)
            except IncompatibleAdapterError as exc:
                raise IncompatibleAdapterError(f"{source}: {exc}") from exc
            source = f"{source} variant {variant!r}"
        return cls(name, source, config, method, grouped)

    @property
    def modules(self) -> dict[str, dict[str, np.ndarray]]:
        return self.tensors.modules

    def slot_tensors(self, module: str, base_weight: Callable[[], np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        """``{form: {slot suffix: float32 array}}`` of ``module`` (see Method.slot_tensors)."""
        if module not in self._slots:
            try:
                self._slots[module] = self.method.slot_tensors(
                    self.config, module, self.modules[module], self.tensors.shared, base_weight)
            except IncompatibleAdapterError as exc:
                raise IncompatibleAdapterError(f"{self.source}: {exc}") from exc
        return self._slots[module]

    def merged_weight(self, module: str, weight: Any, bias: Any) -> tuple[Any, Any]:
        return self.method.merged_weight(self.config, module, weight, bias, self.modules[module],
                                         self.tensors.shared)


def _no_base(source: str) -> BaseWeights:
    def read(module: str) -> np.ndarray:
        raise IncompatibleAdapterError(
            f"{source}: module {module} needs the base layer (its weight or its size: DoRA, HRA, VeRA, "
            "MiSS, FourierFT, OSF, ...) for its slots; pass the model (--model) so it can be read")
    return read


def full_weight_tensors(tensors: Mapping[str, np.ndarray], contract: Contract | None, dtype: Any = np.float32
                        ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split PEFT tensors into (full-weight slot tensors, the rest).

    ``base_model.model.<module>.weight`` ``[out, in]`` matching a ``modules_to_save`` slot of
    ``contract`` is transposed to the slot's layout; ``.bias`` ``[out]`` is kept as is.
    """
    slots = {s.name: s for s in contract.slots if s.method == FULL_WEIGHT_METHOD} if contract else {}
    full, rest = {}, {}
    for key, value in tensors.items():
        slot = slots.get(strip_peft_prefix(key)) if key.startswith(PEFT_PREFIX) else None
        if slot is None:
            rest[key] = value
            continue
        array = np.asarray(value)
        if slot.layout == "in_out" and array.ndim == 2:
            array = array.T
        full[slot.name] = np.ascontiguousarray(array).astype(numpy_dtype(dtype))
    return full, rest


def adapter_slots(adapter: PeftAdapter, dtype: Any, base_weight: BaseWeights,
                  module_map: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """Every slot tensor of ``adapter``, named ``<graph module>.<suffix>`` (``module_map``: adapter
    module path -> the graph's, identity when None), in ``dtype``."""
    if adapter.tensors.full:
        module = sorted(adapter.tensors.full)[0]
        raise IncompatibleAdapterError(
            f"{adapter.source}: module {module} is trained in full (modules_to_save) and the model has no "
            "full-weight slot for it; export the model with this adapter (export(..., adapters=..., "
            "mode='inputs')) and pass that model, or merge the adapter")
    out: dict[str, np.ndarray] = {}
    for module in sorted(adapter.modules):
        target = module_map.get(module, module) if module_map is not None else module
        forms = adapter.slot_tensors(module, lambda target=target: np.asarray(base_weight(target), np.float32))
        for tensors in forms.values():
            for suffix, array in tensors.items():
                out[slot_name(target, suffix)] = as_slot_dtype(array, dtype)
    return out


def as_slot_dtype(array: Any, dtype: Any) -> np.ndarray:
    """A slot tensor in ``dtype`` (the model's float type); integer slots (token ids) stay int64."""
    array = np.ascontiguousarray(array)
    return array.astype(np.int64) if array.dtype.kind in "iu" else array.astype(dtype)


def float_dtype(contract: Contract | None, default: Any = np.float32) -> np.dtype:
    """The model's float type: the dtype of its first float slot."""
    for slot in contract.slots if contract is not None else ():
        if np.dtype(slot.dtype).kind == "f":
            return np.dtype(slot.dtype)
    return np.dtype(default)


def mirror_tied(tensors: dict[str, np.ndarray], contract: Contract | None) -> dict[str, np.ndarray]:
    """Fill a tied head's ``tokens`` slots with its embedding's (``Slot.tied_to``), for an adapter
    that trained the embedding's rows only: the head shares the table, as in PEFT."""
    for slot in contract.slots if contract is not None else ():
        suffix = slot.name[len(slot.module) + 1:]
        source = slot_name(slot.tied_to, suffix) if slot.tied_to else None
        if source in tensors and slot.name not in tensors:
            tensors[slot.name] = tensors[source]
    return tensors


def peft_to_slots(config: AdapterConfig, tensors: Mapping[str, np.ndarray], dtype: Any = np.float32,
                  base_weight: BaseWeights | None = None, contract: Contract | None = None,
                  source: str = "adapter", variant: str | None = None) -> dict[str, np.ndarray]:
    """All slot tensors of a PEFT adapter (config + PEFT-keyed tensors), any method.

    ``base_weight(module) -> [out, in] array`` is needed by methods whose slots depend on it;
    ``contract`` gives full-weight (modules_to_save) slots their layout and shapes the slots
    (a ``[out]`` factor stays ``[out]``). ``variant``: which adapter of a checkpoint that holds
    several (``Method.variants``: Poly's ``"task1"``).
    """
    dtype = numpy_dtype(dtype)
    slots, rest = full_weight_tensors(tensors, contract, dtype)
    adapter = PeftAdapter.from_tensors("adapter", source, config, rest, variant)
    module_map = None
    if contract is not None:
        from .graph.module_map import match_module

        known = {s.module for s in contract.slots}
        module_map = {m: match_module(m, known) or m for m in adapter.modules}
    slots.update(adapter_slots(adapter, dtype, base_weight or _no_base(source), module_map))
    return mirror_tied(slots, contract)


# -- the public entry point ------------------------------------------------------------------
def _model_contract(model_path: str | os.PathLike) -> tuple[Any, Contract]:
    from .graph.io import load_model

    model = load_model(model_path)
    contract = read_contract(model.metadata_props)
    if contract is None or not contract.slots:
        raise IncompatibleAdapterError(
            f"{model_path}: the model has no adapter slots (no onnx-peft contract); run "
            "`onnx-peft insert` or `onnx-peft extract` on it first"
        )
    return model, contract


def base_weight_reader(model: Any) -> Any:
    """``module -> W [out, in]`` read lazily from the model's LinearSite (DoRA, HRA, ...); a norm's
    ``[scale, shift?]`` rows (LN Tuning), an embedding's table."""
    sites: dict[str, Any] | None = None

    def read(module: str) -> np.ndarray:
        nonlocal sites
        if sites is None:
            from .graph.op_sites import find_sites

            sites = find_sites(model)
        site = sites.get(module)
        if site is None or site.weight.const_value is None:
            raise IncompatibleAdapterError(f"model: no layer with a constant weight for module {module}")
        if getattr(site, "kind", "linear") != "linear":
            return site.weight_out_in()
        weight = site.weight.const_value.numpy()
        return weight.T if site.weight_layout == "in_out" else weight

    return read


def _input_files(adapter: Path, model_path: str | os.PathLike | None) -> list[Path]:
    """What convert-adapters reads: the adapter file, or the PEFT files of an adapter dir (and of
    its subfolders: X-LoRA's experts); the model and its usual data files."""
    files = [adapter]
    if adapter.is_dir():
        files += [p for pattern in ("*", "*/*") for p in adapter.glob(pattern)
                  if p.name.startswith(("adapter_config", "adapter_model")) or p.name == "labels.json"]
    if model_path is not None:
        model_path = Path(model_path)
        files += [model_path, model_path.with_name(model_path.name + ".data"),
                  model_path.with_name(model_path.name + ".adapter.data")]
    return files


def _is_slot_file(tensors: Mapping[str, np.ndarray]) -> bool:
    return bool(tensors) and not any(k.startswith(PEFT_PREFIX) for k in tensors)


def convert_adapters(adapter: str | os.PathLike, model_path: str | os.PathLike | None = None, *,
                     output_path: str | os.PathLike, dtype: str | None = None,
                     format: AdapterFileFormat | str | None = None, allow_pickle: bool = False,
                     variant: str | None = None) -> Path:
    """Write ``adapter`` (a PEFT dir, or a slot file from us or Olive) as a slot adapter file.

    With ``model_path`` the tensors are checked against the model's contract (names, shapes,
    dtype: ``IncompatibleAdapterError`` names the first mismatch) and the file records the
    model's fingerprint. ``dtype``: float32 or float16; None takes the model's slot dtype
    (float32 without a model). ``format``: by suffix when None. ``variant``: which adapter of a
    PEFT checkpoint that holds several (``Method.variants``: Poly's ``"task1"``); a slot file
    has none.
    """
    adapter = Path(adapter)
    from .prompt_feeds import convert_prompt_adapter

    refuse_overwriting_inputs([output_path], _input_files(adapter, model_path))
    if convert_prompt_adapter(adapter, model_path, output_path, dtype, format, allow_pickle):
        return Path(output_path)  # a prompt-learning adapter: its tensors are the graph's prompt inputs
    model, contract = _model_contract(model_path) if model_path is not None else (None, None)
    if model is not None:  # every data file the model's weights are read from (DoRA, HRA, ...)
        from .graph.io import external_files

        refuse_overwriting_inputs([output_path], external_files(model))
    fingerprint = contract.fingerprint if contract is not None else ""
    if dtype is None:
        dtype = float_dtype(contract).name
    target_dtype = numpy_dtype(dtype)
    if adapter.is_dir():
        config, peft_tensors = read_peft_adapter(adapter, allow_pickle=allow_pickle)
        reader = base_weight_reader(model) if model is not None else None
        slots = peft_to_slots(config, peft_tensors, target_dtype, reader, contract, source=str(adapter),
                              variant=variant)
        file_fingerprint = fingerprint
    else:
        if variant is not None:
            raise IncompatibleAdapterError(
                f"{adapter}: a slot file is one adapter; variant={variant!r} applies to PEFT adapter directories")
        from .graph.contract import header_check

        check = header_check(contract, str(adapter), converting=True) if contract is not None else None
        slots, file_fingerprint = load_adapter_file(adapter, check=check)
        if not _is_slot_file(slots):
            raise CheckpointError(
                f"{adapter}: holds PEFT-named tensors (base_model.model.*) without their "
                "adapter_config.json; pass the adapter directory instead"
            )
        slots = {k: as_slot_dtype(v, target_dtype) for k, v in slots.items()}
        if contract is not None:
            file_fingerprint = resolve_fingerprint(file_fingerprint, fingerprint)
    if contract is not None:
        shapes = {name: (tuple(array.shape), array.dtype.name) for name, array in slots.items()}
        check_adapter(contract, shapes, file_fingerprint, source=str(adapter))
        file_fingerprint = fingerprint
    return save_adapter_file(output_path, slots, file_fingerprint, format)
