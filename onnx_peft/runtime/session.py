"""AdapterSession: the session itself (construction, inputs, adapters loaded); loading, running
and generation live in sibling modules as the mixins it is made of."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFileError, RuntimeSessionError, require_onnxruntime
from ..graph.banks import MULTI_ADAPTER_KEY, MultiLayout
from ..graph.contract import read_contract
from ..prompt_feeds import PROMPT_INPUT_NAMES, PromptLayout
from .generation import AdapterGeneration
from .loading import AdapterLoading
from .merging import AdapterMerging
from .providers import ProviderPlan, check_applied, plan_providers, rejected_option
from .running import AdapterRunning
from .state import _Banks, _InputSpec, _Loaded, _numpy_dtype
from .strategy import STRATEGIES

logger = logging.getLogger("onnx_peft.runtime")


class AdapterSession(AdapterLoading, AdapterRunning, AdapterGeneration, AdapterMerging):
    """ONNX Runtime session over a model with adapter slots (or MultiAdapter banks).

    >>> session = AdapterSession("deploy/model.onnx")
    >>> session.load_adapter("sql", "deploy/adapters/sql.onnx_adapter")
    >>> logits, = session.run(["logits"], {"input_ids": ids}, adapter="sql")

    ``adapter=None`` runs the base on every kind of slot model. External-initializer models
    (``export --mode external``) hold the exported adapter in their slots' initializers; the session
    feeds the slots' rank-0 defaults whenever no adapter (or an adapter not covering a slot) is
    chosen, and adapters of any rank load, lower or higher than the exported one.
    """

    def __init__(self, model_path: str | os.PathLike, providers: Sequence[Any] | None = None,
                 session_options: Any = None, *, device: str | None = None,
                 provider_options: Mapping[str, Mapping[str, Any]] | None = None, tf32: bool = False,
                 strategy: str = "auto", base_session: bool | None = None):
        """``device``: "auto" (CUDA when onnxruntime-gpu has it, else CPU), "cuda" or "cpu";
        ``providers`` (ORT's list form) overrides it. fp32 runs on CUDA without TF32 (exact, as on
        CPU) unless ``tf32=True``; ``provider_options`` (``{"cuda": {"device_id": "1"}}``) are
        merged over that and checked: an option the provider rejects raises RuntimeSessionError.
        ``strategy`` (chosen once, here; see :mod:`onnx_peft.runtime.strategy`): "slots" feeds
        adapters per run (per row on MultiAdapter models), "merge" folds the active adapter into
        device-resident weights on swap so every run costs the base, "auto" = "slots".
        ``base_session`` (strategy "slots"): runs without an adapter go to a twin session over the
        base graph sharing every weight (runtime/base_twin.py); None = on with CUDA when
        ``session_options`` is None, else off (True adds the shared weights to your options: do not
        reuse them for another model). ``session_options`` serve every session this opens; graphs
        built in memory add the model folder for external data to them."""
        ort = require_onnxruntime()
        self._ort = ort
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ModelFileError(f"{self.model_path}: no such model file")
        from ..graph.io import check_external_data

        check_external_data(self.model_path)  # ORT itself accepts hard links to files elsewhere
        if strategy not in STRATEGIES:
            raise RuntimeSessionError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
        owned = session_options is None  # the shared-weight twin may only add to options of our own
        if owned:
            session_options = ort.SessionOptions()
            session_options.log_severity_level = 3  # slot inputs with defaults warn on every load
        self._session_options = session_options
        self._plan = plan_providers(ort, providers, device, provider_options, tf32)
        self.strategy = "slots" if strategy == "auto" else strategy
        graphs = self._merge_graphs() if self.strategy == "merge" else None
        self.device = self._plan.device
        self._device_id = int(self._plan.options[0].get("device_id", 0)) if self.device == "cuda" else 0
        twin = self._share_base_weights(base_session, owned) if graphs is None else None
        self._session = self._create_session(self.model_path if graphs is None else self._in_memory(graphs.main),
                                             self._plan)
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
        self.contract = graphs.contract if graphs is not None else (
            read_contract(metadata) or self._contract_from_inputs())
        self.layout = MultiLayout.from_json(metadata[MULTI_ADAPTER_KEY]) if MULTI_ADAPTER_KEY in metadata else None
        self._slot_names = {s.name for s in self.contract.slots}
        self._managed = set() if self.layout is None else {b.bank for b in self.layout.banks}
        # A model extracted with pack_inputs takes each dtype's slots as one flat input; the
        # session checks adapters slot by slot, then packs them once at load time.
        from ..graph.packing import read_packing

        self.packing = read_packing(metadata)
        if self.packing:
            self._managed |= {name for group in self.packing.values() for name in (group["data"], group["sizes"])}
        self._ids_input = self.layout.ids_input if self.layout is not None else None
        self.prompt_layout = PromptLayout.from_metadata(metadata)
        if self.prompt_layout is not None:  # prompt inputs are fed from loaded prompt adapters
            self._managed |= {n for n in self._inputs if n in PROMPT_INPUT_NAMES or n.startswith("prefix.")}
        self._base_rows = self._read_base_rows()
        self._noop_arrays, self._noop = self._external_defaults()  # arrays kept: CPU values share them
        self._merge = None if graphs is None else self._start_merge(graphs)
        self._base = None if twin is None else self._create_session(self._in_memory(twin.model), self._plan)
        self._pickers: dict[str, Any] = {}  # logits dtype -> Picker (runtime/picking.py), made on first use

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

    # -- construction --------------------------------------------------------------------------
    def _create_session(self, model: Path | bytes, plan: ProviderPlan, options: Any = None) -> Any:
        """An InferenceSession on ``plan``'s providers. Automatic CUDA that cannot start falls back
        to the CPU with a warning; CUDA the user asked for, or a rejected option, is an error."""
        ort = self._ort
        options = self._session_options if options is None else options
        label = self.model_path.name
        source = str(model) if isinstance(model, Path) else model
        try:
            session = ort.InferenceSession(source, sess_options=options, providers=plan.names,
                                           provider_options=plan.options)
        except Exception as exc:
            named = rejected_option(exc, plan)
            if named is not None:
                raise RuntimeSessionError(f"{label}: {named}") from exc
            if plan.device != "cuda" or plan.explicit:
                raise ModelFileError(f"{self.model_path}: ONNX Runtime cannot load it ({exc})") from exc
            logger.warning("CUDA session failed (%s); falling back to CPU", exc)
            self._plan = plan = ProviderPlan(["CPUExecutionProvider"], [{}])
            session = ort.InferenceSession(source, sess_options=options, providers=plan.names)
        started = session.get_providers()[0]
        if started != plan.names[0]:
            if plan.explicit:
                raise RuntimeSessionError(f"{label}: {plan.names[0]} could not start (ONNX Runtime fell back to "
                                          f"{started}; its log says why); check the CUDA/cuDNN install or use device 'cpu'")
            logger.warning("%s could not start; running on %s", plan.names[0], started)
        check_applied(session, plan)
        return session

    def _share_base_weights(self, wanted: bool | None, owned: bool) -> Any:
        """Strategy "slots": the base twin (runtime/base_twin.py) when wanted, its weights handed
        to ONNX Runtime as shared OrtValues for both sessions; None when not built. Automatic only
        with the session's own SessionOptions: shared initializers stay in an options object, and
        a caller's, reused for another model with the same weight names, would get these weights."""
        if wanted is None:
            wanted = self._plan.device == "cuda" and owned
        if not wanted:
            return None
        from .base_twin import base_twin

        twin = base_twin(self.model_path)
        if twin is None:
            return None
        try:
            values = {name: self._to_device(np.ascontiguousarray(array)) for name, array in twin.weights.items()}
        except Exception as exc:  # the device cannot take them: the slot session alone still works
            logger.warning("no base session (%s); runs without an adapter use the slot graph", exc)
            return None
        # the sessions use these buffers in place: they live as long as self (on CPU the OrtValues
        # share the host arrays, which they keep alive; on a GPU the host copies are freed here)
        self._shared = values
        for name, value in values.items():
            self._session_options.add_initializer(name, value)
        return twin
