"""Llama-Adapter: a wrapper around a Llama-style attention module (q/k/v/o_proj, rotary
position embeddings) that adds gated attention over a learned prompt.

::

    x ──► base attention (frozen, KV cache as usual) ───────────────────────────┐
    │                                                                           (+) ──► y
    └──► q = rope(q_proj(x)) ──► g * softmax(q K^T / sqrt(d)) V ──► o_proj ─────┘
                                            ▲
            prompt P [1, L, hidden] ──► K = k_proj(P), V = v_proj(P)   (GQA: repeated per group)

Same math, op for op, as PEFT's ``AdaptedAttention`` (softmax in fp32, gate applied to the
probabilities, ``o_proj`` applied to the prompt output). The prompt keys/values are recomputed
at every step and never enter the KV cache, so generation with a cache and the ONNX export with
past key/values work unchanged. Several active adapters each add their own term.

The modules are chosen as PEFT chooses them (:func:`select_targets`): the last
``adapter_layers`` modules named ``target_modules``. There is nothing to merge:
:meth:`AdaptedAttention.merge` raises (see :mod:`onnx_peft.methods.adaption_prompt`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import AdapterConfigError, OnnxPeftError
from ..methods.adaption_prompt import MODEL_TYPES, NO_MERGE, AdaptionPromptConfig
from .base import AdapterLayer

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last axis (the rotary embedding's rotation)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AdaptedAttention(AdapterLayer):
    """Llama-style attention plus Llama-Adapter prompts.

    ``adaption_prompt[name]``: ``[1, L, hidden]`` (standard normal at creation, as PEFT);
    ``adaption_gate[name]``: ``[1]`` (zero: a new adapter leaves the model unchanged).
    hidden_states ``[batch, seq, hidden]`` -> ``(attn_output [batch, seq, hidden], attn_weights)``.
    """

    adapter_layer_names = ("adaption_prompt", "adaption_gate")

    def __init__(self, base_layer: nn.Module, module_path: str) -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        config = base_layer.config
        self.num_heads = config.num_attention_heads
        self.head_dim = base_layer.head_dim
        self.num_kv_heads = base_layer.k_proj.out_features // self.head_dim
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: AdaptionPromptConfig) -> None:
        """Create ``adapter_name``: a prompt of ``config.adapter_len`` tokens and a zero gate, in
        ``q_proj``'s dtype (float32 over an integer-quantized base), as PEFT."""
        weight = self.base_layer.q_proj.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        hidden = self.base_layer.config.hidden_size
        prompt = torch.empty(1, config.adapter_len, hidden, device=weight.device, dtype=dtype).normal_()
        self.adaption_prompt[adapter_name] = nn.Parameter(prompt)
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, device=weight.device, dtype=dtype))

    # -- forward ---------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        output, *rest = self.base_layer(hidden_states=hidden_states, **kwargs)
        active = [n for n in self.active_adapters if n in self.adaption_prompt]
        if self.disable_adapters or not active:
            return (output, *rest)
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None:
            raise OnnxPeftError(
                f"{self.module_path} was called without position_embeddings; Llama-Adapter needs the "
                "(cos, sin) rotary embeddings that transformers' Llama decoder layer passes to its attention")
        dtype = output.dtype
        query = self._query(hidden_states, position_embeddings)
        for name in active:
            output = output + self.prompt_attention(name, query)
        return (output.to(dtype), *rest)

    def _query(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
               ) -> torch.Tensor:
        """``rope(q_proj(x))``: ``[batch, heads, seq, head_dim]`` (the base attention does not return it)."""
        batch, seq, _ = hidden_states.shape
        q = self.base_layer.q_proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        return q * cos + _rotate_half(q) * sin

    def prompt_attention(self, adapter_name: str, query: torch.Tensor) -> torch.Tensor:
        """``o_proj(g * softmax_fp32(q K^T / sqrt(d)) V)`` for query ``[batch, heads, seq, d]``
        -> ``[batch, seq, hidden]``; K, V ``[1, heads, L, d]`` broadcast over the batch."""
        attn = self.base_layer
        prompt, gate = self.adaption_prompt[adapter_name], self.adaption_gate[adapter_name]
        length = prompt.shape[1]
        keys = attn.k_proj(prompt).view(1, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = attn.v_proj(prompt).view(1, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        groups = self.num_heads // self.num_kv_heads
        keys = torch.repeat_interleave(keys, groups, dim=1)          # [1, heads, L, d]
        values = torch.repeat_interleave(values, groups, dim=1)
        scores = torch.matmul(query, keys.transpose(2, 3).to(query.dtype)) / math.sqrt(self.head_dim)
        probs = gate * torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        batch, _, seq, _ = query.shape
        out = torch.matmul(probs, values).transpose(1, 2).reshape(batch, seq, -1)   # [batch, seq, heads * d]
        return attn.o_proj(out)

    def adapted_forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        """There is no merged state, so :meth:`forward` is the whole template."""
        return self.forward(hidden_states, **kwargs)

    # -- no merged form --------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise AdapterConfigError(NO_MERGE.format(where=f"the attention {self.module_path}"))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise AdapterConfigError(NO_MERGE.format(where=f"the attention {self.module_path}"))

    def __repr__(self) -> str:
        return f"adaption_prompt.{type(self).__name__}({self.base_layer!r})"


def select_targets(model: nn.Module, config: AdaptionPromptConfig) -> list[str]:
    """The attention modules PEFT wraps: the last ``adapter_layers`` modules whose path ends in
    ``.<target_modules>``, in module order. A missing ``target_modules`` is filled in from the
    model type, as PEFT's ``prepare_config`` does (so the saved config names it too)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPES:
        raise AdapterConfigError(
            f"Llama-Adapter (AdaptionPromptConfig) supports model types {', '.join(sorted(MODEL_TYPES))}, "
            f"not {model_type!r} ({type(model).__name__}); use another method for this model")
    if config.target_modules is None:
        config.target_modules = MODEL_TYPES[model_type]
    found = [name for name, _ in model.named_modules() if name.endswith(f".{config.target_modules}")]
    if len(found) < config.adapter_layers:
        raise AdapterConfigError(
            f"AdaptionPromptConfig.adapter_layers={config.adapter_layers} but {type(model).__name__} has "
            f"{len(found)} modules named {config.target_modules!r}; lower adapter_layers or fix target_modules")
    return found[-config.adapter_layers:]


def make_adapted_attention(module: nn.Module, adapter_name: str, config: AdaptionPromptConfig,
                           module_path: str) -> AdaptedAttention:
    """Wrap the attention ``module`` and create ``adapter_name`` on it."""
    missing = [p for p in _PROJECTIONS if not isinstance(getattr(module, p, None), nn.Linear)]
    if missing or not hasattr(module, "head_dim") or not hasattr(module, "config"):
        raise AdapterConfigError(
            f"module {module_path} ({type(module).__name__}) cannot take a Llama-Adapter (ADAPTION_PROMPT) "
            f"adapter; supported: Llama-style attention with nn.Linear {'/'.join(_PROJECTIONS)} and head_dim "
            f"(missing: {', '.join(missing) or 'head_dim/config'}); check AdaptionPromptConfig.target_modules")
    layer = AdaptedAttention(module, module_path)
    add_adapted_attention(layer, adapter_name, config, module_path)
    return layer


def add_adapted_attention(layer: AdaptedAttention, adapter_name: str, config: AdaptionPromptConfig,
                          module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = AdaptedAttention
make_layer = make_adapted_attention
add_adapter = add_adapted_attention


def slot_parameters(model: nn.Module, adapter_name: str) -> dict[str, tuple[str, nn.Parameter]]:
    """``{slot name: (parameter name in model, parameter)}`` of adapter ``adapter_name``'s prompts
    and gates, slot names as PEFT keys them without ``base_model.model.``
    (``model.layers.1.self_attn.adaption_prompt``), in module order. Export with mode ``inputs``
    swaps these parameters for graph inputs (onnx_peft.export.adaption_inputs)."""
    out: dict[str, tuple[str, nn.Parameter]] = {}
    for path, layer in model.named_modules():
        if isinstance(layer, AdaptedAttention) and adapter_name in layer.adaption_prompt:
            for attr in AdaptedAttention.adapter_layer_names:
                out[f"{path}.{attr}"] = (f"{path}.{attr}.{adapter_name}", getattr(layer, attr)[adapter_name])
    return out
