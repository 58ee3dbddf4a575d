"""AdapterSession: one ONNX Runtime session, many adapters, swapped per run or mixed per row.

A model with adapter slots (optional inputs ``<module>.lora_A.weight`` = A^T ``[in, r]`` and
``<module>.lora_B.weight`` = (s B)^T ``[r, out]`` with zero-rank defaults) runs as the base when
no slot is fed. Loading an adapter checks it against the model's contract and turns its tensors
into OrtValues on the session's device once; ``run(..., adapter="name")`` then feeds those
OrtValues, so switching adapters copies nothing.

On a model built by the MultiAdapter pass the slots are replaced by banks
``A [N, in, r_max]``, ``B [N, r_max, out]`` and an ``adapter_ids [batch]`` input (0 = no
adapter). Full-weight slots (a ``modules_to_save`` head, ``<module>.weight`` / ``.bias``) become
banks ``<module>.weight.bank [N, in, out]`` / ``<module>.bias.bank [N, out]`` whose row 0, and the
row of every adapter without that head, holds the base tensors (read once from the model file).
The session builds the banks from the loaded adapters (again once per load/unload,
as immutable snapshots) and ``run(..., adapter=["a", None, "b"])`` feeds one id per row.

Thread safety: ``run`` takes a reference on each adapter it uses; ``unload_adapter`` refuses new
runs of that adapter, waits for the ones in flight (or fails after ``timeout``), then drops it.
Bank snapshots are never changed in place, so a run always sees the banks and ids it started
with: never another adapter's output.

This module needs only numpy and onnxruntime (no torch).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import (
    CheckpointError,
    IncompatibleAdapterError,
    ModelFileError,
    OnnxPeftError,
    RuntimeSessionError,
    require_onnxruntime,
)
from .graph.banks import MULTI_ADAPTER_KEY, BankEntry, MultiLayout, stack_bank  # noqa: F401  (public here too)
from .graph.contract import RANK_DIM, Contract, Slot, check_adapter, read_contract
from .prompt_feeds import (
    PROMPT_INPUT_NAMES,
    PromptAdapter,
    PromptLayout,
    adapter_from_peft,
    adapter_from_tensors,
    generation_start,
    prompt_inputs,
    task_list,
)

logger = logging.getLogger(__name__)

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}
_SLOT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _numpy_dtype(ort_type: str) -> np.dtype | None:
    if ort_type == "tensor(bfloat16)":
        try:
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        except ImportError:  # pragma: no cover
            return None
    found = _ORT_TO_NUMPY.get(ort_type)
    return np.dtype(found) if found is not None else None


@dataclass
class _InputSpec:
    name: str
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...]
    required: bool


@dataclass
class _Loaded:
    """One loaded adapter: host arrays (bank building) and device OrtValues (direct feeds)."""

    name: str
    source: str
    arrays: dict[str, np.ndarray]
    values: dict[str, Any]
    row: int = 0  # bank row on MultiAdapter models; stable while loaded
    in_use: int = 0
    unloading: bool = False
    prompt: PromptAdapter | None = None  # a prompt-learning adapter (prompt_feeds.py)


@dataclass(frozen=True)
class _Banks:
    """An immutable snapshot: adapter name -> row id, and one OrtValue per bank input."""

    ids: Mapping[str, int]
    values: Mapping[str, Any]
    size: int


def _select_providers(ort: Any, providers: Sequence[Any] | None) -> list[Any]:
    if providers is not None:
        return list(providers)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class AdapterSession:
    """ONNX Runtime session over a model with adapter slots (or MultiAdapter banks).

    >>> session = AdapterSession("deploy/model.onnx")
    >>> session.load_adapter("sql", "deploy/adapters/sql.onnx_adapter")
    >>> logits, = session.run(["logits"], {"input_ids": ids}, adapter="sql")
    """

    def __init__(self, model_path: str | os.PathLike, providers: Sequence[Any] | None = None,
                 session_options: Any = None):
        ort = require_onnxruntime()
        self._ort = ort
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ModelFileError(f"{self.model_path}: no such model file")
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.log_severity_level = 3  # slot inputs with defaults warn on every load
        wanted = _select_providers(ort, providers)
        try:
            self._session = ort.InferenceSession(str(self.model_path), sess_options=session_options,
                                                 providers=wanted)
        except Exception as exc:
            if wanted[0] == "CUDAExecutionProvider" and providers is None:
                logger.warning("CUDA session failed (%s); falling back to CPU", exc)
                self._session = ort.InferenceSession(str(self.model_path), sess_options=session_options,
                                                     providers=["CPUExecutionProvider"])
            else:
                raise ModelFileError(f"{self.model_path}: ONNX Runtime cannot load it ({exc})") from exc
        self.provider = self._session.get_providers()[0]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        logger.debug("AdapterSession: %s on %s", self.model_path.name, self.provider)

        self._inputs: dict[str, _InputSpec] = {}
        for meta, required in [(m, True) for m in self._session.get_inputs()] + [
                (m, False) for m in self._session.get_overridable_initializers()]:
            self._inputs[meta.name] = _InputSpec(meta.name, _numpy_dtype(meta.type),
                                                 tuple(meta.shape or ()), required)
        self.output_names = [o.name for o in self._session.get_outputs()]
        metadata = dict(self._session.get_modelmeta().custom_metadata_map)
        self.contract = read_contract(metadata) or self._contract_from_inputs()
        self.layout = MultiLayout.from_json(metadata[MULTI_ADAPTER_KEY]) if MULTI_ADAPTER_KEY in metadata else None
        self._slot_names = {s.name for s in self.contract.slots}
        self._managed = set() if self.layout is None else {b.bank for b in self.layout.banks}
        # A model extracted with pack_inputs takes each dtype's slots as one flat input; the
        # session checks adapters slot by slot, then packs them once at load time.
        from .passes.extract_adapters import read_packing

        self.packing = read_packing(metadata)
        if self.packing:
            self._managed |= {name for group in self.packing.values() for name in (group["data"], group["sizes"])}
        self._ids_input = self.layout.ids_input if self.layout is not None else None
        self.prompt_layout = PromptLayout.from_metadata(metadata)
        if self.prompt_layout is not None:  # prompt inputs are fed from loaded prompt adapters
            self._managed |= {n for n in self._inputs if n in PROMPT_INPUT_NAMES or n.startswith("prefix.")}
        self._base_rows = self._read_base_rows()

        self._lock = threading.Condition()
        self._adapters: dict[str, _Loaded] = {}
        self._banks: _Banks | None = None

    @property
    def input_names(self) -> list[str]:
        """The inputs a caller feeds: everything but adapter slots, banks and adapter ids."""
        managed = self._slot_names | self._managed | {self._ids_input}
        return [name for name, spec in self._inputs.items() if spec.required and name not in managed]

    # -- adapters ------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters, in load order."""
        with self._lock:
            return [name for name, a in self._adapters.items() if not a.unloading]

    @property
    def is_multi_adapter(self) -> bool:
        return self.layout is not None

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
            from .passes.extract_adapters import unpack_adapter_tensors

            tensors = unpack_adapter_tensors(self.contract, tensors, source=label)
        check_adapter(self.contract, {k: (tuple(v.shape), v.dtype.name) for k, v in tensors.items()},
                      fingerprint=fingerprint, source=label)
        if not tensors:
            raise IncompatibleAdapterError(f"{label}: holds no tensors")
        arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        feeds = arrays
        if self.packing:
            from .passes.extract_adapters import pack_adapter_tensors

            feeds = pack_adapter_tensors(self.contract, arrays, source=label)
        values = {} if self.layout is not None else {k: self._to_device(v) for k, v in feeds.items()}
        if self.layout is not None or self.device == "cpu":
            keep = arrays if self.layout is not None else feeds  # banks: host arrays; CPU OrtValues share them
        else:
            keep = {}
        self._add(name, _Loaded(name, label, keep, values))

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
        from .config import AdapterConfig
        from .formats import read_peft_adapter
        from .methods.base import method_for

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
        from .formats import load_adapter_file, resolve_fingerprint

        try:
            tensors, fingerprint = load_adapter_file(path)
        except OnnxPeftError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read adapter file ({exc})") from exc
        return tensors, resolve_fingerprint(fingerprint, self.contract.fingerprint), str(path)

    def _read_peft_dir(self, path: Path) -> dict[str, np.ndarray]:
        """A PEFT adapter dir converted to this model's slots (A^T, (s B)^T, the model's dtype)."""
        from .convert import base_weight_reader, peft_to_slots
        from .formats import read_peft_adapter

        config, tensors = read_peft_adapter(path)
        reader = None

        def base_weight(module: str) -> np.ndarray:  # DoRA only: read the model lazily
            nonlocal reader
            if reader is None:
                from .graph.io import load_model

                reader = base_weight_reader(load_model(self.model_path))
            return reader(module)

        dtype = self.contract.slots[0].dtype if self.contract.slots else "float32"
        return peft_to_slots(config, tensors, dtype, base_weight, self.contract, source=str(path))

    def _to_device(self, array: np.ndarray) -> Any:
        if self.device == "cpu":
            return self._ort.OrtValue.ortvalue_from_numpy(array)  # shares the numpy buffer
        return self._ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)

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
        from .graph.io import load_model

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
    @contextmanager
    def _using(self, names: Sequence[str]) -> Iterator[tuple[list[_Loaded], _Banks | None]]:
        with self._lock:
            wanted = list(dict.fromkeys(names))
            for name in wanted:
                loaded = self._adapters.get(name)
                if loaded is None or loaded.unloading:
                    raise RuntimeSessionError(self._unknown(name))
            taken = [self._adapters[n] for n in wanted]
            for loaded in taken:
                loaded.in_use += 1
            banks = self._banks
        try:
            yield taken, banks
        finally:
            with self._lock:
                for loaded in taken:
                    loaded.in_use -= 1
                self._lock.notify_all()

    def _check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(feeds, Mapping):
            raise RuntimeSessionError(f"feeds must be a dict of input name -> array, got {type(feeds).__name__}")
        checked: dict[str, Any] = {}
        for name, value in feeds.items():
            spec = self._inputs.get(name)
            if spec is None or name in self._managed:
                expected = [n for n, s in self._inputs.items() if s.required and n not in self._managed]
                why = "is managed by the session (use adapter=...)" if name in self._managed else "is not an input of the model"
                raise RuntimeSessionError(f"feed {name!r} {why}; the model takes {expected}")
            if isinstance(value, self._ort.OrtValue):
                dtype, shape = _numpy_dtype(value.data_type()), tuple(value.shape())
            else:
                if not isinstance(value, np.ndarray):
                    value = np.asarray(value, dtype=spec.dtype)
                dtype, shape = value.dtype, value.shape
            if spec.dtype is not None and dtype != spec.dtype:
                raise RuntimeSessionError(
                    f"input {name!r} has dtype {dtype}, the model expects {spec.dtype}; cast it, "
                    f"e.g. np.asarray(x, dtype=np.{spec.dtype.name})")
            if spec.shape and (len(shape) != len(spec.shape) or any(
                    isinstance(want, int) and want != got for want, got in zip(spec.shape, shape))):
                raise RuntimeSessionError(
                    f"input {name!r} has shape {list(shape)}, the model expects {list(spec.shape)}")
            checked[name] = value
        missing = [n for n, s in self._inputs.items() if s.required and n not in checked
                   and n not in self._managed and n != self._ids_input]
        if missing:
            raise RuntimeSessionError(f"missing input(s) {missing}; the model takes "
                                      f"{[n for n, s in self._inputs.items() if s.required and n not in self._managed]}")
        return checked

    def _batch_size(self, feeds: Mapping[str, Any]) -> int:
        names = [self.layout.batch_input] if self.layout and self.layout.batch_input in feeds else list(feeds)
        for name in names:
            value = feeds[name]
            shape = value.shape() if isinstance(value, self._ort.OrtValue) else value.shape
            if len(shape) >= 1:
                return int(shape[0])
        raise RuntimeSessionError("cannot tell the batch size: no feed has a batch dimension")

    def _names_for_ids(self, ids: Any, feeds: Mapping[str, Any]) -> list[str | None]:
        ids = ids.numpy() if isinstance(ids, self._ort.OrtValue) else np.asarray(ids)
        batch = self._batch_size(feeds)
        if ids.shape != (batch,):
            raise RuntimeSessionError(f"{self._ids_input!r} has shape {list(ids.shape)}; the batch has {batch} rows")
        with self._lock:
            by_row = {a.row: n for n, a in self._adapters.items() if not a.unloading}
        size = max(by_row, default=0) + 1
        names: list[str | None] = []
        for i, row in enumerate(ids.tolist()):
            if row != 0 and row not in by_row:
                raise RuntimeSessionError(
                    f"{self._ids_input}[{i}] = {row} is out of range: valid ids are 0 (no adapter) and "
                    f"{sorted(by_row)} (of {size} rows); see AdapterSession.adapter_ids")
            names.append(by_row.get(row))
        return names

    def _adapter_feeds(self, adapter: Any, feeds: Mapping[str, Any], taken: list[_Loaded],
                       banks: _Banks | None) -> dict[str, Any]:
        by_name = {a.name: a for a in taken}
        if self.layout is None:
            if isinstance(adapter, (list, tuple)):
                distinct = set(adapter)
                if len(distinct) > 1:
                    from .methods.forms import FORMS

                    if any(s.method not in FORMS and s.method != "modules_to_save" for s in self.contract.slots):
                        raise RuntimeSessionError(
                            f"{self.model_path.name} takes one adapter per run and its slots "
                            f"({next(s.method for s in self.contract.slots if s.method not in FORMS)}) have no "
                            "per-row form; run rows of different adapters separately (run(..., adapter=NAME))")
                    raise RuntimeSessionError(
                        f"{self.model_path.name} takes one adapter per run; a different adapter per row "
                        "needs a MultiAdapter model: onnx-peft multi-adapter MODEL.onnx -o OUT_DIR")
                batch = self._batch_size(feeds)
                if len(adapter) != batch:
                    raise RuntimeSessionError(f"adapter list has {len(adapter)} entries but the batch has {batch} rows")
                adapter = next(iter(distinct), None)
            return dict(by_name[adapter].values) if adapter is not None else {}
        assert banks is not None
        batch = self._batch_size(feeds)
        if isinstance(adapter, (list, tuple)):
            if len(adapter) != batch:
                raise RuntimeSessionError(f"adapter list has {len(adapter)} entries but the batch has {batch} rows")
            ids = np.array([0 if a is None else banks.ids[a] for a in adapter], dtype=np.int64)
        else:
            ids = np.full(batch, 0 if adapter is None else banks.ids[adapter], dtype=np.int64)
        if not ids.any():  # every row is the base: the banks' defaults hold row 0, skip the big feeds
            return {self.layout.ids_input: ids}
        return {self.layout.ids_input: ids, **banks.values}

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any],
            adapter: str | Sequence[str | None] | None = None, run_options: Any = None,
            task_ids: Any = None) -> list[Any]:
        """Like ``InferenceSession.run``; ``adapter``: None (base), a name (whole batch), or one
        name/None per batch row (MultiAdapter models, and prompt-ready models with prompt-learning
        adapters). ``task_ids``: one int, or one per row, for multitask prompt adapters."""
        return self._run(output_names, feeds, adapter, run_options, task_ids=task_ids)

    def _run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any], adapter: Any,
             run_options: Any = None, keep_on_device: Sequence[str] = (),
             held: tuple[list[_Loaded], _Banks | None] | None = None, task_ids: Any = None,
             prompt_feeds: Mapping[str, Any] | None = None) -> list[Any]:
        names = self._names_of(adapter)
        output_names = list(output_names or self.output_names)
        unknown = [o for o in output_names if o not in self.output_names]
        if unknown:
            raise RuntimeSessionError(f"unknown output(s) {unknown}; the model has {self.output_names}")
        feeds = self._check_feeds(feeds)
        if self._ids_input is not None and self._ids_input in feeds:
            if adapter is not None:
                raise RuntimeSessionError(f"pass either adapter= or a {self._ids_input!r} feed, not both")
            adapter = self._names_for_ids(feeds.pop(self._ids_input), feeds)
            names = [a for a in adapter if a is not None]
        clash = sorted(set(feeds) & self._slot_names)
        if clash and names:
            raise RuntimeSessionError(f"feed {clash[0]!r} is an adapter slot; pass either the slot feeds or adapter=, not both")
        with self._using(names) if held is None else nullcontext(held) as (taken, banks):
            if prompt_feeds is not None:  # generate() lays out prompt inputs itself
                extra = dict(prompt_feeds)
            elif any(a.prompt is not None for a in taken):
                extra = self._prompt_feeds(adapter, feeds, taken, task_ids)
            else:
                if task_ids is not None:
                    raise RuntimeSessionError("task_ids applies to multitask prompt adapters; this run uses none")
                extra = self._adapter_feeds(adapter, feeds, taken, banks)
            try:
                if self.device == "cpu":
                    return self._session.run(output_names, {**feeds, **extra}, run_options)
                return self._run_bound(output_names, feeds, extra, run_options, keep_on_device)
            except OnnxPeftError:
                raise
            except Exception as exc:
                raise RuntimeSessionError(f"ONNX Runtime failed on {self.model_path.name}: {exc}") from exc

    def _prompt_rows(self, adapter: Any, batch: int, taken: list[_Loaded]) -> list[PromptAdapter | None]:
        """One prompt adapter (or None) per row; refuses runs that mix them with weight adapters."""
        if any(a.prompt is None for a in taken):
            raise RuntimeSessionError("one run cannot mix prompt-learning and weight adapters; run them separately")
        names = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * batch
        if len(names) != batch:
            raise RuntimeSessionError(f"adapter list has {len(names)} entries but the batch has {batch} rows")
        by_name = {a.name: a.prompt for a in taken}
        return [None if n is None else by_name[n] for n in names]

    def _prompt_feeds(self, adapter: Any, feeds: dict[str, Any], taken: list[_Loaded],
                      task_ids: Any) -> dict[str, Any]:
        """Prompt inputs for a run; as PEFT, token types are dropped (zeros) for rows with an
        adapter unless the model classifies sequences."""
        layout = self.prompt_layout
        batch = self._batch_size(feeds)
        rows = self._prompt_rows(adapter, batch, taken)
        if layout.prefix_via == "past" and any(r is not None and r.kind == "prefix" for r in rows):
            raise RuntimeSessionError(f"{self.model_path.name} takes a prefix as its past key/values: run prefix "
                                      "adapters through AdapterSession.generate()")
        layout.check_length(rows, int(np.shape(feeds["input_ids"])[1]) if "input_ids" in feeds else 0)
        if "token_type_ids" in feeds and layout.task != "sequence-classification":
            types = np.array(feeds["token_type_ids"])
            types[[r is not None for r in rows]] = 0
            feeds["token_type_ids"] = types
        heads = self._head_values(rows, taken)
        return {**prompt_inputs(layout, rows, task_list(task_ids, batch), layout.prefix_via == "inputs"), **heads}

    def _head_values(self, rows: list[PromptAdapter | None], taken: list[_Loaded]) -> dict[str, Any]:
        """The full-weight slot feeds of the rows' adapters; heads are per run, not per row."""
        with_heads = [a for a in taken if a.prompt is not None and a.prompt.heads]
        if not with_heads:
            return {}
        if len({id(r) for r in rows}) > 1:
            raise RuntimeSessionError(f"{with_heads[0].name} trains its own head, which a row cannot swap; run "
                                      "rows of different adapters separately")
        return dict(with_heads[0].values)

    def _generation_start(self, adapter: Any, batch: int, taken: list[_Loaded], task_ids: Any, tokens: int) -> Any:
        """Prompt-learning adapters' part of a decode loop (prompt_feeds.GenerationStart), or None."""
        if not any(a.prompt is not None for a in taken):
            if task_ids is not None:
                raise RuntimeSessionError("task_ids applies to multitask prompt adapters; this call uses none")
            return None
        rows = self._prompt_rows(adapter, batch, taken)
        self.prompt_layout.check_length(rows, tokens)
        if self._head_values(rows, taken):
            raise RuntimeSessionError("adapters with trained heads classify; generate() decodes with the LM head")
        return generation_start(self.prompt_layout, rows, task_list(task_ids, batch))

    @staticmethod
    def _names_of(adapter: Any) -> list[str]:
        if isinstance(adapter, (list, tuple)):
            names = [a for a in adapter if a is not None]
            bad = [a for a in names if not isinstance(a, str)]
        else:
            names = [] if adapter is None else [adapter]
            bad = [] if adapter is None or isinstance(adapter, str) else [adapter]
        if bad:
            raise RuntimeSessionError(f"adapter must be a name, None or a list of them; got {bad[0]!r}")
        return names

    def _run_bound(self, output_names: list[str], feeds: Mapping[str, Any], extra: Mapping[str, Any],
                   run_options: Any, keep_on_device: Sequence[str]) -> list[Any]:
        """CUDA: IO binding; adapter OrtValues and banks are already on the device."""
        binding = self._session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, self._ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in extra.items():
            if isinstance(value, self._ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, value)
        for name in output_names:
            binding.bind_output(name, "cuda" if name in keep_on_device else "cpu")
        self._session.run_with_iobinding(binding, run_options)
        outputs = binding.get_outputs()
        return [value if name in keep_on_device else value.numpy()
                for name, value in zip(output_names, outputs)]

    # -- generation ----------------------------------------------------------------------------
    def _decoder_io(self) -> tuple[list[str], list[str], list[str]]:
        """(past inputs, present outputs, missing) of a causal-lm-with-past model."""
        past = [n for n in self._inputs if n.startswith("past_key_values.")]
        present = ["present." + n[len("past_key_values."):] for n in past]
        missing = [n for n in ("input_ids", "logits") if n not in self._inputs and n not in self.output_names]
        missing += [n for n in present if n not in self.output_names]
        return past, present, missing

    def generate(self, input_ids: Any, max_new_tokens: int, adapter: str | Sequence[str | None] | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | Sequence[int] | None = None, attention_mask: Any = None,
                 pad_token_id: int | None = None, seed: int | None = None, task_ids: Any = None) -> np.ndarray:
        """Decode with the KV cache of a causal-lm-with-past model; returns ``[batch, prompt + new]``.

        ``input_ids [batch, prompt]`` int64, left padded where ``attention_mask`` is 0.
        ``adapter``: one name for all rows, or one per row (MultiAdapter models; prompt-ready
        models with prompt-learning adapters: virtual tokens go in at prefill, a prefix is the
        initial past, masks and positions as PEFT builds them). ``task_ids``: multitask prompts. Greedy unless
        ``do_sample`` (then temperature / top_k / top_p, numpy RNG seeded by ``seed``). Rows that
        produced ``eos_token_id`` continue with ``pad_token_id`` (default: the first eos id).
        The adapters stay referenced for the whole call, so unloading one waits for it.
        """
        past_names, present_names, missing = self._decoder_io()
        if missing or not past_names:
            raise RuntimeSessionError(
                f"{self.model_path.name} is not a causal LM with past key/values (missing "
                f"{missing or ['past_key_values.*']}); export it with task causal-lm-with-past")
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise RuntimeSessionError(f"input_ids must be a non-empty [batch, length] integer array, got {ids.dtype} {list(ids.shape)}")
        ids = ids.astype(np.int64)
        batch = ids.shape[0]
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64).reshape(ids.shape)
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) < 0:
            raise RuntimeSessionError(f"max_new_tokens must be >= 0, got {max_new_tokens!r}")
        eos = [] if eos_token_id is None else [int(eos_token_id)] if np.isscalar(eos_token_id) else [int(e) for e in eos_token_id]
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        if isinstance(adapter, (list, tuple)) and len(adapter) != batch:
            raise RuntimeSessionError(f"adapter list has {len(adapter)} entries but the batch has {batch} rows")
        rng = np.random.default_rng(seed)
        past = {}
        for name in past_names:
            spec = self._inputs[name]
            dims = [d for i, d in enumerate(spec.shape) if i not in (0, 2)]
            if len(spec.shape) != 4 or not all(isinstance(d, int) for d in dims):
                raise RuntimeSessionError(f"input {name!r} has shape {list(spec.shape)}; need [batch, heads, past, head_dim] with fixed heads/head_dim")
            past[name] = np.zeros((batch, dims[0], 0, dims[1]), dtype=spec.dtype)
        tokens, current = ids, ids
        finished = np.zeros(batch, dtype=bool)
        outputs = ["logits", *present_names]
        with self._using(self._names_of(adapter)) as held:
            start = self._generation_start(adapter, batch, held[0], task_ids, ids.shape[1] + int(max_new_tokens))
            if start is not None:
                past.update(start.past)
            for step in range(int(max_new_tokens)):
                feeds: dict[str, Any] = {"input_ids": current, **past}
                if "attention_mask" in self._inputs:
                    feeds["attention_mask"] = mask if start is None else np.concatenate(
                        [start.prefix_mask, *([start.prompt_mask] if step else []), mask], axis=1)
                if "position_ids" in self._inputs:
                    if start is None:
                        positions = np.cumsum(mask, axis=1) - 1
                        positions[mask == 0] = 1
                    else:
                        positions = start.positions(mask)
                    feeds["position_ids"] = positions[:, -current.shape[1]:]
                prompt = None if start is None else (start.feeds if step == 0 else {})
                logits, *presents = self._run(outputs, feeds, adapter if start is None else None,
                                              keep_on_device=present_names, held=held, prompt_feeds=prompt)
                last = np.asarray(logits[:, -1, :], dtype=np.float32)
                chosen = _sample(last, rng, temperature, top_k, top_p) if do_sample else last.argmax(-1)
                chosen = np.where(finished, pad, chosen).astype(np.int64)
                tokens = np.concatenate([tokens, chosen[:, None]], axis=1)
                finished |= np.isin(chosen, eos)
                if finished.all():
                    break
                current = chosen[:, None]
                mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
                past = dict(zip(past_names, presents))
        return tokens


def _sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """One token per row from ``logits [batch, vocab]``: temperature, then top-k, then top-p."""
    if temperature <= 0:
        raise RuntimeSessionError(f"temperature must be > 0, got {temperature}")
    logits = logits.astype(np.float64) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1)
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        drop = np.cumsum(probs, axis=-1) - probs > top_p  # keep the smallest set reaching top_p
        sorted_logits[drop] = -np.inf
        logits = np.full_like(logits, -np.inf)
        np.put_along_axis(logits, order, sorted_logits, axis=-1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)


def example_feeds(session: AdapterSession, batch: int = 1, sequence: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic feeds for every required input of ``session`` (benchmarks, smoke tests).

    Symbolic dims: batch -> ``batch``, past/cache dims -> 0, total/attention dims -> ``sequence``,
    others -> ``sequence``. ``input_ids`` draw from the logits' vocab when it is fixed (else 100),
    ``attention_mask`` is ones, ``position_ids`` count up, other ints are zeros, floats normal.
    """
    rng = np.random.default_rng(seed)
    vocab = 100
    for output in session._session.get_outputs():
        if output.name == "logits" and output.shape and isinstance(output.shape[-1], int):
            vocab = output.shape[-1]
    feeds: dict[str, np.ndarray] = {}
    for name, spec in session._inputs.items():
        if not spec.required or name in session._managed or name == session._ids_input:
            continue
        shape = []
        for i, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif i == 0:
                shape.append(batch)
            elif "past" in str(dim):
                shape.append(0)
            else:
                shape.append(sequence)
        dtype = spec.dtype or np.dtype(np.float32)
        if name == "input_ids":
            feeds[name] = rng.integers(0, vocab, shape).astype(dtype)
        elif name == "attention_mask":
            feeds[name] = np.ones(shape, dtype)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        elif np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            feeds[name] = np.zeros(shape, dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds
