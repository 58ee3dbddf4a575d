"""Llama-Adapter (ADAPTION_PROMPT) with mode ``inputs``: prompts and gates as graph inputs.

ExtractAdapters finds Linear branches (``Add(MatMul(x, W), MatMul(MatMul(x, A), B))``); a
Llama-Adapter term is an attention over a prompt, and on small models the exporter folds
``k_proj(P)`` / ``v_proj(P)`` into constants, so nothing is left to extract. Instead the
prompts and gates become inputs at trace time: the spec's forward takes them as extra tensors
and runs the model with them in place of its parameters (``torch.func.functional_call``)::

    input_ids, attention_mask, ...                                   (the task's inputs)
    model.layers.1.self_attn.adaption_prompt  [1, adapter_len.<attention>, hidden]  default [1, 0, hidden]
    model.layers.1.self_attn.adaption_gate    [1]                                    default 0

An empty prompt attends to nothing (the softmax over zero keys is empty, ``probs @ V`` is
zeros, ``o_proj`` has no bias), so a run without adapter is the base model; each adapter of
any ``adapter_len`` is fed per run (AdapterSession) from ``adapters/NAME.onnx_adapter`` or its
PEFT dir. Slot names are PEFT keys without ``base_model.model.``; the contract records them
(method ``adaption_prompt``) with the base fingerprint, as InsertAdapters/ExtractAdapters do.

The slots are the attention modules the PeftModel's active adapter wraps, or, for adapter
dirs, the union of the layers the adapters wrap (the top ``max(adapter_layers)``); an adapter
with fewer layers leaves the others at their defaults.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AdapterConfigError, OnnxPeftError, require_torch
from .adapters import transformers_model
from .exporter import _io_info, run_exporter, weight_bytes
from .output import (
    ADAPTER_DIR,
    ADAPTER_SUFFIX,
    EXTERNAL_DATA_BYTES,
    INFO_FILE,
    MODEL_FILE,
    _install,
    staging_folder,
)
from .spec import ExportSpec, _task_module_class, export_spec

PEFT_TYPE = "ADAPTION_PROMPT"
_TRACE_LEN = 2  # example prompt length: >= 2, so torch.export keeps adapter_len symbolic


def _peft_type(config: Any) -> str:
    value = getattr(config, "peft_type", "")
    return str(getattr(value, "value", value)).upper()


def _active_name(model: Any) -> str:
    active = getattr(model, "active_adapter", None) or "default"
    return active if isinstance(active, str) else active[0]


def uses_adaption_prompt(model_or_dir: Any, adapters: Mapping[str, Path]) -> bool:
    """True when the export is Llama-Adapter's: a PeftModel whose active adapter is one, or
    adapter dirs of which any is one (mixing with other methods is refused later, clearly)."""
    if adapters:
        from ..config import AdapterConfig

        return any(_peft_type(AdapterConfig.from_pretrained(p)) == PEFT_TYPE for p in adapters.values())
    if isinstance(getattr(model_or_dir, "peft_config", None), Mapping):  # ours or Hugging Face's
        config = model_or_dir.peft_config.get(_active_name(model_or_dir))
        return config is not None and _peft_type(config) == PEFT_TYPE
    return False


def _check_request(model_or_dir: Any, adapters: Mapping[str, Path], mode: str, quantize: str | None) -> None:
    if mode != "inputs":
        raise AdapterConfigError(f"mode {mode!r} serves LoRA adapters only; export Llama-Adapter "
                                 "(ADAPTION_PROMPT) adapters with mode='inputs' or 'in-graph'")
    if quantize is not None:
        raise AdapterConfigError("quantize= is not supported with Llama-Adapter (ADAPTION_PROMPT) slots: its "
                                 "prompts go through the base k_proj/v_proj; export without quantize")
    if adapters and hasattr(model_or_dir, "peft_config"):
        raise AdapterConfigError("pass either a PeftModel or adapters= (Llama-Adapter dirs), not both")
    if adapters:
        from ..config import AdapterConfig

        other = sorted(n for n, p in adapters.items() if _peft_type(AdapterConfig.from_pretrained(p)) != PEFT_TYPE)
        if other:
            raise AdapterConfigError(f"adapters {other} are not Llama-Adapter (ADAPTION_PROMPT) adapters and the "
                                     "others are; export them to separate models")


def _slot_model(module: Any, adapters: Mapping[str, Path]) -> Any:
    """``module`` with placeholder Llama-Adapter layers on every attention any adapter wraps."""
    from ..config import AdapterConfig
    from ..methods.adaption_prompt import AdaptionPromptConfig
    from ..model import get_peft_model
    from ..tuners.adaption_prompt import select_targets

    configs = {n: AdapterConfig.from_pretrained(p) for n, p in adapters.items()}
    targets = {n: select_targets(module, copy.copy(c)) for n, c in configs.items()}
    kinds = {t[0].rsplit(".", 1)[-1] for t in targets.values()}
    if len(kinds) > 1:
        raise AdapterConfigError(f"the adapters wrap different attention modules ({', '.join(sorted(kinds))}); "
                                 "export them to separate models")
    layers = max(len(t) for t in targets.values())
    config = AdaptionPromptConfig(adapter_len=_TRACE_LEN, adapter_layers=layers, target_modules=kinds.pop())
    return get_peft_model(module, config, adapter_name="slots").eval()


def _slot_spec(base: ExportSpec, slots: Mapping[str, tuple[str, Any]]) -> ExportSpec:
    """``base`` plus one input per slot; the forward runs the model with the slot tensors in
    place of the parameters they stand for."""
    torch = require_torch()
    count = len(base.args)
    parameter_names = [name for name, _ in slots.values()]
    task_module = _task_module_class()

    def forward(model: Any, *tensors: Any) -> tuple:
        values = dict(zip(parameter_names, tensors[count:]))
        return torch.func.functional_call(task_module(model, base.forward), values, tuple(tensors[:count]))

    examples, dims = [], []
    for index, (slot, (_, parameter)) in enumerate(slots.items()):
        example = parameter.detach()
        if slot.endswith(".adaption_prompt"):
            shape = (1, _TRACE_LEN, example.shape[2])
            example = torch.randn(shape, generator=torch.Generator().manual_seed(index)).to(example)
            dims.append({1: f"adapter_len_{index}"})  # a Python identifier, or torch.export fails
        else:
            dims.append({})
        examples.append(example)
    return ExportSpec(base.input_names + list(slots), base.output_names, tuple(base.args) + tuple(examples),
                      list(base.dims) + dims, forward, base.info)


def _check_no_bias(module: Any, slots: Mapping[str, Any]) -> None:
    """An empty prompt adds ``o_proj(0) = bias``: with a bias the default would not be the base."""
    for slot in slots:
        attention = slot.rsplit(".", 1)[0]
        o_proj = module.get_submodule(attention).base_layer.o_proj
        if getattr(o_proj, "bias", None) is not None:
            raise AdapterConfigError(
                f"{attention}.o_proj has a bias, which Llama-Adapter adds even for an empty prompt, so a run without "
                "adapter could not be the base model; export this model with mode='in-graph' (one adapter)")


def _finish_graph(model_path: Path, slots: Mapping[str, Any]) -> Any:
    """Give each slot input its no-op default, record the contract; returns it."""
    import onnx_ir as ir

    from ..graph.contract import Contract, Slot, write_contract
    from ..graph.io import load_model, save_model
    from ..graph.modules import find_linear_sites
    from ..methods.adaption_prompt import SLOT_FORM
    from ..passes.insert_adapters import base_fingerprint

    model = load_model(model_path)
    graph = model.graph
    inputs = {value.name: value for value in graph.inputs}
    contract = Contract(fingerprint=base_fingerprint(find_linear_sites(model)))
    for name in slots:
        value = inputs.get(name)
        if value is None:
            raise OnnxPeftError(f"{model_path}: the exported graph has no input {name!r}")
        dtype = value.dtype.numpy()
        module = name.rsplit(".", 1)[0]
        if name.endswith(".adaption_prompt"):
            hidden = value.shape[2]
            shape, default = (1, f"adapter_len.{module}", hidden), np.zeros((1, 0, hidden), dtype)
        else:
            shape, default = (1,), np.zeros((1,), dtype)
        value.const_value = ir.tensor(default, name=name)
        graph.register_initializer(value)
        contract.slots.append(Slot(name, np.dtype(dtype).name, shape, module, SLOT_FORM, default="zeros"))
    write_contract(model.metadata_props, contract)
    staging = model_path.parent / ".slots"  # same file names, so external-data references hold
    data = model_path.parent / (model_path.name + ".data")
    save_model(model, staging / model_path.name, external_data=data.exists())
    del model, graph, inputs
    for written in staging.iterdir():
        os.replace(written, model_path.parent / written.name)
    staging.rmdir()
    return contract


def _write_adapters(folder: Path, model_path: Path, contract: Any, adapters: Mapping[str, Path],
                    own: tuple[str, Mapping[str, tuple[str, Any]]] | None) -> dict[str, str]:
    """``adapters/NAME.onnx_adapter`` for each adapter dir (convert-adapters), or for the
    PeftModel's own adapter ``own = (name, slots)``; each checked against the contract."""
    from ..formats import save_adapter_file
    from ..graph.contract import check_adapter
    from .steps import _convert

    if adapters:
        return _convert(adapters, model_path)
    name, slots = own
    tensors = {slot: parameter.detach().cpu().numpy() for slot, (_, parameter) in slots.items()}
    check_adapter(contract, {k: (v.shape, v.dtype.name) for k, v in tensors.items()}, source=f"adapter {name!r}")
    folder.mkdir(exist_ok=True)
    save_adapter_file(folder / f"{name}{ADAPTER_SUFFIX}", tensors, contract.fingerprint)
    return {name: f"{ADAPTER_DIR}/{name}{ADAPTER_SUFFIX}"}


def export_adaption_inputs(model_or_dir: Any, output_dir: Path, adapters: Mapping[str, Path], task: str, mode: str,
                           dtype: str, opset: int | None, external_data: bool | None, quantize: str | None,
                           load: Any) -> tuple[dict, Path]:
    """Export a Llama-Adapter slot model to ``output_dir``; returns ``(info, model path)``.

    ``load(model_or_dir, task)`` gives ``(transformers model (a PeftModel's, adapter layers
    inside), peft wrapper or None, task, source dir or None)``: the caller's loader, nothing merged.
    """
    torch = require_torch()
    _check_request(model_or_dir, adapters, mode, quantize)
    module, _, task, source = load(model_or_dir, task)
    if adapters:
        if isinstance(model_or_dir, torch.nn.Module) and module is model_or_dir:
            module = copy.deepcopy(module)  # a model passed in is never changed
        name = "slots"
        module = transformers_model(_slot_model(module, adapters))
    else:
        name = _active_name(model_or_dir)
        active = list(getattr(model_or_dir, "active_adapters", None) or [name])
        if len(active) > 1:  # the others would stay in the graph as constants
            raise AdapterConfigError(f"adapters {active} are active together; mode 'inputs' exports one: "
                                     "set_adapter(NAME) first, or export the saved folders with adapters=")
    from ..tuners.adaption_prompt import slot_parameters

    slots = slot_parameters(module, name)
    if not slots:
        raise AdapterConfigError(
            f"{type(model_or_dir).__name__} has no onnx-peft Llama-Adapter layers for adapter {name!r}; save it "
            "(save_pretrained) and export the base model with adapters=DIR, or load it with "
            "onnx_peft.PeftModel.from_pretrained")
    _check_no_bias(module, slots)
    training = {m: m.training for m in module.modules()}
    module.eval()
    tmp = staging_folder(output_dir)  # named, umask-honouring; a killed run's is cleaned by the next
    try:
        spec = _slot_spec(export_spec(module, task), slots)
        if external_data is None:
            external_data = weight_bytes(module) > EXTERNAL_DATA_BYTES
        model_path = tmp / MODEL_FILE
        exporter = run_exporter(module, spec, model_path, opset, external_data)
        contract = _finish_graph(model_path, slots)
        written = _write_adapters(tmp / ADAPTER_DIR, model_path, contract, adapters,
                                  None if adapters else (name, slots))
        info_inputs, info_outputs = _io_info(model_path)
        info = {"task": task, "mode": mode, "dtype": dtype, "opset": opset, "exporter": exporter, "quantize": None,
                "architecture": type(module).__name__, "model_type": getattr(module.config, "model_type", None),
                "source": source, "external_data": (tmp / (MODEL_FILE + ".data")).exists(),
                "adapters": written, "inputs": info_inputs, "outputs": info_outputs,
                **{k: v for k, v in spec.info.items() if k != "output_dims"}}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _install(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for layer, flag in training.items():
            layer.training = flag
    return info, output_dir / MODEL_FILE
