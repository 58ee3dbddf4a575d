"""Prompt-learning methods, torch-free: what the rest of onnx-peft needs to know about them.

Prompt tuning, p-tuning, multitask prompt tuning and CPT learn *virtual tokens*: ``p`` vectors of
the model's hidden size that are prepended to the token embeddings. Prefix tuning learns, per
layer, ``p`` keys and values that are prepended to the attention's KV cache. Neither changes a
weight, so neither has a merged form; at inference both are constant tensors, which is what
makes them swappable per run (and per row) in a stock ONNX Runtime graph:

    kind "prompt":  virtual tokens    [p, hidden]             -> graph input ``prompt_embeds``
    kind "prefix":  keys / values     per layer [heads, p, head_dim]
                                                              -> the ``past_key_values.*`` inputs

PEFT saves both as one ``prompt_embeddings`` tensor: ``[p, hidden]`` for prompts, and
``[p, layers * 2 * kv_heads * head_dim]`` for prefixes (the KV cache itself, already projected
when the adapter trained with ``prefix_projection``); multitask prompt tuning adds per-task
factors ``prefix_task_cols [tasks, p, ranks]`` and ``prefix_task_rows [tasks, ranks, hidden]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..config import AdapterConfig
from ..errors import AdapterConfigError, CheckpointError, IncompatibleAdapterError
from .base import AdapterTensors, Method, as_float32

PROMPT_KEY = "prompt_embeddings"


@dataclass
class PromptLearningConfig(AdapterConfig):
    """PEFT's PromptLearningConfig fields; the model-dependent ones are filled by :meth:`prepare`."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        name = type(self).__name__
        if not isinstance(self.num_virtual_tokens, int) or isinstance(self.num_virtual_tokens, bool) \
                or self.num_virtual_tokens < 1:
            raise AdapterConfigError(f"{name}.num_virtual_tokens must be an integer >= 1, got {self.num_virtual_tokens!r}")
        for field_name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise AdapterConfigError(f"{name}.{field_name} must be an integer >= 1, got {value!r}")
        if self.num_transformer_submodules not in (None, 1):
            raise AdapterConfigError(
                f"{name}.num_transformer_submodules={self.num_transformer_submodules}: onnx-peft serves decoder-only "
                "and encoder-only models (1 submodule); encoder-decoder prompt learning is not supported")

    def prepare(self, model_config: Any) -> None:
        """Fill the fields PEFT derives from the model's config (PEFT's rules, incl. prefix tuning
        on grouped-query attention: ``token_dim = kv_heads * head_dim``, ``num_attention_heads =
        kv_heads``)."""
        cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        get = lambda *names: next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)  # noqa: E731
        if self.num_layers is None:
            self.num_layers = get("num_hidden_layers", "num_layers", "n_layer")
        if self.token_dim is None:
            self.token_dim = get("hidden_size", "n_embd", "d_model")
        if self.num_attention_heads is None:
            self.num_attention_heads = get("num_attention_heads", "n_head", "num_heads")
        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 1
        missing = [n for n in ("num_layers", "token_dim", "num_attention_heads") if getattr(self, n) is None]
        if missing:
            raise AdapterConfigError(f"{type(self).__name__}: cannot read {missing[0]} from the model's config; set it")
        if method_kind(self) == "prefix" and get("num_key_value_heads") is not None:
            head_dim = get("head_dim") or self.token_dim // self.num_attention_heads
            kv_heads = get("num_key_value_heads")
            self.token_dim, self.num_attention_heads = head_dim * kv_heads, kv_heads
        if hasattr(self, "encoder_hidden_size") and self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim

    @property
    def is_prompt_learning(self) -> bool:
        return True


def method_kind(config: AdapterConfig) -> str | None:
    """"prompt", "prefix", or None for a weight method."""
    from .base import method_for

    return getattr(method_for(config), "kind", None)


class PromptLearningMethod(Method):
    """A method whose adapter is virtual tokens (``kind = "prompt"``) or a KV prefix (``"prefix"``)."""

    kind: ClassVar[str] = "prompt"
    is_prompt_learning: ClassVar[bool] = True
    tensor_names = ()
    # checkpoint keys besides prompt_embeddings (multitask prompt tuning's per-task factors)
    extra_keys: ClassVar[tuple[str, ...]] = ()

    def group(self, tensors: Mapping[str, np.ndarray], source: str = "adapter",
              saved_modules: Sequence[str] = ()) -> AdapterTensors:
        """All tensors are shared (no module owns them); stray or missing keys raise."""
        out = AdapterTensors()
        for key, value in tensors.items():
            full = _saved_key(key, saved_modules)
            if key in (PROMPT_KEY, *self.extra_keys):
                out.shared[key] = value
            elif full is not None:  # a head trained in full (SEQ_CLS): base_model.<head>.weight
                out.full.setdefault(full[0], {})[full[1]] = value
            else:
                raise IncompatibleAdapterError(
                    f"{source}: tensor {key!r} is not part of a {self.peft_type} adapter (expected "
                    f"{[PROMPT_KEY, *self.extra_keys]}); the checkpoint and its adapter_config.json do not belong together")
        for needed in (PROMPT_KEY, *self.extra_keys):
            if needed not in out.shared:
                raise CheckpointError(f"{source}: the checkpoint has no {needed!r} tensor")
        return out

    def virtual_tokens(self, config: PromptLearningConfig, shared: Mapping[str, np.ndarray],
                       task: int | None = None, source: str = "adapter") -> np.ndarray:
        """The constant the adapter adds at inference: ``[p, token_dim]`` virtual tokens (kind
        "prompt") or ``[p, layers * 2 * token_dim]`` KV prefix (kind "prefix"), float32."""
        prompt = as_float32(shared[PROMPT_KEY])
        width = config.token_dim * (2 * config.num_layers if self.kind == "prefix" else 1)
        if prompt.shape != (config.num_virtual_tokens, width):
            raise IncompatibleAdapterError(
                f"{source}: prompt_embeddings has shape {list(prompt.shape)}, the config says "
                f"[{config.num_virtual_tokens}, {width}] (num_virtual_tokens, "
                f"{'num_layers * 2 * token_dim' if self.kind == 'prefix' else 'token_dim'})")
        return prompt

    def tasks(self, config: AdapterConfig) -> int:
        """How many task-specific prompts the adapter holds (1 unless it is multitask)."""
        return 1

    # -- no merged form, no weight slots ---------------------------------------------------------
    def merged_weight(self, config: AdapterConfig, module: str, weight: Any, bias: Any,
                      parts: Mapping[str, Any], shared: Mapping[str, Any]) -> tuple[Any, Any]:
        raise AdapterConfigError(self.no_merge_message())

    def slot_tensors(self, config: AdapterConfig, module: str, parts: Mapping[str, np.ndarray],
                     shared: Mapping[str, np.ndarray], base_weight: Any) -> dict[str, dict[str, np.ndarray]]:
        raise AdapterConfigError(self.no_merge_message())

    def no_merge_message(self) -> str:
        what = "learned keys/values prepended to every attention layer" if self.kind == "prefix" \
            else "learned virtual tokens prepended to the input"
        return (f"{self.peft_type} adds {what}; it changes no weight, so it has no merged form and no "
                "weight slots: export it with mode 'inputs' (swappable prompt inputs) or 'in-graph'")


def _saved_key(key: str, saved_modules: Sequence[str]) -> tuple[str, str] | None:
    """``base_model.classifier.weight`` -> ``("classifier", "weight")`` for a modules_to_save
    module (prompt-learning checkpoints name the transformers model ``base_model``)."""
    name = key[len("base_model."):] if key.startswith("base_model.") else None
    if name is None:
        return None
    module, _, part = name.rpartition(".")
    if any(module == m or module.endswith("." + m) or module.startswith(m + ".") for m in saved_modules):
        return module, part
    return None


def prefix_pairs(config: PromptLearningConfig, prefix: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[p, layers * 2 * heads * head_dim]`` -> per layer ``(key, value)``, each
    ``[heads, p, head_dim]`` (PEFT's view + permute of the flat prefix)."""
    p, heads = prefix.shape[0], config.num_attention_heads
    head_dim = config.token_dim // heads
    cube = prefix.reshape(p, config.num_layers * 2, heads, head_dim).transpose(1, 2, 0, 3)
    return [(cube[2 * i], cube[2 * i + 1]) for i in range(config.num_layers)]
