"""LoRA-FA: freeze A, train B with a projected gradient (Zhang et al., 2023, arXiv:2308.03303).

With A frozen, LoRA's update ``s * B A`` can only move inside the row space of A. LoRA-FA
picks B's gradient so that ``s * g_B A`` is the closest such move to the full-weight
gradient ``g_W = g_B_lora / s`` projected through A (least squares)::

    g_B = (1 / s^2) * grad_B @ (A A^T + 1e-8 I)^+         grad_B: [out, r], A: [r, in]

and feeds it to AdamW (transformers' ``AdamW``: bias correction folded into the step size,
decoupled weight decay applied after the step, eps 1e-6). Every other trainable parameter
(modules_to_save, biases) takes the plain AdamW step. This mirrors PEFT's ``LoraFAOptimizer``;
PEFT runs the projection matmul under bfloat16 autocast when the machine has bf16, we keep
it in the parameter's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import AdapterConfigError

_RIDGE = 1e-8  # keeps A A^T invertible when A loses rank


class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW where each LoRA ``B`` in ``lora_pairs`` steps on its LoRA-FA gradient.

    ``lora_pairs``: ``(A, B, s)`` per adapted layer; A is frozen (not in ``params``), B is.
    """

    def __init__(self, params: Iterable[Any], lora_pairs: Iterable[tuple[torch.Tensor, torch.Tensor, float]] = (),
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True) -> None:
        if lr < 0.0 or eps < 0.0 or not all(0.0 <= b < 1.0 for b in betas):
            raise AdapterConfigError(
                f"LoraFAOptimizer: need lr >= 0, eps >= 0 and betas in [0, 1); got lr={lr}, eps={eps}, betas={betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "correct_bias": correct_bias})
        self._projection = {id(b): (a, float(s)) for a, b, s in lora_pairs}

    def _gradient(self, param: torch.Tensor) -> torch.Tensor:
        """The gradient AdamW sees: LoRA-FA's projection for a B, the plain gradient otherwise."""
        if id(param) not in self._projection:
            return param.grad
        A, scaling = self._projection[id(param)]
        gram = A @ A.T + _RIDGE * torch.eye(A.shape[0], device=A.device, dtype=A.dtype)  # [r, r]
        return ((1.0 / scaling**2) * (param.grad @ torch.linalg.pinv(gram))).to(param.grad.dtype)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = self._gradient(param)
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0.0:  # decoupled, after the step (transformers' AdamW)
                    param.add_(param, alpha=-group["lr"] * group["weight_decay"])
        return loss


def _lora_pairs(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """``(layer path, A, B, s)`` for every adapter of every LoRA layer whose B trains."""
    from ..tuners.lora import Embedding, Linear, LoraLayer

    pairs = []
    for path, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if not isinstance(layer, (Linear, Embedding)):
            raise AdapterConfigError(
                f"create_lorafa_optimizer: module {path} is a LoRA {type(layer).__name__} layer; LoRA-FA projects "
                "through a 2-D A and supports Linear/Conv1D and Embedding layers: exclude it from target_modules")
        for name in layer.r:
            if layer.use_dora.get(name):
                raise AdapterConfigError(
                    f"create_lorafa_optimizer: module {path} uses DoRA (adapter {name!r}); LoRA-FA has no rule for "
                    "the magnitude vector: train it with use_dora=False")
            if name in layer.lora_A:
                A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
            else:
                A, B = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
            if B.requires_grad:
                pairs.append((path, A, B, layer.scaling[name]))
    return pairs


def create_lorafa_optimizer(model: nn.Module, r: int, lora_alpha: float, lr: float, weight_decay: float = 0.0,
                            use_rslora: bool | None = None) -> LoraFAOptimizer:
    """Freeze every trained LoRA A of ``model`` (a PeftModel) and return a :class:`LoraFAOptimizer`
    over the rest (betas 0.9/0.999, eps 1e-6).

    ``r`` and ``lora_alpha`` are PEFT's signature; as in PEFT, the projection uses each layer's own
    scaling ``s`` (rank_pattern, alpha_pattern and use_rslora of its config included).
    ``use_rslora`` (deprecated in PEFT) must agree with the active adapters' configs if given.
    """
    configs = getattr(model, "peft_config", {})
    active = [n for n in getattr(model, "active_adapters", []) if n in configs]
    if use_rslora is not None:
        mismatched = [n for n in active if bool(getattr(configs[n], "use_rslora", False)) != use_rslora]
        if mismatched:
            raise AdapterConfigError(
                f"create_lorafa_optimizer(use_rslora={use_rslora}) disagrees with LoraConfig.use_rslora of adapters "
                f"{mismatched}; set rsLoRA in the LoraConfig and drop the use_rslora argument")
    if not (isinstance(r, int) and r > 0):
        raise AdapterConfigError(f"create_lorafa_optimizer: r must be a positive integer, got {r!r}")
    pairs = _lora_pairs(model)
    if not pairs:
        raise AdapterConfigError("create_lorafa_optimizer: the model has no trainable LoRA layer; "
                                 "add one with onnx_peft.get_peft_model(model, LoraConfig(...))")
    for _, A, _, _ in pairs:
        A.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    return LoraFAOptimizer(params, [(A, B, s) for _, A, B, s in pairs], lr=lr, weight_decay=weight_decay)
