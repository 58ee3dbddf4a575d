"""The method seam: what every adapter method tells the rest of onnx-peft, torch-free.

A method is one file ``onnx_peft/methods/<method>.py`` (config, PEFT keys, math, slots) plus
one file ``onnx_peft/tuners/<method>.py`` (its torch layer). The file defines a
:class:`Method` subclass and registers it with :func:`register_method`; passes,
convert-adapters, the contract, inspect and the runtime look methods up here by ``peft_type``
and never name one themselves.

What a method answers (``W`` a base Linear weight ``[out, in]``, ``parts`` the tensors PEFT
stores for one module, keyed by their PEFT suffix, e.g. ``{"lora_A.weight": A, ...}``)::

    group(tensors)                  PEFT checkpoint keys -> {module path: parts} + shared tensors
    merged_weight(W, bias, parts)   W', bias'  (the one definition of the merged layer; numpy or
                                    torch arrays alike, so the tuner, MergeAdapters and tests share it)
    slot_tensors(parts, base)       {form name: {slot suffix: array}}: the adapter in the slot
                                    layout of one or more branch forms (methods/forms.py)

A *form* is a graph shape shared by methods (``lora``: ``y + (x A) B``; ``ia3_out``:
``y * l``; ``rotate_in``: ``Linear(x R)``; ...): VeRA, AdaLoRA and MiSS adapters become
``lora`` slots, so they swap with LoRA adapters in one session and share its per-row banks.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..config import AdapterConfig
from ..errors import AdapterConfigError, CheckpointError, IncompatibleAdapterError

PEFT_PREFIX = "base_model.model."

# peft_type -> Method instance; filled by @register_method in each method module.
_METHODS: dict[str, Method] = {}


@dataclass
class AdapterTensors:
    """A PEFT checkpoint's tensors by module: ``modules[path][suffix]``, plus tensors shared by
    all modules (VeRA's projections), keyed as stored."""

    modules: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    shared: dict[str, np.ndarray] = field(default_factory=dict)
    # modules trained in full (PEFT ``modules_to_save``): {module path: {"weight": W, "bias": b}}
    full: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


BaseWeight = Callable[[], np.ndarray]
"""Returns the base weight ``W [out, in]`` as float32 (read lazily: only DoRA-like methods call it)."""


class Method(abc.ABC):
    """One PEFT method, torch-free. Subclasses set the class attributes and the math."""

    peft_type: ClassVar[str]
    config_class: ClassVar[type[AdapterConfig]]
    tuner_module: ClassVar[str]            # "onnx_peft.tuners.ia3"; imported only when torch is used
    # PEFT key suffixes of the per-module tensors, e.g. ("lora_A.weight", "lora_B.weight").
    tensor_names: ClassVar[tuple[str, ...]]
    # Suffixes a module must have; the others are optional (e.g. DoRA's magnitude).
    required_tensors: ClassVar[tuple[str, ...] | None] = None
    # Keys (after ``base_model.model.`` / ``base_model.``) of tensors shared by all modules.
    shared_names: ClassVar[tuple[str, ...]] = ()
    # Attribute names of the torch layer's per-adapter containers (for PEFT key mapping).
    layer_attrs: ClassVar[tuple[str, ...]] = ()
    # True when merging changes the layer's bias too (IA3 scaling the output).
    changes_bias: ClassVar[bool] = False
    # The export modes that can hold this method (X-LoRA routes experts from the model's own
    # hidden states: only "in-graph"); the others are refused before anything is traced.
    graph_modes: ClassVar[tuple[str, ...]] = ("merged", "in-graph", "inputs", "external")

    @property
    def name(self) -> str:
        return self.peft_type.lower()

    # -- checkpoint keys -----------------------------------------------------------------------
    def split_key(self, key: str) -> tuple[str, str] | None:
        """``base_model.model.<module>.<suffix>`` -> ``(module, suffix)``, or None."""
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix in sorted(self.tensor_names, key=len, reverse=True):
            if name.endswith("." + suffix):
                return name[: -len(suffix) - 1], suffix
        return None

    def group(self, tensors: Mapping[str, np.ndarray], source: str = "adapter",
              saved_modules: Sequence[str] = ()) -> AdapterTensors:
        """Sort a PEFT checkpoint's tensors by module; a stray key or a missing one raises,
        naming it. ``saved_modules`` (the config's ``modules_to_save``) name modules whose
        ``.weight`` / ``.bias`` are whole trained tensors."""
        out = AdapterTensors()
        for key, value in tensors.items():
            full = _saved_module_key(key, saved_modules)
            if full is not None:
                out.full.setdefault(full[0], {})[full[1]] = value
                continue
            shared = self._shared_key(key)
            if shared is not None:
                out.shared[shared] = value
                continue
            split = self.split_key(key)
            if split is None:
                raise IncompatibleAdapterError(
                    f"{source}: tensor {key!r} is not a {self.peft_type} tensor of a module "
                    f"(expected <module>.{{{', '.join(self.tensor_names)}}}); the checkpoint and its "
                    "adapter_config.json do not belong together, or the module kind is not supported"
                )
            module, suffix = split
            out.modules.setdefault(module, {})[suffix] = value
        required = self.required_tensors if self.required_tensors is not None else self.tensor_names
        for module, parts in sorted(out.modules.items()):
            for needed in required:
                if needed not in parts:
                    raise CheckpointError(f"{source}: module {module} has no {needed}; the checkpoint is incomplete")
        for needed in self.shared_names:
            if out.modules and needed not in out.shared:
                raise CheckpointError(f"{source}: the checkpoint has no shared tensor {needed!r}")
        return out

    def _shared_key(self, key: str) -> str | None:
        for name in self.shared_names:
            if key in (name, "base_model." + name, PEFT_PREFIX + name):
                return name
        return None

    # -- the math ------------------------------------------------------------------------------
    def features(self, config: AdapterConfig, module: str, parts: Mapping[str, np.ndarray]) -> tuple[int, int] | None:
        """``(in, out)`` of the layer these tensors were trained on, where they say (checked
        against the graph before anything is grafted); None where they do not."""
        return None

    @abc.abstractmethod
    def merged_weight(self, config: AdapterConfig, module: str, weight: Any, bias: Any,
                      parts: Mapping[str, Any], shared: Mapping[str, Any]) -> tuple[Any, Any]:
        """The merged layer: ``(W' [out, in], bias')`` from ``W [out, in]`` and ``bias [out]``
        (or None). Works on numpy arrays and torch tensors alike."""

    @abc.abstractmethod
    def slot_tensors(self, config: AdapterConfig, module: str, parts: Mapping[str, np.ndarray],
                     shared: Mapping[str, np.ndarray], base_weight: BaseWeight
                     ) -> dict[str, dict[str, np.ndarray]]:
        """The adapter at ``module`` as slot tensors: ``{form: {slot suffix: float32 array}}``
        (forms in methods/forms.py; Llama-Adapter's ``adaption_prompt`` form is not grafted by a
        pass but traced at export, export/adaption_inputs.py). ``base_weight()`` gives
        ``W [out, in]`` where the slot tensors depend on it (DoRA's factor, HRA's folded reflections)."""

    # -- variants: one checkpoint, several adapters (Poly's tasks) -----------------------------
    def variants(self, config: AdapterConfig) -> tuple[str, ...]:
        """Names of the adapters one checkpoint of this method holds, each with its own slot
        tensors and merged weight (Poly: one LoRA per task, ``("task0", "task1", ...)``); ``()``
        for a method whose checkpoint is one adapter. Callers name variant ``v`` of adapter
        ``NAME`` as ``NAME.v``."""
        return ()

    def select_variant(self, config: AdapterConfig, tensors: AdapterTensors, variant: str
                       ) -> tuple[AdapterConfig, AdapterTensors]:
        """``(config, tensors)`` of the one adapter ``variant`` (a name from :meth:`variants`),
        which ``slot_tensors`` / ``merged_weight`` then take like any adapter of this method."""
        raise IncompatibleAdapterError(
            f"a {self.peft_type} adapter is one adapter and has no variants; got variant={variant!r}")

    # -- torch ---------------------------------------------------------------------------------
    def tuner(self) -> Any:
        """The torch module of this method (imports torch)."""
        return importlib.import_module(self.tuner_module)


def _saved_module_key(key: str, saved_modules: Sequence[str]) -> tuple[str, str] | None:
    """``base_model.model.classifier.weight`` -> ``("classifier", "weight")`` when ``classifier``
    (or a module inside it: ``classifier.out_proj``) is a modules_to_save module."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    module, _, part = name.rpartition(".")
    if part not in ("weight", "bias") or not module:
        return None
    for saved in saved_modules:
        if module == saved or module.endswith("." + saved) or f"{saved}." in module:
            return module, part
    return None


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` the method of its ``peft_type``."""
    _METHODS[cls.peft_type] = cls()
    return cls


def method_for(config_or_type: AdapterConfig | str) -> Method:
    """The registered method of a config (or a ``peft_type`` string)."""
    from . import _load_all  # noqa: F401  (registers every method)

    _load_all()
    peft_type = config_or_type if isinstance(config_or_type, str) else config_or_type.peft_type
    try:
        return _METHODS[str(peft_type).upper()]
    except KeyError:
        raise AdapterConfigError(
            f"peft_type {peft_type!r} has no onnx-peft method; supported: {', '.join(sorted(_METHODS))}"
        ) from None


def all_methods() -> dict[str, Method]:
    from . import _load_all

    _load_all()
    return dict(_METHODS)


def method_names() -> tuple[str, ...]:
    """Every registered method by its lower-case name (``lora``, ``ia3``, ...), as ``train`` takes it."""
    return tuple(sorted(m.lower() for m in all_methods()))


def layer_attrs() -> tuple[str, ...]:
    """Every method's per-adapter container names (``lora_A``, ``ia3_l``, ...)."""
    return tuple(dict.fromkeys(a for m in all_methods().values() for a in m.layer_attrs))


def as_float32(array: Any) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)
