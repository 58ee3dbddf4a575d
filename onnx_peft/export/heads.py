"""Heads the adapters train in full (PEFT ``modules_to_save``, e.g. a classifier), served as
full-weight slots: which Linears they are, how many labels they have, and how a PEFT model's
own trained head reaches its adapter file while the base head stays in the graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import AdapterConfigError, require_torch

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
    from ..config import AdapterConfig

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

    from ..formats import load_adapter_file, save_adapter_file
    from ..graph.contract import read_contract
    from ..graph.io import load_model

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
    from ..checkpoint import read_label_names

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
            for key in (f"base_model.model.{head}.weight", f"base_model.model.{head}.out_proj.weight",
                        f"base_model.{head}.weight"):  # the last: prompt-learning checkpoints
                if key in keys:
                    return int(handle.get_slice(key).get_shape()[0])
    return None


