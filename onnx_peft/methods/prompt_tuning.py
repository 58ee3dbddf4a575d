"""Prompt tuning (Lester et al.): ``p`` trained virtual-token embeddings prepended to the input.

    inputs_embeds' = concat(P, embed(input_ids))     P: [p, hidden], PEFT key ``prompt_embeddings``

``prompt_tuning_init``: RANDOM, SAMPLE_VOCAB (rows of the word embeddings) or TEXT (the
embeddings of ``prompt_tuning_init_text`` tokenized with ``tokenizer_name_or_path``, repeated
or cut to ``p``), as PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import register_config
from ..errors import AdapterConfigError
from .base import register_method
from .prompt_learning import PromptLearningConfig, PromptLearningMethod

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@register_config
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """PEFT's PromptTuningConfig: same field names and defaults."""

    peft_type = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def validate(self) -> None:
        super().validate()
        init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init))
        if init not in INITS:
            raise AdapterConfigError(f"PromptTuningConfig.prompt_tuning_init must be one of {INITS}, got {init!r}")
        self.prompt_tuning_init = init
        if init == "TEXT" and not self.tokenizer_name_or_path:
            raise AdapterConfigError("PromptTuningConfig: prompt_tuning_init='TEXT' needs tokenizer_name_or_path "
                                     "(a local tokenizer folder)")
        if init == "TEXT" and self.prompt_tuning_init_text is None:
            raise AdapterConfigError("PromptTuningConfig: prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        if self.tokenizer_kwargs and init != "TEXT":
            raise AdapterConfigError("PromptTuningConfig.tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")


@register_method
class PromptTuningMethod(PromptLearningMethod):
    peft_type = "PROMPT_TUNING"
    config_class = PromptTuningConfig
    tuner_module = "onnx_peft.tuners.prompt_tuning"
    kind = "prompt"
