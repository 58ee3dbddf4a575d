"""LoRA, rsLoRA and DoRA: the config and the math, torch-free.

LoRA adds a low-rank update to a frozen weight ``W [out, in]``::

    y = x W^T + s * (x A^T) B^T          A: [r, in], B: [out, r]
    delta_weight = s * B @ A             s = alpha / r   (rsLoRA: alpha / sqrt(r))

DoRA (use_dora) rescales each output row of the updated weight to a learned magnitude m::

    W' = m / ||W + s B A||_row * (W + s B A)

These functions accept numpy arrays or torch tensors; the tuner (PyTorch), MergeAdapters
(numpy on lazily loaded ONNX weights) and convert-adapters all call them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import AdapterConfig, check_positive_ints, check_scale, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from ..targets import pattern_value
from .trainable_tokens import LORA_DELTA, check_indices, replace_rows, token_slots

_INIT_CHOICES = ("gaussian", "pissa", "olora", "loftq", "eva", "corda", "lora_ga")


@dataclass
class LoraRuntimeConfig:
    """PEFT's run-time LoRA settings: never saved in adapter_config.json (a saved one is ignored).

    ``ephemeral_gpu_offload``: for layers kept in CPU memory, DoRA's initial weight norm is computed
    on the GPU and copied back (PEFT: "currently only affects DoRA initialization"); without CUDA it
    changes nothing.
    """

    ephemeral_gpu_offload: bool = False


@register_config
@dataclass
class LoraConfig(AdapterConfig):
    """PEFT's LoraConfig: same field names, same defaults."""

    peft_type = "LORA"

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int | float] = field(default_factory=dict)
    use_dora: bool = False
    loftq_config: dict[str, Any] = field(default_factory=dict)  # LoftQConfig fields (init "loftq")
    eva_config: dict[str, Any] | None = None  # EvaConfig fields (init "eva", tuners/lora_init/eva.py)
    corda_config: dict[str, Any] | None = None  # CordaConfig fields (init "corda", tuners/lora_init/corda.py)
    lora_ga_config: dict[str, Any] | None = None  # LoraGAConfig fields (init "lora_ga", tuners/lora_init/loraga.py)
    # rows of embeddings trained next to the LoRA weights (methods/trainable_tokens.py): a list for
    # the input embedding, or {embedding module name: list}
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig, metadata={"saved": False})

    def validate(self) -> None:
        if isinstance(self.runtime_config, dict):  # PEFT ignores a saved one; keep its values if given
            self.runtime_config = LoraRuntimeConfig(**{k: v for k, v in self.runtime_config.items()
                                                       if k == "ephemeral_gpu_offload"})
        if not isinstance(self.runtime_config, LoraRuntimeConfig):
            raise AdapterConfigError(f"LoraConfig.runtime_config must be a LoraRuntimeConfig, got {self.runtime_config!r}")
        if dataclasses.is_dataclass(self.loftq_config):  # a LoftQConfig: stored as PEFT writes it
            self.loftq_config = dataclasses.asdict(self.loftq_config)
        if dataclasses.is_dataclass(self.eva_config):  # an EvaConfig, likewise
            self.eva_config = dataclasses.asdict(self.eva_config)
        if dataclasses.is_dataclass(self.corda_config):  # a CordaConfig, likewise
            self.corda_config = dataclasses.asdict(self.corda_config)
        if dataclasses.is_dataclass(self.lora_ga_config):  # a LoraGAConfig, likewise
            self.lora_ga_config = dataclasses.asdict(self.lora_ga_config)
        if self.init_lora_weights == "corda" and self.corda_config is None:  # PEFT's default CordaConfig
            self.corda_config = {"cache_file": None, "covariance_file": None, "corda_method": "ipm", "verbose": False,
                                 "use_float16_for_covariance": False, "prune_temporary_fields": True}
        if not isinstance(self.r, int) or self.r <= 0:
            raise AdapterConfigError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        check_positive_ints(self.rank_pattern, "LoraConfig.rank_pattern")
        check_scale(self.lora_alpha, "LoraConfig.lora_alpha")
        for key, alpha in (self.alpha_pattern or {}).items():
            check_scale(alpha, f"LoraConfig.alpha_pattern[{key!r}]")
        if self.bias not in ("none", "all", "lora_only"):
            raise AdapterConfigError(
                f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}"
            )
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise AdapterConfigError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        init = self.init_lora_weights
        if not isinstance(init, bool) and not (
            isinstance(init, str) and (init in _INIT_CHOICES or init.startswith("pissa_niter_"))
        ):
            raise AdapterConfigError(
                f"LoraConfig.init_lora_weights={init!r} is not supported; use True, False, "
                "'gaussian', 'pissa', 'pissa_niter_N', 'olora', 'loftq', 'eva' (then initialize_lora_eva_weights), "
                "'corda' (after preprocess_corda) or 'lora_ga' (after preprocess_loraga)"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterConfigError("LoraConfig.layers_pattern needs layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise AdapterConfigError(
                "LoraConfig.layers_to_transform cannot be used when target_modules is a regex string"
            )
        tokens = self.trainable_token_indices
        if isinstance(tokens, dict):
            for name, indices in tokens.items():
                check_indices(indices, f"LoraConfig.trainable_token_indices[{name!r}]")
        elif tokens is not None:
            check_indices(tokens, "LoraConfig.trainable_token_indices")

    def token_indices_for(self, module_path: str) -> list[int]:
        """The token rows trained at embedding ``module_path`` (a dict key matches as a path suffix;
        a list belongs to the one embedding the checkpoint holds rows for)."""
        tokens = self.trainable_token_indices
        if isinstance(tokens, dict):
            for name, indices in tokens.items():
                if module_path == name or module_path.endswith("." + name):
                    return list(indices)
            raise IncompatibleAdapterError(
                f"module {module_path} has trained token rows but LoraConfig.trainable_token_indices names no "
                f"such module ({sorted(tokens)}); the adapter_config.json does not belong to these weights")
        if tokens is None:
            raise IncompatibleAdapterError(
                f"module {module_path} has trained token rows but LoraConfig.trainable_token_indices is not set; "
                "the adapter_config.json does not belong to these weights")
        return list(tokens)

    def rank_for(self, module_path: str) -> int:
        return int(pattern_value(self.rank_pattern or {}, module_path, self.r))

    def alpha_for(self, module_path: str) -> float:
        return pattern_value(self.alpha_pattern or {}, module_path, self.lora_alpha)

    def scaling_for(self, module_path: str) -> float:
        return lora_scaling(self.rank_for(module_path), self.alpha_for(module_path), self.use_rslora)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _reshape(x: Any, *shape: int) -> Any:
    return x.reshape(*shape)


def lora_delta_weight(lora_A: Any, lora_B: Any, scaling: float, base_shape: tuple[int, ...] | None = None,
                      fan_in_fan_out: bool = False) -> Any:
    """``s * B @ A`` shaped like the base weight.

    lora_A: Linear ``[r, in]`` / Conv ``[r, in, *k]``; lora_B: ``[out, r]`` / ``[out, r, 1..]``.
    ``base_shape`` gives conv kernels their shape back; ``fan_in_fan_out`` (GPT-2 Conv1D,
    weight ``[in, out]``) returns the transpose.
    """
    out_features, rank = lora_B.shape[0], lora_B.shape[1]
    if isinstance(lora_A, np.ndarray) and lora_A.dtype.itemsize < 4:  # numpy fp16 matmul is ~20x slower
        lora_A, lora_B = lora_A.astype(np.float32), lora_B.astype(np.float32)
    delta = _reshape(lora_B, out_features, rank) @ _reshape(lora_A, rank, -1)
    if base_shape is not None and len(base_shape) > 2:
        delta = _reshape(delta, *base_shape)
    delta = delta * scaling
    return delta.T if fan_in_fan_out else delta


def lora_embedding_delta_weight(lora_embedding_A: Any, lora_embedding_B: Any, scaling: float) -> Any:
    """Embedding LoRA: A ``[r, num_embeddings]``, B ``[dim, r]`` -> ``[num_embeddings, dim]``."""
    return (lora_embedding_B @ lora_embedding_A).T * scaling


def row_norm(weight: Any) -> Any:
    """L2 norm of each output row of ``[out, in, ...]``, as a ``[out]`` vector."""
    flat = weight.reshape(weight.shape[0], -1)
    return ((flat * flat).sum(1)) ** 0.5


def dora_weight(base_weight: Any, delta: Any, magnitude: Any) -> Any:
    """DoRA's merged weight ``m / ||W + dW||_row * (W + dW)`` for ``W`` of shape ``[out, ...]``."""
    updated = base_weight + delta
    factor = magnitude / row_norm(updated)
    return updated * factor.reshape(-1, *([1] * (len(updated.shape) - 1)))


def dora_factor(base_weight: Any, delta: Any, magnitude: Any) -> Any:
    """Per-output-channel factor ``m / ||W + dW||_row`` (``[out]``).

    Unmerged DoRA is ``y = factor * (x W^T + s x A^T B^T) + bias``; the swappable ONNX form
    precomputes this factor at convert time from the base weight.
    """
    return magnitude / row_norm(base_weight + delta)


# -- the method seam ---------------------------------------------------------------------------
from .base import Method, register_method  # noqa: E402


@register_method
class LoraMethod(Method):
    """LoRA/rsLoRA/DoRA on Linear and Conv1D: ``lora`` slots (A^T, (s B)^T), plus DoRA's factor;
    embedding rows of ``trainable_token_indices``: ``tokens`` slots (methods/trainable_tokens.py)."""

    peft_type = "LORA"
    config_class = LoraConfig
    tuner_module = "onnx_peft.tuners.lora"
    tensor_names = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_magnitude_vector.weight",
                    LORA_DELTA)
    required_tensors = ()  # checked in group: a module has its token rows, or A and B
    layer_attrs = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                   "trainable_tokens_delta")

    def group(self, tensors, source="adapter", saved_modules=()):
        out = super().group(tensors, source, saved_modules)
        for module, parts in sorted(out.modules.items()):
            if LORA_DELTA in parts:
                continue
            for needed in ("lora_A.weight", "lora_B.weight"):
                if needed not in parts:
                    from ..errors import CheckpointError

                    raise CheckpointError(f"{source}: module {module} has no {needed}; the checkpoint is incomplete")
        return out

    def features(self, config, module, parts):
        if LORA_DELTA in parts:
            return None
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        return (int(a.shape[1]), int(b.shape[0])) if a.ndim == 2 and b.ndim == 2 else None

    @staticmethod
    def _magnitude(parts):
        m = parts.get("lora_magnitude_vector", parts.get("lora_magnitude_vector.weight"))
        return None if m is None else m.reshape(-1)

    def _checked(self, config, module, parts):
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        rank = config.rank_for(module)
        if a.ndim != 2 or b.ndim != 2:
            from ..errors import IncompatibleAdapterError

            raise IncompatibleAdapterError(
                f"module {module} has LoRA A of shape {list(a.shape)}; only linear layers (2-D A and B) "
                "can be inserted or converted (merge conv/embedding adapters with export mode='merged')")
        if a.shape[0] != rank or b.shape[1] != rank:
            from ..errors import IncompatibleAdapterError

            raise IncompatibleAdapterError(
                f"module {module} has A {list(a.shape)} and B {list(b.shape)} but the config says r={rank}; "
                "the adapter_config.json does not belong to these weights")
        return a, b

    def merged_weight(self, config, module, weight, bias, parts, shared):
        if LORA_DELTA in parts:  # trained token rows replace the table's rows
            return replace_rows(weight, config.token_indices_for(module), parts[LORA_DELTA]), bias
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        delta = lora_delta_weight(a, b, config.scaling_for(module))
        magnitude = self._magnitude(parts)
        if magnitude is None:
            return weight + delta, bias
        return dora_weight(weight, delta, magnitude), bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        if LORA_DELTA in parts:
            return {"tokens": token_slots(module, config.token_indices_for(module), parts[LORA_DELTA])}
        a, b = (np.asarray(t, np.float32) for t in self._checked(config, module, parts))
        scale = config.scaling_for(module)
        out = {"lora": {"lora_A.weight": np.ascontiguousarray(a.T),
                        "lora_B.weight": np.ascontiguousarray((b * scale).T)}}
        magnitude = self._magnitude(parts)
        if magnitude is not None or config.use_dora:
            if magnitude is None:
                from ..errors import CheckpointError

                raise CheckpointError(f"DoRA module {module} has no lora_magnitude_vector")
            delta = lora_delta_weight(a, b, scale)
            out["dora"] = {"dora_factor": dora_factor(base_weight(), delta, np.asarray(magnitude, np.float32))}
        return out
