"""P-tuning's torch side: virtual tokens produced by a trained MLP or LSTM+MLP encoder.

    training:   P = mlp(E)  or  mlp(bilstm(E))        E: [p, token_dim]  (PEFT's layer sizes)
    inference:  P = the saved table (``embedding.weight`` holds the encoder's output)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..methods.prompt_learning import PROMPT_KEY
from .prompt_tuning import load_table


class PromptEncoder(nn.Module):
    def __init__(self, config, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size or config.token_dim
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.num_virtual_tokens, dim)
        if config.inference_mode:
            return  # PEFT builds no encoder for inference: the table is the output
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:  # MLP: always three layers (PEFT ignores encoder_num_layers here)
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if self.encoder_type == "LSTM":
            embeds = self.lstm_head(embeds)[0]
        return self.mlp_head(embeds)

    def prompt(self, batch: int, task_ids: torch.Tensor | None = None, inference: bool = False) -> torch.Tensor:
        """``[batch, p, token_dim]``; the encoder runs once and its output is expanded."""
        if inference or not hasattr(self, "mlp_head"):
            return self.embedding.weight.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.arange(self.embedding.num_embeddings, device=self.embedding.weight.device)[None]
        return self(tokens).expand(batch, -1, -1)

    def to_save(self, inference: bool) -> dict[str, torch.Tensor]:
        return {PROMPT_KEY: self.prompt(1, inference=inference)[0].detach()}

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        load_table(self.embedding, tensors)


def make_encoder(config, word_embeddings: nn.Embedding) -> PromptEncoder:
    return PromptEncoder(config, word_embeddings)
