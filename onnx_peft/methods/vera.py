"""VeRA: the config, the shared random projections and the math, torch-free.

VeRA (Kopiczko et al., 2023) freezes one pair of random matrices shared by every adapted
layer and trains only two scaling vectors per layer::

    y = x W^T + b * ((d * (x A_s^T)) B_s^T)        d: lambda_d [r],  b: lambda_b [out]
    delta_weight = (b[:, None] * B_s) @ (d[:, None] * A_s)              [out, in]

``A [r, max_in]`` and ``B [max_out, r]`` are sized for the largest adapted layer; a layer
uses the slices ``A_s = A[:, :in]`` and ``B_s = B[:out, :]``. PEFT saves them once per adapter
(``base_model.vera_A`` / ``base_model.vera_B``) unless ``save_projection=False``, in which case
they are drawn again from ``projection_prng_key``: :func:`vera_projections` reproduces PEFT's
draws bit for bit without torch.

The low-rank delta becomes ``lora`` slots with the vectors folded in (``(d A_s)^T [in, r]``,
``(b B_s)^T [r, out]``), so a VeRA adapter swaps with LoRA adapters in one session.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError, CheckpointError, IncompatibleAdapterError
from .base import Method, as_float32, register_method


@register_config
@dataclass
class VeraConfig(AdapterConfig):
    """PEFT's VeraConfig: same field names, same defaults."""

    peft_type = "VERA"

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise AdapterConfigError(f"VeraConfig.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise AdapterConfigError(
                f"VeraConfig.projection_prng_key must be an integer seed, got {self.projection_prng_key!r}")
        if self.bias not in ("none", "all", "vera_only"):
            raise AdapterConfigError(f"VeraConfig.bias must be 'none', 'all' or 'vera_only', got {self.bias!r}")
        if not 0.0 <= float(self.vera_dropout) < 1.0:
            raise AdapterConfigError(f"VeraConfig.vera_dropout must be in [0, 1), got {self.vera_dropout!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterConfigError("VeraConfig.layers_pattern needs layers_to_transform")


# -- the shared projections --------------------------------------------------------------------
def _torch_cpu_uniform(count: int, bound: float, state: np.random.RandomState) -> np.ndarray:
    """``count`` float32 draws of ``torch.empty(count).uniform_(-bound, bound, generator=g)``.

    torch's CPU generator is MT19937 seeded like numpy's legacy ``RandomState(seed)``; a float32
    draw keeps the low 24 bits of one 32-bit output, ``u = bits / 2**24``, and computes
    ``u * (hi - lo) + lo`` in float64 with ``lo``/``hi`` first rounded to float32.
    """
    bits = state.randint(0, 2**32, size=count, dtype=np.uint32) & np.uint32((1 << 24) - 1)
    low, high = np.float32(-bound), np.float32(bound)
    unit = bits.astype(np.float64) / float(1 << 24)
    return (unit * np.float64(high - low) + np.float64(low)).astype(np.float32)


def vera_projections(r: int, max_in: int, max_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``vera_A [r, max_in]`` and ``vera_B [max_out, r]`` for ``projection_prng_key=seed``.

    Kaiming-uniform (gain sqrt(2), fan_in = the last dim) drawn from one CPU generator seeded
    with ``seed``, A first, then B: the same numbers as ``torch.Generator().manual_seed(seed)``.
    """
    state = np.random.RandomState(seed % 2**32)  # torch keeps the low 32 bits of the seed
    tensors = []
    for rows, cols in ((r, max_in), (max_out, r)):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(cols)
        tensors.append(_torch_cpu_uniform(rows * cols, bound, state).reshape(rows, cols))
    return tensors[0], tensors[1]


def vera_delta_weight(lambda_b: Any, lambda_d: Any, vera_A: Any, vera_B: Any, in_features: int) -> Any:
    """``(b B_s) @ (d A_s)``: ``[out, in]`` with ``out = len(lambda_b)`` (numpy or torch)."""
    sliced_A = vera_A[:, :in_features]
    sliced_B = vera_B[: lambda_b.shape[0], :]
    return (lambda_b.reshape(-1, 1) * sliced_B) @ (lambda_d.reshape(-1, 1) * sliced_A)


@register_method
class VeraMethod(Method):
    """VeRA on Linear and Conv1D: ``lora`` slots with lambda_d / lambda_b folded in."""

    peft_type = "VERA"
    config_class = VeraConfig
    tuner_module = "onnx_peft.tuners.vera"
    tensor_names = ("vera_lambda_b", "vera_lambda_d")
    shared_names = ("vera_A", "vera_B")
    layer_attrs = ("vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B")

    def group(self, tensors, source="adapter", saved_modules=()):
        found = {self._shared_key(key) for key in tensors}
        if not set(self.shared_names) <= found:
            raise CheckpointError(
                f"{source}: this VeRA adapter was saved without its projections vera_A / vera_B "
                "(save_projection=False); they can be redrawn from projection_prng_key only next to "
                "the PyTorch model (onnx_peft.PeftModel.from_pretrained does). Re-save it with "
                "save_projection=True: get_peft_model(base, VeraConfig(same fields, save_projection=True)), "
                "copy the vera_lambda_* tensors in, save_pretrained")
        return super().group(tensors, source, saved_modules)

    def _checked(self, config: VeraConfig, module: str, parts, shared) -> tuple[Any, Any, Any, Any]:
        lambda_b, lambda_d = parts["vera_lambda_b"], parts["vera_lambda_d"]
        vera_A, vera_B = shared["vera_A"], shared["vera_B"]
        r = lambda_d.shape[0]
        if vera_A.shape[0] != r or vera_B.shape[1] != r or r != config.r:
            raise IncompatibleAdapterError(
                f"module {module}: vera_lambda_d has {r} entries, vera_A is {list(vera_A.shape)}, vera_B "
                f"{list(vera_B.shape)} and the config says r={config.r}; the tensors and the "
                "adapter_config.json do not belong together")
        if vera_B.shape[0] < lambda_b.shape[0]:
            raise IncompatibleAdapterError(
                f"module {module}: vera_lambda_b has {lambda_b.shape[0]} outputs but vera_B only "
                f"{vera_B.shape[0]} rows")
        return lambda_b, lambda_d, vera_A, vera_B

    def merged_weight(self, config, module, weight, bias, parts, shared):
        lambda_b, lambda_d, vera_A, vera_B = self._checked(config, module, parts, shared)
        return weight + vera_delta_weight(lambda_b, lambda_d, vera_A, vera_B, weight.shape[1]), bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        lambda_b, lambda_d, vera_A, vera_B = (as_float32(t) for t in self._checked(config, module, parts, shared))
        in_features = base_weight().shape[1]  # the slice of vera_A this layer uses
        if vera_A.shape[1] < in_features:
            raise IncompatibleAdapterError(
                f"module {module} has {in_features} inputs but vera_A only {vera_A.shape[1]} columns")
        a = lambda_d[:, None] * vera_A[:, :in_features]              # [r, in]
        b = lambda_b[:, None] * vera_B[: lambda_b.shape[0], :]       # [out, r]
        return {"lora": {"lora_A.weight": np.ascontiguousarray(a.T), "lora_B.weight": np.ascontiguousarray(b.T)}}
