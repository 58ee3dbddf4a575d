"""X-LoRA (mixture of LoRA experts): the config and why it has no merged or slot form, torch-free.

X-LoRA keeps N trained LoRA adapters (the *experts*, PEFT LoRA folders named in ``adapters``)
and learns a small classifier that mixes them per token and per layer::

    pass 1 (scalings pass, no grad): h = model(x) with every expert scaled by scaling_pass_value
    scalings = softmax(classifier(h[-1]) / T)          [batch, seq, n_layers, n_experts]
    pass 2: at adapted layer l, y = x W^T + sum_i B_i A_i (x * w[..., l, i] * g) * s_i

``w`` is ``scalings`` after the optional top-k mask (``top_k_lora``) and top-k softmax
(``enable_softmax_topk``); ``g`` is ``global_scaling_weight``. The experts' mix depends on the
model's own hidden states for each token, so X-LoRA has no merged weight and no static slot
tensors: it is exported whole, both passes in one graph (``mode="in-graph"``).

Checkpoint layout (PEFT's): ``adapter_config.json`` (this config) and
``adapter_model.safetensors`` holding ``base_model.internal_xlora_classifier.layers.N.weight``
/ ``.bias``; the experts are LoRA folders (``adapters`` paths, or the ``<dir>/<i>`` subfolders a
save writes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError
from .base import Method, register_method

NO_STATIC_FORM = (
    "X-LoRA routes its LoRA experts per token from the model's own hidden states (a scalings pass "
    "feeds a classifier whose output weights each expert at each layer), so it has no merged weight "
    "and no static slot tensors; export it with mode='in-graph', which traces both passes into the graph")


@register_config
@dataclass
class XLoraConfig(AdapterConfig):
    """PEFT's XLoraConfig: same field names, same defaults (``hidden_size`` and ``adapters`` are
    required here, where PEFT warns and guesses 4096 / no experts)."""

    peft_type = "XLORA"

    hidden_size: int | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def validate(self) -> None:
        def positive_int(name: str, value: object) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise AdapterConfigError(f"XLoraConfig.{name} must be a positive integer, got {value!r}")

        if self.hidden_size is None:
            raise AdapterConfigError("XLoraConfig.hidden_size is required: the base model's hidden size "
                                     "(model.config.hidden_size)")
        positive_int("hidden_size", self.hidden_size)
        if not isinstance(self.adapters, dict) or not self.adapters or not all(
                isinstance(k, str) and isinstance(v, (str, os.PathLike)) for k, v in self.adapters.items()):
            raise AdapterConfigError(
                f"XLoraConfig.adapters must map expert names to LoRA adapter folders, e.g. "
                f"{{'0': 'path/to/lora0', '1': 'path/to/lora1'}}; got {self.adapters!r}")
        self.adapters = {k: str(v) for k, v in self.adapters.items()}
        positive_int("xlora_depth", self.xlora_depth)
        positive_int("xlora_size", self.xlora_size)
        if not 0.0 <= float(self.xlora_dropout_p) < 1.0:
            raise AdapterConfigError(f"XLoraConfig.xlora_dropout_p must be in [0, 1), got {self.xlora_dropout_p!r}")
        if not float(self.softmax_temperature) > 0.0:
            raise AdapterConfigError(
                f"XLoraConfig.softmax_temperature must be > 0, got {self.softmax_temperature!r}")
        if self.top_k_lora is not None:
            positive_int("top_k_lora", self.top_k_lora)
            if self.top_k_lora > len(self.adapters):
                raise AdapterConfigError(f"XLoraConfig.top_k_lora={self.top_k_lora} exceeds the number of experts "
                                         f"in adapters ({len(self.adapters)})")
        if self.enable_softmax_topk and self.top_k_lora is None:
            raise AdapterConfigError("XLoraConfig.enable_softmax_topk needs top_k_lora (the softmax runs over "
                                     "the top-k experts)")


@register_method
class XLoraMethod(Method):
    """X-LoRA: a classifier (``internal_xlora_classifier``) routing LoRA experts; no merge, no slots."""

    peft_type = "XLORA"
    config_class = XLoraConfig
    tuner_module = "onnx_peft.tuners.xlora"
    tensor_names = ()
    # the classifier lives on base_model (PEFT key base_model.internal_xlora_classifier.layers.N.*)
    layer_attrs = ("internal_xlora_classifier",)
    graph_modes = ("in-graph",)

    def no_merge_message(self) -> str:
        """Why merged / slot exports are refused (the same hook prompt-learning methods answer)."""
        return NO_STATIC_FORM

    def group(self, tensors, source="adapter", saved_modules=()):
        raise AdapterConfigError(f"{source}: {NO_STATIC_FORM}")

    def merged_weight(self, config, module, weight, bias, parts, shared):
        raise AdapterConfigError(f"module {module}: {NO_STATIC_FORM}")

    def slot_tensors(self, config, module, parts, shared, base_weight):
        raise AdapterConfigError(f"module {module}: {NO_STATIC_FORM}")
