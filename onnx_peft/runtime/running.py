"""Running: feeds checked, adapters held for the run, slot / bank / prompt feeds, IO binding."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np

from ..errors import OnnxPeftError, RuntimeSessionError
from ..prompt_feeds import (
    PromptAdapter,
    generation_start,
    prompt_inputs,
    task_list,
)
from .state import _Banks, _Loaded, _numpy_dtype


class AdapterRunning:
    """Run verbs of :class:`~onnx_peft.runtime.AdapterSession`."""

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
                    from ..methods.forms import FORMS

                    if self._merge is not None:
                        raise RuntimeSessionError(
                            "strategy 'merge' runs one adapter at a time; for a different adapter per row open the "
                            "session with strategy 'slots' on a MultiAdapter model")

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
            if self._merge is not None:  # merge on swap: the weights of this adapter (or the base)
                loaded = by_name[adapter] if adapter is not None else None
                heads = {k: v for k, v in loaded.values.items() if k in self._merge.heads} if loaded else {}
                return {**self._merge.weights_for(loaded).values, **heads}
            noop = {k: v for k, v in self._noop.items() if k not in feeds}  # external models: the base
            return {**noop, **by_name[adapter].values} if adapter is not None else noop
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
            task_ids: Any = None, device_outputs: Sequence[str] = ()) -> list[Any]:
        """Like ``InferenceSession.run``; ``adapter``: None (base), a name (whole batch), or one
        name/None per batch row (MultiAdapter models, and prompt-ready models with prompt-learning
        adapters). ``task_ids``: one int, or one per row, for multitask prompt adapters.
        ``device_outputs``: outputs returned as OrtValues where the model ran (on CUDA: device
        memory, nothing copied to the host; feed them to the next run as they are)."""
        unknown = [n for n in device_outputs if n not in (output_names or self.output_names)]
        if unknown:
            raise RuntimeSessionError(f"device_outputs {unknown} are not among the outputs asked for")
        return self._run(output_names, feeds, adapter, run_options, keep_on_device=list(device_outputs),
                         task_ids=task_ids)

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
        if (self._base is not None and not names and prompt_feeds is None and task_ids is None
                and not set(feeds) & self._slot_names):  # no adapter: the twin's base kernels
            return self._execute(self._base, output_names, feeds, {}, run_options, keep_on_device)
        with self._using(names) if held is None else nullcontext(held) as (taken, banks):
            if prompt_feeds is not None:  # generate() lays out prompt inputs itself
                extra = dict(prompt_feeds)
            elif any(a.prompt is not None for a in taken):
                extra = self._prompt_feeds(adapter, feeds, taken, task_ids)
            else:
                if task_ids is not None:
                    raise RuntimeSessionError("task_ids applies to multitask prompt adapters; this run uses none")
                extra = self._adapter_feeds(adapter, feeds, taken, banks)
            return self._execute(self._session, output_names, feeds, extra, run_options, keep_on_device)

    def _execute(self, session: Any, output_names: list[str], feeds: Mapping[str, Any], extra: Mapping[str, Any],
                 run_options: Any, keep_on_device: Sequence[str]) -> list[Any]:
        try:
            if self.device == "cpu" and not keep_on_device:
                return session.run(output_names, {**feeds, **extra}, run_options)
            return self._run_bound(session, output_names, feeds, extra, run_options, keep_on_device)
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

    def _run_bound(self, session: Any, output_names: list[str], feeds: Mapping[str, Any], extra: Mapping[str, Any],
                   run_options: Any, keep_on_device: Sequence[str]) -> list[Any]:
        """IO binding (CUDA; and any device when outputs stay where the model runs, as the KV
        cache of ``generate``): adapter OrtValues and banks are already on the device. Host arrays
        are bound as CPU OrtValues: ``bind_cpu_input`` cannot bind an input that has a default
        (an overridable initializer: slots, prompt inputs), ``bind_ortvalue_input`` can."""
        binding = session.io_binding()
        for name, value in {**feeds, **extra}.items():
            if not isinstance(value, self._ort.OrtValue):
                value = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
            binding.bind_ortvalue_input(name, value)
        for name in output_names:
            if name in keep_on_device:
                binding.bind_output(name, self.device, self._device_id)
            else:
                binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding, run_options)
        outputs = binding.get_outputs()
        return [value if name in keep_on_device else value.numpy()
                for name, value in zip(output_names, outputs)]
