"""Trainable Tokens layers: new values for a few rows of an embedding (and of its tied head).

::

    ids ──► embedding with rows token_indices replaced by trainable_tokens_delta ──► [..., hidden]
    x   ──► tied head:  x E'^T (+ bias), E' the same replaced table             ──► [..., vocab]

Only ``trainable_tokens_delta[adapter]`` ``[k, hidden]`` trains. Rows are *replaced*, as in PEFT
(``index_copy``), through :func:`onnx_peft.methods.trainable_tokens.replace_rows`, the definition
MergeAdapters applies to an ONNX graph. Several active adapters must train disjoint rows.

Tied weights: when the model's output head shares the input embedding's weight, the head is
wrapped too (:class:`TiedTokensLayer`, no parameters of its own) so logits see the same rows, as
PEFT does. ``before_inject`` sets both up, because the head must share the embedding's tensors:
TrainableTokens exposes them under the head's path too (PEFT saves
``lm_head.trainable_tokens_delta``); LoRA's ``trainable_token_indices`` keeps them in
``<embedding>.token_adapter`` only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterConfigError, OnnxPeftError
from ..methods.base import method_for
from ..methods.trainable_tokens import DELTA, TrainableTokensConfig, replace_rows
from ..targets import is_target
from .base import AdapterLayer


class TokenDeltas(nn.Module):
    """Holds ``trainable_tokens_delta`` (LoRA's ``<embedding>.token_adapter``)."""

    def __init__(self) -> None:
        super().__init__()
        self.trainable_tokens_delta = nn.ParameterDict()


def _overlap_check(module_path: str, indices: dict[str, list[int]], names: Iterable[str]) -> None:
    seen: dict[int, str] = {}
    for name in names:
        for index in indices[name]:
            if index in seen and seen[index] != name:
                raise OnnxPeftError(
                    f"{module_path}: adapters {seen[index]!r} and {name!r} both train token {index}; "
                    "adapters used together must train disjoint tokens")
            seen[index] = name


class TrainableTokensLayer(AdapterLayer):
    """An ``nn.Embedding`` (weight ``[vocab, hidden]``) with trained rows per adapter.
    ids: ``[...]`` -> ``[..., hidden]``. ``lora_style`` keeps the rows in ``token_adapter``."""

    def __init__(self, base_layer: nn.Module, module_path: str, lora_style: bool = False) -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        if lora_style:
            self.token_adapter = TokenDeltas()
        else:
            self.trainable_tokens_delta = nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = {}
        self._originals: dict[str, torch.Tensor] = {}  # base rows of merged adapters

    @property
    def deltas(self) -> nn.ParameterDict:
        holder = self._modules.get("token_adapter")
        return holder.trainable_tokens_delta if holder is not None else self._modules["trainable_tokens_delta"]

    # -- adapters ----------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, token_indices: list[int], init_weights: bool = True) -> None:
        """Rows start as the base rows (a no-op until trained) or random (``init_weights=False``)."""
        weight = self.base_layer.weight
        if token_indices and max(token_indices) >= weight.shape[0]:
            raise AdapterConfigError(f"{self.module_path}: token id {max(token_indices)} is outside the "
                                     f"embedding's {weight.shape[0]} rows")
        rows = weight.detach()[list(token_indices)].clone()
        if not init_weights:
            rows = torch.randn_like(rows)
        self.token_indices[adapter_name] = list(token_indices)
        self.deltas[adapter_name] = nn.Parameter(rows)

    def adapter_names(self) -> list[str]:
        return list(self.deltas.keys())

    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for key, param in self.deltas.items():
            param.requires_grad_(trainable and key in names)
        self.active_adapters = [n for n in names if n in self.deltas]

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.deltas:
            del self.deltas[adapter_name]
        self.token_indices.pop(adapter_name, None)
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    # -- the table ----------------------------------------------------------------------------
    def replaced_table(self, names: list[str], table: torch.Tensor | None = None) -> torch.Tensor:
        """The base table ``[vocab, hidden]`` with the rows of adapters ``names`` replaced."""
        table = self.base_layer.weight if table is None else table
        _overlap_check(self.module_path, self.token_indices, names)
        for name in names:
            table = replace_rows(table, self.token_indices[name], self.deltas[name])
        return table

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``E'[ids]``: the embedding lookup in the table with the active adapters' rows."""
        names = [n for n in self.active_adapters if n in self.deltas]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        return F.embedding(x, self.replaced_table(names), padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    # -- merging ----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Write the adapters' rows into the base table (shared with a tied head, which follows)."""
        names = [n for n in (adapter_names if adapter_names is not None else self.active_adapters)
                 if n in self.deltas and n not in self.merged_adapters]
        if not names:
            return
        _overlap_check(self.module_path, self.token_indices, self.merged_adapters + names)
        weight = self.base_layer.weight
        for name in names:
            indices = self.token_indices[name]
            merged = method_for("TRAINABLE_TOKENS").merged_weight(
                TrainableTokensConfig(token_indices=indices), self.module_path, weight.data, None,
                {DELTA: self.deltas[name].detach()}, {})[0]
            if safe_merge and not torch.isfinite(merged).all():
                raise OnnxPeftError(f"merging adapter {name!r} gives NaN/inf weights; the adapter is broken")
            self._originals[name] = weight.data[indices].clone()
            weight.data = merged
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data = replace_rows(weight.data, self.token_indices[name], self._originals.pop(name))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``E' - E`` ``[vocab, hidden]`` (non-zero only on the adapter's rows)."""
        weight = self.base_layer.weight.detach()
        return self.replaced_table([adapter_name], weight) - weight

    def __repr__(self) -> str:
        return f"trainable_tokens.{type(self).__name__}({self.base_layer!r})"


class TiedTokensLayer(AdapterLayer):
    """An output head ``nn.Linear`` whose weight is the input embedding's (tied): it follows the
    embedding's :class:`TrainableTokensLayer`, ``source()``. x: ``[..., hidden]`` -> ``[..., vocab]``.

    ``expose``: the state dict shows the embedding's rows under the head's path too, as a copy
    (``<head>.trainable_tokens_delta.<adapter>``; PEFT's TrainableTokens saves them there, its LoRA
    ``trainable_token_indices`` does not); loading such a key writes the embedding's rows."""

    def __init__(self, base_layer: nn.Module, source: Callable[[], nn.Module], expose: bool) -> None:
        super().__init__(base_layer)
        self._source = source
        self.expose = expose

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        source = self.source()
        if self.expose and source is not None:
            for name, param in source.deltas.items():  # a copy: safetensors refuses shared memory
                destination[f"{prefix}{DELTA}.{name}"] = param if keep_vars else param.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        source = self.source()
        for key in [k for k in state_dict if k.startswith(f"{prefix}{DELTA}.")]:
            name = key[len(prefix) + len(DELTA) + 1:]
            if self.expose and source is not None and name in source.deltas:
                with torch.no_grad():
                    source.deltas[name].copy_(state_dict[key])
            else:
                unexpected_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if not k.startswith(f"{prefix}{DELTA}.")}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def source(self) -> TrainableTokensLayer | None:
        layer = self._source()
        return layer if isinstance(layer, TrainableTokensLayer) else None

    def adapter_names(self) -> list[str]:
        source = self.source()
        return [] if source is None else source.adapter_names()

    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.active_adapters = [n for n in names if n in self.adapter_names()]  # grads: the source's

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """The weight is the embedding's: its merge already wrote the rows; keep the books."""
        for name in adapter_names if adapter_names is not None else list(self.active_adapters):
            if name in self.adapter_names() and name not in self.merged_adapters:
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        self.merged_adapters.clear()

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x E'^T + bias`` with ``E'`` the embedding's replaced table."""
        source = self.source()
        names = [n for n in self.active_adapters if source is not None and n in source.deltas]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return F.linear(x, source.replaced_table(names, self.base_layer.weight), self.base_layer.bias)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        source = self.source()
        weight = self.base_layer.weight.detach()
        return torch.zeros_like(weight) if source is None else source.replaced_table([adapter_name], weight) - weight


def _path_of(model: nn.Module, target: nn.Module) -> str | None:
    return next((name for name, module in model.named_modules() if module is target), None)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def wrap_tokens(model: nn.Module, path: str, adapter_name: str, indices: list[int], init_weights: bool,
                lora_style: bool) -> TrainableTokensLayer:
    """Give the embedding at ``path`` the adapter's rows (wrapping it first if needed); a head tied
    to it (same weight) is wrapped too. Returns the embedding's layer."""
    module = model.get_submodule(path)
    if isinstance(module, TrainableTokensLayer):
        layer = module
    elif isinstance(module, nn.Embedding):
        layer = TrainableTokensLayer(module, path, lora_style)
        _replace(model, path, layer)
    else:
        raise AdapterConfigError(
            f"module {path} ({type(module).__name__}) cannot take trainable tokens; supported: nn.Embedding "
            "(a tied output head follows its embedding by itself)")
    layer.update_layer(adapter_name, indices, init_weights)
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if inputs is layer and isinstance(output, nn.Linear) and output.weight is layer.base_layer.weight:
        head = _path_of(model, output)
        _replace(model, head, TiedTokensLayer(output, model.get_input_embeddings, expose=not lora_style))
    return layer


def before_inject(base_model: nn.Module, adapter_name: str, config: TrainableTokensConfig) -> None:
    """Create the adapter on the input embedding and on a head tied to it, so both share one
    parameter (see the module docstring); ``add_adapter`` then finds it done."""
    model = base_model.model
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    path = _path_of(model, inputs) if inputs is not None else None
    if path is not None and is_target(path, config):
        wrap_tokens(model, path, adapter_name, config.token_indices, config.init_weights, lora_style=False)


def make_trainable_tokens_layer(module: nn.Module, adapter_name: str, config: TrainableTokensConfig,
                                module_path: str) -> nn.Module:
    """Wrap the embedding ``module`` and create ``adapter_name`` (a tied head is wrapped by
    ``before_inject``)."""
    if not isinstance(module, nn.Embedding):
        raise AdapterConfigError(
            f"module {module_path} ({type(module).__name__}) cannot take a TrainableTokens adapter; supported: "
            "nn.Embedding (target the input embedding, e.g. ['embed_tokens']; a tied output head follows it)")
    layer = TrainableTokensLayer(module, module_path)
    add_trainable_tokens_adapter(layer, adapter_name, config, module_path)
    return layer


def add_trainable_tokens_adapter(layer: nn.Module, adapter_name: str, config: TrainableTokensConfig,
                                 module_path: str) -> None:
    if isinstance(layer, TrainableTokensLayer) and adapter_name not in layer.deltas:  # else before_inject made it
        layer.update_layer(adapter_name, config.token_indices, config.init_weights)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = (TrainableTokensLayer, TiedTokensLayer)
make_layer = make_trainable_tokens_layer
add_adapter = add_trainable_tokens_adapter


def default_targets(model: nn.Module, config: TrainableTokensConfig) -> list[str]:
    """PEFT's default: the model's input embedding."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return [_path_of(model, embeddings) or "embed_tokens"] if embeddings is not None else ["embed_tokens"]
