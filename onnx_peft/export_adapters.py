"""The adapter side of export: which PEFT folders, which modules they target, which heads they
train in full, and the PEFT wrapper that carries them while the model is traced.

Split from :mod:`onnx_peft.export` (tracing, modes, the output folder). torch is imported inside
functions only; PEFT models are recognised by their attributes, never by importing ``peft``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import AdapterConfigError, MissingDependencyError, require_torch

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
        from .model import PeftModel
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
    from .config import AdapterConfig
    from .targets import is_target

    configs = {}
    for name, path in adapters.items():
        config = AdapterConfig.from_pretrained(path)
        if config.target_modules == "all-linear":  # resolved as get_peft_model resolves it
            from .model import linear_module_names

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


_SEQ_CLS_HEADS = ("classifier", "score")  # PEFT adds these to modules_to_save for task_type SEQ_CLS


def _modules_to_save(config: Any) -> list[str]:
    names = list(getattr(config, "modules_to_save", None) or [])
    if getattr(config, "task_type", None) == "SEQ_CLS":
        names += [h for h in _SEQ_CLS_HEADS if h not in names]
    return names


def full_weight_modules(model: Any, adapters: Mapping[str, Path]) -> tuple[list[str], list[str]]:
    """Linear modules the adapters train in full (PEFT ``modules_to_save``), and those with a bias.

    Each becomes a full-weight slot (``<module>.weight`` / ``.bias``, default = the base's).
    A modules_to_save module made of Linears only (RoBERTa's ``classifier``: dense, out_proj)
    gives its Linears; anything else (an embedding, a LayerNorm) raises AdapterConfigError,
    since its trained copy would otherwise be silently dropped.
    """
    from .config import AdapterConfig

    modules: dict[str, bool] = {}
    for path in adapters.values():
        config = AdapterConfig.from_pretrained(path)
        wanted = _modules_to_save(config)
        for key, module in model.named_modules():
            if key and any(key == w or key.endswith(f".{w}") for w in wanted):
                for linear_path, linear in _linear_parts(key, module, str(path)).items():
                    modules[linear_path] = linear.bias is not None
    return list(modules), [m for m, has_bias in modules.items() if has_bias]


def _linear_parts(key: str, module: Any, source: str) -> dict[str, Any]:
    """``{path: Linear}`` of a modules_to_save module made of Linears only, else AdapterConfigError."""
    torch = require_torch()
    linears = {f"{key}.{sub}" if sub else key: m for sub, m in module.named_modules() if type(m) is torch.nn.Linear}
    owned = {id(p) for m in linears.values() for p in m.parameters()}
    stray = [n for n, p in module.named_parameters() if id(p) not in owned]
    if not linears or stray:
        raise AdapterConfigError(
            f"{source}: modules_to_save module {key!r} ({type(module).__name__}) is not a Linear"
            f"{f' (parameter {stray[0]!r})' if stray else ''}; only Linear heads can be served as "
            "swappable slots. Export this adapter with mode='merged' or 'in-graph'"
        )
    return linears


def saved_heads(model: Any) -> dict[str, tuple[Any, Any]]:
    """``{path: (wrapper, trained copy)}`` of the modules_to_save wrappers in a PEFT model
    (ours or Hugging Face's, recognised by ``original_module``/``modules_to_save``) with an
    active trained copy."""
    heads = {}
    for path, module in model.named_modules():
        if not (hasattr(module, "original_module") and hasattr(module, "modules_to_save")):
            continue
        active = getattr(module, "active_adapter", None)
        if isinstance(active, (list, tuple)):
            active = active[0] if active else None
        if active is None or active not in module.modules_to_save or getattr(module, "disable_adapters", False):
            continue
        heads[path] = (module, module.modules_to_save[active])
    return heads


def _head_slots(heads: Mapping[str, tuple[Any, Any]]) -> tuple[list[str], list[str]]:
    """full_weight_modules / full_weight_biases for the heads of :func:`saved_heads`."""
    modules: dict[str, bool] = {}
    for path, (wrapper, _) in heads.items():
        for linear_path, linear in _linear_parts(path, wrapper.original_module, "model").items():
            modules[linear_path] = linear.bias is not None
    return list(modules), [m for m, has_bias in modules.items() if has_bias]


@contextlib.contextmanager
def _base_heads(model: Any, heads: Mapping[str, tuple[Any, Any]]) -> Iterator[None]:
    """Trace each wrapped head's base module in place of its wrapper (restored afterwards), so
    the graph holds the base head under the head's own path (``classifier``)."""
    swapped = []
    try:
        for path, (wrapper, _) in heads.items():
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            parent._modules[name] = wrapper.original_module
            swapped.append((parent, name, wrapper))
        yield
    finally:
        for parent, name, wrapper in swapped:
            parent._modules[name] = wrapper


def _write_trained_heads(adapter_file: Path, model_path: Path, heads: Mapping[str, tuple[Any, Any]]) -> None:
    """Put the trained heads into the extracted adapter file (which holds the base heads)."""
    import numpy as np

    from .formats import load_adapter_file, save_adapter_file
    from .graph.contract import read_contract
    from .graph.io import load_model

    slots = read_contract(load_model(model_path).metadata_props).slot_map()
    tensors, fingerprint = load_adapter_file(adapter_file)
    for path, (_, trained) in heads.items():
        for linear_path, linear in _linear_parts(path, trained, "model").items():
            for part in ("weight", "bias"):
                slot = slots.get(f"{linear_path}.{part}")
                tensor = getattr(linear, part)
                if slot is None or tensor is None:
                    continue
                array = tensor.detach().float().cpu().numpy()
                array = array.T if slot.layout == "in_out" else array
                tensors[slot.name] = np.ascontiguousarray(array).astype(slot.dtype)
    save_adapter_file(adapter_file, tensors, fingerprint)


def adapter_num_labels(adapters: Mapping[str, Path]) -> int | None:
    """The classifier size the adapters were trained with, or None when none of them says.

    Read from ``labels.json`` (written by onnx_peft.training) or else from the head's shape in
    ``adapter_model.safetensors`` (``base_model.model.classifier.weight`` [num_labels, hidden]).
    All adapters that say must agree.
    """
    found: dict[str, tuple[int, Path]] = {}
    for name, path in adapters.items():
        count = _labels_of(path)
        if count is not None:
            found[name] = (count, path)
    if not found:
        return None
    first, first_path = next(iter(found.values()))
    for count, path in found.values():
        if count != first:
            raise AdapterConfigError(f"adapters disagree on the number of labels: {first_path} has {first}, "
                                     f"{path} has {count}; one model serves heads of one size only")
    return first


def _labels_of(path: Path) -> int | None:
    from .checkpoint import read_label_names

    names = read_label_names(path)
    if names is not None:
        return len(names)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="np") as handle:
        keys = set(handle.keys())
        for head in _SEQ_CLS_HEADS:
            for key in (f"base_model.model.{head}.weight", f"base_model.model.{head}.out_proj.weight"):
                if key in keys:
                    return int(handle.get_slice(key).get_shape()[0])
    return None


def slot_model(model: Any, adapters: Mapping[str, Path]) -> Any:
    """A PEFT wrapper with one LoRA branch on every module any adapter targets.

    Its weights are placeholders (random, alpha = r so the scale is 1): the extract pass turns
    them into slots and each real adapter is converted to fit.
    """
    from .methods.lora import LoraConfig

    targets, rank, conv1d = union_targets(model, adapters)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False,
                        fan_in_fan_out=conv1d)
    from .model import get_peft_model

    return get_peft_model(model, config).eval()


def needs_insert(adapters: Mapping[str, Path]) -> bool:
    """True when some adapter is not plain LoRA (another method, or DoRA): such adapters reach a
    slot model by exporting the base and inserting their branches (one graph form per method)."""
    from .config import AdapterConfig

    for path in adapters.values():
        config = AdapterConfig.from_pretrained(path)
        if config.peft_type != "LORA" or getattr(config, "use_dora", False):
            return True
    return False
