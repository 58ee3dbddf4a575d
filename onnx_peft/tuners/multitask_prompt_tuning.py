"""Multitask prompt tuning's torch side: a shared prompt times a per-task low-rank factor
(``methods.multitask_prompt_tuning.task_prompt`` holds the math)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import AdapterConfigError, CheckpointError
from ..methods.multitask_prompt_tuning import task_prompt
from ..methods.prompt_learning import PROMPT_KEY
from .prompt_tuning import PromptEmbedding, load_table


class MultitaskPromptEmbedding(PromptEmbedding):
    def __init__(self, config, word_embeddings: nn.Embedding) -> None:
        super().__init__(config, word_embeddings)
        p, tasks, ranks = config.num_virtual_tokens, config.num_tasks, config.num_ranks
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, 0.02, size=(tasks, p, ranks)))
        self.prefix_task_rows = nn.Parameter(torch.normal(0.0, 0.02, size=(tasks, ranks, config.token_dim)))
        init = config.prompt_tuning_init
        if init in ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"):
            self._init_from_source(config)

    def _init_from_source(self, config) -> None:
        from ..checkpoint import read_safetensors

        source, _ = read_safetensors(config.prompt_tuning_init_state_dict_path)
        tensors = {k: torch.from_numpy(v.copy()) for k, v in source.items()}
        load_table(self.embedding, tensors)
        if config.prompt_tuning_init == "ONLY_SOURCE_SHARED":
            return
        cols, rows = tensors["prefix_task_cols"], tensors["prefix_task_rows"]
        if config.prompt_tuning_init == "AVERAGE_SOURCE_TASKS":
            cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
        else:
            cols, rows = cols[config.prompt_tuning_init_task][None], rows[config.prompt_tuning_init_task][None]
        if cols.shape[0] != self.prefix_task_cols.shape[0]:
            raise AdapterConfigError(f"prompt_tuning_init={config.prompt_tuning_init!r} gives one task; set num_tasks=1")
        with torch.no_grad():
            self.prefix_task_cols.copy_(cols)
            self.prefix_task_rows.copy_(rows)

    def prompt(self, batch: int, task_ids: torch.Tensor | None = None, inference: bool = False) -> torch.Tensor:
        """``[batch, p, token_dim]``: row ``i`` gets task ``task_ids[i]``'s prompt."""
        if task_ids is None:
            raise AdapterConfigError("multitask prompt tuning needs task_ids (one task id per row)")
        task_ids = torch.as_tensor(task_ids, device=self.embedding.weight.device).reshape(-1)
        if task_ids.numel() != batch:
            raise AdapterConfigError(f"task_ids has {task_ids.numel()} entries for a batch of {batch}")
        return task_prompt(self.embedding.weight.unsqueeze(0), self.prefix_task_cols, self.prefix_task_rows, task_ids)

    def to_save(self, inference: bool) -> dict[str, torch.Tensor]:
        return {PROMPT_KEY: self.embedding.weight.detach(), "prefix_task_cols": self.prefix_task_cols.detach(),
                "prefix_task_rows": self.prefix_task_rows.detach()}

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        load_table(self.embedding, tensors)
        for name in ("prefix_task_cols", "prefix_task_rows"):
            param = getattr(self, name)
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise CheckpointError(f"{name} has shape {list(tensors[name].shape)}, expected {list(param.shape)}")
            with torch.no_grad():
                param.copy_(tensors[name].to(param.dtype))


def make_encoder(config, word_embeddings: nn.Embedding) -> MultitaskPromptEmbedding:
    return MultitaskPromptEmbedding(config, word_embeddings)
