"""VB-LoRA layers for nn.Linear and transformers' Conv1D.

::

    x ──► base_layer (frozen W) ─────────────────────────────┐
    │                                                        (+) ──► y
    └──► dropout ──► A^T [in, r] ──► B^T [r, out] ────────────┘
                     A = mix(logits_A, bank), B = mix(logits_B, bank)

The vector bank ``[num_vectors, vector_length]`` is one trainable tensor per adapter shared by
every layer. It lives once on ``peft_model.base_model`` (state-dict key
``base_model.vblora_vector_bank.<adapter>``, saved by PEFT as ``base_model.vblora_vector_bank``),
created by :func:`before_inject`; each layer keeps a plain (non-module) handle to it, so it is
neither duplicated in the state dict nor trained twice. The math is
:mod:`onnx_peft.methods.vblora`, shared with the ONNX passes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterConfigError, OnnxPeftError
from ..methods.base import method_for
from ..methods.vblora import LOGITS, VBLoRAConfig, vblora_factors
from .base import AdapterLayer, linear_layout
from .vera import _OwnerRef

_OWNER = "_vblora_bank_owner"


def before_inject(base_model: nn.Module, adapter_name: str, config: VBLoRAConfig) -> None:
    """Draw ``adapter_name``'s vector bank, ``U(-bound, bound)`` as PEFT does, and keep it on
    ``base_model`` (the tuner seam calls this before any layer is made)."""
    if "vblora_vector_bank" not in base_model._modules:
        base_model.vblora_vector_bank = nn.ParameterDict()
    weight = next((p for p in base_model.model.parameters() if p.is_floating_point()), None)
    dtype = weight.dtype if weight is not None else torch.float32
    bank = torch.empty(config.num_vectors, config.vector_length)
    bank.uniform_(-config.init_vector_bank_bound, config.init_vector_bank_bound)
    base_model.vblora_vector_bank[adapter_name] = nn.Parameter(
        bank.to(weight.device if weight is not None else "cpu", dtype))
    config.__dict__[_OWNER] = _OwnerRef(base_model)


class VectorBank:
    """A layer's handle to ``base_model.vblora_vector_bank``: a plain object, so the bank is not
    registered as the layer's parameter."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner

    def __getitem__(self, adapter_name: str) -> torch.Tensor:
        return self.owner.vblora_vector_bank[adapter_name]

    def remove(self, adapter_name: str) -> None:
        if adapter_name in self.owner.vblora_vector_bank:
            del self.owner.vblora_vector_bank[adapter_name]


class VBLoRALayer(AdapterLayer):
    """VB-LoRA on ``nn.Linear`` (weight ``[out, in]``) or ``Conv1D`` (weight ``[in, out]``,
    ``fan_in_fan_out``). x: ``[..., in]`` -> ``[..., out]``."""

    adapter_layer_names = ("vblora_logits_A", "vblora_logits_B")
    other_param_names = ("r", "topk", "vblora_dropout", "configs")

    def __init__(self, base_layer: nn.Module, bank: VectorBank, module_path: str) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = linear_layout(base_layer, module_path, "VB-LoRA")
        rows, cols = base_layer.weight.shape
        self.in_features, self.out_features = (rows, cols) if self.fan_in_fan_out else (cols, rows)
        self.module_path = module_path
        self.bank = bank
        self.r: dict[str, int] = {}
        self.topk: dict[str, int] = {}
        self.configs: dict[str, VBLoRAConfig] = {}
        self.vblora_dropout = nn.ModuleDict()
        self.vblora_logits_A = nn.ParameterDict()
        self.vblora_logits_B = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: VBLoRAConfig) -> None:
        length = config.vector_length
        for name, size in (("in_features", self.in_features), ("out_features", self.out_features)):
            if size % length:
                raise AdapterConfigError(
                    f"module {self.module_path}: {name}={size} is not divisible by VBLoRAConfig.vector_length="
                    f"{length}; pick a vector_length dividing every targeted layer's sizes")
        self.r[adapter_name] = config.r
        self.topk[adapter_name] = config.topk
        self.configs[adapter_name] = config
        p = float(config.vblora_dropout)
        self.vblora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        bank = self.bank[adapter_name]
        std = float(config.init_logits_std)
        logits_a = torch.randn(config.r, self.in_features // length, config.num_vectors) * std
        logits_b = torch.randn(self.out_features // length, config.r, config.num_vectors) * std
        self.vblora_logits_A[adapter_name] = nn.Parameter(logits_a.to(bank.device, bank.dtype))
        self.vblora_logits_B[adapter_name] = nn.Parameter(logits_b.to(bank.device, bank.dtype))

    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True) -> None:
        """As the base class; the shared bank of an adapter of this layer trains with it."""
        super().set_adapter(adapter_names, trainable)
        for name in self.vblora_logits_A:
            self.bank[name].requires_grad_(trainable and name in self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        """As the base class; the shared bank goes with the adapter (the first layer drops it)."""
        super().delete_adapter(adapter_name)
        self.bank.remove(adapter_name)

    # -- math ------------------------------------------------------------------------------
    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])`` mixed from the bank."""
        logits_a = self.vblora_logits_A[adapter_name]
        if self.training and torch.isinf(logits_a).any():
            raise OnnxPeftError(
                f"module {self.module_path}: adapter {adapter_name!r} has -inf logits: it was loaded from a "
                "save_only_topk_weights checkpoint, which serves inference and merging but cannot train")
        parts = {LOGITS[0]: logits_a, LOGITS[1]: self.vblora_logits_B[adapter_name]}
        return vblora_factors(parts, self.bank[adapter_name], self.topk[adapter_name])

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W + B @ A`` through :meth:`VBLoRAMethod.merged_weight` (``[out, in]`` there)."""
        parts = {name: getattr(self, name)[adapter_name].float() for name in LOGITS}
        shared = {"vblora_vector_bank": self.bank[adapter_name].float()}
        out_first = weight.T if self.fan_in_fan_out else weight
        merged, _ = method_for("VBLORA").merged_weight(self.configs[adapter_name], self.module_path,
                                                       out_first.float(), None, parts, shared)
        merged = merged.to(weight.dtype)
        return merged.T if self.fan_in_fan_out else merged

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The update in the base weight's own layout (``[in, out]`` for Conv1D)."""
        shape = (self.in_features, self.out_features) if self.fan_in_fan_out else (self.out_features, self.in_features)
        return self.merged_weight(adapter_name, torch.zeros(shape, device=self.base_layer.weight.device))

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``y = base(x) + (dropout(x) A^T) B^T``."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.vblora_logits_A:
                continue
            a, b = self._factors(name)
            h = self.vblora_dropout[name](x.to(a.dtype))
            result = result + F.linear(F.linear(h, a), b).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return f"vblora.{type(self).__name__}({self.base_layer!r})"


def make_vblora_layer(module: nn.Module, adapter_name: str, config: VBLoRAConfig, module_path: str) -> VBLoRALayer:
    """Wrap ``module`` (nn.Linear or Conv1D) and create ``adapter_name`` on it."""
    linear_layout(module, module_path, "VB-LoRA")  # raises for unsupported module types
    owner = config.__dict__.get(_OWNER, _OwnerRef(None))()
    if owner is None:
        raise AdapterConfigError(f"module {module_path}: VB-LoRA layers are created by PeftModel.add_adapter")
    layer = VBLoRALayer(module, VectorBank(owner), module_path)
    add_vblora_adapter(layer, adapter_name, config, module_path)
    return layer


def add_vblora_adapter(layer: VBLoRALayer, adapter_name: str, config: VBLoRAConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# -- PEFT's save_only_topk_weights checkpoint layout ------------------------------------------
def _index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer type PEFT stores top-k indices in."""
    for limit, dtype in ((2**8, torch.uint8), (2**15, torch.int16), (2**31, torch.int32)):
        if num_vectors < limit:
            return dtype
    return torch.int64


def topk_tensors(config: VBLoRAConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors with each ``<module>.vblora_logits_X [.., N]`` replaced, as PEFT saves
    a ``save_only_topk_weights`` adapter, by ``..._topk_indices [.., k]`` (smallest integer type)
    and ``..._topk_weights [.., k-1]`` (the softmax of the top-k logits, the last one left out)."""
    out = {}
    for key, value in tensors.items():
        if not key.endswith(LOGITS) or not config.save_only_topk_weights:
            out[key] = value
            continue
        top, indices = value.topk(config.topk, dim=-1)
        out[key + "_topk_indices"] = indices.to(_index_dtype(config.num_vectors))
        out[key + "_topk_weights"] = torch.softmax(top, dim=-1)[..., :-1].contiguous()
    return out


def logits_tensors(config: VBLoRAConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse on load (PEFT's recipe): logits that are ``log(weight)`` at the saved indices
    and ``-inf`` elsewhere give the same top-k mixture. Such an adapter serves inference and
    merging; it cannot train (:meth:`VBLoRALayer._factors` refuses)."""
    out = {}
    for key, value in tensors.items():
        if key.endswith("_topk_weights"):
            continue
        if not key.endswith("_topk_indices"):
            out[key] = value
            continue
        name = key[: -len("_topk_indices")]
        partial = tensors[name + "_topk_weights"].float()
        weights = torch.cat([partial, 1 - partial.sum(-1, keepdim=True)], dim=-1)
        logits = torch.full((*weights.shape[:-1], config.num_vectors), float("-inf"))
        out[name] = logits.scatter(-1, value.long(), torch.log(weights))
    return out


load_tensors = logits_tensors  # PeftModel._load_weights: a top-k checkpoint back to logits


def save_extra(peft_model: nn.Module, adapter_name: str, directory: Path) -> None:
    """After PeftModel.save_pretrained: rewrite a ``save_only_topk_weights`` adapter's file in
    PEFT's top-k layout (:func:`topk_tensors`), so both libraries write the same keys."""
    config = peft_model.peft_config[adapter_name]
    if not config.save_only_topk_weights:
        return
    from safetensors.torch import load_file

    from ..checkpoint import WEIGHTS_NAME, save_adapter_dir
    from ..config import AdapterConfig

    tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
    save_adapter_dir(directory, AdapterConfig.from_pretrained(directory), topk_tensors(config, tensors))


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = VBLoRALayer
make_layer = make_vblora_layer
add_adapter = add_vblora_adapter
