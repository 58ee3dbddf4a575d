"""Prefix tuning's torch side: the trained KV prefix, optionally through a two-layer MLP.

    training, prefix_projection:  prefix = W2 tanh(W1 E + b1) + b2     E: [p, token_dim]
    otherwise / inference:        prefix = the table [p, layers * 2 * token_dim]
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from ..methods.prompt_learning import PROMPT_KEY
from .prompt_tuning import load_table


class PrefixEncoder(nn.Module):
    def __init__(self, config, word_embeddings: nn.Embedding | None = None) -> None:
        super().__init__()
        width = config.num_layers * 2 * config.token_dim
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            hidden = config.encoder_hidden_size or config.token_dim
            self.transform = nn.Sequential(nn.Linear(config.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            last = self.embedding
        if config.init_weights == "zero":
            for param in last.parameters():
                nn.init.zeros_(param)

    def prompt(self, batch: int, task_ids: torch.Tensor | None = None, inference: bool = False) -> torch.Tensor:
        """``[batch, p, layers * 2 * token_dim]``."""
        if self.prefix_projection and not inference:
            return self.transform(self.embedding.weight).unsqueeze(0).expand(batch, -1, -1)
        return self.embedding.weight.unsqueeze(0).expand(batch, -1, -1)

    def to_save(self, inference: bool) -> dict[str, torch.Tensor]:
        return {PROMPT_KEY: self.prompt(1, inference=inference)[0].detach()}

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.prefix_projection:  # as PEFT: the MLP cannot be recovered from its output
            raise CheckpointError("a prefix-tuning checkpoint holds the projected prefix only; load it for inference "
                                  "(is_trainable=False) or train a new adapter with prefix_projection")
        load_table(self.embedding, tensors)


def make_encoder(config, word_embeddings: nn.Embedding | None = None) -> PrefixEncoder:
    return PrefixEncoder(config, word_embeddings)
