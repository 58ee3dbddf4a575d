"""LN Tuning: train copies of the model's LayerNorm / RMSNorm layers, torch-free.

PEFT's LN Tuning (https://huggingface.co/papers/2312.11420) keeps a trained copy of each targeted
normalization layer per adapter and runs the copy instead of the base layer. Its parameters
*replace* the base ones, there is no delta::

    LayerNorm:  y = (x - mean) / sqrt(var + eps) * w' + b'     w', b': [hidden]
    RMSNorm:    y = x / sqrt(mean(x^2) + eps) * w'             w': [hidden]

PEFT stores ``<module>.ln_tuning_layers.weight`` (and ``.bias``) ``[hidden]``. Merged, the
trained vectors become the layer's own. Unmerged in ONNX, the ``norm`` branch form adds the
difference to the base parameters, ``w = w_base + (w' - w_base)``, so an unfed slot (zeros) is
exactly the base model and per-row banks pad with zeros (methods/forms.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from .base import Method, as_float32, register_method

WEIGHT, BIAS = "ln_tuning_layers.weight", "ln_tuning_layers.bias"
DELTA_WEIGHT, DELTA_BIAS = "ln_delta.weight", "ln_delta.bias"


@register_config
@dataclass
class LNTuningConfig(AdapterConfig):
    """PEFT's LNTuningConfig: same field names, same defaults.

    PEFT fills a missing ``target_modules`` from a per-architecture table; we have none, so name
    the norms (Llama: ``["input_layernorm", "post_attention_layernorm", "norm"]``, GPT-2:
    ``["ln_1", "ln_2", "ln_f"]``).
    """

    peft_type = "LN_TUNING"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, str)):
                raise AdapterConfigError(f"LNTuningConfig.{name} must be a list of names or a regex string, got {value!r}")


def ln_merged(weight: Any, bias: Any, parts: dict[str, Any]) -> tuple[Any, Any]:
    """``(w', b')``: the trained vectors replace the base ones (a bias the adapter does not train
    stays); numpy arrays or torch tensors alike."""
    return parts[WEIGHT], parts.get(BIAS, bias)


@register_method
class LNTuningMethod(Method):
    """LN Tuning on LayerNorm / RMSNorm: a ``norm`` slot pair (scale and bias differences)."""

    peft_type = "LN_TUNING"
    config_class = LNTuningConfig
    tuner_module = "onnx_peft.tuners.ln_tuning"
    tensor_names = (WEIGHT, BIAS)
    required_tensors = (WEIGHT,)
    layer_attrs = ("ln_tuning_layers",)

    def features(self, config, module, parts):
        hidden = int(np.prod(parts[WEIGHT].shape))
        return hidden, hidden

    def merged_weight(self, config, module, weight, bias, parts, shared):
        """``weight``/``bias`` are the norm's scale and shift ``[hidden]`` (not a Linear's)."""
        return ln_merged(weight, bias, dict(parts))

    def slot_tensors(self, config, module, parts, shared, base_weight):
        """``base_weight()`` is the norm's affine as rows ``[scale, shift?]`` (``[1 or 2, hidden]``)."""
        base = as_float32(base_weight())
        weight = as_float32(parts[WEIGHT]).reshape(-1)
        if base.ndim != 2 or base.shape[1] != weight.size:
            raise IncompatibleAdapterError(
                f"module {module} has ln_tuning_layers.weight of size {weight.size} but the model's norm has "
                f"{base.shape[-1]} features; the adapter was trained on another base model")
        out = {DELTA_WEIGHT: weight - base[0]}
        if BIAS in parts or base.shape[0] > 1:
            bias = as_float32(parts[BIAS]).reshape(-1) if BIAS in parts else base[1]
            out[DELTA_BIAS] = bias - (base[1] if base.shape[0] > 1 else 0.0)
        return {"norm": out}
