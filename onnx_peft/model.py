"""get_peft_model / PeftModel: inject adapters into a PyTorch model and manage them.

Same names and behaviour as Hugging Face PEFT, so a PEFT user changes only the import. The
module tree also matches PEFT's (``base_model.model.<path>.lora_A.default.weight``), which
keeps state dicts, exported node names and checkpoints interchangeable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_adapter_weights, save_adapter_dir
from .config import AdapterConfig
from .errors import AdapterConfigError, CheckpointError, OnnxPeftError
from .methods.base import layer_attrs, method_for
from .quant.layers import is_quantized_linear
from .targets import is_target
from .tuners.base import AdapterLayer, ModulesToSaveWrapper, layer_call_args

_SEQ_CLS_HEADS = ["classifier", "score"]


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


def linear_module_names(model: nn.Module) -> list[str]:
    """Last-name components of every Linear/Conv1D except the output head ("all-linear")."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    wrapped: list[str] = []  # adapter layers already injected: count the layer, not its insides
    for name, module in model.named_modules():
        if module is output or not name or any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, AdapterLayer):
            wrapped.append(name)
            module = module.base_layer
        if isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf")) \
                or is_quantized_linear(module):
            names.add(name.split(".")[-1])
    if output is not None:
        for name, module in model.named_modules():
            if module is output:
                names.discard(name.split(".")[-1])
    return sorted(names)


class AdapterModel(nn.Module):
    """``PeftModel.base_model``: holds the wrapped model as ``.model`` (PEFT's naming)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # verbs a method adds to the tuner model (AdaLoRA's update_and_allocate), by name
        self.model_methods: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            methods = self.__dict__.get("model_methods", {})
            if name in methods:
                return functools.partial(methods[name], self)
            raise

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class PeftModel(nn.Module):
    """A model with named adapters; forwards calls to the wrapped model."""

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = AdapterModel(model)
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapters: list[str] = []
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)
        # Show the wrapped model's forward signature (transformers.Trainer reads it to keep the
        # batch columns the model accepts), as PEFT users expect.
        self.forward = functools.wraps(model.forward)(functools.partial(PeftModel._forward, self))

    # -- attribute passthrough -------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0] if self.active_adapters else ""

    def _forward(self, *args, **kwargs):
        # layer call args: keyword arguments adapter layers take (Poly's task_ids) go to them
        with layer_call_args(self.base_model.model, kwargs):
            return self.base_model.model(*args, **kwargs)

    forward = _forward

    def generate(self, *args, **kwargs):
        with layer_call_args(self.base_model.model, kwargs):  # layer call args, as in _forward
            return self.base_model.model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def _layers(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.base_model.model.named_modules():
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                yield name, module

    # -- creating adapters -----------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig) -> None:
        """Inject a new adapter (inactive unless it is the first)."""
        if adapter_name in self.peft_config:
            raise AdapterConfigError(f"adapter {adapter_name!r} already exists; delete it or pick another name")
        method = method_for(peft_config)
        others = {c.peft_type for c in self.peft_config.values()} - {peft_config.peft_type}
        if others:
            raise AdapterConfigError(
                f"adapter {adapter_name!r} is {peft_config.peft_type} but this model holds {sorted(others)[0]} "
                "adapters; one PeftModel holds adapters of one method, as in PEFT")
        config = dataclasses.replace(peft_config)
        model = self.base_model.model
        tuner = method.tuner()
        # a tuner may pick its module paths itself (Llama-Adapter: the attention of the top N layers)
        chosen = tuner.select_targets(model, config) if hasattr(tuner, "select_targets") else None
        if hasattr(tuner, "default_targets") and getattr(config, "target_modules", None) is None:
            config.target_modules = tuner.default_targets(model, config)  # PEFT's per-method defaults
        if getattr(config, "target_modules", None) == "all-linear":
            config.target_modules = linear_module_names(model)
        if chosen is None and getattr(config, "target_modules", None) is None:
            raise AdapterConfigError(
                f"{type(config).__name__}.target_modules is required (a list, a regex or 'all-linear')")
        if config.task_type == "SEQ_CLS":
            saved = getattr(config, "modules_to_save", None) or []
            config.modules_to_save = list(saved) + [h for h in _SEQ_CLS_HEADS if h not in saved]
            if peft_config.target_modules == "all-linear":  # the head trains whole, not as LoRA
                config.target_modules = [t for t in config.target_modules if t not in config.modules_to_save]
        try:
            if hasattr(tuner, "before_inject"):  # shared state (VeRA's projections) on base_model
                tuner.before_inject(self.base_model, adapter_name, config)
            if not self._inject(model, adapter_name, config, tuner, chosen):
                raise AdapterConfigError(
                    f"target modules {config.target_modules!r} matched no supported module of "
                    f"{type(model).__name__}; check the names with model.named_modules()"
                )
        except BaseException:
            self._remove_adapter_everywhere(adapter_name, unwrap_empty=True)
            raise
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapters or [adapter_name])

    def _inject(self, model: nn.Module, adapter_name: str, config: AdapterConfig, tuner: Any,
                chosen: list[str] | None = None) -> int:
        """Wrap every target (``chosen`` paths where the tuner picked them, else ``is_target``)."""
        matched = 0
        for key, module in list(model.named_modules()):
            if not key or self._is_inside_tuner(model, key):
                continue
            saved = getattr(config, "modules_to_save", None)  # a field of most configs, not all
            wrap_save = saved and any(key == name or key.endswith(f".{name}") for name in saved)
            if wrap_save:
                wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
                wrapper.add(adapter_name)
                self._replace(model, key, wrapper)
                continue
            if not (key in chosen if chosen is not None else is_target(key, config)):
                continue
            if isinstance(module, tuner.Layer):
                tuner.add_adapter(module, adapter_name, config, key)
            else:
                self._replace(model, key, tuner.make_layer(module, adapter_name, config, key))
            matched += 1
        return matched

    @staticmethod
    def _is_inside_tuner(model: nn.Module, key: str) -> bool:
        parts = key.split(".")
        module = model
        for part in parts[:-1]:
            module = getattr(module, part)
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                return True
        return False

    @staticmethod
    def _replace(model: nn.Module, key: str, new: nn.Module) -> None:
        parent_name, _, child = key.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)

    # -- activating ------------------------------------------------------------------------
    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter, or several at once (their outputs add up)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise OnnxPeftError(f"unknown adapter {name!r}; loaded: {sorted(self.peft_config)}")
        trainable = any(not self.peft_config[n].inference_mode for n in names)
        self.active_adapters = names
        self._update_trainable(names, trainable)

    def _update_trainable(self, names: list[str], trainable: bool) -> None:
        """Only the active adapters' tensors (and the biases their config names) train."""
        for param in self.base_model.model.parameters():
            param.requires_grad_(False)
        for _, layer in self._layers():
            layer.set_adapter(names, trainable=trainable)
        if not trainable:
            return
        for name in names:
            bias = getattr(self.peft_config[name], "bias", "none")
            if bias == "all":
                for pname, param in self.base_model.model.named_parameters():
                    if pname.endswith(".bias") or pname == "bias":
                        param.requires_grad_(True)
            elif bias.endswith("_only"):  # lora_only, fourier_only, ...: biases of adapted layers
                for _, layer in self._layers():
                    if isinstance(layer, AdapterLayer) and name in layer.adapter_names() and layer.bias is not None:
                        layer.bias.requires_grad_(True)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the ``with`` block."""
        layers = [layer for _, layer in self._layers()]
        for layer in layers:
            layer.disable_adapters = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disable_adapters = False

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise OnnxPeftError(f"unknown adapter {adapter_name!r}; loaded: {sorted(self.peft_config)}")
        self._remove_adapter_everywhere(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.active_adapters = remaining
        if remaining:
            self.set_adapter(remaining)

    def _remove_adapter_everywhere(self, adapter_name: str, unwrap_empty: bool = False) -> None:
        """Delete ``adapter_name`` from every layer; with ``unwrap_empty`` (undoing a failed add
        or load) a wrapper left with no adapter gives its place back to the module it wrapped."""
        model = self.base_model.model
        for key, layer in list(self._layers()):
            layer.delete_adapter(adapter_name)
            if not unwrap_empty or self._is_inside_tuner(model, key):
                continue
            if isinstance(layer, AdapterLayer) and not layer.adapter_names():
                self._replace(model, key, layer.base_layer)
            elif isinstance(layer, ModulesToSaveWrapper) and not len(layer.modules_to_save):
                self._replace(model, key, layer.original_module)

    # -- merging / unloading ---------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        for _, layer in self._layers():
            if isinstance(layer, AdapterLayer):
                layer.merge(adapter_names or list(self.active_adapters), safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for _, layer in self._layers():
            if isinstance(layer, AdapterLayer):
                layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Fold adapters into the base weights and return the plain model."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unload()

    def unload(self) -> nn.Module:
        """Remove all adapters without merging; return the plain base model."""
        self.unmerge_adapter()
        return self._unload()

    def _unload(self, keep_saved_modules: bool = True) -> nn.Module:
        """Put the wrapped modules back; a modules_to_save wrapper leaves its active trained copy
        (PEFT's unload) unless ``keep_saved_modules`` is False (undoing a failed load)."""
        model = self.base_model.model
        for key, layer in list(self._layers()):
            if self._is_inside_tuner(model, key):
                continue
            if isinstance(layer, AdapterLayer):
                new = layer.base_layer
            else:
                new = layer.current() if keep_saved_modules else layer.original_module
            self._replace(model, key, new)
        self.peft_config = {}
        return model

    # -- weighted combination --------------------------------------------------------------
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             density: float | None = None, majority_sign_method: str = "total") -> None:
        """A new adapter that combines ``adapters`` (see onnx_peft.tuners.weighted)."""
        from .tuners.weighted import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                             svd_full_matrices, density, majority_sign_method)

    # -- parameters ------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for param in self.parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

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
                        allow_pickle: bool = False, **kwargs: Any) -> PeftModel:
        """Wrap ``model`` and load the PEFT adapter directory ``model_id`` into it.

        As in PEFT, ``init_lora_weights`` "pissa"/"olora" runs again on load: it turns the
        base weight into the same residual the adapter was trained on (PEFT's PiSSA recipe
        saves ``init_lora_weights=True`` when the residual model itself is shipped).
        """
        config = config or AdapterConfig.from_pretrained(model_id)
        if _prompt_learning(config):  # prompt / prefix methods leave the model's layers alone
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


def get_peft_model(model: nn.Module, peft_config: AdapterConfig, adapter_name: str = "default",
                   **kwargs: Any) -> PeftModel:
    """Wrap ``model`` with a new trainable adapter, like ``peft.get_peft_model``; prompt-learning
    configs give a :class:`~onnx_peft.prompt_model.PromptLearningModel`."""
    if _prompt_learning(peft_config):
        from .prompt_model import PromptLearningModel

        return PromptLearningModel(model, peft_config, adapter_name)
    return PeftModel(model, peft_config, adapter_name)


def _prompt_learning(config: AdapterConfig) -> bool:
    return bool(getattr(method_for(config), "is_prompt_learning", False))
