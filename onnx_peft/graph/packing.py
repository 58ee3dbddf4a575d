"""Packed slot inputs: the slots of one dtype as ONE flat input, cut apart in the graph.

    packed_adapters.float32        [packed_adapters.float32.size]  slots raveled, contract order
    packed_adapters.float32.sizes  [n_slots] int64                 element count of each slot

The sizes carry each module's rank (size 0 = rank 0 = not adapted); the defaults pack the zero-rank
slots, so no feed = the base. Torch-free and pass-free: the runtime packs and unpacks adapter files
with these, ExtractAdapters builds the graph side (passes/extract_adapters.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import IncompatibleAdapterError
from .contract import Contract, Slot, check_adapter

PACKED_PREFIX = "packed_adapters"
PACKING_KEY = "onnx_peft.packing"


def slot_default(slot: Slot) -> np.ndarray:
    """What a slot holds when nothing is fed: symbolic dims at 0 (rank 0: A ``[in, 0]``), ones
    (DoRA's factor, IA3) or identity blocks (rotations)."""
    from ..methods.forms import default_array

    shape = tuple(d if isinstance(d, int) else 0 for d in slot.shape)
    return default_array(shape, slot.default_kind, np.dtype(slot.dtype))


def packed_input_names(dtype: Any) -> tuple[str, str]:
    """``("packed_adapters.float32", "packed_adapters.float32.sizes")`` for one dtype."""
    data = f"{PACKED_PREFIX}.{np.dtype(dtype).name}"
    return data, f"{data}.sizes"


def packing_groups(contract: Contract) -> dict[str, list[Slot]]:
    """dtype name -> its slots in contract order: the order they are packed in."""
    groups: dict[str, list[Slot]] = {}
    for slot in contract.slots:
        groups.setdefault(np.dtype(slot.dtype).name, []).append(slot)
    return groups


def pack_adapter_tensors(contract: Contract, tensors: Mapping[str, np.ndarray], source: str = "adapter"
                         ) -> dict[str, np.ndarray]:
    """Slot tensors -> the feeds of a packed model: ``{packed_adapters.<dtype>: [total],
    packed_adapters.<dtype>.sizes: int64 [n_slots]}``.

    ``tensors`` may cover only some modules; the others get :func:`slot_default` (rank 0).
    Raises IncompatibleAdapterError when ``tensors`` do not fit the contract.
    """
    check_adapter(contract, {n: (np.shape(a), np.asarray(a).dtype.name) for n, a in tensors.items()},
                  source=source)
    feeds: dict[str, np.ndarray] = {}
    for dtype, slots in packing_groups(contract).items():
        parts = [np.asarray(tensors[s.name]) if s.name in tensors else slot_default(s) for s in slots]
        data, sizes = packed_input_names(dtype)
        feeds[data] = np.concatenate([p.reshape(-1) for p in parts]).astype(dtype, copy=False)
        feeds[sizes] = np.array([p.size for p in parts], np.int64)
    return feeds


def unpack_adapter_tensors(contract: Contract, packed: Mapping[str, np.ndarray], source: str = "adapter"
                           ) -> dict[str, np.ndarray]:
    """The inverse of :func:`pack_adapter_tensors`; modules left at rank 0 are dropped."""
    tensors: dict[str, np.ndarray] = {}
    for dtype, slots in packing_groups(contract).items():
        data_name, sizes_name = packed_input_names(dtype)
        if data_name not in packed or sizes_name not in packed:
            raise IncompatibleAdapterError(f"{source}: no {data_name!r}/{sizes_name!r}; is it a packed adapter?")
        data, sizes = np.asarray(packed[data_name]).reshape(-1), np.asarray(packed[sizes_name]).reshape(-1)
        if len(sizes) != len(slots) or int(sizes.sum()) != data.size or (sizes < 0).any():
            raise IncompatibleAdapterError(
                f"{source}: {sizes_name} lists {len(sizes)} sizes summing to {int(sizes.sum())}; the model "
                f"packs {len(slots)} slots into {data_name} of {data.size} elements"
            )
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        for slot, start, size in zip(slots, starts.tolist(), sizes.tolist()):
            fixed = int(np.prod([d for d in slot.shape if isinstance(d, int)]))
            if (fixed == 0 and size) or (fixed and size % fixed):
                raise IncompatibleAdapterError(f"{source}: slot {slot.name!r} gets {size} elements, "
                                               f"which do not fill shape {list(slot.shape)}")
            shape = [d if isinstance(d, int) else (size // fixed if fixed else 0) for d in slot.shape]
            tensors[slot.name] = data[start:start + size].reshape(shape)
    empty = {s.module for s in contract.slots if s.name in tensors and tensors[s.name].size == 0}
    return {name: array for name, array in tensors.items() if contract.slot_map()[name].module not in empty}


def read_packing(metadata_props: Mapping[str, str]) -> dict[str, dict[str, Any]] | None:
    """The packed inputs of a model (``{dtype: {"data", "sizes", "slots"}}``), or None."""
    text = metadata_props.get(PACKING_KEY)
    return json.loads(text) if text else None
