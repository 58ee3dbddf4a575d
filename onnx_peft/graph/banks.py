"""The bank layout of a MultiAdapter model, shared by the pass that writes it and the runtime
that fills it.

A MultiAdapter model (passes/multi_adapter.py) takes, for every slot ``S`` of the adapter-facing
contract, a bank input ``[num_adapters, *S.shape]`` and ``adapter_ids [batch]``; row ``i`` of each
bank holds adapter ``i``'s tensor (row 0: the slot's no-op default). The layout is recorded as JSON in
``metadata_props[MULTI_ADAPTER_KEY]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

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
    def from_json(cls, text: str) -> MultiLayout:
        import json

        data = json.loads(text)
        banks = [BankEntry(**{**b, "dims": tuple(b["dims"]), "shape": tuple(b.get("shape", ()))})
                 for b in data.get("banks", [])]
        return cls(ids_input=data.get("ids_input", "adapter_ids"),
                   batch_input=data.get("batch_input", ""), banks=banks)


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
