"""CPT, Context-aware Prompt Tuning (Blau et al., 2024): in-context examples as a trained prompt.

The prompt is the embedding of real tokens (``cpt_token_ids``: a few worked examples, each an
input template, an input, an output template and a label), nudged by a small trained delta whose
per-token norm is capped:

    P = E[cpt_token_ids] + project(D)          E: frozen word embeddings, D: [p, hidden], init 0
    project(D)_i = D_i * eps_i / max(|D_i|, eps_i)
    eps_i = opt_projection_format_epsilon * sqrt(hidden / 2048)   templates (type % 4 in {1, 3})
            opt_projection_epsilon        * sqrt(hidden / 2048)   inputs    (type % 4 == 2)
            1e-10                                                  labels (type % 4 == 0) and type 0

``cpt_tokens_type_mask`` gives each prompt token its type (example ``k`` uses ``4k+1 .. 4k+4``);
only template and input rows of ``D`` train, and the loss covers label tokens of the prompt and
of the input (``input_type_mask``), optionally decayed per example (``opt_weighted_loss_type``).

PEFT saves ``P`` itself as ``prompt_embeddings [p, hidden]``, so at inference CPT is a plain
prompt: :meth:`CPTMethod.virtual_tokens` is that tensor, and the ONNX prompt inputs serve it
like any prompt-tuning adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config import register_config
from ..errors import AdapterConfigError
from .base import register_method
from .prompt_learning import PromptLearningConfig, PromptLearningMethod

LOSS_TYPES = ("none", "decay")


@register_config
@dataclass
class CPTConfig(PromptLearningConfig):
    """PEFT's CPTConfig: same field names and defaults. ``num_virtual_tokens`` is always
    ``len(cpt_token_ids)``, and the masks default to all ones, as PEFT sets them."""

    peft_type = "CPT"

    cpt_token_ids: list[int] | None = None
    cpt_mask: list[int] | None = None
    cpt_tokens_type_mask: list[int] | None = None
    opt_weighted_loss_type: str | None = "none"
    opt_loss_decay_factor: float | None = 1.0
    opt_projection_epsilon: float | None = 0.1
    opt_projection_format_epsilon: float | None = 0.1
    tokenizer_name_or_path: str | None = None

    def validate(self) -> None:
        task = str(getattr(self.task_type, "value", self.task_type))
        if task != "CAUSAL_LM":
            raise AdapterConfigError(f"CPTConfig.task_type must be 'CAUSAL_LM' (CPT trains causal LMs only), "
                                     f"got {self.task_type!r}")
        self.task_type = task
        if self.cpt_token_ids is None:
            self.cpt_token_ids = [0]
        self.cpt_token_ids = _int_list("cpt_token_ids", self.cpt_token_ids)
        if not self.cpt_token_ids:
            raise AdapterConfigError("CPTConfig.cpt_token_ids is empty; give the token ids of the context examples")
        p = len(self.cpt_token_ids)
        for name in ("cpt_mask", "cpt_tokens_type_mask"):
            value = [1] * p if getattr(self, name) is None else _int_list(name, getattr(self, name))
            if len(value) != p:
                raise AdapterConfigError(f"CPTConfig.{name} has {len(value)} entries, cpt_token_ids has {p}; "
                                         "give one entry per prompt token")
            setattr(self, name, value)
        self.num_virtual_tokens = p
        super().validate()
        if self.opt_weighted_loss_type is not None:  # None: no decay, as PEFT reads it
            loss_type = str(getattr(self.opt_weighted_loss_type, "value", self.opt_weighted_loss_type))
            if loss_type not in LOSS_TYPES:
                raise AdapterConfigError(f"CPTConfig.opt_weighted_loss_type must be one of {LOSS_TYPES}, "
                                         f"got {loss_type!r}")
            self.opt_weighted_loss_type = loss_type
        _number("opt_loss_decay_factor", self.opt_loss_decay_factor)
        _number("opt_projection_epsilon", self.opt_projection_epsilon, at_least=0.0)
        _number("opt_projection_format_epsilon", self.opt_projection_format_epsilon, at_least=0.0)

    def prepare(self, model_config: Any) -> None:
        super().prepare(model_config)
        vocab = getattr(model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config,
                        "vocab_size", None)
        if vocab is not None and max(self.cpt_token_ids) >= vocab:
            raise AdapterConfigError(f"CPTConfig.cpt_token_ids holds id {max(self.cpt_token_ids)}, the model's "
                                     f"vocabulary has {vocab} tokens; tokenize the examples with the model's tokenizer")


def _int_list(name: str, value: Any) -> list[int]:
    """A list of non-negative ints (JSON lists, tuples or 1-D tensors' ``tolist()``)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                      for v in value):
        raise AdapterConfigError(f"CPTConfig.{name} must be a list of integers >= 0, got {value!r}")
    return list(value)


def _number(name: str, value: Any, at_least: float | None = None) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or (at_least is not None and value < at_least):
        bound = f" >= {at_least}" if at_least is not None else ""
        raise AdapterConfigError(f"CPTConfig.{name} must be a finite number{bound}, got {value!r}")


@register_method
class CPTMethod(PromptLearningMethod):
    """CPT at inference: the saved ``prompt_embeddings`` (``E[ids] + project(D)``, already
    summed by PEFT at save time) are the virtual tokens ``[p, hidden]``; the inherited
    :meth:`virtual_tokens` returns them after checking the shape."""

    peft_type = "CPT"
    config_class = CPTConfig
    tuner_module = "onnx_peft.tuners.cpt"
    kind = "prompt"
