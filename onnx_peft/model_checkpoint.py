"""PeftModel's checkpoint verbs: PEFT's adapter directories both ways (save_pretrained,
from_pretrained, load_adapter) and the state-dict keys they hold.

A mixin of :class:`onnx_peft.model.PeftModel` (kept apart so each file has one job): keys are
PEFT's (``base_model.model.<path>.lora_A.weight``, adapter name removed, see ``model.peft_key``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_adapter_weights, save_adapter_dir
from .config import AdapterConfig
from .errors import CheckpointError, OnnxPeftError
from .methods.base import layer_attrs, method_for
from .tuners.base import AdapterLayer


@functools.cache
def _adapter_attrs() -> tuple[str, ...]:
    """The per-adapter containers whose state-dict keys carry the adapter name (PEFT drops it):
    every method's ``layer_attrs`` and ``modules_to_save``."""
    return (*layer_attrs(), "modules_to_save")


def peft_key(param_name: str, adapter_name: str) -> str:
    """Our parameter name -> the key PEFT stores it under (adapter name removed).

    ``base_model.model.q.lora_A.default.weight`` -> ``base_model.model.q.lora_A.weight``;
    ``...lora_magnitude_vector.default.weight`` -> ``...lora_magnitude_vector``;
    ``...score.modules_to_save.default.weight`` -> ``...score.weight``.
    """
    key = param_name.replace(f".lora_magnitude_vector.{adapter_name}.weight", ".lora_magnitude_vector")
    key = key.replace(f".modules_to_save.{adapter_name}.", ".")
    for attr in _adapter_attrs():
        key = key.replace(f".{attr}.{adapter_name}.", f".{attr}.")
        if key.endswith(f".{attr}.{adapter_name}"):
            key = key[: -len(adapter_name) - 1]
    return key


class PeftCheckpoints:
    """Checkpoint verbs of :class:`~onnx_peft.model.PeftModel`."""

    # -- checkpoints -----------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors of one adapter under PEFT's checkpoint keys."""
        config = self.peft_config[adapter_name]
        owned = {}
        bias = getattr(config, "bias", "none")
        lora_biases = {f"base_model.model.{k}.base_layer.bias" for k, layer in self._layers()
                       if isinstance(layer, AdapterLayer) and adapter_name in layer.adapter_names()}
        for name, tensor in self.state_dict().items():
            marker = any(f".{attr}.{adapter_name}" in name for attr in _adapter_attrs())
            if marker and (name.endswith(f".{adapter_name}") or f".{adapter_name}." in name):
                owned[peft_key(name, adapter_name)] = tensor
            elif bias == "all" and name.endswith(".bias") and not _is_adapter_param(name):
                owned[name.replace(".original_module.", ".")] = tensor
            elif bias.endswith("_only") and name in lora_biases:
                owned[name] = tensor
        return owned

    def _embedding_tensors(self, adapter_name: str, save_embedding_layers: bool | str) -> dict[str, torch.Tensor]:
        """The base input/output embedding weights PEFT stores next to an adapter.

        PEFT's ``save_embedding_layers="auto"`` saves them when ``target_modules`` names
        ``embed_tokens``/``lm_head`` (so a resized vocabulary travels with the adapter); we
        write the same keys so both libraries produce the same files.
        """
        model = self.base_model.model
        config = self.peft_config[adapter_name]
        targeted = _targets_embedding_by_name(config, model)
        if save_embedding_layers == "auto":  # PEFT: token rows travel without the whole table
            trains_rows = config.peft_type == "TRAINABLE_TOKENS" or getattr(config, "trainable_token_indices", None)
            save_embedding_layers = targeted and not trains_rows
        if not save_embedding_layers or not hasattr(model, "get_input_embeddings"):
            return {}
        out: dict[str, torch.Tensor] = {}
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is None or (targeted and not isinstance(layer, AdapterLayer)):
                continue  # targeted: only the wrapped embeddings' base weights, as PEFT does
            source = layer.base_layer if isinstance(layer, AdapterLayer) else layer
            name = next(n for n, m in model.named_modules() if m is source)
            out.update({f"base_model.model.{name}.{k}": v for k, v in source.state_dict().items()})
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        save_embedding_layers: bool | str = "auto", **kwargs: Any) -> None:
        """PEFT layout: the "default" adapter in ``save_directory``, others in subfolders."""
        for name in selected_adapters or list(self.peft_config):
            if name not in self.peft_config:
                raise OnnxPeftError(f"unknown adapter {name!r}; loaded: {sorted(self.peft_config)}")
            target = Path(save_directory) if name == "default" else Path(save_directory) / name
            config = dataclasses.replace(self.peft_config[name], inference_mode=True)
            if config.base_model_name_or_path is None:
                model_config = getattr(self.base_model.model, "config", None)
                config.base_model_name_or_path = getattr(model_config, "_name_or_path", None) or None
            tensors = {**self.adapter_state_dict(name), **self._embedding_tensors(name, save_embedding_layers)}
            save_adapter_dir(target, config, tensors)
            tuner = method_for(config).tuner()
            if hasattr(tuner, "save_extra"):  # folders a method keeps next to its adapter (X-LoRA's experts)
                tuner.save_extra(self, name, target)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: AdapterConfig | None = None,
                        allow_pickle: bool = False, **kwargs: Any) -> Any:
        """Wrap ``model`` and load the PEFT adapter directory ``model_id`` into it.

        As in PEFT, ``init_lora_weights`` "pissa"/"olora" runs again on load: it turns the
        base weight into the same residual the adapter was trained on (PEFT's PiSSA recipe
        saves ``init_lora_weights=True`` when the residual model itself is shipped).
        """
        config = config or AdapterConfig.from_pretrained(model_id)
        if getattr(method_for(config), "is_prompt_learning", False):  # prompt / prefix: the layers stay as they are
            from .prompt_model import PromptLearningModel

            return PromptLearningModel.from_pretrained(model, model_id, adapter_name, is_trainable, config,
                                                       allow_pickle)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        tuner = method_for(config).tuner()
        if hasattr(tuner, "config_for_load"):  # X-LoRA: where its experts are (adapters=, or saved copies)
            config = tuner.config_for_load(config, model_id, **kwargs)
        peft_model = cls(model, config, adapter_name)
        try:
            peft_model._load_weights(model_id, adapter_name, allow_pickle)
        except OnnxPeftError:
            peft_model._undo_base_init(adapter_name)
            peft_model._unload(keep_saved_modules=False)  # hand the caller's model back untouched
            raise
        peft_model.set_adapter(adapter_name)
        if not is_trainable:  # as PEFT: an inference adapter runs without dropout
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     allow_pickle: bool = False, **kwargs: Any) -> None:
        """Load another PEFT adapter directory next to the existing ones (not activated)."""
        config = AdapterConfig.from_pretrained(model_id)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        self.add_adapter(adapter_name, config)
        try:
            self._load_weights(model_id, adapter_name, allow_pickle)
        except OnnxPeftError:
            self._undo_base_init(adapter_name)
            self._remove_adapter_everywhere(adapter_name, unwrap_empty=True)
            del self.peft_config[adapter_name]
            self.set_adapter(self.active_adapters)
            raise
        self.set_adapter(self.active_adapters)
        if not is_trainable:
            self.eval()

    def _undo_base_init(self, adapter_name: str) -> None:
        """PiSSA/OLoRA moved ``s * B0 @ A0`` out of the base weights; put it back (failed load)."""
        init = getattr(self.peft_config[adapter_name], "init_lora_weights", None)
        if not isinstance(init, str) or init == "gaussian":
            return
        for _, layer in self._layers():
            if isinstance(layer, AdapterLayer) and adapter_name in layer.adapter_names():
                layer.merge([adapter_name])
                layer.merged_adapters.remove(adapter_name)

    def _load_weights(self, model_id: str | os.PathLike, adapter_name: str, allow_pickle: bool) -> None:
        """Copy checkpoint tensors into the adapter; every key must land, every shape must fit."""
        tensors = load_adapter_weights(model_id, allow_pickle=allow_pickle)
        tuner = method_for(self.peft_config[adapter_name]).tuner()
        if hasattr(tuner, "load_tensors"):  # a method's compact checkpoint layout (VB-LoRA's top-k weights)
            loaded = tuner.load_tensors(self.peft_config[adapter_name], {k: _to_torch(v) for k, v in tensors.items()})
            tensors = {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in loaded.items()}
        state = self.state_dict(keep_vars=True)
        expected = self.adapter_state_dict(adapter_name)
        ours = {peft_key(name, adapter_name): name for name in state}
        for key, value in tensors.items():
            if key not in expected and key not in ours:
                raise CheckpointError(
                    f"{model_id}: key {key!r} matches no module of this model; the adapter was trained "
                    "for another architecture or with other target_modules"
                )
            param = state[ours[key]]
            if tuple(param.shape) != tuple(value.shape):
                raise CheckpointError(
                    f"{model_id}: tensor {key!r} has shape {list(value.shape)}, the model expects "
                    f"{list(param.shape)}; is the adapter for another base model?"
                )
        missing = [k for k in expected if k not in tensors and ".bias" not in k]
        if missing:
            raise CheckpointError(f"{model_id}: checkpoint lacks tensor {missing[0]!r} ({len(missing)} missing)")
        with torch.no_grad():
            for key, value in tensors.items():
                param = state[ours[key]]
                param.copy_(_to_torch(value).to(param.dtype))


def _to_torch(value: Any) -> torch.Tensor:
    """numpy -> torch; bfloat16 (ml_dtypes, which torch.from_numpy rejects) goes through its bits."""
    if value.dtype.name == "bfloat16":
        return torch.from_numpy(value.view("uint16").copy()).view(torch.bfloat16)
    return torch.from_numpy(value.copy())


def _targets_embedding_by_name(config: AdapterConfig, model: nn.Module) -> bool:
    """PEFT's "auto" rule: target_modules names ``embed_tokens`` or ``lm_head``."""
    names = ("embed_tokens", "lm_head")
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        return any(re.fullmatch(targets, key) for key, _ in model.named_modules()
                   if any(re.match(rf"(.*\.)?{n}$", key) for n in names))
    return any(n in (targets or ()) for n in names)


def _is_adapter_param(name: str) -> bool:
    return any(f".{attr}." in name for attr in _adapter_attrs())
