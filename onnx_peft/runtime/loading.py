"""Loading and unloading adapters: sources (PEFT dirs, files, dicts, prompt adapters), the
contract check, device values, and the per-row banks rebuilt on every load/unload."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import (
    CheckpointError,
    IncompatibleAdapterError,
    ModelFileError,
    OnnxPeftError,
    RuntimeSessionError,
)
from ..graph.banks import stack_bank
from ..graph.contract import FULL_WEIGHT_METHOD, RANK_DIM, Contract, Slot, check_adapter
from ..prompt_feeds import (
    PROMPT_INPUT_NAMES,
    PromptAdapter,
    adapter_from_peft,
    adapter_from_tensors,
)
from .state import _SLOT_SUFFIXES, _Banks, _Loaded

logger = logging.getLogger("onnx_peft.runtime")


class AdapterLoading:
    """Adapter loading verbs of :class:`~onnx_peft.runtime.AdapterSession`."""

    def load_adapter(self, name: str, source: str | os.PathLike | Mapping[str, np.ndarray]) -> None:
        """Load a PEFT adapter dir, ``.onnx_adapter``, ``.safetensors``/``.npz`` file, or a dict of
        MatMul-ready slot arrays, under ``name``. Checked against the model's contract first."""
        if not isinstance(name, str) or not name:
            raise RuntimeSessionError(f"adapter name must be a non-empty string, got {name!r}")
        with self._lock:
            if name in self._adapters:
                raise RuntimeSessionError(f"adapter {name!r} is already loaded; unload_adapter({name!r}) first")
        prompt = self._read_prompt_dir(source)
        if prompt is None:
            tensors, fingerprint, label = self._read_source(source)
            prompt = adapter_from_tensors(tensors, label)
        if prompt is not None:
            return self._add(name, self._checked_prompt(name, prompt))
        if self.packing and any(k in self._managed for k in tensors):
            from ..graph.packing import unpack_adapter_tensors

            tensors = unpack_adapter_tensors(self.contract, tensors, source=label)
        check_adapter(self.contract, {k: (tuple(v.shape), v.dtype.name) for k, v in tensors.items()},
                      fingerprint=fingerprint, source=label)
        if not tensors:
            raise IncompatibleAdapterError(f"{label}: holds no tensors")
        self._check_overridable(tensors)
        arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        feeds = arrays
        if self.packing:
            from ..graph.packing import pack_adapter_tensors

            feeds = pack_adapter_tensors(self.contract, arrays, source=label)
        values = {} if self.layout is not None else {k: self._to_device(v) for k, v in feeds.items()}
        if self.layout is not None or self.device == "cpu":
            keep = arrays if self.layout is not None else feeds  # banks: host arrays; CPU OrtValues share them
        else:
            keep = {}
        self._add(name, _Loaded(name, label, keep, values))

    def _check_overridable(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Every slot fed directly must be an input ONNX Runtime takes (a graph input, or an
        initializer that is one too); else ORT's own "Invalid input name" would come at run time."""
        if self.layout is not None or self.packing:
            return
        merge = self._merge  # merge strategy: low-rank slots feed the merge graph, heads the main one
        fixed = next((n for n in tensors if n not in self._inputs and (merge is None or n in merge.heads)), None)
        if fixed is not None:
            raise IncompatibleAdapterError(
                f"{self.model_path.name}: slot {fixed!r} is a fixed initializer, not an input ONNX Runtime can "
                "override (external mode of an older onnx-peft, or extract without inputs); extract or export "
                "the model again: onnx-peft extract MODEL.onnx -o OUT_DIR --external (or --mode inputs)")

    def _external_defaults(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """External-initializer models (``contract.external``): host arrays and device values of
        each low-rank slot's no-op default (rank 0). The model's own initializers hold the exported
        adapter, so these are fed for every slot an adapter leaves out, and for all of them when no
        adapter is chosen: no adapter = the base, as with every other slot model."""
        if not self.contract.external:
            return {}, {}
        from ..graph.packing import slot_default

        arrays = {s.name: slot_default(s) for s in self.contract.slots
                  if s.method != FULL_WEIGHT_METHOD and s.name in self._inputs}
        return arrays, {name: self._to_device(array) for name, array in arrays.items()}

    def _add(self, name: str, loaded: _Loaded) -> None:
        with self._lock:
            if name in self._adapters:
                raise RuntimeSessionError(f"adapter {name!r} is already loaded; unload_adapter({name!r}) first")
            used = {a.row for a in self._adapters.values()}
            loaded.row = next(row for row in range(1, len(used) + 2) if row not in used)
            adapters = {**self._adapters, name: loaded}
            banks = self._build_banks(adapters) if self.layout is not None else None
            self._adapters = adapters
            self._banks = banks
        logger.debug("loaded adapter %s from %s", name, loaded.source)

    def _read_prompt_dir(self, source: Any) -> PromptAdapter | None:
        """A PEFT prompt-learning adapter dir as a PromptAdapter; None for anything else."""
        if isinstance(source, Mapping) or not Path(source).is_dir():
            return None
        from ..config import AdapterConfig
        from ..formats import read_peft_adapter
        from ..methods.base import method_for

        config = AdapterConfig.from_pretrained(source)
        if not getattr(method_for(config), "is_prompt_learning", False):
            return None
        config, tensors = read_peft_adapter(source)
        dtype = self.prompt_layout.dtype if self.prompt_layout is not None else "float32"
        return adapter_from_peft(config, tensors, dtype, str(source))

    def _checked_prompt(self, name: str, prompt: PromptAdapter) -> _Loaded:
        if self.prompt_layout is None:
            raise IncompatibleAdapterError(
                f"{prompt.label} is a prompt-learning adapter and {self.model_path.name} takes no prompt inputs; export "
                "the base with it: onnx-peft export BASE_DIR -o OUT --adapter NAME=ADAPTER_DIR --mode inputs")
        if self.layout is not None:
            raise IncompatibleAdapterError(f"{prompt.label}: prompt-learning adapters need a prompt-ready model, "
                                           "not a MultiAdapter one (rows already mix prompts there)")
        prompt.check(self.prompt_layout)
        prompt.values = np.ascontiguousarray(prompt.values.astype(self.prompt_layout.dtype))
        prompt.fit_heads(self.contract)
        if prompt.heads:  # heads trained in full (SEQ_CLS) feed the model's full-weight slots
            check_adapter(self.contract, {k: (v.shape, v.dtype.name) for k, v in prompt.heads.items()},
                          source=prompt.label)
        values = {k: self._to_device(np.ascontiguousarray(v)) for k, v in prompt.heads.items()}
        return _Loaded(name, prompt.label, dict(prompt.heads), values, prompt=prompt)

    def unload_adapter(self, name: str, timeout: float | None = None) -> None:
        """Drop adapter ``name``. Waits for runs using it (up to ``timeout`` seconds, None = no
        limit); new runs of it are refused meanwhile. Raises RuntimeSessionError on timeout."""
        with self._lock:
            loaded = self._adapters.get(name)
            if loaded is None or loaded.unloading:
                raise RuntimeSessionError(self._unknown(name))
            loaded.unloading = True
            if not self._lock.wait_for(lambda: loaded.in_use == 0, timeout=timeout):
                loaded.unloading = False
                self._lock.notify_all()
                raise RuntimeSessionError(
                    f"adapter {name!r} is still used by {loaded.in_use} run(s) after {timeout}s; "
                    "try again later or pass a longer timeout")
            adapters = {k: v for k, v in self._adapters.items() if k != name}
            if self._merge is not None:
                self._merge.forget(loaded)
            self._banks = self._build_banks(adapters) if self.layout is not None else None
            self._adapters = adapters

    def _unknown(self, name: Any) -> str:
        loaded = [n for n, a in self._adapters.items() if not a.unloading]
        return f"no adapter named {name!r} is loaded (loaded: {', '.join(loaded) or 'none'}); call load_adapter first"

    def _read_source(self, source: Any) -> tuple[dict[str, np.ndarray], str, str]:
        if isinstance(source, Mapping):
            return {k: np.asarray(v) for k, v in source.items()}, "", "adapter tensors"
        path = Path(source)
        if path.is_dir():
            return self._read_peft_dir(path), "", str(path)
        from ..formats import load_adapter_file, resolve_fingerprint
        from ..graph.contract import header_check

        slots_check = header_check(self.contract, str(path))

        def check(header: Mapping[str, Any]) -> None:  # names, shapes, dtypes before any data is read
            if not any(k in PROMPT_INPUT_NAMES or k.startswith("prefix.") or k in self._managed for k in header):
                slots_check(header)  # (prompt and packed files are checked once read and unpacked)

        try:
            tensors, fingerprint = load_adapter_file(path, check=check)
        except OnnxPeftError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read adapter file ({exc})") from exc
        return tensors, resolve_fingerprint(fingerprint, self.contract.fingerprint), str(path)

    def _read_peft_dir(self, path: Path) -> dict[str, np.ndarray]:
        """A PEFT adapter dir converted to this model's slots (A^T, (s B)^T, the model's dtype)."""
        from ..convert import base_weight_reader, peft_to_slots
        from ..formats import read_peft_adapter

        config, tensors = read_peft_adapter(path)
        reader = None

        def base_weight(module: str) -> np.ndarray:  # DoRA only: read the model lazily
            nonlocal reader
            if reader is None:
                from ..graph.io import load_model

                reader = base_weight_reader(load_model(self.model_path))
            return reader(module)

        dtype = self.contract.slots[0].dtype if self.contract.slots else "float32"
        return peft_to_slots(config, tensors, dtype, base_weight, self.contract, source=str(path))

    def _to_device(self, array: np.ndarray) -> Any:
        if self.device == "cpu":
            return self._ort.OrtValue.ortvalue_from_numpy(array)  # shares the numpy buffer
        return self._ort.OrtValue.ortvalue_from_numpy(array, "cuda", self._device_id)  # the session's GPU

    def _contract_from_inputs(self) -> Contract:
        """Models without a recorded contract (e.g. Olive's): slots from input names."""
        slots = []
        for spec in self._inputs.values():
            if spec.name.endswith(_SLOT_SUFFIXES) and spec.dtype is not None:
                module = spec.name.rsplit(".", 2)[0]
                shape = tuple(d if isinstance(d, int) else (d or RANK_DIM) for d in spec.shape)
                slots.append(Slot(spec.name, spec.dtype.name, shape, module))
        return Contract(slots=slots)

    # -- banks ---------------------------------------------------------------------------------
    def _read_base_rows(self) -> dict[str, np.ndarray]:
        """Full-weight banks -> their base row (the bank's default in the model file)."""
        names = [b.bank for b in self.layout.banks if b.kind in ("W", "b")] if self.layout is not None else []
        if not names:
            return {}
        from ..graph.io import load_model

        initializers = load_model(self.model_path).graph.initializers
        missing = [n for n in names if n not in initializers or initializers[n].const_value is None]
        if missing:
            raise ModelFileError(f"{self.model_path}: bank {missing[0]!r} has no default holding the base "
                                 "weights; rebuild the model with the MultiAdapter pass")
        return {n: np.array(initializers[n].const_value.numpy()[0]) for n in names}

    def _build_banks(self, adapters: Mapping[str, _Loaded]) -> _Banks:
        """Banks for ``adapters``: row 0, free rows and rows of adapters without a slot hold its
        no-op default (zeros, ones, identity; full weights: the base tensors), each adapter at its
        own row, symbolic dims (ranks) padded with zeros. Built from scratch, so runs holding the
        previous snapshot are safe."""
        assert self.layout is not None
        order = list(adapters)
        size = max([a.row for a in adapters.values()], default=0) + 1
        values = {}
        slots = self.contract.slot_map()
        for entry in self.layout.banks:
            if entry.kind in ("W", "b"):  # whole weights: base rows, each adapter's head at its row
                base = self._base_rows[entry.bank]
                bank = np.repeat(base[None], size, axis=0)
                for name in order:
                    tensor = adapters[name].arrays.get(entry.slot)
                    if tensor is not None:
                        slot = slots.get(entry.slot)
                        bank[adapters[name].row] = tensor.T if slot is not None and slot.layout == "out_in" else tensor
                values[entry.bank] = self._to_device(bank)
                continue
            tensors = [(adapters[n].row, adapters[n].arrays[entry.slot]) for n in order
                       if entry.slot in adapters[n].arrays]
            values[entry.bank] = self._to_device(stack_bank(entry, size, tensors))
        return _Banks({name: adapters[name].row for name in order}, values, size)

    @property
    def adapter_ids(self) -> dict[str, int]:
        """Bank row of each loaded adapter (MultiAdapter models), for feeding ids directly."""
        with self._lock:
            return {n: a.row for n, a in self._adapters.items() if not a.unloading}

    # -- run -----------------------------------------------------------------------------------
