"""RandLoRA layers for nn.Linear and transformers' Conv1D.

::

    x ──► base_layer (frozen W) ──────────────────────────────────────┐
    │                                                                 (+) ──► y
    └──► dropout ──► first^T [in, R] ──► second^T [R, out] ──► * s ────┘
         first/second: the shared random bases A, B scaled by lambda [r, n], gamma [n, m]

The bases are frozen buffers, one pair per adapter, drawn by :func:`before_inject` exactly as
PEFT draws them (torch's generator seeded with ``projection_prng_key``). One
:class:`BasisBank` on ``peft_model.base_model`` holds them; each layer shows them through a
:class:`LayerBases` view, so the state dict (and a saved adapter) carries
``base_model.randlora_A`` and a ``<module>.randlora_A`` per module, as PEFT saves them, while the
tensors exist once. With ``save_projection=False`` they are non-persistent and none is saved. The math is :mod:`onnx_peft.methods.randlora`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterConfigError
from ..methods.base import method_for
from ..methods.randlora import RandLoraConfig, num_bases, randlora_factors
from ..targets import is_target
from .base import AdapterLayer, linear_layout
from .vera import _OwnerRef


class BasisBank(nn.Module):
    """One frozen basis per adapter, as buffers named by the adapter (persistent or not)."""

    def __init__(self) -> None:
        super().__init__()
        self.seeds: dict[str, tuple[int, bool]] = {}  # adapter -> (projection_prng_key, save_projection)

    def add(self, adapter_name: str, tensor: torch.Tensor, config: RandLoraConfig) -> None:
        self.register_buffer(adapter_name, tensor, persistent=config.save_projection)
        self.seeds[adapter_name] = (config.projection_prng_key, config.save_projection)

    def __getitem__(self, adapter_name: str) -> torch.Tensor:
        return self._buffers[adapter_name]

    def __contains__(self, adapter_name: str) -> bool:
        return adapter_name in self._buffers

    def __delitem__(self, adapter_name: str) -> None:
        self._buffers.pop(adapter_name, None)
        self._non_persistent_buffers_set.discard(adapter_name)
        self.seeds.pop(adapter_name, None)


class LayerBases(nn.Module):
    """A layer's view of a :class:`BasisBank`: in the state dict it shows (as PEFT saves them) the
    bases of the adapters this layer carries, under ``<layer>.randlora_A.<adapter>``; the
    tensors stay the bank's, so they are stored and moved once."""

    def __init__(self, bank: BasisBank) -> None:
        super().__init__()
        self.__dict__["bank"] = bank       # not a submodule: the bank is registered on base_model
        self.names: list[str] = []

    def __getitem__(self, adapter_name: str) -> torch.Tensor:
        return self.bank[adapter_name]

    def __contains__(self, adapter_name: str) -> bool:
        return adapter_name in self.names

    def __delitem__(self, adapter_name: str) -> None:
        if adapter_name in self.names:
            self.names.remove(adapter_name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Copies when detached: safetensors refuses one tensor under several keys (PEFT copies
        them at save too); ``keep_vars=True`` (loading into the model) gives the bank's own."""
        for name in self.names:
            if name in self.bank and name not in self.bank._non_persistent_buffers_set:
                buffer = self.bank[name]
                destination[prefix + name] = buffer if keep_vars else buffer.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for name in self.names:
            if name in self.bank._non_persistent_buffers_set:
                continue
            if prefix + name in state_dict:
                with torch.no_grad():
                    self.bank[name].copy_(state_dict[prefix + name])
            elif strict:
                missing_keys.append(prefix + name)


def _in_out(module: nn.Module, module_path: str) -> tuple[int, int]:
    """``(in, out)`` of a supported module; anything else raises naming the module."""
    if isinstance(module, RandLoraLayer):
        module = module.base_layer
    fan_in_fan_out = linear_layout(module, module_path, "RandLoRA")
    rows, cols = module.weight.shape
    return (rows, cols) if fan_in_fan_out else (cols, rows)


def _kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """PEFT's draw: kaiming-uniform (a=sqrt(5)) in bfloat16 (float16 where a GPU lacks bf16)."""
    low_bf16 = torch.cuda.is_available() and not torch.cuda.is_bf16_supported()
    tensor = torch.empty(shape, dtype=torch.float16 if low_bf16 else torch.bfloat16)
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def draw_bases(config: RandLoraConfig, max_out: int, max_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, 1, m], B [M, n, r])`` for the largest targeted sizes, bit for bit as PEFT:
    dense (kaiming, std-normalised) or ternary sparse (``sparse``: P(+-1) = 1/6 each;
    ``very_sparse``: 1/sqrt(m) each), from ``projection_prng_key``."""
    small, large = min(max_out, max_in), max(max_out, max_in)
    n = num_bases(max_in, max_out, config.r)
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    if config.sparse or config.very_sparse:
        sparsity = math.sqrt(small) if config.very_sparse else 3
        dense_A = torch.rand((config.r, 1, small), generator=generator)
        dense_B = torch.rand((large, n, config.r), generator=generator)
        bases = []
        for dense in (dense_A, dense_B):
            ternary = torch.zeros(dense.shape)
            ternary[dense < 1 / (2 * sparsity)] = -1
            ternary[dense > 1 - 1 / (2 * sparsity)] = 1
            bases.append(ternary / ternary.std())
        return bases[0], bases[1]
    basis_A = _kaiming_uniform((config.r, 1, small), generator)
    basis_B = torch.cat([_kaiming_uniform((large, 1, config.r), generator) for _ in range(n)], dim=1)
    return basis_A / basis_A.std(), basis_B / basis_B.std()


def before_inject(base_model: nn.Module, adapter_name: str, config: RandLoraConfig) -> None:
    """Draw ``adapter_name``'s bases, sized for the largest targeted layer (PEFT's ``_find_dim``),
    into the banks on ``base_model`` (the tuner seam calls this before any layer is made)."""
    model = base_model.model
    sizes = [_in_out(m, key) for key, m in model.named_modules() if key and is_target(key, config)]
    if not sizes:
        raise AdapterConfigError(
            f"RandLoraConfig.target_modules {config.target_modules!r} matched no module of "
            f"{type(model).__name__}; check the names with model.named_modules()")
    for name in ("randlora_A", "randlora_B"):
        if name not in base_model._modules:
            setattr(base_model, name, BasisBank())
    for other, seed in base_model.randlora_A.seeds.items():
        if other != adapter_name and seed != (config.projection_prng_key, config.save_projection):
            raise AdapterConfigError(
                f"RandLoraConfig.projection_prng_key / save_projection ({config.projection_prng_key}, "
                f"{config.save_projection}) differ from adapter {other!r} {seed}; all RandLoRA adapters of a "
                "model share one key and save their bases alike, as in PEFT")
    max_in, max_out = (max(s[i] for s in sizes) for i in (0, 1))
    basis_A, basis_B = draw_bases(config, max_out, max_in)
    weight = next(m for key, m in model.named_modules() if key and is_target(key, config)).weight
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    for bank, value in ((base_model.randlora_A, basis_A), (base_model.randlora_B, basis_B)):
        bank.add(adapter_name, value.to(weight.device, dtype), config)
    config.__dict__[_OWNER] = _OwnerRef(base_model)


class RandLoraLayer(AdapterLayer):
    """RandLoRA on ``nn.Linear`` (weight ``[out, in]``) or ``Conv1D`` (weight ``[in, out]``,
    ``fan_in_fan_out``). x: ``[..., in]`` -> ``[..., out]``."""

    adapter_layer_names = ("randlora_lambda", "randlora_gamma")
    other_param_names = ("r", "scaling", "randlora_dropout", "configs")

    def __init__(self, base_layer: nn.Module, banks: tuple[BasisBank, BasisBank], module_path: str) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = linear_layout(base_layer, module_path, "RandLoRA")
        self.in_features, self.out_features = _in_out(base_layer, module_path)
        self.module_path = module_path
        self.randlora_A, self.randlora_B = (LayerBases(bank) for bank in banks)  # PEFT saves them per module too
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.configs: dict[str, RandLoraConfig] = {}
        self.randlora_dropout = nn.ModuleDict()
        self.randlora_lambda = nn.ParameterDict()
        self.randlora_gamma = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: RandLoraConfig) -> None:
        basis_A, basis_B = self.randlora_A[adapter_name], self.randlora_B[adapter_name]
        for view in (self.randlora_A, self.randlora_B):
            if adapter_name not in view:
                view.names.append(adapter_name)
        n = num_bases(self.in_features, self.out_features, config.r)
        small, large = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        if basis_A.shape[2] < small or basis_B.shape[0] < large or basis_B.shape[1] < n:
            raise AdapterConfigError(
                f"module {self.module_path}: the RandLoRA bases {list(basis_A.shape)} / {list(basis_B.shape)} "
                f"are smaller than the layer ({self.in_features} -> {self.out_features})")
        self.r[adapter_name] = config.r
        self.scaling[adapter_name] = config.randlora_alpha / config.r
        self.configs[adapter_name] = config
        p = float(config.randlora_dropout)
        self.randlora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        # a fresh adapter is a no-op (lambda = 0); gamma = 1 / max(gamma's shape), as PEFT
        lambda_ = torch.zeros(config.r, n) if config.init_weights else torch.randn(config.r, n)
        gamma = torch.full((n, small), 1 / max(n, small) if config.init_weights else 1 / large)
        self.randlora_lambda[adapter_name] = nn.Parameter(lambda_.to(weight.device, dtype))
        self.randlora_gamma[adapter_name] = nn.Parameter(gamma.to(weight.device, dtype))

    def delete_adapter(self, adapter_name: str) -> None:
        """As the base class; the shared bases go too (the layer's views, then the banks)."""
        super().delete_adapter(adapter_name)
        for view in (self.randlora_A, self.randlora_B):
            del view[adapter_name]
            del view.bank[adapter_name]

    # -- math ------------------------------------------------------------------------------
    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first [R, in], second [out, R])``: ``delta = s * second @ first``."""
        return randlora_factors(self.randlora_lambda[adapter_name], self.randlora_gamma[adapter_name],
                                self.randlora_A[adapter_name], self.randlora_B[adapter_name],
                                self.in_features, self.out_features)

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W + s * second @ first`` through :meth:`RandLoraMethod.merged_weight` (``[out, in]`` there)."""
        parts = {name: getattr(self, name)[adapter_name].float()
                 for name in ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B")}
        out_first = weight.T if self.fan_in_fan_out else weight
        merged, _ = method_for("RANDLORA").merged_weight(self.configs[adapter_name], self.module_path,
                                                         out_first.float(), None, parts, {})
        merged = merged.to(weight.dtype)
        return merged.T if self.fan_in_fan_out else merged

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The update in the base weight's own layout (``[in, out]`` for Conv1D)."""
        shape = (self.in_features, self.out_features) if self.fan_in_fan_out else (self.out_features, self.in_features)
        return self.merged_weight(adapter_name, torch.zeros(shape, device=self.base_layer.weight.device))

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``y = base(x) + s * (dropout(x) first^T) second^T``."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.randlora_lambda:
                continue
            first, second = self._factors(name)
            h = self.randlora_dropout[name](x.to(first.dtype))
            result = result + (F.linear(F.linear(h, first), second) * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return f"randlora.{type(self).__name__}({self.base_layer!r})"


def make_randlora_layer(module: nn.Module, adapter_name: str, config: RandLoraConfig,
                        module_path: str) -> RandLoraLayer:
    """Wrap ``module`` (nn.Linear or Conv1D) and create ``adapter_name`` on it."""
    _in_out(module, module_path)  # raises for unsupported module types
    owner = config.__dict__.get(_OWNER, _OwnerRef(None))()
    if owner is None:
        raise AdapterConfigError(f"module {module_path}: RandLoRA layers are created by PeftModel.add_adapter")
    layer = RandLoraLayer(module, (owner.randlora_A, owner.randlora_B), module_path)
    add_randlora_adapter(layer, adapter_name, config, module_path)
    return layer


def add_randlora_adapter(layer: RandLoraLayer, adapter_name: str, config: RandLoraConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The seam's make_layer does not receive the model, so before_inject leaves a weak reference to
# the AdapterModel holding the banks on the config it is given (as VeRA's tuner does).
_OWNER = "_randlora_banks_owner"

# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = RandLoraLayer
make_layer = make_randlora_layer
add_adapter = add_randlora_adapter
