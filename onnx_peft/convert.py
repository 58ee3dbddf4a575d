"""convert-adapters: a PEFT adapter dir -> an adapter file that fits a model's slots.

PEFT stores, per target module (``W: [out, in]``, ``x: [..., in]``)::

    lora_A.weight  A  [r, in]        lora_B.weight  B  [out, r]       y = x W^T + s (x A^T) B^T

A slot model computes ``Add(x W^T, MatMul(MatMul(x, A_slot), B_slot))``, so we write::

    <module>.lora_A.weight   A^T        [in, r]
    <module>.lora_B.weight   (s B)^T    [r, out]      s from methods.lora (rank/alpha patterns, rsLoRA)

A module trained in full (PEFT ``modules_to_save``, e.g. ``base_model.model.classifier.weight``
``[out, in]`` and ``.bias`` ``[out]``) fills the model's full-weight slots ``<module>.weight`` /
``<module>.bias``, the weight transposed when the slot's layout is ``in_out``; an adapter without
that module leaves the slots at their defaults (the base head).

GPT-2's Conv1D (``fan_in_fan_out``) changes only the base weight's orientation, not A or B,
so the slot tensors are the same. DoRA adds one ``[out]`` slot holding the per-channel factor
``m / ||W + s B A||_row``, which needs the base weight: read from the model, one at a time.

A file already written by ``olive convert-adapters`` (same names, already transposed and
scaled) is passed through, checked against the model's contract when a model is given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

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
    Slot,
    check_adapter,
    read_contract,
    slot_name,
    strip_peft_prefix,
)
from .methods.lora import LoraConfig, dora_factor, lora_delta_weight

A_SUFFIX = "lora_A.weight"
B_SUFFIX = "lora_B.weight"
MAGNITUDE_SUFFIX = "lora_magnitude_vector"

_DTYPES = {"float32": np.float32, "fp32": np.float32, "float16": np.float16, "fp16": np.float16}


def numpy_dtype(dtype: str | np.dtype | type) -> np.dtype:
    """``"fp16"``/``"float16"``/``np.float16`` -> ``np.dtype('float16')``; fp32 likewise."""
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"dtype must be float32/fp32 or float16/fp16, got {dtype!r}")
        return np.dtype(_DTYPES[dtype.lower()])
    return np.dtype(dtype)


def group_peft_tensors(tensors: Mapping[str, np.ndarray], source: str = "adapter"
                       ) -> dict[str, dict[str, np.ndarray]]:
    """``{module path: {"lora_A.weight": A, "lora_B.weight": B, ["lora_magnitude_vector": m]}}``.

    Module paths lose PEFT's ``base_model.model.`` prefix, so they read like graph module paths.
    Tensors of other kinds (embeddings, conv, biases) are refused, naming the key.
    """
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix in (A_SUFFIX, B_SUFFIX, MAGNITUDE_SUFFIX, MAGNITUDE_SUFFIX + ".weight"):
            if name.endswith("." + suffix):
                kind = MAGNITUDE_SUFFIX if suffix.startswith(MAGNITUDE_SUFFIX) else suffix
                modules.setdefault(name[: -len(suffix) - 1], {})[kind] = value
                break
        else:
            raise IncompatibleAdapterError(
                f"{source}: tensor {key!r} is not a LoRA A/B matrix of a linear layer; onnx-peft "
                "converts LoRA/DoRA on Linear and Conv1D modules only (merge the others with PEFT), "
                "and a Linear trained in full (modules_to_save) only against a model with a slot for "
                "it (export(..., adapters=..., mode='inputs'), then pass that model)"
            )
    for module, parts in modules.items():
        for needed in (A_SUFFIX, B_SUFFIX):
            if needed not in parts:
                raise CheckpointError(f"{source}: module {module} has no {needed}; the checkpoint is incomplete")
        if parts[A_SUFFIX].ndim != 2 or parts[B_SUFFIX].ndim != 2:
            raise IncompatibleAdapterError(
                f"{source}: module {module} has LoRA A of shape {list(parts[A_SUFFIX].shape)}; only "
                "linear layers (2-D A and B) can be inserted or converted"
            )
    return modules


def lora_slot_tensors(module: str, parts: Mapping[str, np.ndarray], config: LoraConfig,
                      dtype: Any = np.float32, source: str = "adapter") -> dict[str, np.ndarray]:
    """Slot tensors of one module: A^T ``[in, r]`` and (s B)^T ``[r, out]`` in ``dtype``."""
    lora_a = np.asarray(parts[A_SUFFIX], dtype=np.float32)
    lora_b = np.asarray(parts[B_SUFFIX], dtype=np.float32)
    rank = config.rank_for(module)
    if lora_a.shape[0] != rank or lora_b.shape[1] != rank:
        raise IncompatibleAdapterError(
            f"{source}: module {module} has A {list(lora_a.shape)} and B {list(lora_b.shape)} but the "
            f"config says r={rank}; the adapter_config.json does not belong to these weights"
        )
    scale = config.scaling_for(module)
    dtype = numpy_dtype(dtype)
    return {
        slot_name(module, A_SUFFIX): np.ascontiguousarray(lora_a.T).astype(dtype),
        slot_name(module, B_SUFFIX): np.ascontiguousarray((lora_b * scale).T).astype(dtype),
    }


def dora_factor_for(module: str, parts: Mapping[str, np.ndarray], config: LoraConfig,
                    base_weight_out_in: np.ndarray) -> np.ndarray:
    """DoRA's ``m / ||W + s B A||_row`` (``[out]``, float32) for base ``W`` given as ``[out, in]``."""
    lora_a = np.asarray(parts[A_SUFFIX], dtype=np.float32)
    lora_b = np.asarray(parts[B_SUFFIX], dtype=np.float32)
    delta = lora_delta_weight(lora_a, lora_b, config.scaling_for(module))
    weight = np.asarray(base_weight_out_in, dtype=np.float32)
    return dora_factor(weight, delta, np.asarray(parts[MAGNITUDE_SUFFIX], dtype=np.float32).reshape(-1))


def _extra_dora_slot(contract: Contract, module: str) -> Slot | None:
    """The contract's DoRA factor slot of ``module`` (the one that is neither A nor B), if any."""
    for slot in contract.slots:
        if slot.module == module and slot.method == "dora" and not slot.name.endswith(
                (A_SUFFIX, B_SUFFIX)):
            return slot
    return None


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


def peft_to_slots(config: Any, tensors: Mapping[str, np.ndarray], dtype: Any = np.float32,
                  base_weight: Any = None, contract: Contract | None = None,
                  source: str = "adapter") -> dict[str, np.ndarray]:
    """All slot tensors of a PEFT adapter (config + PEFT-keyed tensors).

    ``base_weight(module) -> [out, in] array`` is needed for DoRA only; ``contract`` gives the
    DoRA factor slot its name (the model defines it) and its full-weight (modules_to_save)
    slots their layout.
    """
    if not isinstance(config, LoraConfig):
        raise IncompatibleAdapterError(
            f"{source}: peft_type {config.peft_type} cannot be converted to slots; only LoRA/DoRA can"
        )
    slots, tensors = full_weight_tensors(tensors, contract, dtype)
    for module, parts in sorted(group_peft_tensors(tensors, source).items()):
        slots.update(lora_slot_tensors(module, parts, config, dtype, source))
        if config.use_dora or MAGNITUDE_SUFFIX in parts:
            if MAGNITUDE_SUFFIX not in parts:
                raise CheckpointError(f"{source}: DoRA module {module} has no {MAGNITUDE_SUFFIX}")
            slot = _extra_dora_slot(contract, module) if contract is not None else None
            if slot is None or base_weight is None:
                raise IncompatibleAdapterError(
                    f"{source}: module {module} is DoRA, whose swappable form needs a model with a "
                    "DoRA slot for it (export/extract the model with DoRA, then pass --model)"
                )
            factor = dora_factor_for(module, parts, config, base_weight(module))
            slots[slot.name] = factor.astype(numpy_dtype(dtype)).reshape(
                [d if isinstance(d, int) else -1 for d in slot.shape])
    return slots


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
    """``module -> W [out, in]`` read lazily from the model's LinearSite (DoRA only)."""
    sites: dict[str, Any] | None = None

    def read(module: str) -> np.ndarray:
        nonlocal sites
        if sites is None:
            from .graph.modules import find_linear_sites

            sites = find_linear_sites(model)
        site = sites.get(module)
        if site is None or site.weight.const_value is None:
            raise IncompatibleAdapterError(f"model: no linear layer with a constant weight for module {module}")
        weight = site.weight.const_value.numpy()
        return weight.T if site.weight_layout == "in_out" else weight

    return read


def _is_slot_file(tensors: Mapping[str, np.ndarray]) -> bool:
    return bool(tensors) and not any(k.startswith(PEFT_PREFIX) for k in tensors)


def convert_adapters(adapter: str | os.PathLike, model_path: str | os.PathLike | None = None, *,
                     output_path: str | os.PathLike, dtype: str | None = None,
                     format: AdapterFileFormat | str | None = None, allow_pickle: bool = False) -> Path:
    """Write ``adapter`` (a PEFT dir, or a slot file from us or Olive) as a slot adapter file.

    With ``model_path`` the tensors are checked against the model's contract (names, shapes,
    dtype: ``IncompatibleAdapterError`` names the first mismatch) and the file records the
    model's fingerprint. ``dtype``: float32 or float16; None takes the model's slot dtype
    (float32 without a model). ``format``: by suffix when None.
    """
    adapter = Path(adapter)
    model, contract = _model_contract(model_path) if model_path is not None else (None, None)
    fingerprint = contract.fingerprint if contract is not None else ""
    if dtype is None:
        dtype = contract.slots[0].dtype if contract is not None else "float32"
    target_dtype = numpy_dtype(dtype)
    if adapter.is_dir():
        config, peft_tensors = read_peft_adapter(adapter, allow_pickle=allow_pickle)
        reader = base_weight_reader(model) if model is not None else None
        slots = peft_to_slots(config, peft_tensors, target_dtype, reader, contract, source=str(adapter))
        file_fingerprint = fingerprint
    else:
        slots, file_fingerprint = load_adapter_file(adapter)
        if not _is_slot_file(slots):
            raise CheckpointError(
                f"{adapter}: holds PEFT-named tensors (base_model.model.*) without their "
                "adapter_config.json; pass the adapter directory instead"
            )
        slots = {k: np.asarray(v).astype(target_dtype) for k, v in slots.items()}
        if contract is not None:
            file_fingerprint = resolve_fingerprint(file_fingerprint, fingerprint)
    if contract is not None:
        shapes = {name: (tuple(array.shape), array.dtype.name) for name, array in slots.items()}
        check_adapter(contract, shapes, file_fingerprint, source=str(adapter))
        file_fingerprint = fingerprint
    return save_adapter_file(output_path, slots, file_fingerprint, format)
