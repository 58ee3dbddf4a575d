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
function of any one weight: there is no merged form and no Linear-branch form. The torch
layer is :mod:`onnx_peft.tuners.adaption_prompt`; exported unmerged, the prompt attention is
part of the ONNX graph: with mode ``in-graph`` the tensors are constants, with mode ``inputs``
(:mod:`onnx_peft.export.adaption_inputs`) they are graph inputs, the *slots* of form
``adaption_prompt`` this method's :meth:`~AdaptionPromptMethod.slot_tensors` fills::

    <attention>.adaption_prompt   P  [1, adapter_len.<attention>, hidden]   default [1, 0, hidden]
    <attention>.adaption_gate     g  [1]                                     default 0

An empty prompt attends to nothing, so the defaults make the layer its base attention. No pass
grafts this form (it is traced at export), so it has no per-row (MultiAdapter) variant.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from .base import Method, as_float32, register_method

# Model types PEFT's AdaptionPromptModel accepts for Llama-style attention (q/k/v/o_proj and
# rotary position embeddings), and the attention module name it fills in when none is given.
MODEL_TYPES = {"llama": "self_attn", "mistral": "self_attn"}

# The slot form of the prompt/gate graph inputs (Slot.method in a model's contract).
SLOT_FORM = "adaption_prompt"

NO_MERGE = ("Llama-Adapter (ADAPTION_PROMPT) adds attention over a learned prompt to {where}; it cannot be "
            "merged into weights. Export the PeftModel (or the base with adapters=) with mode "
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
        """``{"adaption_prompt": {"adaption_prompt": P [1, L, hidden], "adaption_gate": g [1]}}``:
        PEFT's tensors as they are, for a model exported with mode ``inputs``."""
        prompt, gate = as_float32(parts["adaption_prompt"]), as_float32(parts["adaption_gate"])
        if prompt.ndim != 3 or prompt.shape[0] != 1 or gate.shape != (1,):
            raise IncompatibleAdapterError(
                f"module {module}: Llama-Adapter tensors must be adaption_prompt [1, adapter_len, hidden] and "
                f"adaption_gate [1], got {list(prompt.shape)} and {list(gate.shape)}; the checkpoint is damaged")
        return {SLOT_FORM: {"adaption_prompt": prompt, "adaption_gate": gate}}
