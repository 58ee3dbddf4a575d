"""Prefix tuning (Li & Liang): trained keys and values prepended to every attention layer.

    per layer l:  K' = concat(K_prefix[l], K)   V' = concat(V_prefix[l], V)   each [heads, p, head_dim]

PEFT saves the whole prefix flat as ``prompt_embeddings [p, layers * 2 * kv_heads * head_dim]``
(with ``prefix_projection`` the MLP has already been applied: the saved tensor is its output).
Positions of the real tokens start at ``p``, as if the prefix had been decoded first. In ONNX the
prefix enters through the ``past_key_values.*`` inputs, so the graph is the plain base.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import register_config
from ..errors import AdapterConfigError
from .base import register_method
from .prompt_learning import PromptLearningConfig, PromptLearningMethod


@register_config
@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """PEFT's PrefixTuningConfig: same field names and defaults."""

    peft_type = "PREFIX_TUNING"

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.prefix_projection, bool):
            raise AdapterConfigError(f"PrefixTuningConfig.prefix_projection must be true or false, "
                                     f"got {self.prefix_projection!r}")
        if self.init_weights not in (None, "zero"):
            raise AdapterConfigError(f"PrefixTuningConfig.init_weights must be null or 'zero', got {self.init_weights!r}")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size < 1):
            raise AdapterConfigError(f"PrefixTuningConfig.encoder_hidden_size must be an integer >= 1, "
                                     f"got {self.encoder_hidden_size!r}")


@register_method
class PrefixTuningMethod(PromptLearningMethod):
    peft_type = "PREFIX_TUNING"
    config_class = PrefixTuningConfig
    tuner_module = "onnx_peft.tuners.prefix_tuning"
    kind = "prefix"
