"""The public :func:`export`: prepare the module, trace it, run the mode's steps, install.

Why: one call goes from a trained adapter to a deploy folder; the pieces it strings together
live in the sibling modules (loading, exporter, steps, output, adapters, heads).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import AdapterConfigError, OnnxPeftError, require_torch
from ..progress import honours_quiet, progress
from .adapters import (
    AdapterSpec,
    attach_adapters,
    check_adapters_fit,
    is_peft_model,
    needs_insert,
    normalize_adapters,
    slot_model,
    transformers_model,
)
from .adaption_inputs import export_adaption_inputs, uses_adaption_prompt
from .exporter import _io_info, run_exporter, weight_bytes
from .heads import (
    _base_heads,
    _head_slots,
    _write_trained_heads,
    adapter_num_labels,
    full_weight_modules,
    saved_heads,
)
from .loading import _architecture, load_model_dir, resolve_task
from .output import (
    ADAPTER_DIR,
    EXTERNAL_DATA_BYTES,
    INFO_FILE,
    MODEL_FILE,
    _check_output_dir,
    _install,
    staging_folder,
)
from .prompt import export_prompt, is_prompt_model, prompt_adapter_dirs
from .spec import export_spec
from .steps import (
    _convert,
    _exact_quantizer,
    _extract,
    _float_bases,
    _hold_adapter,
    _insert,
    _quantize,
)

log = logging.getLogger(__package__)  # one logger for the export package: "onnx_peft.export"

MODES = ("merged", "in-graph", "inputs", "external")
DTYPES = ("fp32", "fp16")


def _prepare(model_or_dir: Any, task: str, mode: str, dtype: str, adapters: dict[str, Path],
             labels_from: dict[str, Path] | None = None) -> tuple[Any, Any, str, str | None]:
    """Returns ``(module to export, peft wrapper or None, task, source dir or None)``.
    ``labels_from``: adapters whose number of labels a folder's head is loaded with when
    ``adapters`` (attached to the model) is empty (the base exported for InsertAdapters).

    The module is a transformers model, possibly with adapter layers inside. A model the
    caller passed in is copied before anything changes it (merge, fp16, new adapter layers).
    """
    torch = require_torch()
    source: str | None = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        source = str(model_or_dir)
        labelled = adapters or labels_from
        model, task = load_model_dir(model_or_dir, task, num_labels=adapter_num_labels(labelled) if labelled else None)
        owned = True
    elif isinstance(model_or_dir, torch.nn.Module) and hasattr(transformers_model(model_or_dir), "config"):
        model = model_or_dir
        task = resolve_task(task, _architecture(model), source=type(transformers_model(model)).__name__)
        owned = False
    else:
        raise OnnxPeftError(
            f"cannot export a {type(model_or_dir).__name__}; pass a transformers model folder, a "
            "transformers model, or a PeftModel"
        )
    peft = model if is_peft_model(model) else None
    if mode in ("in-graph", "merged") and len(adapters) > 1:
        raise AdapterConfigError(
            f"mode {mode!r} exports one adapter, got {len(adapters)} ({', '.join(adapters)}); "
            "use mode='inputs' or 'external' to serve several adapters from one model"
        )
    if adapters:
        if not owned:
            model, owned = copy.deepcopy(model), True
        if mode in ("inputs", "external") and peft is None:
            peft = slot_model(model, adapters)
        else:
            peft = attach_adapters(model, adapters)
    if mode == "merged" and peft is not None:
        if not owned:
            peft, owned = copy.deepcopy(peft), True
        inner = peft.merge_and_unload()
        peft = None
    else:
        inner = transformers_model(peft if peft is not None else model)
    if mode in ("inputs", "external") and peft is None:
        raise AdapterConfigError(
            f"mode {mode!r} needs adapter branches to extract; pass a PeftModel or adapters={{name: dir}}"
        )
    if dtype == "fp16":
        if not owned:
            inner = copy.deepcopy(inner)
        inner = inner.half()
    return inner, peft, task, source



@honours_quiet
def export(model_or_dir: Any, output_dir: str | os.PathLike, adapters: AdapterSpec = None,
           task: str = "auto", mode: str = "in-graph", dtype: str = "fp32", opset: int | None = None,
           quiet: bool = False, external_data: bool | None = None, quantize: str | None = None,
           double_quant: bool = False, block_size: int = 64, overwrite: bool = False) -> Path:
    """Export ``model_or_dir`` to ``output_dir/model.onnx`` and return that path.

    ``model_or_dir``: a local transformers folder, a transformers model, or a PeftModel (ours
    or Hugging Face's). ``adapters``: PEFT adapter folders, ``{name: dir}`` or a list (named
    by folder); modes in-graph/merged take one, inputs/external any number (the model gets a
    slot on every module any of them targets, a full-weight slot on every Linear they train in
    full (``modules_to_save``, e.g. a classifier head; sequence-classification models are loaded
    with the adapters' number of labels), and each is written to ``adapters/NAME.onnx_adapter``). ``external_data``: None decides by size (> 1 GB).
    ``quantize``: ``"nf4"``/``"fp4"`` (bitsandbytes codes, ``double_quant`` as bitsandbytes') or
    ``"int4"`` with ``block_size``: the base Linears (not lm_head) become 4-bit ONNX Runtime
    contrib MatMuls after export, adapter branches and slots stay float (passes.quantize_base).
    A model passed in is never changed; the output appears only when complete. A non-empty
    ``output_dir`` is refused unless ``overwrite=True``, which replaces it whole.
    """
    if mode not in MODES:
        raise OnnxPeftError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if dtype not in DTYPES:
        raise OnnxPeftError(f"unknown dtype {dtype!r}; choose fp32 or fp16")
    quantizer = None
    if quantize is not None:  # checked before anything is loaded
        from ..passes.quantize_base import QuantizeBase

        quantizer = QuantizeBase(quantize, block_size, double_quant)
    started = time.perf_counter()
    output_dir = Path(output_dir)
    named = normalize_adapters(adapters)
    inputs = list(named.values()) + ([model_or_dir] if isinstance(model_or_dir, (str, os.PathLike)) else [])
    _check_output_dir(output_dir, inputs, overwrite)
    _check_mode_fits_methods(model_or_dir, named, mode)
    if is_prompt_model(model_or_dir) or (named and prompt_adapter_dirs(named)):
        return _export_prompt(model_or_dir, output_dir, named, task, mode, dtype, opset, quiet, external_data,
                              quantize, started)
    inserted_own = _own_adapter_as_folder(model_or_dir, named, mode)
    if inserted_own is not None:  # our PeftModel of a method ExtractAdapters cannot read: base + insert
        base, folders, holder = inserted_own
        with holder:
            return export(base, output_dir, folders, task, mode, dtype, opset, quiet, external_data, quantize,
                          double_quant, block_size, overwrite=True)
    if mode in ("inputs", "external") and uses_adaption_prompt(model_or_dir, named):  # Llama-Adapter slots
        load = lambda model, task: _prepare(model, task, "in-graph", dtype, {})  # noqa: E731
        return export_adaption_inputs(model_or_dir, output_dir, named, task, mode, dtype, opset, external_data,
                                      quantize, load)[1]
    inserted = mode in ("inputs", "external") and bool(named) and needs_insert(named)
    if inserted and mode == "external":
        raise AdapterConfigError("mode 'external' serves LoRA adapters only; export these adapters "
                                 "(another method, or DoRA) with mode='inputs' or 'merged'")
    steps = ["load", "export", "extract", "convert"] if mode in ("inputs", "external") else ["load", "export"]
    bar = iter(steps if quiet else progress(steps, desc="onnx-peft export", total=len(steps)))
    next(bar, None)
    if inserted:  # export the plain base, then graft each method's branch (InsertAdapters)
        module, peft, task, source = _prepare(model_or_dir, task, "in-graph", dtype, {}, labels_from=named)
    else:
        module, peft, task, source = _prepare(model_or_dir, task, mode, dtype, named)
    if named:  # adapter vs model in model terms, before minutes of tracing
        check_adapters_fit(module, named)
    # heads the adapters train in full become full-weight slots (default: the base head)
    full_weights = full_weight_modules(module, named) if named and mode in ("inputs", "external") \
        and not inserted else ([], [])
    heads = saved_heads(module) if not named and mode in ("inputs", "external") else {}
    if heads:  # a PeftModel's own trained heads: base head in the graph, trained one in its file
        full_weights = _head_slots(heads)
    training = {m: m.training for m in module.modules()}  # restored afterwards, layer by layer
    module.eval()
    tmp = staging_folder(output_dir)
    try:
        spec = export_spec(module, task)
        if external_data is None:
            external_data = weight_bytes(module) > EXTERNAL_DATA_BYTES
        next(bar, None)
        model_path = tmp / MODEL_FILE
        with _base_heads(module, heads), _float_bases(module) as states:
            exporter = run_exporter(module, spec, model_path, opset, external_data)
        if states:  # a 4-bit (QLoRA) base: its own codes, not a second quantization
            quantizer = _exact_quantizer(states, quantize)
        if quantizer is not None:
            # heads trained in full stay float: their weights become full-weight slots
            quantizer.skip = tuple(quantizer.skip) + tuple(full_weights[0])
            _quantize(model_path, quantizer)
        written: dict[str, str] = {}
        if inserted:
            next(bar, None)
            written = _insert(model_path, named)
            next(bar, None)
        elif mode in ("inputs", "external"):
            next(bar, None)
            extracted = _extract(model_path, mode, full_weights)
            if heads:
                _write_trained_heads(extracted, model_path, heads)
            next(bar, None)
            if named:  # the graph held placeholder weights; convert the real adapters
                written = _convert(named, model_path)
                if mode == "external":  # the model as written: the first adapter, not placeholders
                    _hold_adapter(model_path, tmp / written[next(iter(named))])
            else:  # a PeftModel came with its own adapter: keep what was extracted
                active = getattr(peft, "active_adapter", None) or "default"
                name = active if isinstance(active, str) else active[0]
                (tmp / ADAPTER_DIR).mkdir()
                target = tmp / ADAPTER_DIR / f"{name}{extracted.suffix}"
                os.replace(extracted, target)
                written = {name: f"{ADAPTER_DIR}/{target.name}"}
            shutil.rmtree(tmp / ".extracted", ignore_errors=True)
        info_inputs, info_outputs = _io_info(model_path)
        info = {
            "task": task, "mode": mode, "dtype": dtype, "opset": opset, "exporter": exporter,
            "quantize": None if quantizer is None else {"quant_type": quantize, "block_size": block_size,
                                                        "double_quant": double_quant},
            "architecture": type(module).__name__, "model_type": getattr(module.config, "model_type", None),
            "source": source, "external_data": (tmp / (MODEL_FILE + ".data")).exists(),
            "adapters": written if written else sorted(named),
            "inputs": info_inputs, "outputs": info_outputs,
            **{k: v for k, v in spec.info.items() if k != "output_dims"},
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _install(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for layer, flag in training.items():
            layer.training = flag
        for _ in bar:
            pass
    seconds = time.perf_counter() - started
    if not quiet:
        log.info("exported %s (%s, %s, %s) to %s in %.1f s", type(module).__name__, task, mode, exporter,
                 output_dir / MODEL_FILE, seconds)
    return output_dir / MODEL_FILE


def _export_prompt(model_or_dir: Any, output_dir: Path, named: dict[str, Path], task: str, mode: str, dtype: str,
                   opset: int | None, quiet: bool, external_data: bool | None, quantize: str | None,
                   started: float) -> Path:
    """Prompt-learning adapters: a prompt-ready graph (export/prompt.py); none of them mixes with
    weight adapters in one model yet, and a 4-bit base is a weight-method feature."""
    if named and len(prompt_adapter_dirs(named)) != len(named):
        weight = sorted(set(named) - set(prompt_adapter_dirs(named)))
        raise AdapterConfigError(f"adapters {weight} change weights and the others are prompt-learning adapters; "
                                 "export them to separate models")
    if quantize is not None:
        raise AdapterConfigError("quantize= applies to weight adapters (QLoRA); prompt-learning exports stay float")

    def load(model: Any, task: str) -> tuple[Any, str, str | None]:
        if isinstance(model, (str, os.PathLike)) and named:  # the head size the adapters trained
            model, task = load_model_dir(model, task, num_labels=adapter_num_labels(named))
        module, _, task, source = _prepare(model, task, "in-graph", dtype, {})
        return module, task, source

    info, path = export_prompt(model_or_dir, output_dir, named, task, mode, dtype, opset, external_data, load)
    if not quiet:
        log.info("exported %s (%s, %s, prompt inputs) to %s in %.1f s", info["architecture"], info["task"], mode,
                 path, time.perf_counter() - started)
    return path


def _check_mode_fits_methods(model_or_dir: Any, named: dict[str, Path], mode: str) -> None:
    """Refuse a mode an adapter's method cannot take (X-LoRA: in-graph only) before tracing."""
    from ..config import AdapterConfig
    from ..methods.base import method_for

    configs = [AdapterConfig.from_pretrained(path) for path in named.values()]
    configs += list(getattr(model_or_dir, "peft_config", {}).values()) if not named else []
    for config in configs:
        if not isinstance(config, AdapterConfig):
            continue  # Hugging Face PEFT's configs: their own method checks apply
        method = method_for(config)
        if mode not in method.graph_modes:
            reason = method.no_merge_message() if hasattr(method, "no_merge_message") else ""
            raise AdapterConfigError(f"mode {mode!r} cannot hold a {config.peft_type} adapter; use "
                                     f"{' or '.join(repr(m) for m in method.graph_modes)}. {reason}".strip())


def _own_adapter_as_folder(model: Any, named: dict[str, Path], mode: str) -> tuple[Any, dict[str, Path], Any] | None:
    """Our PeftModel holding a non-LoRA (or DoRA / token-row) adapter, exported with mode inputs or
    external: its active adapter saved to a temporary PEFT folder and its base (a copy, adapters
    unloaded), so the export takes the folder path: base graph + InsertAdapters, one form per method.
    None for anything else (LoRA branches are extracted from the in-graph export directly)."""
    import tempfile

    from ..model import PeftModel

    if mode not in ("inputs", "external") or named or not isinstance(model, PeftModel) \
            or len(model.active_adapters) != 1 or uses_adaption_prompt(model, named):
        return None  # (Llama-Adapter has its own input path; several active adapters are refused there)
    active = model.active_adapter
    config = model.peft_config.get(active)
    if config is None or (config.peft_type == "LORA" and not getattr(config, "use_dora", False)
                          and not getattr(config, "trainable_token_indices", None)):
        return None
    holder = tempfile.TemporaryDirectory(prefix="onnx-peft-adapter-")
    model.save_pretrained(holder.name, selected_adapters=[active])
    folder = Path(holder.name) if active == "default" else Path(holder.name) / active
    base = copy.deepcopy(model)._unload(keep_saved_modules=False)
    return base, {active: folder}, holder
