"""Merge on swap: one adapter at a time, folded into device-resident weights, runs at base cost.

The session runs the *main* graph (merge_graphs.py): the base graph whose adapted Linears read
their weights from inputs. The session binds one :class:`WeightSet` per run:

    adapter=None       the base set (the model's own weights, read once): exactly the base
    adapter="sql"      the set merged for "sql"; when another adapter is active, a swap runs the
                       *merge* graph on ONNX Runtime (W + s B A and the other forms' math, on the
                       session's device) into a fresh set, which becomes the active one

Sets are immutable and each run holds the set it started with, so a run in flight finishes on
its own weights while a swap builds the next; the previous set is freed when its last run ends.
Swapping back to the base binds the original tensors: no arithmetic. Memory: the adapted weights
twice (base + active set), plus sets still held by runs in flight.

Cost: on CUDA the runs launch the base's kernels on the same weights. On CPU, ONNX Runtime
pre-packs only constant MatMul weights, and these are inputs: runs cost 1.07x the base at prefill
and more per decode step (BENCHMARKS.md), so "auto" stays "slots" there.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import RuntimeSessionError
from .merge_graphs import MergeGraphs, build_merge_graphs, main_feeds_of


@dataclass(frozen=True)
class WeightSet:
    """The main graph's weight inputs for one adapter (None: the base)."""

    adapter: str | None
    values: Mapping[str, Any]
    source: Any = field(default=None, compare=False)  # the _Loaded it was merged from


class MergeOnSwap:
    """Weight sets of a merge-strategy session, and the merge session that builds them."""

    def __init__(self, graphs: MergeGraphs, to_device: Any, merge_session: Any, device: tuple[str, int],
                 slot_modules: Mapping[str, str]) -> None:
        self._slot_modules = slot_modules  # slot name -> its module
        self.heads = set(graphs.heads)
        self._merge_inputs = {i.name for i in merge_session.get_inputs()} | {
            i.name for i in merge_session.get_overridable_initializers()}
        self._session = merge_session
        self._device = device
        # CPU OrtValues share (and keep) the host arrays; on a GPU the device copies are all there is
        self.base = WeightSet(None, {name: to_device(array) for name, array in main_feeds_of(graphs.targets).items()})
        self.targets = [t if device[0] == "cpu" else replace(t, base_weight=None, base_bias=None)
                        for t in graphs.targets]
        self._active: WeightSet | None = None
        self._lock = threading.Lock()

    @property
    def inputs(self) -> set[str]:
        return set(self.base.values)

    @property
    def active(self) -> str | None:
        current = self._active
        return None if current is None else current.adapter

    def weights_for(self, loaded: Any | None) -> WeightSet:
        """The set to bind for a run of ``loaded`` (a _Loaded, or None for the base)."""
        if loaded is None:
            return self.base
        current = self._active
        if current is not None and current.source is loaded:
            return current
        with self._lock:  # one swap at a time; a run waiting here gets the set just built
            current = self._active
            if current is None or current.source is not loaded:
                current = self._merged(loaded)
                self._active = current
            return current

    def forget(self, loaded: Any) -> None:
        """``loaded`` was unloaded: drop its set (runs holding it keep it alive until they end)."""
        with self._lock:
            if self._active is not None and self._active.source is loaded:
                self._active = None

    def _merged(self, loaded: Any) -> WeightSet:
        """Run the merge graph for the modules ``loaded`` adapts; the others keep the base."""
        slot_values = {k: v for k, v in loaded.values.items() if k in self._merge_inputs}
        modules = {self._slot_modules[name] for name in slot_values}
        if not modules:
            return WeightSet(loaded.name, self.base.values, loaded)
        binding = self._session.io_binding()
        for target in self.targets:  # every input bound (ORT wants them all); untouched modules stay base
            binding.bind_ortvalue_input(target.weight_input, self.base.values[target.weight_input])
        for name, value in slot_values.items():
            binding.bind_ortvalue_input(name, value)
        outputs = []
        for target in self.targets:
            outputs.append(target.weight_input)
            binding.bind_output(target.weight_output, *self._device)
            if target.bias_output is not None:
                outputs.append(target.bias_input)
                binding.bind_output(target.bias_output, *self._device)
        try:
            self._session.run_with_iobinding(binding)
        except Exception as exc:
            raise RuntimeSessionError(f"merging adapter {loaded.name!r} failed in ONNX Runtime: {exc}") from exc
        merged = {name: value for name, value in zip(outputs, binding.get_outputs())
                  if name.rsplit(".", 2)[0] in modules}
        return WeightSet(loaded.name, {**self.base.values, **merged}, loaded)


class AdapterMerging:
    """Merge-strategy verbs of :class:`~onnx_peft.runtime.AdapterSession`."""

    def _merge_graphs(self) -> MergeGraphs:
        return build_merge_graphs(self.model_path)

    def _in_memory(self, model: Any) -> bytes:
        """``model`` as bytes for ONNX Runtime; its external weights stay in the model's folder,
        which ORT is told (a model from bytes otherwise reads them relative to the working dir)."""
        import onnx_ir as ir

        key, folder = "session.model_external_initializers_file_folder_path", str(self.model_path.parent.resolve())
        try:
            present = self._session_options.get_session_config_entry(key)
        except Exception:  # ORT raises for a key never set
            present = None
        if present != folder:
            self._session_options.add_session_config_entry(key, folder)
        return ir.serde.serialize_model(model).SerializeToString()

    def _start_merge(self, graphs: MergeGraphs) -> MergeOnSwap:
        """The merge session (exact fp32 on CUDA whatever the user chose for runs) and the base set."""
        from .providers import ProviderPlan

        options = [{**o, "use_tf32": "0"} if n == "CUDAExecutionProvider" else dict(o)
                   for n, o in zip(self._plan.names, self._plan.options)]
        merge_session = self._create_session(self._in_memory(graphs.merge), ProviderPlan(
            list(self._plan.names), options, self._plan.explicit))
        merge = MergeOnSwap(graphs, self._to_device, merge_session, (self.device, self._device_id),
                            {s.name: s.module for s in graphs.contract.slots})
        self._managed |= merge.inputs
        return merge

    @property
    def active_adapter(self) -> str | None:
        """The adapter whose merged weights are device-resident (strategy "merge"), else None."""
        return None if self._merge is None else self._merge.active

    def activate(self, name: str | None) -> None:
        """Strategy "merge": fold ``name`` into the weights now, so the next run does not pay the
        swap (runs swap on their own otherwise). ``None`` keeps the last merge for later."""
        if self._merge is None:
            raise RuntimeSessionError(f"activate() applies to strategy 'merge'; this session uses {self.strategy!r} "
                                      "(adapters are fed per run)")
        if name is None:
            return
        with self._using([name]) as (taken, _):
            self._merge.weights_for(taken[0])
