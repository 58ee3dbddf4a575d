"""Trainable Tokens: train a few rows of an embedding table, torch-free.

PEFT's TrainableTokens (and LoRA's ``trainable_token_indices``) keeps, per adapter, new values
for the rows ``token_indices`` of an embedding ``E [vocab, hidden]`` and writes them over the
base rows (it replaces rows, it does not add to them)::

    E' = E;  E'[token_indices[j]] = trainable_tokens_delta[j]      delta: [k, hidden]
    embedding:           y = E'[ids]                                ids: [...] -> [..., hidden]
    tied output head:    logits = x E'^T (+ bias)                   x: [..., hidden] -> [..., vocab]

PEFT stores ``<module>.trainable_tokens_delta`` ``[k, hidden]`` (LoRA:
``<module>.token_adapter.trainable_tokens_delta``); the indices live in the config. A model whose
output head shares the embedding's weight (``tie_word_embeddings``) gets the same rows there.

Unmerged in ONNX, the ``tokens`` form (methods/forms.py) corrects the looked-up rows with a
one-hot of ``Equal(ids, indices)``: slots ``indices [k]`` (int64) and ``rows [k, hidden]``,
zero-length by default, never a vocab-sized tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from .base import Method, as_float32, register_method

DELTA = "trainable_tokens_delta"
LORA_DELTA = "token_adapter.trainable_tokens_delta"
INDICES, ROWS = "trainable_tokens.indices", "trainable_tokens.rows"


def check_indices(indices: Any, field_name: str) -> list[int]:
    """``indices`` as a list of distinct non-negative ints, else AdapterConfigError naming the field."""
    if not isinstance(indices, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                           for i in indices):
        raise AdapterConfigError(f"{field_name} must be a list of token ids (ints), got {indices!r}")
    if any(i < 0 for i in indices):
        raise AdapterConfigError(f"{field_name} holds a negative token id: {sorted(indices)[0]}")
    if len(set(indices)) != len(indices):
        raise AdapterConfigError(f"{field_name} lists a token id twice; each row can be trained once")
    return list(indices)


@register_config
@dataclass
class TrainableTokensConfig(AdapterConfig):
    """PEFT's TrainableTokensConfig: same field names, same defaults.

    PEFT fills a missing ``target_modules`` with the input embedding's path; pass it (Llama:
    ``["embed_tokens"]``, GPT-2: ``["wte"]``).
    """

    peft_type = "TRAINABLE_TOKENS"

    token_indices: list[int] = field(default_factory=list)
    target_modules: list[str] | str | None = None
    init_weights: bool = True

    def validate(self) -> None:
        self.token_indices = check_indices(self.token_indices, "TrainableTokensConfig.token_indices")
        if not isinstance(self.init_weights, bool):
            raise AdapterConfigError(f"TrainableTokensConfig.init_weights must be True or False, got {self.init_weights!r}")
        if self.target_modules is not None and not isinstance(self.target_modules, (list, str)):
            raise AdapterConfigError(
                f"TrainableTokensConfig.target_modules must be a list of names or a regex string, got {self.target_modules!r}")

    def indices_for(self, module_path: str) -> list[int]:
        return list(self.token_indices)


def replace_rows(table: Any, indices: Sequence[int], rows: Any) -> Any:
    """``table`` ``[vocab, hidden]`` with rows ``indices`` replaced by ``rows [k, hidden]`` (a copy);
    numpy arrays or torch tensors alike."""
    if isinstance(table, np.ndarray):
        out = np.array(table, copy=True)
        out[np.asarray(indices, dtype=np.int64)] = np.asarray(rows, dtype=out.dtype)
        return out
    import torch

    index = torch.as_tensor(list(indices), dtype=torch.long, device=table.device)
    return table.index_copy(0, index, rows.to(table.dtype))


def token_slots(module: str, indices: Sequence[int], rows: Any, vocab: int | None = None) -> dict[str, np.ndarray]:
    """The ``tokens`` form's slot tensors: ``indices [k]`` int64 and ``rows [k, hidden]``."""
    rows = as_float32(rows)
    if rows.ndim != 2 or rows.shape[0] != len(indices):
        raise IncompatibleAdapterError(
            f"module {module} has {rows.shape[0] if rows.ndim else 0} trained token rows but the config lists "
            f"{len(indices)} token ids; the adapter_config.json does not belong to these weights")
    if vocab is not None and indices and max(indices) >= vocab:
        raise IncompatibleAdapterError(
            f"module {module}: token id {max(indices)} is outside the model's vocabulary ({vocab} rows)")
    return {INDICES: np.asarray(indices, dtype=np.int64), ROWS: rows}


@register_method
class TrainableTokensMethod(Method):
    """Trainable Tokens on an embedding (and its tied output head): a ``tokens`` slot pair."""

    peft_type = "TRAINABLE_TOKENS"
    config_class = TrainableTokensConfig
    tuner_module = "onnx_peft.tuners.trainable_tokens"
    tensor_names = (DELTA,)
    required_tensors = (DELTA,)
    layer_attrs = (DELTA,)

    def merged_weight(self, config, module, weight, bias, parts, shared):
        """``weight`` is the table ``[vocab, hidden]`` (an embedding's, or a tied head's ``[out, in]``)."""
        return replace_rows(weight, config.indices_for(module), parts[DELTA]), bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        return {"tokens": token_slots(module, config.indices_for(module), parts[DELTA])}
