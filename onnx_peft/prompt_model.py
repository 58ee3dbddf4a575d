"""The PyTorch model of prompt-learning adapters (prompt / prefix / p-tuning / multitask).

PEFT's ``PeftModel`` for these methods leaves the base model untouched and feeds it extra
inputs; so does this one, with PEFT's module names (``prompt_encoder.<adapter>.embedding``),
checkpoint keys (``prompt_embeddings``) and input conventions, so outputs and greedy
``generate`` match PEFT's token for token:

    prompt kind:  inputs_embeds = concat(P [b, p, h], embed(input_ids))   mask: p ones prepended
                  labels: p times -100 prepended; position_ids dropped (positions count the prompt)
    prefix kind:  past_key_values = the prefix (per layer [b, kv_heads, p, head_dim])
                  mask: p ones prepended; position_ids shifted by p

Outputs cover the virtual tokens too for the prompt kind (``logits [b, p + s, vocab]``), as PEFT's.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_adapter_weights, save_adapter_dir
from .config import AdapterConfig
from .errors import AdapterConfigError, CheckpointError, IncompatibleAdapterError, OnnxPeftError
from .methods.base import method_for
from .methods.prompt_learning import PromptLearningConfig, prefix_pairs  # noqa: F401  (prefix_pairs: numpy twin)

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION", None)
CLASSIFIER_HEADS = ["classifier", "score"]  # PEFT trains these in full for SEQ_CLS (modules_to_save)


class PromptLearningModel(nn.Module):
    """A frozen transformers model plus named prompt-learning adapters (one active at a time)."""

    def __init__(self, model: nn.Module, config: PromptLearningConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, PromptLearningConfig] = {}
        self.prompt_encoder = nn.ModuleDict()
        self.active_adapter = adapter_name
        self._disabled = False
        for param in model.parameters():
            param.requires_grad_(False)
        self.add_adapter(adapter_name, config)
        self.forward = functools.wraps(model.forward)(functools.partial(PromptLearningModel._forward, self))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- adapters --------------------------------------------------------------------------------
    @property
    def active_peft_config(self) -> PromptLearningConfig:
        return self.peft_config[self.active_adapter]

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    @property
    def word_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def add_adapter(self, adapter_name: str, peft_config: PromptLearningConfig) -> None:
        if adapter_name in self.peft_config:
            raise OnnxPeftError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
        if peft_config.task_type not in TASK_TYPES:
            raise AdapterConfigError(f"{type(peft_config).__name__}.task_type={peft_config.task_type!r}: prompt learning "
                                     f"supports {[t for t in TASK_TYPES if t]} here")
        config = copy.deepcopy(peft_config)
        config.prepare(self.base_model.config)
        _check_fits(config, self.base_model)
        embeddings = self.word_embeddings
        encoder = method_for(config).tuner().make_encoder(config, embeddings)
        encoder.to(embeddings.weight.device)
        for param in encoder.parameters():
            param.requires_grad_(param.requires_grad and not config.inference_mode)  # CPT freezes its table
        self.peft_config[adapter_name] = config
        self.prompt_encoder[adapter_name] = encoder
        self._add_saved_modules(adapter_name, config)

    def _add_saved_modules(self, adapter_name: str, config: PromptLearningConfig) -> None:
        """PEFT's sequence classification trains the head in full: a copy per adapter
        (``ModulesToSaveWrapper``), saved as ``base_model.<head>.weight``."""
        from .tuners.base import ModulesToSaveWrapper

        if config.task_type == "SEQ_CLS":
            config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *CLASSIFIER_HEADS]))
        for key, module in list(self.base_model.named_modules()):
            if not key or not any(key == m or key.endswith("." + m) for m in config.modules_to_save or ()):
                continue
            if isinstance(module, ModulesToSaveWrapper) or ".modules_to_save." in key or ".original_module" in key:
                continue
            parent_name, _, child = key.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            setattr(parent, child, ModulesToSaveWrapper(module))
        for wrapper in self._saved_wrappers().values():
            if config.modules_to_save and any(wrapper is w for w in self._saved_wrappers().values()):
                wrapper.add(adapter_name)
                wrapper.set_adapter(self.active_adapter, trainable=not config.inference_mode)

    def _saved_wrappers(self) -> dict[str, nn.Module]:
        from .tuners.base import ModulesToSaveWrapper

        return {k: m for k, m in self.base_model.named_modules() if isinstance(m, ModulesToSaveWrapper)}

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise OnnxPeftError(f"unknown adapter {adapter_name!r}; loaded: {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        for wrapper in self._saved_wrappers().values():
            wrapper.set_adapter(adapter_name, trainable=not self.peft_config[adapter_name].inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise OnnxPeftError(f"unknown adapter {adapter_name!r}; loaded: {sorted(self.peft_config)}")
        del self.peft_config[adapter_name], self.prompt_encoder[adapter_name]
        for wrapper in self._saved_wrappers().values():
            wrapper.delete_adapter(adapter_name)
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), "")

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the block (PEFT's verb)."""
        self._disabled = True
        wrappers = self._saved_wrappers().values()
        for wrapper in wrappers:
            wrapper.disable_adapters = True
        try:
            yield
        finally:
            self._disabled = False
            for wrapper in wrappers:
                wrapper.disable_adapters = False

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise AdapterConfigError(method_for(self.active_peft_config).no_merge_message())

    merge_adapter = merge_and_unload

    def unload(self) -> nn.Module:
        """The base model without any adapter (it was never modified)."""
        return self.base_model

    # -- the prompt ------------------------------------------------------------------------------
    def get_prompt(self, batch_size: int, task_ids: torch.Tensor | None = None) -> Any:
        """Virtual tokens ``[b, p, h]`` (prompt kind) or a transformers Cache holding the prefix."""
        config = self.active_peft_config
        encoder = self.prompt_encoder[self.active_adapter]
        values = encoder.prompt(batch_size, task_ids, inference=config.inference_mode)
        dtype = self.word_embeddings.weight.dtype
        if method_for(config).kind != "prefix":
            return values
        heads = config.num_attention_heads
        cube = values.to(dtype).reshape(batch_size, config.num_virtual_tokens, config.num_layers * 2, heads,
                                        config.token_dim // heads).permute(2, 0, 3, 1, 4)
        from .export.spec import make_cache

        return make_cache(self.base_model.config, [(cube[2 * i], cube[2 * i + 1]) for i in range(config.num_layers)])

    def _forward(self, input_ids: Any = None, attention_mask: Any = None, inputs_embeds: Any = None,
                 labels: Any = None, task_ids: Any = None, **kwargs: Any) -> Any:
        if self._disabled:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   labels=labels, **kwargs)
        config = self.active_peft_config
        # -- CPT (tuners/cpt.py): its own labels, input_type_mask and loss ---------------------
        if config.peft_type == "CPT":
            from .tuners.cpt import cpt_forward

            return cpt_forward(self, input_ids, attention_mask, inputs_embeds, labels, task_ids, **kwargs)
        # -- end CPT ---------------------------------------------------------------------------
        kind = method_for(config).kind
        p = config.num_virtual_tokens
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if labels is not None and config.task_type != "SEQ_CLS":
            kwargs["labels"] = labels if kind == "prefix" else \
                torch.cat([torch.full((batch, p), -100, device=labels.device, dtype=labels.dtype), labels], dim=1)
        elif labels is not None:
            kwargs["labels"] = labels
        if attention_mask is not None:
            ones = torch.ones(batch, p, device=attention_mask.device, dtype=attention_mask.dtype)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        self._adjust_kwargs(config, kind, batch, kwargs)
        if kind == "prefix":
            kwargs["past_key_values"] = self.get_prompt(batch)
            return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   **kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        prompts = self.get_prompt(batch, task_ids).to(inputs_embeds.dtype)
        return self.base_model(inputs_embeds=torch.cat([prompts, inputs_embeds], dim=1),
                               attention_mask=attention_mask, **kwargs)

    forward = _forward

    @staticmethod
    def _adjust_kwargs(config: PromptLearningConfig, kind: str, batch: int, kwargs: dict[str, Any]) -> None:
        """PEFT's rules: prefix positions move by ``p``, prompt positions are recomputed; token types
        survive only for sequence classification (zeros for the virtual tokens)."""
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens if kind == "prefix" else None
        types = kwargs.get("token_type_ids")
        if types is not None:
            if config.task_type != "SEQ_CLS":
                kwargs["token_type_ids"] = None
            elif kind != "prefix":
                zeros = torch.zeros(batch, config.num_virtual_tokens, dtype=types.dtype, device=types.device)
                kwargs["token_type_ids"] = torch.cat([zeros, types], dim=1)

    # -- generation ------------------------------------------------------------------------------
    def generate(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        """The base model's ``generate`` with the prompt injected at prefill (PEFT's hooks)."""
        if self._disabled:
            return self.base_model.generate(*args, **kwargs)
        base = self.base_model
        original = base.prepare_inputs_for_generation
        base.prepare_inputs_for_generation = functools.partial(self._prepare_for_generation, original, task_ids)
        try:
            return base.generate(*args, **kwargs)
        finally:
            base.prepare_inputs_for_generation = original

    def _prepare_for_generation(self, original: Any, task_ids: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        config = self.active_peft_config
        kind = method_for(config).kind
        p = config.num_virtual_tokens
        model_kwargs = original(*args, **kwargs)
        positions = model_kwargs.get("cache_position")
        prefill = positions is not None and int(positions[0]) == 0
        # transformers 5 calls the cache "cache" (PEFT 0.21 still looks for "past_key_values" and so
        # re-injects the prompt at every decode step; we inject it once, as its forward implies)
        cache_key = "cache" if "cache" in model_kwargs else "past_key_values"
        cache = model_kwargs.get(cache_key)
        ids = model_kwargs["input_ids"]
        if cache is not None and cache.get_seq_length() >= ids.shape[1]:
            ids = model_kwargs["input_ids"] = ids[:, -1:]
        mask = model_kwargs.get("attention_mask")
        if isinstance(mask, dict):
            mask = next(iter(mask.values())) if len(mask) == 1 else None
        if mask is not None:
            if mask.dim() != 2:
                raise OnnxPeftError("prompt-learning generate needs a 2-D attention mask")
            ones = torch.ones(ids.shape[0], p, dtype=mask.dtype, device=mask.device)
            model_kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)
        self._adjust_kwargs(config, kind, ids.shape[0], model_kwargs)
        if cache is None or not cache.get_seq_length():
            if kind == "prefix":
                model_kwargs[cache_key] = self.get_prompt(ids.shape[0])
            else:
                embeds = self.word_embeddings(ids)
                prompts = self.get_prompt(ids.shape[0], task_ids).to(embeds.dtype)
                model_kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
                model_kwargs["input_ids"] = None
        if kind == "prefix" and prefill:
            model_kwargs["cache_position"] = model_kwargs["cache_position"] + p
        elif kind != "prefix":
            model_kwargs.pop("cache_position", None)
        return model_kwargs

    # -- checkpoints -----------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """PEFT's keys: ``prompt_embeddings`` (the encoder's output when training through one), and
        ``base_model.<head>.weight`` for heads trained in full."""
        tensors = dict(self.prompt_encoder[adapter_name].to_save(self.peft_config[adapter_name].inference_mode))
        for path, wrapper in self._saved_wrappers().items():
            if adapter_name in wrapper.modules_to_save:
                for name, value in wrapper.modules_to_save[adapter_name].state_dict().items():
                    tensors[f"base_model.{path}.{name}"] = value.detach()
        return tensors

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        **kwargs: Any) -> None:
        """PEFT layout: "default" in ``save_directory``, other adapters in subfolders."""
        for name in selected_adapters or list(self.peft_config):
            if name not in self.peft_config:
                raise OnnxPeftError(f"unknown adapter {name!r}; loaded: {sorted(self.peft_config)}")
            target = Path(save_directory) if name == "default" else Path(save_directory) / name
            config = dataclasses.replace(self.peft_config[name], inference_mode=True)
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = getattr(self.base_model.config, "_name_or_path", None) or None
            save_adapter_dir(target, config, {k: v.contiguous() for k, v in self.adapter_state_dict(name).items()})

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: AdapterConfig | None = None,
                        allow_pickle: bool = False, **kwargs: Any) -> PromptLearningModel:
        config = dataclasses.replace(config or AdapterConfig.from_pretrained(model_id), inference_mode=not is_trainable)
        wrapped = cls(model, config, adapter_name)
        wrapped._load_weights(model_id, adapter_name, allow_pickle)
        if not is_trainable:
            wrapped.eval()
        return wrapped

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     allow_pickle: bool = False, **kwargs: Any) -> None:
        config = dataclasses.replace(AdapterConfig.from_pretrained(model_id), inference_mode=not is_trainable)
        self.add_adapter(adapter_name, config)
        try:
            self._load_weights(model_id, adapter_name, allow_pickle)
        except OnnxPeftError:
            self.delete_adapter(adapter_name)
            raise

    def _load_weights(self, model_id: str | os.PathLike, adapter_name: str, allow_pickle: bool) -> None:
        config = self.peft_config[adapter_name]
        arrays = load_adapter_weights(model_id, allow_pickle=allow_pickle)
        grouped = method_for(config).group(arrays, source=str(model_id), saved_modules=config.modules_to_save or ())
        self.prompt_encoder[adapter_name].load({k: torch.from_numpy(v.astype("float32"))
                                                for k, v in grouped.shared.items()})
        wrappers = self._saved_wrappers()
        for path, parts in grouped.full.items():
            copy_ = wrappers.get(path)
            if copy_ is None or adapter_name not in copy_.modules_to_save:
                raise CheckpointError(f"{model_id}: holds a trained {path!r} but the model has no such head to train")
            state = copy_.modules_to_save[adapter_name].state_dict()
            for part, value in parts.items():
                if tuple(state[part].shape) != tuple(value.shape):
                    raise CheckpointError(f"{model_id}: {path}.{part} has shape {list(value.shape)}, the model's is "
                                          f"{list(state[part].shape)}; load the model with the adapter's num_labels")
            copy_.modules_to_save[adapter_name].load_state_dict(
                {k: torch.from_numpy(v.astype("float32")) for k, v in parts.items()}, strict=False)


def _check_fits(config: PromptLearningConfig, model: nn.Module) -> None:
    """An adapter whose config says another hidden size or layer count fails here, in model terms."""
    method = method_for(config)
    name = type(config).__name__
    if method.kind == "prompt":
        width = model.get_input_embeddings().weight.shape[1]
        if config.token_dim != width:
            raise IncompatibleAdapterError(f"{name}.token_dim={config.token_dim} but the model's hidden size is {width}; "
                                           "the adapter was trained for another base model")
        return
    fresh = type(config)(num_virtual_tokens=1)
    fresh.prepare(model.config)
    for field_name in ("num_layers", "token_dim", "num_attention_heads"):
        if getattr(config, field_name) != getattr(fresh, field_name):
            raise IncompatibleAdapterError(
                f"{name}.{field_name}={getattr(config, field_name)} but the model's is {getattr(fresh, field_name)}; "
                "the prefix was trained for another base model")
