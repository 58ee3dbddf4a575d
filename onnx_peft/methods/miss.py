"""MiSS (and Bone, its predecessor): the configs and the math, torch-free.

MiSS trains one block per layer (PEFT's ``miss_block``; Bone's ``bone_block``) and, in its
default ("balance") mode, adds it to every ``r``-column shard of ``W [out, in]``::

    W'[o, i] = W[o, i] + B[i % r, o]                B: [r, out]
    y = x W^T + b + (x S) B                         S: [in, r], S[i, j] = 1 if i % r == j

``x S`` sums the ``r``-wide chunks of x (PEFT pads x with zeros to a multiple of r), so the
update is low rank and W-independent: ``lora`` slots ``A = S``, ``B = B``, scale 1.

``init_weights="mini"``: ``B [r, mini_r]`` is repeated along the outputs (column ``o`` is
``B[:, o % mini_r]``), then as above.

``init_weights="bat"``: ``B [out/r, r, r]`` multiplies each ``r x r`` block of W (output block
a, input block c) and adds to it::

    W'_(a, c) = W_(a, c) + W_(a, c) B[a] + B[a]

The update depends on W, so its slots are ``dense``: ``D = (W' - W)^T [in, out]``, which has no
per-row (batched) form.

Bone (PEFT < 0.19, ``peft_type`` "BONE", ``bone_block``) is the same math without dropout and
mini; PEFT 0.19+ no longer reads it (its own converter renames ``.bone_`` to ``.miss_`` and the
type to MISS). Here a Bone adapter loads, runs, converts and saves as Bone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from .base import Method, as_float32, register_method


def _validate(config: Any, name: str, modes: tuple[Any, ...], only: str) -> None:
    """Checks shared by MissConfig and BoneConfig (PEFT's rules), naming the field."""
    if isinstance(config.target_modules, (set, tuple)):
        config.target_modules = sorted(config.target_modules)
    if isinstance(config.exclude_modules, (set, tuple)):
        config.exclude_modules = sorted(config.exclude_modules)
    if not isinstance(config.r, int) or isinstance(config.r, bool) or config.r <= 0:
        raise AdapterConfigError(f"{name}.r must be a positive integer, got {config.r!r}")
    if config.init_weights not in modes:
        raise AdapterConfigError(f"{name}.init_weights must be one of {modes}, got {config.init_weights!r}")
    bias = config.bias
    if not isinstance(bias, str) or not (bias in ("none", "all") or bias.endswith("_only")):
        raise AdapterConfigError(f"{name}.bias must be 'none', 'all' or {only!r}, got {bias!r}")
    if isinstance(config.target_modules, str) and (config.layers_to_transform is not None or config.layers_pattern):
        raise AdapterConfigError(
            f"{name}.layers_to_transform / layers_pattern cannot be used when target_modules is a regex")


@register_config
@dataclass
class MissConfig(AdapterConfig):
    """PEFT's MissConfig: same field names, same defaults."""

    peft_type = "MISS"

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        _validate(self, "MissConfig", (True, False, "bat", "mini"), "MiSS_only")
        if not 0.0 <= float(self.miss_dropout) < 1.0:
            raise AdapterConfigError(f"MissConfig.miss_dropout must be in [0, 1), got {self.miss_dropout!r}")
        if not isinstance(self.mini_r, int) or isinstance(self.mini_r, bool) or self.mini_r <= 0:
            raise AdapterConfigError(f"MissConfig.mini_r must be a positive integer, got {self.mini_r!r}")


@register_config
@dataclass
class BoneConfig(AdapterConfig):
    """PEFT's former BoneConfig (PEFT 0.14-0.18): MiSS's math without dropout and mini."""

    peft_type = "BONE"

    r: int = 64
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        _validate(self, "BoneConfig", (True, False, "bat"), "Bone_only")


def miss_mode(config: AdapterConfig) -> str:
    """``"bat"``, ``"mini"`` or ``"balance"`` (init_weights True or False)."""
    init = getattr(config, "init_weights", True)
    return init if init in ("bat", "mini") else "balance"


def block_shape(config: AdapterConfig, in_features: int, out_features: int) -> tuple[int, ...]:
    """The block's shape for a ``[out, in]`` layer: ``[r, out]``, ``[r, mini_r]`` or ``[out/r, r, r]``."""
    mode, r = miss_mode(config), config.r
    if mode == "bat":
        return (out_features // r, r, r)
    return (r, config.mini_r) if mode == "mini" else (r, out_features)


def layer_problem(config: AdapterConfig, in_features: int, out_features: int) -> str | None:
    """Why a ``[out, in]`` layer cannot take this config (PEFT's checks), or None."""
    mode, r = miss_mode(config), config.r
    if r > in_features:
        return f"r={r} is larger than in_features={in_features}"
    if mode == "bat" and (in_features % r or out_features % r):
        return f"init_weights='bat' needs in and out features ({in_features}, {out_features}) divisible by r={r}"
    if mode == "mini" and out_features % config.mini_r:
        return f"init_weights='mini' needs out_features={out_features} divisible by mini_r={config.mini_r}"
    return None


# -- the math (numpy arrays and torch tensors alike) --------------------------------------------
def full_block(block: Any, out_features: int, mode: str) -> Any:
    """The ``[r, out]`` block of balance mode; mini's ``[r, mini_r]`` repeated along the outputs."""
    if mode != "mini":
        return block
    return block[:, np.arange(out_features) % block.shape[1]]


def shard_delta_t(block: Any, in_features: int, out_features: int, mode: str) -> Any:
    """``(W' - W)^T [in, out]`` of balance/mini mode: row ``i`` is ``B[i % r]``."""
    full = full_block(block, out_features, mode)
    return full[np.arange(in_features) % full.shape[0]]


def bat_delta(weight: Any, block: Any) -> Any:
    """Bat's ``W' - W [out, in]``: ``W_(a,c) B[a] + B[a]`` for each ``r x r`` block of ``W``."""
    out_features, in_features = weight.shape
    n_out, r = block.shape[0], block.shape[-1]
    tiles = weight.reshape(n_out, r, in_features // r, r).swapaxes(1, 2)  # [a, c, r, r]
    b = block[:, None]                                                    # [a, 1, r, r]
    return (tiles @ b + b).swapaxes(1, 2).reshape(out_features, in_features)


def selector(in_features: int, r: int) -> np.ndarray:
    """``S [in, r]``: ``S[i, j] = 1`` where ``i % r == j``; ``x S`` sums x's r-wide chunks."""
    return (np.arange(in_features)[:, None] % r == np.arange(r)[None, :]).astype(np.float32)


# -- the method seam ---------------------------------------------------------------------------
@register_method
class MissMethod(Method):
    """MiSS on Linear: ``lora`` slots (selector, block) in balance/mini mode, ``dense`` in bat mode."""

    peft_type = "MISS"
    config_class = MissConfig
    tuner_module = "onnx_peft.tuners.miss"
    block = "miss_block"
    tensor_names = (block,)
    layer_attrs = (block,)

    def features(self, config, module, parts):
        """None: the block tells ``out`` (balance) or neither, never ``in``."""
        return None

    def _checked(self, config, module, block, in_features, out_features):
        problem = layer_problem(config, in_features, out_features)
        expected = block_shape(config, in_features, out_features)
        if problem is None and tuple(block.shape) != expected:
            problem = (f"{self.block} has shape {list(block.shape)}, expected {list(expected)} "
                       f"(r={config.r}, init_weights={config.init_weights!r})")
        if problem is not None:
            raise IncompatibleAdapterError(
                f"module {module} ([{out_features}, {in_features}]): {problem}; the adapter does not fit this "
                "layer, or its adapter_config.json does not belong to these weights")
        return block

    def merged_weight(self, config, module, weight, bias, parts, shared):
        """``W + (W' - W)``; bias unchanged."""
        block = parts[self.block]
        if isinstance(weight, np.ndarray):
            weight, block = as_float32(weight), as_float32(block)
        out_features, in_features = weight.shape
        self._checked(config, module, block, in_features, out_features)
        mode = miss_mode(config)
        if mode == "bat":
            return weight + bat_delta(weight, block), bias
        return weight + shard_delta_t(block, in_features, out_features, mode).T, bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        """``lora`` (A = selector, B = block) or, for bat, ``dense`` (D = (W' - W)^T).

        balance/mini read only the base weight's shape (the slots need ``in``).
        """
        block = as_float32(parts[self.block])
        weight = base_weight()
        out_features, in_features = weight.shape
        self._checked(config, module, block, in_features, out_features)
        mode = miss_mode(config)
        if mode == "bat":
            delta = bat_delta(np.asarray(weight, np.float64), block.astype(np.float64))
            return {"dense": {"delta.weight": as_float32(delta.T)}}
        b = np.ascontiguousarray(full_block(block, out_features, mode))
        return {"lora": {"lora_A.weight": selector(in_features, config.r), "lora_B.weight": b}}


@register_method
class BoneMethod(MissMethod):
    """Bone checkpoints (``bone_block``): MiSS's math, balance or bat."""

    peft_type = "BONE"
    config_class = BoneConfig
    block = "bone_block"
    tensor_names = (block,)
    layer_attrs = (block,)
