"""Multitask prompt tuning (Wang et al.): one shared prompt, rescaled per task by a low-rank
factor.

    P_t = E * (C_t @ R_t)      E: [p, hidden]  C_t: [p, ranks]  R_t: [ranks, hidden]

PEFT keys: ``prompt_embeddings`` (E), ``prefix_task_cols`` ([tasks, p, ranks]),
``prefix_task_rows`` ([tasks, ranks, hidden]). At inference each task is a plain prompt, so an
adapter serves ``num_tasks`` prompts: the runtime picks one per row by ``task_ids``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..config import register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from .base import as_float32, register_method
from .prompt_learning import PromptLearningConfig, PromptLearningMethod

INITS = ("RANDOM", "TEXT", "AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")


@register_config
@dataclass
class MultitaskPromptTuningConfig(PromptLearningConfig):
    """PEFT's MultitaskPromptTuningConfig: same field names and defaults."""

    peft_type = "MULTITASK_PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int = 0
    num_ranks: int = 1
    num_tasks: int = 1

    def validate(self) -> None:
        super().validate()
        init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init))
        if init not in INITS:
            raise AdapterConfigError(f"MultitaskPromptTuningConfig.prompt_tuning_init must be one of {INITS}, got {init!r}")
        self.prompt_tuning_init = init
        for name in ("num_ranks", "num_tasks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AdapterConfigError(f"MultitaskPromptTuningConfig.{name} must be an integer >= 1, got {value!r}")
        if init in INITS[2:] and not self.prompt_tuning_init_state_dict_path:
            raise AdapterConfigError(f"MultitaskPromptTuningConfig: prompt_tuning_init={init!r} needs "
                                     "prompt_tuning_init_state_dict_path (a .safetensors file of the source tasks)")


def task_prompt(embeddings, cols, rows, task):
    """``E * (C_t @ R_t)``: the prompt of task ``task`` (numpy or torch; ``task`` an int or a
    ``[batch]`` index array, then the result is ``[batch, p, hidden]``)."""
    return embeddings * (cols[task] @ rows[task])


@register_method
class MultitaskPromptTuningMethod(PromptLearningMethod):
    peft_type = "MULTITASK_PROMPT_TUNING"
    config_class = MultitaskPromptTuningConfig
    tuner_module = "onnx_peft.tuners.multitask_prompt_tuning"
    kind = "prompt"
    extra_keys = ("prefix_task_cols", "prefix_task_rows")

    def tasks(self, config: MultitaskPromptTuningConfig) -> int:
        return config.num_tasks

    def virtual_tokens(self, config: MultitaskPromptTuningConfig, shared: Mapping[str, np.ndarray],
                       task: int | None = None, source: str = "adapter") -> np.ndarray:
        embeddings = super().virtual_tokens(config, shared, source=source)
        cols, rows = as_float32(shared["prefix_task_cols"]), as_float32(shared["prefix_task_rows"])
        p, hidden, tasks, ranks = config.num_virtual_tokens, config.token_dim, config.num_tasks, config.num_ranks
        if cols.shape != (tasks, p, ranks) or rows.shape != (tasks, ranks, hidden):
            raise IncompatibleAdapterError(
                f"{source}: prefix_task_cols {list(cols.shape)} / prefix_task_rows {list(rows.shape)} do not match "
                f"the config ([{tasks}, {p}, {ranks}] / [{tasks}, {ranks}, {hidden}])")
        if task is None:
            raise AdapterConfigError(f"{source}: a multitask prompt needs a task id (0..{tasks - 1}): pass task_ids")
        if not 0 <= int(task) < tasks:
            raise AdapterConfigError(f"{source}: task id {task} is out of range; the adapter has {tasks} tasks")
        return task_prompt(embeddings, cols, rows, int(task)).astype(np.float32)
