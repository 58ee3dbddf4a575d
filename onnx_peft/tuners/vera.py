"""VeRA layers for nn.Linear and transformers' Conv1D.

::

    x ──► base_layer (frozen W) ───────────────────────────────────────────┐
    │                                                                     (+) ──► y
    └──► dropout ──► A_s [r, in] ──► * lambda_d ──► B_s [out, r] ──► * lambda_b

``A``/``B`` are frozen random projections shared by all layers of one adapter. They live once
on ``peft_model.base_model`` (state-dict keys ``base_model.vera_A.<adapter>``, saved by PEFT as
``base_model.vera_A``), created by :func:`before_inject` before any layer; each layer keeps a
plain (non-module) handle to them, so they are neither duplicated in the state dict nor moved
twice. The math is :mod:`onnx_peft.methods.vera`, shared with the ONNX passes.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterConfigError
from ..methods.base import method_for
from ..methods.vera import VeraConfig, vera_projections
from ..targets import is_target
from .base import AdapterLayer, linear_layout


class ProjectionBank(nn.Module):
    """One frozen matrix per adapter, as buffers: ``base_model.vera_A.<adapter>``.

    A buffer is non-persistent (left out of the state dict, as PEFT does) when the adapter's
    config says ``save_projection=False``; it is then redrawn from ``projection_prng_key``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seeds: dict[str, tuple[int, bool]] = {}  # adapter -> (projection_prng_key, save_projection)

    def add(self, adapter_name: str, tensor: torch.Tensor, config: VeraConfig) -> None:
        self.register_buffer(adapter_name, tensor, persistent=config.save_projection)
        self.seeds[adapter_name] = (config.projection_prng_key, config.save_projection)

    def __getitem__(self, adapter_name: str) -> torch.Tensor:
        return self._buffers[adapter_name]

    def __contains__(self, adapter_name: str) -> bool:
        return adapter_name in self._buffers

    def remove(self, adapter_name: str) -> None:
        self._buffers.pop(adapter_name, None)
        self._non_persistent_buffers_set.discard(adapter_name)
        self.seeds.pop(adapter_name, None)


class Projections:
    """A layer's handle to ``base_model.vera_A`` / ``vera_B``: a plain object, so assigning it to
    a layer does not register the banks as the layer's submodules."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner

    def get(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.owner.vera_A[adapter_name], self.owner.vera_B[adapter_name]


def _in_out(module: nn.Module, module_path: str) -> tuple[int, int]:
    """``(in, out)`` of a supported module; anything else raises naming the module."""
    if isinstance(module, VeraLayer):
        module = module.base_layer
    fan_in_fan_out = linear_layout(module, module_path, "VeRA")
    rows, cols = module.weight.shape
    return (rows, cols) if fan_in_fan_out else (cols, rows)


def before_inject(base_model: nn.Module, adapter_name: str, config: VeraConfig) -> None:
    """Draw ``adapter_name``'s projections, sized for the largest targeted layer (PEFT's
    ``_find_dim``), and store them on ``base_model`` (the tuner seam calls this first)."""
    model = base_model.model
    sizes = [_in_out(m, key) for key, m in model.named_modules() if key and is_target(key, config)]
    if not sizes:
        raise AdapterConfigError(
            f"VeraConfig.target_modules {config.target_modules!r} matched no module of "
            f"{type(model).__name__}; check the names with model.named_modules()")
    for name in ("vera_A", "vera_B"):
        if name not in base_model._modules:
            setattr(base_model, name, ProjectionBank())
    for other, (seed, save) in base_model.vera_A.seeds.items():
        if other != adapter_name and seed != config.projection_prng_key:
            raise AdapterConfigError(
                f"VeraConfig.projection_prng_key={config.projection_prng_key} differs from adapter {other!r} "
                f"({seed}); all VeRA adapters of a model share one key, as in PEFT")
        if other != adapter_name and save != config.save_projection:
            raise AdapterConfigError(
                f"VeraConfig.save_projection={config.save_projection} differs from adapter {other!r}; "
                "save the projections for all VeRA adapters or for none, as in PEFT")
    max_in, max_out = (max(s[i] for s in sizes) for i in (0, 1))
    vera_A, vera_B = vera_projections(config.r, max_in, max_out, config.projection_prng_key)
    weight = next(m for key, m in model.named_modules() if key and is_target(key, config)).weight
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    for bank, value in ((base_model.vera_A, vera_A), (base_model.vera_B, vera_B)):
        bank.remove(adapter_name)
        bank.add(adapter_name, torch.from_numpy(value).to(weight.device, dtype), config)
    config.__dict__[_OWNER] = _OwnerRef(base_model)


class VeraLayer(AdapterLayer):
    """VeRA on ``nn.Linear`` (weight ``[out, in]``) or ``Conv1D`` (weight ``[in, out]``,
    ``fan_in_fan_out``). x: ``[..., in]`` -> ``[..., out]``."""

    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d")
    other_param_names = ("r", "vera_dropout", "configs")

    def __init__(self, base_layer: nn.Module, projections: Projections, module_path: str) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = linear_layout(base_layer, module_path, "VeRA")
        self.in_features, self.out_features = _in_out(base_layer, module_path)
        self.module_path = module_path
        self.projections = projections
        self.r: dict[str, int] = {}
        self.configs: dict[str, VeraConfig] = {}
        self.vera_dropout = nn.ModuleDict()
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: VeraConfig) -> None:
        vera_A, vera_B = self.projections.get(adapter_name)
        if vera_A.shape[1] < self.in_features or vera_B.shape[0] < self.out_features:
            raise AdapterConfigError(
                f"module {self.module_path}: the VeRA projections {list(vera_A.shape)} / {list(vera_B.shape)} "
                f"are smaller than the layer ({self.in_features} -> {self.out_features})")
        self.r[adapter_name] = config.r
        self.configs[adapter_name] = config
        p = float(config.vera_dropout)
        self.vera_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        if config.init_weights:  # a fresh adapter is a no-op: lambda_b = 0
            lambda_b = torch.zeros(self.out_features)
            lambda_d = torch.full((config.r,), float(config.d_initial))
        else:
            lambda_b, lambda_d = torch.ones(self.out_features), torch.randn(config.r)
        self.vera_lambda_b[adapter_name] = nn.Parameter(lambda_b.to(weight.device, dtype))
        self.vera_lambda_d[adapter_name] = nn.Parameter(lambda_d.to(weight.device, dtype))

    # -- math ------------------------------------------------------------------------------
    def _parts(self, adapter_name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        vera_A, vera_B = self.projections.get(adapter_name)
        parts = {"vera_lambda_b": self.vera_lambda_b[adapter_name], "vera_lambda_d": self.vera_lambda_d[adapter_name]}
        return parts, {"vera_A": vera_A, "vera_B": vera_B}

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W + (b B_s)(d A_s)`` through :meth:`VeraMethod.merged_weight` (``[out, in]`` there)."""
        parts, shared = self._parts(adapter_name)
        out_first = weight.T if self.fan_in_fan_out else weight
        merged, _ = method_for("VERA").merged_weight(self.configs[adapter_name], self.module_path,
                                                     out_first.float(), None, parts, shared)
        return merged.T if self.fan_in_fan_out else merged

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.get_delta_weight(adapter_name).to(weight.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The update in the base weight's own layout (``[in, out]`` for Conv1D)."""
        shape = (self.in_features, self.out_features) if self.fan_in_fan_out else (self.out_features, self.in_features)
        zero = torch.zeros(shape, device=self.base_layer.weight.device)
        return self.merged_weight(adapter_name, zero)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``y = base(x) + lambda_b * ((lambda_d * (dropout(x) A_s^T)) B_s^T)``."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.vera_lambda_d:
                continue
            vera_A, vera_B = self.projections.get(name)
            lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
            h = self.vera_dropout[name](x.to(lambda_d.dtype))
            low = lambda_d * F.linear(h, vera_A[:, : self.in_features])          # [..., r]
            result = result + (lambda_b * F.linear(low, vera_B[: self.out_features])).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return f"vera.{type(self).__name__}({self.base_layer!r})"


def make_vera_layer(module: nn.Module, adapter_name: str, config: VeraConfig, module_path: str) -> VeraLayer:
    """Wrap ``module`` (nn.Linear or Conv1D) and create ``adapter_name`` on it."""
    _in_out(module, module_path)  # raises for unsupported module types
    owner = config.__dict__.get(_OWNER, _OwnerRef(None))()
    if owner is None:
        raise AdapterConfigError(f"module {module_path}: VeRA layers are created by PeftModel.add_adapter")
    layer = VeraLayer(module, Projections(owner), module_path)
    add_vera_adapter(layer, adapter_name, config, module_path)
    return layer


def add_vera_adapter(layer: VeraLayer, adapter_name: str, config: VeraConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The seam's make_layer does not receive the model, so before_inject leaves a weak reference
# to the AdapterModel holding the projections on the config it is given (the same object
# make_layer then receives; not a dataclass field, so never saved or compared).
_OWNER = "_vera_projections_owner"


class _OwnerRef:
    """A weak reference that pickles and deep-copies as an empty one (a copied config must
    not drag the model along)."""

    def __init__(self, owner: nn.Module | None) -> None:
        self._ref = weakref.ref(owner) if owner is not None else None

    def __call__(self) -> nn.Module | None:
        return self._ref() if self._ref is not None else None

    def __reduce__(self):
        return (_OwnerRef, (None,))


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = VeraLayer
make_layer = make_vera_layer
add_adapter = add_vera_adapter
