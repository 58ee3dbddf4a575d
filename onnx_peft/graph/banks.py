"""The bank layout of a MultiAdapter model, shared by the pass that writes it and the runtime
that fills it.

A MultiAdapter model (passes/multi_adapter.py) takes, for every slot ``S`` of the adapter-facing
contract, a bank input ``[num_adapters, *S.shape]`` and ``adapter_ids [batch]``; row ``i`` of each
bank holds adapter ``i``'s tensor (row 0: the slot's no-op default). The layout is recorded as JSON in
``metadata_props[MULTI_ADAPTER_KEY]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from ..errors import ModelFileError
from ..methods.forms import default_array

MULTI_ADAPTER_KEY = "onnx_peft.multi_adapter"
"""metadata_props key of a MultiAdapter model: JSON ``{"ids_input", "batch_input", "banks"}``."""


@dataclass(frozen=True)
class BankEntry:
    """One bank input of a MultiAdapter model and the slot it stands for."""

    slot: str       # e.g. "model.layers.0.mlp.up_proj.lora_A.weight"
    bank: str       # e.g. "model.layers.0.mlp.up_proj.lora_A.bank"
    kind: str       # "slot": [N, *slot shape]; full weights "W": [N, in, out], "b": [N, out]
    module: str
    dims: tuple[int, int]  # (in, out) of the site
    dtype: str
    shape: tuple[int | str, ...] = ()  # the slot's shape (symbolic dims zero-padded to the largest)
    default: str = "zeros"             # what rows without this slot hold (methods.forms.default_array)


@dataclass
class MultiLayout:
    """What the MultiAdapter pass records in ``metadata_props[MULTI_ADAPTER_KEY]``."""

    ids_input: str = "adapter_ids"
    batch_input: str = ""
    banks: list[BankEntry] = field(default_factory=list)

    def to_json(self) -> str:
        import json

        return json.dumps({"version": 1, "ids_input": self.ids_input, "batch_input": self.batch_input,
                           "banks": [{**b.__dict__, "dims": list(b.dims)} for b in self.banks]},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> MultiLayout:
        """Parse the layout; anything malformed is a ModelFileError naming ``source`` and the key."""
        from .contract import check_dtype_name, metadata_shape, parse_metadata_json

        data = parse_metadata_json(text, MULTI_ADAPTER_KEY, source)
        where = f"{source}: metadata {MULTI_ADAPTER_KEY!r}"
        entries = data.get("banks", [])
        if not isinstance(entries, list):
            raise ModelFileError(f"{where}: 'banks' must be a list; the model file is corrupt, export it again")
        known = {f.name for f in fields(BankEntry)}  # fields of a newer writer are ignored
        banks = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ModelFileError(f"{where}: banks[{index}] must be an object; the model file is corrupt")
            values = {k: v for k, v in entry.items() if k in known}
            for key in ("slot", "bank", "kind", "module", "dtype", "default"):
                if not isinstance(values.get(key, "zeros" if key == "default" else None), str):
                    raise ModelFileError(f"{where}: banks[{index}].{key} must be a string, got {values.get(key)!r:.60}")
            dims = values.get("dims")
            if not (isinstance(dims, list) and len(dims) == 2 and all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)):
                raise ModelFileError(f"{where}: banks[{index}].dims must be [in, out], got {dims!r:.60}")
            values["dims"] = tuple(dims)
            values["shape"] = metadata_shape(values.get("shape", []), f"{where}: banks[{index}].shape")
            check_dtype_name(values["dtype"], f"{where}: banks[{index}].dtype")
            banks.append(BankEntry(**values))
        ids_input, batch_input = data.get("ids_input", "adapter_ids"), data.get("batch_input", "")
        if not isinstance(ids_input, str) or not isinstance(batch_input, str):
            raise ModelFileError(f"{where}: 'ids_input' and 'batch_input' must be strings")
        return cls(ids_input=ids_input, batch_input=batch_input, banks=banks)


def stack_bank(entry: BankEntry, size: int, tensors: Sequence[tuple[int, np.ndarray]]) -> np.ndarray:
    """The bank ``[size, *shape]`` of a slot entry: ``tensors`` (row, array) at their rows, every other
    row the slot's no-op default; symbolic dims (ranks) take the largest size, zero-padded, which is
    exact for the forms that have them (zero columns of A meet zero rows of B)."""
    dims = tuple(d if isinstance(d, int) else max([t.shape[axis] for _, t in tensors], default=0)
                 for axis, d in enumerate(entry.shape))
    bank = default_array((size, *dims), entry.default, np.dtype(entry.dtype))
    for row, tensor in tensors:
        bank[(row, *(slice(0, d) for d in tensor.shape))] = tensor
    return bank
