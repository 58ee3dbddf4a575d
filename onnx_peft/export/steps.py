"""Rewrites of the freshly exported ``model.onnx`` in its temporary folder: extract the adapter
tensors, insert other methods' branches, convert adapter folders to slot files, quantize the base.

Each step replaces the model files in place (staging folder, then renames), so the next step
and the final install see one consistent model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import AdapterConfigError, MissingDependencyError
from ..progress import progress
from .output import ADAPTER_DIR, ADAPTER_SUFFIX, MODEL_FILE, _model_files


def _extract(model_path: Path, mode: str, full_weights: tuple[list[str], list[str]] = ([], [])) -> Path:
    """Replace the in-graph ``model_path`` by its extracted form; returns the adapter file
    holding the tensors that were in the graph (the exported adapter, in slot layout)."""
    try:
        from ..passes.extract_adapters import extract_adapters
    except ImportError as exc:
        raise MissingDependencyError(
            f"mode {mode!r} needs onnx_peft.passes.extract_adapters, which this install lacks"
        ) from exc
    staging = model_path.parent / ".extracted"
    staging.mkdir()
    new_model, adapter_file = extract_adapters(model_path, staging, make_inputs=mode == "inputs",
                                               external=mode == "external", full_weight_modules=full_weights[0],
                                               full_weight_biases=full_weights[1])
    for stale in _model_files(model_path.parent):
        os.remove(stale)
    for entry in staging.iterdir():  # the model and every data file it refers to
        if entry != Path(adapter_file):
            os.replace(entry, model_path.parent / entry.name)
    return Path(adapter_file)


def _hold_adapter(model_path: Path, adapter_file: Path) -> None:
    """External mode with adapter folders: the extracted slot initializers held the placeholder
    branches traced at export; make them hold ``adapter_file``'s tensors (the first adapter), so the
    model run as written is that adapter. Slots it leaves out hold their rank-0 default (no-op)."""
    import numpy as np
    import onnx_ir as ir

    from ..formats import load_adapter_file
    from ..graph.contract import FULL_WEIGHT_METHOD, read_contract
    from ..graph.io import load_model, save_model_with_side_data
    from ..passes.extract_adapters import adapter_data_name, slot_default

    model = load_model(model_path)
    contract = read_contract(model.metadata_props, str(model_path))
    tensors, _ = load_adapter_file(adapter_file)
    for slot in contract.slots:
        if slot.method == FULL_WEIGHT_METHOD:
            continue  # heads: the graph keeps the base head, the adapter file the trained one
        value = model.graph.initializers[slot.name]
        array = np.ascontiguousarray(tensors[slot.name]) if slot.name in tensors else slot_default(slot)
        value.const_value = ir.tensor(array, name=slot.name)
    staging = model_path.parent / ".held"
    save_model_with_side_data(model, staging / model_path.name, [s.name for s in contract.slots],
                              adapter_data_name(model_path))
    del model  # no lazy tensor may read the old files once they are gone
    for stale in _model_files(model_path.parent):
        os.remove(stale)
    for entry in staging.iterdir():
        os.replace(entry, model_path.parent / entry.name)
    staging.rmdir()


def _insert(model_path: Path, adapters: Mapping[str, Path]) -> dict[str, str]:
    """Replace the base ``model_path`` by the slot model InsertAdapters makes for ``adapters``;
    their files go to ``adapters/``. Returns ``{name: relative adapter file}``."""
    from ..passes.insert_adapters import insert_adapters

    staging = model_path.parent / ".inserted"
    insert_adapters(model_path, adapters, staging)
    for stale in _model_files(model_path.parent):
        os.remove(stale)
    for entry in staging.iterdir():
        os.replace(entry, model_path.parent / entry.name)
    return {name: f"{ADAPTER_DIR}/{name}{ADAPTER_SUFFIX}" for name in adapters}


def _convert(adapters: Mapping[str, Path], model_path: Path) -> dict[str, str]:
    from ..convert import convert_adapters

    folder = model_path.parent / ADAPTER_DIR
    folder.mkdir(exist_ok=True)
    written = {}
    for name, path in progress(adapters.items(), desc="convert adapters", total=len(adapters)):
        convert_adapters(path, model_path, output_path=folder / f"{name}{ADAPTER_SUFFIX}")
        written[name] = f"{ADAPTER_DIR}/{name}{ADAPTER_SUFFIX}"
    return written


@contextlib.contextmanager
def _float_bases(module: Any) -> Iterator[dict]:
    """quant.trace.float_bases when the model has quantized layers (torch is loaded by then)."""
    from ..quant.layers import is_quantized_linear

    if not any(is_quantized_linear(m) for m in module.modules()):
        yield {}
        return
    from ..quant.trace import float_bases

    with float_bases(module) as states:
        yield states


def _exact_quantizer(states: Mapping[str, Any], quantize: str | None) -> Any:
    """QuantizeBase writing a 4-bit model's own states; ``quantize`` must agree or be None."""
    from ..passes.quantize_base import QuantizeBase

    kinds = sorted({s.quant_type for s in states.values()})
    if quantize is not None and kinds != [quantize]:
        raise AdapterConfigError(f"the model is already quantized ({', '.join(kinds)}); export it without "
                                 f"quantize={quantize!r} to keep the codes it was trained on")
    return QuantizeBase.from_states(states)


def _quantize(model_path: Path, quantize: Any) -> None:
    """Replace the exported ``model_path`` by its 4-bit form (QuantizeBase: base Linears become
    MatMulBnb4/MatMulNBits); adapter branches stay float, so extract/insert run after it."""
    from ..graph.io import load_model, save_model

    staging = model_path.parent / ".quantized"
    model = load_model(model_path)
    quantize(model)
    save_model(model, staging / MODEL_FILE)
    del model  # no lazy tensor may read the old files once they are gone
    for stale in _model_files(model_path.parent):
        os.remove(stale)
    for entry in staging.iterdir():
        os.replace(entry, model_path.parent / entry.name)
    staging.rmdir()


