"""get_peft_model / PeftModel: inject adapters into a PyTorch model and manage them.

Same names and behaviour as Hugging Face PEFT, so a PEFT user changes only the import. The
module tree also matches PEFT's (``base_model.model.<path>.lora_A.default.weight``), which
keeps state dicts, exported node names and checkpoints interchangeable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

from torch import nn

from .config import AdapterConfig
from .errors import AdapterConfigError, OnnxPeftError
from .methods.base import method_for
from .model_checkpoint import PeftCheckpoints, peft_key  # noqa: F401  (peft_key: public here too)
from .quant.layers import is_quantized_linear
from .targets import is_target
from .tuners.base import AdapterLayer, ModulesToSaveWrapper, layer_call_args

_SEQ_CLS_HEADS = ["classifier", "score"]


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


class PeftModel(PeftCheckpoints, nn.Module):
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
