"""P-tuning (Liu et al.): virtual tokens produced by a trained encoder (MLP or bidirectional
LSTM + MLP) from ``p`` trained embeddings.

    training:   P = encoder(E)        E: [p, hidden]
    inference:  P (the encoder's output, which PEFT saves as ``prompt_embeddings``)

At inference the adapter is therefore exactly a prompt-tuning prompt: same graph input, same
runtime path; only the torch side trains through the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import register_config
from ..errors import AdapterConfigError
from .base import register_method
from .prompt_learning import PromptLearningConfig, PromptLearningMethod

ENCODERS = ("MLP", "LSTM")


@register_config
@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """PEFT's PromptEncoderConfig (peft_type P_TUNING): same field names and defaults."""

    peft_type = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        kind = str(getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type))
        if kind not in ENCODERS:
            raise AdapterConfigError(
                f"PromptEncoderConfig.encoder_reparameterization_type must be one of {ENCODERS}, got {kind!r}")
        self.encoder_reparameterization_type = kind
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size < 1):
            raise AdapterConfigError(f"PromptEncoderConfig.encoder_hidden_size must be an integer >= 1, "
                                     f"got {self.encoder_hidden_size!r}")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers < 1:
            raise AdapterConfigError(f"PromptEncoderConfig.encoder_num_layers must be >= 1, got {self.encoder_num_layers!r}")
        if not isinstance(self.encoder_dropout, (int, float)) or not 0 <= self.encoder_dropout < 1:
            raise AdapterConfigError(f"PromptEncoderConfig.encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")


@register_method
class PromptEncoderMethod(PromptLearningMethod):
    peft_type = "P_TUNING"
    config_class = PromptEncoderConfig
    tuner_module = "onnx_peft.tuners.p_tuning"
    kind = "prompt"
