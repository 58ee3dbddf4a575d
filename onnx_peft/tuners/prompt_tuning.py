"""Prompt tuning's torch side: the trained virtual-token table.

Every prompt-learning tuner module exposes ``make_encoder(config, word_embeddings)``: an
``nn.Module`` with ``embedding`` (an ``nn.Embedding`` of ``p`` rows, PEFT's attribute name, so
state-dict keys match) and

    prompt(batch, task_ids, inference) -> [batch, p, width]   the constant the model receives
    to_save(inference)                 -> {PEFT key: tensor}  what ``save_pretrained`` writes
    load(tensors)                                             the inverse of to_save
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import AdapterConfigError, CheckpointError
from ..methods.prompt_learning import PROMPT_KEY


class PromptEmbedding(nn.Module):
    """``p`` virtual tokens of ``token_dim``; initialised RANDOM, SAMPLE_VOCAB or TEXT as PEFT."""

    def __init__(self, config, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
        init = getattr(config, "prompt_tuning_init", "RANDOM")
        if config.inference_mode or init == "RANDOM":
            return
        if init == "SAMPLE_VOCAB":
            ids = torch.randint(0, word_embeddings.num_embeddings, (config.num_virtual_tokens,))
        elif init == "TEXT":
            ids = torch.tensor(text_token_ids(config), dtype=torch.long)
        else:
            return  # multitask inits load their tables afterwards
        with torch.no_grad():
            rows = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone().float()
        self.embedding.weight = nn.Parameter(rows)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)

    def prompt(self, batch: int, task_ids: torch.Tensor | None = None, inference: bool = False) -> torch.Tensor:
        """``[batch, p, token_dim]``: the table itself (no encoder to run)."""
        return self.embedding.weight.unsqueeze(0).expand(batch, -1, -1)

    def to_save(self, inference: bool) -> dict[str, torch.Tensor]:
        return {PROMPT_KEY: self.prompt(1, inference=inference)[0].detach()}

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        load_table(self.embedding, tensors)


def load_table(embedding: nn.Embedding, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy the checkpoint's ``prompt_embeddings`` into ``embedding`` (shapes must agree)."""
    value = tensors[PROMPT_KEY]
    if tuple(value.shape) != tuple(embedding.weight.shape):
        raise CheckpointError(f"prompt_embeddings has shape {list(value.shape)}, this model's adapter expects "
                              f"{list(embedding.weight.shape)}; was it trained for another model or num_virtual_tokens?")
    with torch.no_grad():
        embedding.weight.copy_(value.to(embedding.weight.dtype))


def text_token_ids(config) -> list[int]:
    """``prompt_tuning_init_text`` tokenized, repeated or cut to ``num_virtual_tokens`` (PEFT's rule).
    The tokenizer must be local (no hub access); ``trust_remote_code`` is never honoured."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is part of the torch extra
        raise AdapterConfigError("prompt_tuning_init='TEXT' needs transformers") from exc
    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise AdapterConfigError(f"tokenizer_name_or_path={config.tokenizer_name_or_path!r}: cannot load a tokenizer "
                                 f"there ({exc}); give a local tokenizer folder") from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise AdapterConfigError("prompt_tuning_init_text tokenizes to nothing; give a non-empty text")
    total = config.num_virtual_tokens
    return (ids * math.ceil(total / len(ids)))[:total]


def make_encoder(config, word_embeddings: nn.Embedding) -> PromptEmbedding:
    return PromptEmbedding(config, word_embeddings)
