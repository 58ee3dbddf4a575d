"""Poly (Polytropon) and MHR: the config and the math, torch-free.

A Poly layer holds ``n_skills`` LoRA "skills" per split and a router with one row of logits
per task; a row's task picks a mixture of the skills (Ponti et al., 2022; ``n_splits > 1`` is
Multi-Head Routing, Caccia et al., 2022). With ``q = n_splits``, ``s = n_skills``, rank ``r``::

    poly_lora_A           A [q, s, in/q, r]
    poly_lora_B           B [q, s, r, out/q]
    poly_router.module_logits   L [n_tasks, q*s]

    w[q, s] = p[q, s] / (sum_s' p[q, s'] + 1e-12)     p = sigmoid(L[task])   (eval)
    A_t = concat_q (sum_s w[q, s] A[q, s])   [in, r]   (split q reads input block q)
    B_t = concat_q (sum_s w[q, s] B[q, s])   [r, out]  (split q writes output block q)
    y   = x W^T + b + (x A_t) B_t / r

The splits share the rank: ``x A_t`` sums every input block's projection, and each output
block reads all r of them. So for a fixed task the layer is exactly a rank-r LoRA, which is
how Poly reaches ONNX: ``lora`` slots ``A_t [in, r]``, ``B_t / r [r, out]`` per task.

Training samples ``p`` from a relaxed Bernoulli instead of the sigmoid (the tuner does that);
everything here is the eval-mode router.

Tasks are the adapter's *variants* (``Method.variants``): ``"task0" .. "task{n-1}"``. Slot
tensors and the merged weight need one task, chosen with ``select_variant`` (convert-adapters,
AdapterSession and InsertAdapters take a ``variant``); a one-task adapter needs no choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from .base import AdapterTensors, Method, as_float32, register_method

EPS = 1e-12  # PEFT's: keeps the normalisation finite when every skill is switched off
A_KEY, B_KEY, LOGITS_KEY = "poly_lora_A", "poly_lora_B", "poly_router.module_logits"
TASK_PREFIX = "task"


@register_config
@dataclass
class PolyConfig(AdapterConfig):
    """PEFT's PolyConfig: same field names, same defaults."""

    peft_type = "POLY"

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    poly_type: str = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1

    def validate(self) -> None:
        for name in ("r", "n_tasks", "n_skills", "n_splits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise AdapterConfigError(f"PolyConfig.{name} must be a positive integer, got {value!r}")
        if self.poly_type != "poly":
            raise AdapterConfigError(f"PolyConfig.poly_type must be 'poly' (the only router PEFT has), "
                                     f"got {self.poly_type!r}")
        if not isinstance(self.init_weights, bool):
            raise AdapterConfigError(f"PolyConfig.init_weights must be True or False, got {self.init_weights!r}")


# -- the math (numpy arrays or torch tensors) --------------------------------------------------
def _sigmoid(x: Any) -> Any:
    return 1 / (1 + (x.neg().exp() if hasattr(x, "exp") else np.exp(-x)))


def skill_weights(probs: Any, n_splits: int, n_skills: int) -> Any:
    """Router probabilities ``[..., q*s]`` -> mixing weights ``[..., q, s]`` summing to ~1 per split."""
    probs = probs.reshape(*probs.shape[:-1], n_splits, n_skills)
    return probs / (probs.sum(-1)[..., None] + EPS)


def task_weights(module_logits: Any, task: Any, n_splits: int, n_skills: int) -> Any:
    """The eval router: ``L [n_tasks, q*s]`` and task ids (an int or ``[batch]``) -> ``[(batch,) q, s]``."""
    return skill_weights(_sigmoid(module_logits[task]), n_splits, n_skills)


def mix_skills(weights: Any, lora_A: Any, lora_B: Any, r: int) -> tuple[Any, Any]:
    """Mix the skills into one LoRA: ``weights [..., q, s]``, ``A [q, s, in/q, r]``,
    ``B [q, s, r, out/q]`` -> ``(A_t [..., in, r], B_t / r [..., r, out])``, so that the layer's
    update is ``(x A_t) (B_t / r)``."""
    q, _, d_in, rank = lora_A.shape
    d_out = lora_B.shape[-1]
    lead = tuple(weights.shape[:-2])
    w = weights[..., None, None]                                    # [..., q, s, 1, 1]
    a = (w * lora_A).sum(-3)                                        # [..., q, in/q, r]
    b = (w * lora_B).sum(-3)                                        # [..., q, r, out/q]
    a = a.reshape(*lead, q * d_in, rank)
    b = b.swapaxes(-3, -2).reshape(*lead, rank, q * d_out) / r      # block q -> columns of split q
    return a, b


def task_lora(config: PolyConfig, parts: Mapping[str, Any], task: int) -> tuple[Any, Any]:
    """The rank-r LoRA a Poly module is for ``task``: ``(A_t [in, r], B_t / r [r, out])``."""
    weights = task_weights(parts[LOGITS_KEY], task, config.n_splits, config.n_skills)
    return mix_skills(weights, parts[A_KEY], parts[B_KEY], config.r)


def task_of(config: PolyConfig, variant: str) -> int:
    """``"task2"`` -> 2, checked against ``config.n_tasks``."""
    names = PolyMethod.task_names(config)
    if variant not in names:
        raise IncompatibleAdapterError(
            f"Poly adapter has no variant {variant!r}; it has one per task: {', '.join(names)}")
    return int(variant[len(TASK_PREFIX):])


# -- the method seam ---------------------------------------------------------------------------
@register_method
class PolyMethod(Method):
    """Poly/MHR on nn.Linear; for one task, ``lora`` slots ``(A_t, B_t / r)``."""

    peft_type = "POLY"
    config_class = PolyConfig
    tuner_module = "onnx_peft.tuners.poly"
    tensor_names = (A_KEY, B_KEY, LOGITS_KEY)
    layer_attrs = ("poly_lora_A", "poly_lora_B", "poly_router")

    @staticmethod
    def task_names(config: PolyConfig) -> tuple[str, ...]:
        return tuple(f"{TASK_PREFIX}{t}" for t in range(config.n_tasks))

    def variants(self, config: AdapterConfig) -> tuple[str, ...]:
        return self.task_names(config)

    def select_variant(self, config: AdapterConfig, tensors: AdapterTensors, variant: str
                       ) -> tuple[AdapterConfig, AdapterTensors]:
        """The adapter restricted to one task: the same Poly adapter with ``n_tasks=1`` and each
        router's row of that task (itself a valid PEFT Poly adapter, run with task id 0)."""
        task = task_of(config, variant)
        modules = {m: {**parts, LOGITS_KEY: parts[LOGITS_KEY][task:task + 1]} for m, parts in tensors.modules.items()}
        return replace(config, n_tasks=1), replace(tensors, modules=modules)

    def _checked(self, config: PolyConfig, module: str, parts: Mapping[str, Any]) -> None:
        q, s, r = config.n_splits, config.n_skills, config.r
        a, b, logits = parts[A_KEY], parts[B_KEY], parts[LOGITS_KEY]
        ok = (len(a.shape) == 4 and tuple(a.shape[:2]) == (q, s) and a.shape[3] == r
              and len(b.shape) == 4 and tuple(b.shape[:3]) == (q, s, r)
              and tuple(logits.shape) == (config.n_tasks, q * s))
        if not ok:
            raise IncompatibleAdapterError(
                f"module {module} has poly_lora_A {list(a.shape)}, poly_lora_B {list(b.shape)} and "
                f"module_logits {list(logits.shape)}, but the config says n_splits={q}, n_skills={s}, r={r}, "
                f"n_tasks={config.n_tasks} (expected [{q}, {s}, in/{q}, {r}], [{q}, {s}, {r}, out/{q}], "
                f"[{config.n_tasks}, {q * s}]); the adapter_config.json does not belong to these weights")
        if config.n_tasks != 1:
            raise IncompatibleAdapterError(
                f"module {module}: a Poly adapter with n_tasks={config.n_tasks} is one LoRA per task; choose "
                f"a task (variant= one of {', '.join(self.task_names(config))}, e.g. "
                "convert_adapters(..., variant='task0')) to insert, convert or merge it")

    def features(self, config, module, parts):
        a, b = parts[A_KEY], parts[B_KEY]
        if len(a.shape) != 4 or len(b.shape) != 4:
            return None
        return int(a.shape[0] * a.shape[2]), int(b.shape[0] * b.shape[3])

    def merged_weight(self, config, module, weight, bias, parts, shared):
        """``W + (A_t B_t / r)^T`` for the adapter's one task (PEFT cannot merge Poly at all)."""
        self._checked(config, module, parts)
        a, b = task_lora(config, parts, 0)
        return weight + (a @ b).T, bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        self._checked(config, module, parts)
        a, b = task_lora(config, {k: as_float32(v) for k, v in parts.items()}, 0)
        return {"lora": {"lora_A.weight": np.ascontiguousarray(a), "lora_B.weight": np.ascontiguousarray(b)}}
