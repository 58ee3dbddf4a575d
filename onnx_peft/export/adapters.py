"""The adapter side of export: which PEFT folders, which modules they target, whether they
need InsertAdapters, and the PEFT wrapper that carries them while the model is traced.

Heads they train in full (modules_to_save) are in :mod:`.heads`. torch is imported inside
functions only; PEFT models are recognised by their attributes, never by importing ``peft``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import AdapterConfigError, MissingDependencyError, require_torch

AdapterSpec = Mapping[str, "str | os.PathLike[str]"] | Sequence["str | os.PathLike[str]"] | None


def is_peft_model(obj: Any) -> bool:
    """True for a PEFT-style wrapper (ours or Hugging Face's), recognised by attributes only.

    Such a model has ``peft_config``, ``merge_and_unload()`` and ``base_model.model``: the
    transformers model whose target layers carry ``base_layer`` / ``lora_A[name]`` / ``lora_B[name]``.
    """
    base = getattr(obj, "base_model", None)
    return (hasattr(obj, "peft_config") and callable(getattr(obj, "merge_and_unload", None))
            and base is not None and getattr(base, "model", None) is not None)


def transformers_model(model: Any) -> Any:
    """The transformers model inside ``model`` (itself when it is not a PEFT wrapper)."""
    return model.base_model.model if is_peft_model(model) else model




def normalize_adapters(adapters: AdapterSpec) -> dict[str, Path]:
    """``{name: dir}`` from a mapping, or from a list of dirs (named by folder name)."""
    if adapters is None:
        return {}
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    items = adapters.items() if isinstance(adapters, Mapping) else ((Path(a).name, a) for a in adapters)
    out: dict[str, Path] = {}
    for name, directory in items:
        path = Path(directory)
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise AdapterConfigError(f"adapter name {name!r} for {path} is not a plain file name")
        if name in out:
            raise AdapterConfigError(f"adapter name {name!r} is given twice ({out[name]} and {path})")
        if not (path / "adapter_config.json").is_file():
            raise AdapterConfigError(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
        out[name] = path
    return out


def _peft_model_class() -> Any:
    try:
        from ..model import PeftModel
    except ImportError as exc:
        raise MissingDependencyError(
            "loading adapter folders needs onnx_peft.model (the tuners), which this install lacks"
        ) from exc
    return PeftModel


def attach_adapters(model: Any, adapters: Mapping[str, Path]) -> Any:
    """Load adapter folders onto ``model`` (a transformers model or a PEFT wrapper).

    The first adapter is active. ``model`` itself gains adapter layers, so callers pass a model
    they own.
    """
    names = list(adapters)
    if is_peft_model(model):
        peft_model = model
    else:
        peft_model = _peft_model_class().from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        names = names[1:]
    for name in names:
        peft_model.load_adapter(adapters[name], adapter_name=name)
    if hasattr(peft_model, "set_adapter"):
        peft_model.set_adapter(next(iter(adapters)))
    return peft_model.eval()


def _adapter_layer_types() -> tuple[type, ...]:
    torch = require_torch()
    types: list[type] = [torch.nn.Linear, torch.nn.Embedding]
    with contextlib.suppress(ImportError):
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    return tuple(types)


def union_targets(model: Any, adapters: Mapping[str, Path]) -> tuple[list[str], int, bool]:
    """Module paths targeted by any of ``adapters``, the largest rank, and whether a Conv1D is hit.

    Used to build one model whose adapter slots fit every adapter: ranks may differ because
    the extract pass makes the rank dimension symbolic.
    """
    from ..config import AdapterConfig
    from ..targets import is_target

    configs = {}
    for name, path in adapters.items():
        config = AdapterConfig.from_pretrained(path)
        if config.target_modules == "all-linear":  # resolved as get_peft_model resolves it
            from ..model import linear_module_names

            config = dataclasses.replace(config, target_modules=linear_module_names(model))
        configs[name] = config
    layer_types = _adapter_layer_types()
    targets, conv1d, max_rank = [], False, 1
    for path, module in model.named_modules():
        if not path or not isinstance(module, layer_types):
            continue
        hits = [c for c in configs.values() if is_target(path, c)]
        if hits:
            targets.append(path)
            conv1d |= type(module).__name__ == "Conv1D"
            max_rank = max(max_rank, *(c.rank_for(path) for c in hits))
    if not targets:
        raise AdapterConfigError(
            f"adapters {', '.join(str(p) for p in adapters.values())} target no layer of "
            f"{type(model).__name__}; were they trained on another model?"
        )
    return targets, max_rank, conv1d


def slot_model(model: Any, adapters: Mapping[str, Path]) -> Any:
    """A PEFT wrapper with one LoRA branch on every module any adapter targets.

    Its weights are placeholders (random, alpha = r so the scale is 1): the extract pass turns
    them into slots and each real adapter is converted to fit.
    """
    from ..methods.lora import LoraConfig

    targets, rank, conv1d = union_targets(model, adapters)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False,
                        fan_in_fan_out=conv1d)
    from ..model import get_peft_model

    return get_peft_model(model, config).eval()


def needs_insert(adapters: Mapping[str, Path]) -> bool:
    """True when some adapter is not plain LoRA (another method, or DoRA): such adapters reach a
    slot model by exporting the base and inserting their branches (one graph form per method)."""
    from ..config import AdapterConfig

    for path in adapters.values():
        config = AdapterConfig.from_pretrained(path)
        if config.peft_type != "LORA" or getattr(config, "use_dora", False) \
                or getattr(config, "trainable_token_indices", None):  # token rows: an embedding form
            return True
    return False


def _layer_features(layer: Any) -> tuple[int, int] | None:
    """``(in, out)`` of a Linear / transformers Conv1D (an adapter wrapper: its base layer)."""
    layer = getattr(layer, "base_layer", layer)
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return int(layer.in_features), int(layer.out_features)
    if type(layer).__name__ == "Conv1D" and getattr(layer, "weight", None) is not None:
        return int(layer.weight.shape[0]), int(layer.weight.shape[1])
    return None


def check_adapters_fit(model: Any, adapters: Mapping[str, Path]) -> None:
    """Refuse an adapter trained on layers of other sizes before anything is traced, naming the
    module and both sizes (the ONNX checks would only say so after the export, in slot shapes)."""
    from ..errors import IncompatibleAdapterError
    from ..formats import read_peft_adapter
    from ..methods.base import method_for

    for path in adapters.values():
        config, tensors = read_peft_adapter(path)
        method = method_for(config)
        if getattr(method, "is_prompt_learning", False):
            continue
        grouped = method.group(tensors, str(path), getattr(config, "modules_to_save", None) or ())
        for module_path, parts in sorted(grouped.modules.items()):
            wanted = method.features(config, module_path, parts)
            try:
                layer = model.get_submodule(module_path)
            except AttributeError:
                continue  # mapped to the graph by suffix later
            have = _layer_features(layer)
            if wanted is not None and have is not None and tuple(wanted) != have:
                raise IncompatibleAdapterError(
                    f"{path}: module {module_path} was trained as {wanted[0]} -> {wanted[1]} features, the model's "
                    f"is {have[0]} -> {have[1]}; the adapter belongs to another base model")
