"""Llama-Adapter (PEFT ``ADAPTION_PROMPT``): the config and the checkpoint layout, torch-free.

Llama-Adapter (https://arxiv.org/abs/2303.16199) wraps the attention of the top
``adapter_layers`` decoder layers. Each wrapped attention learns a prompt ``P`` of
``adapter_len`` tokens and a zero-initialised gate ``g``; the layer's queries also attend to the
prompt, projected by the layer's own (frozen) ``k_proj`` / ``v_proj``, and the gated result goes
through ``o_proj`` and is added to the attention output::

    P [1, L, hidden]   g [1]          (PEFT keys: <attention>.adaption_prompt / .adaption_gate)
    K = k_proj(P), V = v_proj(P)      [1, kv_heads, L, head_dim], repeated to the query heads (GQA)
    y = attention(x) + o_proj(g * softmax_fp32(rope(q_proj(x)) K^T / sqrt(head_dim)) V)

The softmax runs over the prompt tokens only (no mask, no cache: the prompt is not part of the
sequence). ``g = 0`` makes the layer exactly the base attention (plus ``o_proj``'s bias where it
has one, as in PEFT). Because the added term is an attention over a learned prompt, it is not a
function of any one weight: there is no merged form and no Linear-branch slot form. The torch
layer is :mod:`onnx_peft.tuners.adaption_prompt`; exported unmerged, the prompt attention is
part of the ONNX graph.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError
from .base import Method, register_method

# Model types PEFT's AdaptionPromptModel accepts for Llama-style attention (q/k/v/o_proj and
# rotary position embeddings), and the attention module name it fills in when none is given.
MODEL_TYPES = {"llama": "self_attn", "mistral": "self_attn"}

NO_MERGE = ("Llama-Adapter (ADAPTION_PROMPT) adds attention over a learned prompt to {where}; it cannot be "
            "merged into weights and has no Linear-branch slot form. Export the PeftModel with mode "
            "'in-graph' or 'inputs' instead")


@register_config
@dataclass
class AdaptionPromptConfig(AdapterConfig):
    """PEFT's AdaptionPromptConfig: same field names, same defaults.

    ``target_modules``: the name of the attention submodule of each decoder layer (one name, not
    a list; None = the model type's, ``self_attn`` for Llama/Mistral). ``adapter_len``: prompt
    tokens per layer. ``adapter_layers``: how many decoder layers, counted from the top.
    """

    peft_type = "ADAPTION_PROMPT"

    target_modules: str | None = None
    adapter_len: int | None = None
    adapter_layers: int | None = None

    def validate(self) -> None:
        if self.target_modules is not None and (not isinstance(self.target_modules, str)
                                                or not self.target_modules or self.target_modules == "all-linear"):
            raise AdapterConfigError(
                f"AdaptionPromptConfig.target_modules must be the name of the attention submodule "
                f"(e.g. 'self_attn') or None, got {self.target_modules!r}")
        for name in ("adapter_len", "adapter_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AdapterConfigError(f"AdaptionPromptConfig.{name} must be a positive integer, got {value!r}")


@register_method
class AdaptionPromptMethod(Method):
    """Llama-Adapter: per wrapped attention a prompt ``[1, L, hidden]`` and a gate ``[1]``."""

    peft_type = "ADAPTION_PROMPT"
    config_class = AdaptionPromptConfig
    tuner_module = "onnx_peft.tuners.adaption_prompt"
    tensor_names = ("adaption_prompt", "adaption_gate")
    required_tensors = ("adaption_prompt", "adaption_gate")
    layer_attrs = ("adaption_prompt", "adaption_gate")

    def merged_weight(self, config, module, weight, bias, parts, shared):
        raise AdapterConfigError(NO_MERGE.format(where=f"the attention {module}"))

    def slot_tensors(self, config, module, parts, shared, base_weight):
        raise AdapterConfigError(NO_MERGE.format(where=f"the attention {module}"))
