"""Poly (Polytropon / Multi-Head Routing) layer for nn.Linear.

Each row of a batch names its task; the task's router row mixes the layer's LoRA skills into
one rank-r LoRA for that row (``q`` splits, ``s`` skills; see :mod:`onnx_peft.methods.poly`)::

    task_ids [b] ──► module_logits [n_tasks, q*s] ──► sigmoid | relaxed Bernoulli (training)
                         ──► w [b, q, s] (normalised over skills)
    x [b, n, in] ──► base_layer ───────────────────────────────────────────┐
    │                                                                      (+) ──► y
    └──► x A_t [b, in, r] ──► B_t / r [b, r, out] ─────────────────────────┘
         A_t = concat_q sum_s w[:, q, s] A[q, s]      B_t = concat_q sum_s w[:, q, s] B[q, s]

``task_ids`` comes as a keyword argument of ``layer(x, task_ids=...)``, or from
``PeftModel.forward(..., task_ids=...)`` / ``generate(..., task_ids=...)``, which hand it to the
layers for the duration of the call (``AdapterLayer.call_kwargs``). The mixing is the same
function the ONNX conversion uses (:func:`onnx_peft.methods.poly.mix_skills`). PEFT cannot merge
Poly; here an adapter with one task merges (its weight does not depend on the row).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import RelaxedBernoulli

from ..errors import AdapterConfigError, OnnxPeftError
from ..methods.base import method_for
from ..methods.poly import (
    A_KEY,
    B_KEY,
    LOGITS_KEY,
    PolyConfig,
    mix_skills,
    skill_weights,
    task_lora,
    task_weights,
)
from .base import AdapterLayer, linear_layout


class PolyRouter(nn.Module):
    """Task ids ``[b]`` -> skill weights ``[b, q, s]`` from ``module_logits [n_tasks, q*s]``.

    Eval: ``sigmoid(logits)``; training: a relaxed Bernoulli sample (temperature 1) of the same
    logits, so that routing stays differentiable but explores; both normalised over skills.
    """

    def __init__(self, n_tasks: int, n_splits: int, n_skills: int) -> None:
        super().__init__()
        self.n_tasks, self.n_splits, self.n_skills = n_tasks, n_splits, n_skills
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills))

    def reset(self) -> None:
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        task_ids = task_ids.to(self.module_logits.device)
        if self.training:
            probs = RelaxedBernoulli(temperature=1.0, logits=self.module_logits[task_ids]).rsample()
            return skill_weights(probs, self.n_splits, self.n_skills)
        return task_weights(self.module_logits, task_ids, self.n_splits, self.n_skills)


class PolyLayer(AdapterLayer):
    """Poly on an ``nn.Linear`` (weight ``[out, in]``). x: ``[b, ..., in]`` -> ``[b, ..., out]``,
    row ``i`` routed by ``task_ids[i]`` (``task_ids`` of length 1 routes every row)."""

    adapter_layer_names = ("poly_lora_A", "poly_lora_B", "poly_router")
    other_param_names = ("poly_config",)
    call_kwargs = ("task_ids",)

    def __init__(self, base_layer: nn.Linear, module_path: str) -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.poly_lora_A = nn.ParameterDict()
        self.poly_lora_B = nn.ParameterDict()
        self.poly_router = nn.ModuleDict()
        self.poly_config: dict[str, PolyConfig] = {}

    # -- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: PolyConfig) -> None:
        q, s, r = config.n_splits, config.n_skills, config.r
        for features, side in ((self.in_features, "in"), (self.out_features, "out")):
            if features % q:
                raise AdapterConfigError(
                    f"module {self.module_path} has {features} {side}put features, which PolyConfig.n_splits={q} "
                    "does not divide; choose n_splits dividing every target's in and out features")
        # A skill's A starts like an nn.Linear weight [r, in/q] (stored transposed), B at zero
        # (a no-op adapter) unless init_weights=False, as in PEFT.
        a = torch.empty(q, s, self.in_features // q, r)
        b = torch.zeros(q, s, r, self.out_features // q)
        for split in range(q):
            for skill in range(s):
                a[split, skill] = _kaiming(r, self.in_features // q).T
                if not config.init_weights:
                    b[split, skill] = _kaiming(self.out_features // q, r).T
        router = PolyRouter(config.n_tasks, q, s)
        router.reset()
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        self.poly_lora_A[adapter_name] = nn.Parameter(a.to(weight.device, dtype))
        self.poly_lora_B[adapter_name] = nn.Parameter(b.to(weight.device, dtype))
        self.poly_router[adapter_name] = router.to(weight.device, dtype)
        self.poly_config[adapter_name] = config

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, task_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """PEFT's signature: ``task_ids [b]`` may come here directly."""
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        return self.adapted_forward(x, *args, task_ids=task_ids, **kwargs)

    def adapted_forward(self, x: torch.Tensor, *args, task_ids: torch.Tensor | None = None,
                        **kwargs) -> torch.Tensor:
        """``y = base(x) + sum_adapters (x A_t) (B_t / r)``, ``A_t``/``B_t`` mixed per row."""
        result = self.base_layer(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self.poly_lora_A]
        if not names:
            return result
        task_ids = self._task_ids(task_ids if task_ids is not None else self.call_args.get("task_ids"), x)
        out = result
        rows = x.reshape(x.shape[0], -1, self.in_features)                      # [b, n, in]
        for name in names:
            weights = self.poly_router[name](task_ids)                           # [b, q, s]
            a, b = mix_skills(weights, self.poly_lora_A[name], self.poly_lora_B[name], self.poly_config[name].r)
            update = (rows.to(a.dtype) @ a) @ b                                  # [b, n, out]
            out = out + update.reshape(result.shape).to(result.dtype)
        return out

    def _task_ids(self, task_ids: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Check ``task_ids`` against the batch and every active adapter's ``n_tasks``."""
        if task_ids is None:
            raise OnnxPeftError(
                f"Poly layer {self.module_path} needs task ids: call model(..., task_ids=tensor) or "
                "model.generate(..., task_ids=tensor) with one task id per row of the batch")
        task_ids = torch.as_tensor(task_ids).reshape(-1)
        if len(task_ids) not in (1, x.shape[0]):
            raise OnnxPeftError(f"Poly layer {self.module_path}: task_ids has {len(task_ids)} entries for a batch "
                                f"of {x.shape[0]} rows; pass one task id per row")
        n_tasks = min(self.poly_config[n].n_tasks for n in self.active_adapters if n in self.poly_config)
        if len(task_ids) and (int(task_ids.min()) < 0 or int(task_ids.max()) >= n_tasks):
            raise OnnxPeftError(f"Poly layer {self.module_path}: task ids must be in [0, {n_tasks}), got "
                                f"{task_ids.tolist()}")
        return task_ids

    # -- merging (one task only) -----------------------------------------------------------
    def _parts(self, adapter_name: str) -> dict[str, torch.Tensor]:
        config = self.poly_config[adapter_name]
        if config.n_tasks != 1:
            raise OnnxPeftError(
                f"Poly adapter {adapter_name!r} at {self.module_path} has n_tasks={config.n_tasks}: its weight "
                "depends on each row's task, so it cannot be merged (PEFT cannot merge Poly at all); merge a "
                "one-task adapter, or convert one task to ONNX (variant='task0', ...)")
        return {A_KEY: self.poly_lora_A[adapter_name].detach(), B_KEY: self.poly_lora_B[adapter_name].detach(),
                LOGITS_KEY: self.poly_router[adapter_name].module_logits.detach()}

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        parts = self._parts(adapter_name)
        merged, _ = method_for("POLY").merged_weight(self.poly_config[adapter_name], self.module_path,
                                                     weight.to(parts[A_KEY].dtype), None, parts, {})
        return merged.to(weight.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``(A_t B_t / r)^T [out, in]`` of the adapter's one task."""
        a, b = task_lora(self.poly_config[adapter_name], self._parts(adapter_name), 0)
        return (a @ b).T

    def __repr__(self) -> str:
        return f"poly.{type(self).__name__}({self.base_layer!r})"


def _kaiming(rows: int, cols: int) -> torch.Tensor:
    """An nn.Linear-style ``[rows, cols]`` draw (kaiming uniform, a = sqrt(5))."""
    weight = torch.empty(rows, cols)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


def make_poly_layer(module: nn.Module, adapter_name: str, config: PolyConfig, module_path: str) -> PolyLayer:
    """Wrap an ``nn.Linear`` in a Poly layer and create ``adapter_name`` on it."""
    linear_layout(module, module_path, "Poly", conv1d=False)
    layer = PolyLayer(module, module_path)
    add_poly_adapter(layer, adapter_name, config, module_path)
    return layer


def add_poly_adapter(layer: PolyLayer, adapter_name: str, config: PolyConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = PolyLayer
make_layer = make_poly_layer
add_adapter = add_poly_adapter
