"""Exporting prompt-learning adapters: a prompt-ready base graph plus adapter files.

Prompt, prefix, p-tuning and multitask adapters change no weight, so every mode exports the
same graph (export/prompt_spec.py) and differs only in where the adapter goes:

    inputs    empty defaults (the graph is the base); each adapter -> adapters/NAME.onnx_adapter
    in-graph  the adapter's tensors become the defaults (no feed = the adapter; feeds override)
    merged / external    refused: there is no weight to merge or to move out
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AdapterConfigError, OnnxPeftError
from ..prompt_feeds import PROMPT_KEY, PromptAdapter, PromptLayout, adapter_from_peft, prefix_names
from .exporter import _io_info, run_exporter, weight_bytes
from .heads import _base_heads, saved_heads
from .output import (
    ADAPTER_DIR,
    EXTERNAL_DATA_BYTES,
    INFO_FILE,
    MODEL_FILE,
    _install,
    staging_folder,
)
from .prompt_spec import PREFIX_MASK, PROMPT_INPUTS, prefix_geometry, prompt_ready_spec


def is_prompt_model(model: Any) -> bool:
    from ..prompt_model import PromptLearningModel

    return isinstance(model, PromptLearningModel)


def prompt_adapter_dirs(adapters: Mapping[str, Path]) -> dict[str, Any]:
    """``{name: config}`` of the named adapters that are prompt-learning ones."""
    from ..config import AdapterConfig
    from ..methods.base import method_for

    configs = {name: AdapterConfig.from_pretrained(path) for name, path in adapters.items()}
    return {n: c for n, c in configs.items() if getattr(method_for(c), "is_prompt_learning", False)}


def _adapters_of_model(model: Any, dtype: str) -> dict[str, PromptAdapter]:
    """A PromptLearningModel's own adapters, as the tensors PEFT would save."""
    out = {}
    for name, config in model.peft_config.items():
        tensors = {k: v.detach().float().cpu().numpy() for k, v in model.adapter_state_dict(name).items()}
        out[name] = adapter_from_peft(config, tensors, dtype, f"adapter {name!r}")
    return out


def _adapters_of_dirs(adapters: Mapping[str, Path], dtype: str) -> dict[str, PromptAdapter]:
    from ..formats import read_peft_adapter

    out = {}
    for name, path in adapters.items():
        config, tensors = read_peft_adapter(path)
        out[name] = adapter_from_peft(config, tensors, dtype, str(path))
    return out


def export_prompt(model_or_dir: Any, output_dir: Path, adapters: Mapping[str, Path], task: str, mode: str,
                  dtype: str, opset: int | None, external_data: bool | None, load: Any) -> tuple[dict, Path]:
    """Export a prompt-ready graph and the prompt adapters; returns (info, tmp folder to install).

    ``load(model_or_dir, task)`` gives ``(transformers model, task, source)`` (the caller's loader).
    """
    if mode in ("merged", "external"):
        from ..methods.base import method_for

        configs = list(prompt_adapter_dirs(adapters).values()) if adapters else \
            list(model_or_dir.peft_config.values())
        reason = method_for(configs[0]).no_merge_message()
        raise AdapterConfigError(f"mode {mode!r}: {reason}")
    if is_prompt_model(model_or_dir) and adapters:
        raise AdapterConfigError("pass either a prompt-learning model or adapters=, not both")
    np_dtype = "float16" if dtype == "fp16" else "float32"
    module, task, source = load(model_or_dir.base_model if is_prompt_model(model_or_dir) else model_or_dir, task)
    if task not in ("causal-lm", "causal-lm-with-past", "feature-extraction", "sequence-classification"):
        raise AdapterConfigError(f"prompt-learning adapters export for causal-lm(-with-past), feature-extraction "
                                 f"and sequence-classification models; got task {task!r}")
    found = _adapters_of_model(model_or_dir, np_dtype) if is_prompt_model(model_or_dir) \
        else _adapters_of_dirs(adapters, np_dtype)
    if mode == "in-graph" and len(found) != 1:
        raise AdapterConfigError(f"mode 'in-graph' exports one adapter, got {len(found)}; use mode='inputs'")
    spec = prompt_ready_spec(module, task)
    layers = spec.info["prompt"]["prefix_layers"]
    text = module.config.get_text_config() if hasattr(module.config, "get_text_config") else module.config
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 0
    layout = PromptLayout(hidden=int(module.get_input_embeddings().weight.shape[1]), dtype=np_dtype, task=task,
                          max_positions=int(limit))
    if task == "causal-lm-with-past" or layers:
        layout.layers, layout.heads, layout.head_dim = prefix_geometry(module)
        layout.prefix_via = "past" if task == "causal-lm-with-past" else "inputs"
    for adapter in found.values():
        adapter.check(layout)
    if mode == "in-graph" and layout.prefix_via == "past" and next(iter(found.values())).kind == "prefix":
        raise AdapterConfigError("a prefix adapter cannot be baked into a causal-lm-with-past graph (its prefix is "
                                 "the past the runtime feeds); use mode='inputs'")
    tmp = staging_folder(output_dir)  # named, umask-honouring; a killed run's is cleaned by the next
    try:
        model_path = tmp / MODEL_FILE
        if external_data is None:
            external_data = weight_bytes(module) > EXTERNAL_DATA_BYTES
        training = module.training
        module.eval()
        baked = next(iter(found.values())) if mode == "in-graph" else None
        heads = saved_heads(module) if mode == "inputs" else {}  # trace the base head; trained ones go in files
        try:
            with _base_heads(module, heads), _trained_heads(module, baked):
                exporter = run_exporter(module, spec, model_path, opset, external_data)
        finally:
            module.train(training)
        _finish_graph(model_path, layout, baked)
        if mode == "inputs" and any(a.heads for a in found.values()):
            _head_slots_for(model_path, found)
        written = {}
        if mode == "inputs":
            from ..formats import save_adapter_file

            (tmp / ADAPTER_DIR).mkdir()
            for name, adapter in found.items():
                save_adapter_file(tmp / ADAPTER_DIR / f"{name}.onnx_adapter", adapter.tensors())
                written[name] = f"{ADAPTER_DIR}/{name}.onnx_adapter"
        info_inputs, info_outputs = _io_info(model_path)
        info = {"task": task, "mode": mode, "dtype": dtype, "opset": opset, "exporter": exporter,
                "architecture": type(module).__name__, "model_type": getattr(module.config, "model_type", None),
                "source": source, "external_data": (tmp / (MODEL_FILE + ".data")).exists(),
                "adapters": written or sorted(found), "prompt": json.loads(layout.to_json()),
                "inputs": info_inputs, "outputs": info_outputs,
                **{k: v for k, v in spec.info.items() if k not in ("output_dims", "prompt")}}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _install(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info, output_dir / MODEL_FILE


def _finish_graph(model_path: Path, layout: PromptLayout, baked: PromptAdapter | None) -> None:
    """Give the prompt inputs their defaults (empty, or ``baked``'s tensors) and record the layout."""
    import onnx_ir as ir

    from ..graph.io import load_model, save_model

    model = load_model(model_path)
    graph = model.graph
    dtype = np.dtype(layout.dtype)
    defaults: dict[str, np.ndarray] = {
        PROMPT_INPUTS[0]: np.zeros((1, 0, layout.hidden), dtype), PROMPT_INPUTS[1]: np.zeros((1, 0), np.int64)}
    if layout.prefix_via == "inputs":
        defaults.update({n: np.zeros((1, layout.heads, 0, layout.head_dim), dtype) for n in prefix_names(layout.layers)})
        defaults[PREFIX_MASK] = np.zeros((1, 0), np.int64)
    if baked is not None:
        tensors = {k: v for k, v in baked.tensors().items() if k not in baked.heads}
        if baked.tasks > 1:
            raise AdapterConfigError(f"{baked.label}: a multitask prompt ({baked.tasks} tasks) cannot be baked in; "
                                     "use mode='inputs' and pass task_ids at run time")
        defaults.update(tensors)
    inputs = {value.name: value for value in graph.inputs}
    for name, array in defaults.items():
        value = inputs.get(name)
        if value is None:
            raise OnnxPeftError(f"{model_path}: the exported graph has no input {name!r}")
        value.const_value = ir.tensor(np.ascontiguousarray(array), name=name)
        graph.register_initializer(value)
    model.metadata_props[PROMPT_KEY] = layout.to_json()
    staging = model_path.parent / ".prompt"  # same file names, so external-data references hold
    data = model_path.parent / (model_path.name + ".data")
    save_model(model, staging / model_path.name, external_data=data.exists())
    del model, graph, inputs
    for written in staging.iterdir():
        os.replace(written, model_path.parent / written.name)
    staging.rmdir()


@contextlib.contextmanager
def _trained_heads(module: Any, adapter: PromptAdapter | None) -> Iterator[None]:
    """in-graph: trace the adapter's trained heads (a PEFT dir's ``base_model.<head>.weight``) in
    place of the base model's, restored afterwards."""
    import torch

    saved = {}
    try:
        for name, array in (adapter.heads if adapter is not None else {}).items():
            param = module.get_parameter(name)
            if tuple(param.shape) != array.shape:
                raise AdapterConfigError(f"{adapter.label}: {name} has shape {list(array.shape)}, the model's is "
                                         f"{list(param.shape)}")
            saved[name] = param.detach().clone()
            with torch.no_grad():
                param.copy_(torch.from_numpy(np.asarray(array, dtype=np.float32)).to(param.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                module.get_parameter(name).copy_(value)


def _head_slots_for(model_path: Path, found: Mapping[str, PromptAdapter]) -> None:
    """Heads the adapters train in full become full-weight slots (default: the base head), and each
    adapter's head tensors take the slots' layout."""
    from ..graph.contract import read_contract
    from ..graph.io import load_model
    from .steps import _extract

    names = sorted({n for a in found.values() for n in a.heads})
    modules = sorted({n.rsplit(".", 1)[0] for n in names})
    biases = sorted({n.rsplit(".", 1)[0] for n in names if n.endswith(".bias")})
    base_heads = _extract(model_path, "inputs", (modules, biases))
    base_heads.unlink()
    shutil.rmtree(model_path.parent / ".extracted", ignore_errors=True)
    contract = read_contract(load_model(model_path).metadata_props)
    for adapter in found.values():
        adapter.fit_heads(contract)
