"""AdaLoRA layers (nn.Linear, transformers' Conv1D, nn.Conv2d) and the rank budget.

::

    x ──► base_layer (frozen W) ─────────────────────────────────────────┐
    │                                                                   (+) ──► y
    └──► dropout ──► (A * E) [r, in] ──► B [out, r] ──► * s / (ranknum + 1e-5)

Training AdaLoRA has two extras, both as in PEFT:

* ``peft_model.base_model.update_and_allocate(step)`` (after ``loss.backward()``, before
  ``zero_grad()``) smooths each triplet's importance ``|p * grad|``, and on the cubic budget
  schedule zeroes the least important singular values ``E``; from ``total_step - tfinal`` on it
  keeps the final ``rank_pattern`` (stored on the adapter's config, as PEFT does).
* a forward hook adds ``orth_reg_weight * mean ||A A^T - I||_F, ||B^T B - I||_F`` to the loss
  of every forward that computes one.

The saved adapter holds only the kept triplets (a layer's ``state_dict`` slices them), so a
file has PEFT's shapes. The math is :mod:`onnx_peft.methods.adalora`, shared with the ONNX passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterConfigError, OnnxPeftError
from ..methods.adalora import AdaLoraConfig
from ..methods.base import method_for
from .base import AdapterLayer, linear_layout

SUPPORTED = "nn.Linear, transformers Conv1D, nn.Conv2d (groups=1)"
SVD_NAMES = ("lora_A", "lora_E", "lora_B")


class AdaLoraLayer(AdapterLayer):
    """SVD-form adapters on one module: ``lora_A [r, in]``, ``lora_E [r, 1]``, ``lora_B [out, r]``
    (``in`` is ``in_channels * kh * kw`` for Conv2d). ``ranknum`` is the adapter's ``init_r``;
    it is never saved, so it comes from the config."""

    adapter_layer_names = SVD_NAMES
    other_param_names = ("r", "lora_dropout", "configs")

    def __init__(self, base_layer: nn.Module, module_path: str, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        self.fan_in_fan_out = fan_in_fan_out
        weight = base_layer.weight
        if isinstance(base_layer, nn.Conv2d):
            self.in_features, self.out_features = weight[0].numel(), weight.shape[0]
        elif self.fan_in_fan_out:
            self.in_features, self.out_features = weight.shape
        else:
            self.out_features, self.in_features = weight.shape
        self.r: dict[str, int] = {}
        self.configs: dict[str, AdaLoraConfig] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.register_state_dict_post_hook(_save_kept_triplets)
        self.register_load_state_dict_pre_hook(_load_kept_triplets)

    def update_layer(self, adapter_name: str, config: AdaLoraConfig) -> None:
        r = config.rank_for(self.module_path)
        self.r[adapter_name] = r
        self.configs[adapter_name] = config
        p = float(config.lora_dropout)
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        A, E, B = torch.randn(r, self.in_features), torch.randn(r, 1), torch.randn(self.out_features, r)
        if config.init_lora_weights:  # E = 0: a fresh adapter is a no-op
            nn.init.zeros_(E)
            nn.init.normal_(A, mean=0.0, std=0.02)
            nn.init.normal_(B, mean=0.0, std=0.02)
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        for attr, value in zip(SVD_NAMES, (A, E, B)):
            getattr(self, attr)[adapter_name] = nn.Parameter(value.to(weight.device, dtype))

    def parts(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {attr: getattr(self, attr)[adapter_name] for attr in SVD_NAMES}

    def scale(self, adapter_name: str) -> float:
        return self.configs[adapter_name].scale_for(self.r[adapter_name])

    # -- math ------------------------------------------------------------------------------
    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W + s' B (A * E)`` through :meth:`AdaLoraMethod.merged_weight` (``[out, ...]`` there)."""
        out_first = weight.T if self.fan_in_fan_out else weight
        merged, _ = method_for("ADALORA").merged_weight(self.configs[adapter_name], self.module_path,
                                                        out_first.float(), None, self.parts(adapter_name), {})
        return merged.T if self.fan_in_fan_out else merged

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight = self.base_layer.weight
        return self.merged_weight(adapter_name, torch.zeros(weight.shape, device=weight.device))

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``y = base(x) + (dropout(x) (A * E)^T) B^T * s / (ranknum + 1e-5)``."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            A, E, B = (getattr(self, attr)[name] for attr in SVD_NAMES)
            h = self.lora_dropout[name](x.to(A.dtype))
            result = result + (self._adapter_output(h, A * E, B) * self.scale(name)).to(result.dtype)
        return result

    def _adapter_output(self, h: torch.Tensor, AE: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, nn.Conv2d):  # the delta as one conv kernel, as PEFT's SVDConv2d
            kernel = (B @ AE).reshape(base.weight.shape)
            return F.conv2d(h, kernel, stride=base.stride, padding=base.padding, dilation=base.dilation)
        return h @ AE.T @ B.T

    def __repr__(self) -> str:
        return f"adalora.{type(self).__name__}({self.base_layer!r})"


# -- saving only the kept triplets ---------------------------------------------------------
def _kept_index(layer: AdaLoraLayer, adapter_name: str) -> torch.Tensor | None:
    """Indices of the triplets ``rank_pattern`` keeps, when the layer still holds pruned ones."""
    kept = layer.configs[adapter_name].kept_triplets(layer.module_path)
    if kept is None or len(kept) != layer.r[adapter_name] or all(kept):
        return None
    return torch.tensor([i for i, k in enumerate(kept) if k], dtype=torch.long)


def _save_kept_triplets(layer: AdaLoraLayer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """PEFT saves an allocated adapter at its kept rank: ``A[kept]``, ``E[kept]``, ``B[:, kept]``."""
    for name in list(layer.lora_A.keys()):
        index = _kept_index(layer, name)
        if index is None:
            continue
        for attr, dim in zip(SVD_NAMES, (0, 0, 1)):
            key = f"{prefix}{attr}.{name}"
            if key in state_dict:
                state_dict[key] = state_dict[key].index_select(dim, index.to(state_dict[key].device))


def _load_kept_triplets(layer: AdaLoraLayer, state_dict: dict, prefix: str, *args) -> None:
    """The inverse of :func:`_save_kept_triplets`: pruned triplets come back as zeros."""
    for name in list(layer.lora_A.keys()):
        index = _kept_index(layer, name)
        for attr, dim in zip(SVD_NAMES, (0, 0, 1)):
            key = f"{prefix}{attr}.{name}"
            value, param = state_dict.get(key), getattr(layer, attr)[name]
            if index is None or value is None or value.shape[dim] != len(index):
                continue
            full = torch.zeros_like(param)
            full.index_copy_(dim, index.to(full.device), value.to(full.device, full.dtype))
            state_dict[key] = full


# -- the rank budget -------------------------------------------------------------------------
class RankAllocator:
    """PEFT's RankAllocator over one adapter's layers (``{module path: layer}``).

    Importance of an entry: ``I = |p * grad|``, smoothed ``Ī = b1 Ī + (1 - b1) I`` and
    uncertainty ``Ū = b2 Ū + (1 - b2) |I - Ī|``; a triplet ``i`` scores ``(Ī Ū)(E_i)`` plus
    the mean scores of row ``A_i`` and column ``B_:,i``. The ``init - budget`` lowest-scoring
    triplets get ``E_i = 0``.
    """

    def __init__(self, config: AdaLoraConfig, adapter_name: str, layers: dict[str, AdaLoraLayer]) -> None:
        self.config, self.adapter_name, self.layers = config, adapter_name, layers
        self.init_bgt = sum(layer.lora_A[adapter_name].shape[0] for layer in layers.values())
        self.target_bgt = config.target_r * len(layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, mask now?)``: full rank until ``tinit``, then a cubic decrease to
        ``target_r`` per layer at ``total_step - tfinal``, masking every ``deltaT`` steps."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        coeff = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * coeff**3 + self.target_bgt), step % c.deltaT == 0

    def _params(self):
        for path, layer in self.layers.items():
            for attr in SVD_NAMES:
                yield (path, attr), getattr(layer, attr)[self.adapter_name]

    @torch.no_grad()
    def update_ipt(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for key, p in self._params():
            if p.grad is None:
                raise OnnxPeftError(f"AdaLoRA: {key[0]}.{key[1]} has no gradient; call update_and_allocate "
                                    "after loss.backward() and before optimizer.zero_grad()")
            if key not in self.ipt:
                self.exp_avg_ipt[key], self.exp_avg_unc[key] = torch.zeros_like(p), torch.zeros_like(p)
            self.ipt[key] = (p * p.grad).abs()
            self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * self.ipt[key]
            surprise = (self.ipt[key] - self.exp_avg_ipt[key]).abs()
            self.exp_avg_unc[key] = b2 * self.exp_avg_unc[key] + (1 - b2) * surprise

    def _triplet_scores(self) -> dict[str, torch.Tensor]:
        scores = {}
        for path in self.layers:
            s = {attr: self.exp_avg_ipt[(path, attr)] * self.exp_avg_unc[(path, attr)] for attr in SVD_NAMES}
            scores[path] = s["lora_E"].view(-1) + (s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0))
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the ``E`` of all but the ``budget`` best triplets; returns the rank pattern."""
        scores = self._triplet_scores()
        k = self.init_bgt - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item() if k > 0 else -float("inf")
        pattern = {}
        for path, score in scores.items():
            self.layers[path].lora_E[self.adapter_name].masked_fill_((score <= threshold).view(-1, 1), 0.0)
            pattern[f"{path}.lora_E"] = (score > threshold).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self) -> None:
        """Zero the ``E`` entries the config's ``rank_pattern`` prunes (after the final allocation)."""
        for path, layer in self.layers.items():
            kept, E = self.config.kept_triplets(path), layer.lora_E[self.adapter_name]
            if kept is not None and len(kept) == E.shape[0]:
                E.masked_fill_(~torch.tensor(kept, device=E.device).view(-1, 1), 0.0)


class AdaLoraTraining:
    """The trainable AdaLoRA adapter of a model (PEFT allows one): its config, allocator, hook."""

    def __init__(self, base_model: nn.Module, adapter_name: str, config: AdaLoraConfig) -> None:
        self.adapter_name, self.config = adapter_name, config
        self.model = base_model.model
        self.allocator: RankAllocator | None = None
        self.hook = self.model.register_forward_hook(self._add_orth_reg)

    def layers(self) -> dict[str, AdaLoraLayer]:
        return {path: m for path, m in self.model.named_modules()
                if isinstance(m, AdaLoraLayer) and self.adapter_name in m.lora_A}

    def update_and_allocate(self, global_step: int) -> None:
        """PEFT's schedule: allocate while budgeting, fix the pattern at ``total_step - tfinal``,
        then keep re-applying it."""
        if self.allocator is None:
            self.allocator = RankAllocator(self.config, self.adapter_name, self.layers())
        allocator, c = self.allocator, self.config
        final = c.total_step - c.tfinal
        if global_step < final:
            allocator.update_ipt()
            budget, mask = allocator.budget_schedule(global_step)
            if mask:
                c.rank_pattern = allocator.mask_to_budget(budget)
        elif global_step == final:
            c.rank_pattern = allocator.mask_to_budget(allocator.budget_schedule(global_step)[0])
            allocator.reset_ipt()
        elif c.rank_pattern:
            allocator.mask_using_rank_pattern()

    def orthogonal_regularisation(self, layers: list[AdaLoraLayer]) -> torch.Tensor:
        """Mean over the A and B matrices of ``||A A^T - I||_F`` / ``||B^T B - I||_F``."""
        terms = []
        for layer in layers:
            A, B = layer.lora_A[self.adapter_name], layer.lora_B[self.adapter_name]
            for cov in (A @ A.T, B.T @ B):                                   # [r, r]
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        return torch.stack(terms).mean()

    def _add_orth_reg(self, model: nn.Module, args, output):
        loss = getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor):
            return None
        layers = list(self.layers().values())
        if not layers:  # the adapter was deleted or unloaded: stop adding
            self.hook.remove()
            return None
        output.loss = loss + self.config.orth_reg_weight * self.orthogonal_regularisation(layers)
        return output


def update_and_allocate(base_model: nn.Module, global_step: int) -> None:
    """``peft_model.base_model.update_and_allocate(step)``: see :class:`AdaLoraTraining`."""
    training = base_model.__dict__.get("adalora_training")
    if training is None:
        raise OnnxPeftError("update_and_allocate needs a trainable AdaLoRA adapter (inference_mode=False)")
    training.update_and_allocate(global_step)


def before_inject(base_model: nn.Module, adapter_name: str, config: AdaLoraConfig) -> None:
    """Expose ``update_and_allocate`` and, for a trainable adapter, set up its allocator and the
    orthogonal regularisation (one trainable AdaLoRA adapter per model, as in PEFT)."""
    base_model.model_methods["update_and_allocate"] = update_and_allocate
    if config.inference_mode:
        return
    current = base_model.__dict__.get("adalora_training")
    if current is not None and current.layers():
        raise AdapterConfigError(
            f"adapter {current.adapter_name!r} is already a trainable AdaLoRA adapter; AdaLoRA trains one "
            f"adapter at a time: add {adapter_name!r} with inference_mode=True")
    if current is not None:
        current.hook.remove()
    base_model.__dict__["adalora_training"] = AdaLoraTraining(base_model, adapter_name, config)


def make_adalora_layer(module: nn.Module, adapter_name: str, config: AdaLoraConfig, module_path: str) -> AdaLoraLayer:
    """Wrap ``module`` and create ``adapter_name`` on it (nn.Linear, Conv1D, Conv2d)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise AdapterConfigError(
                f"module {module_path}: AdaLoRA on a grouped Conv2d (groups={module.groups}) is not supported; "
                f"supported: {SUPPORTED}")
        fan_in_fan_out = False
    else:
        fan_in_fan_out = linear_layout(module, module_path, "AdaLoRA", SUPPORTED)
    layer = AdaLoraLayer(module, module_path, fan_in_fan_out)
    add_adalora_adapter(layer, adapter_name, config, module_path)
    return layer


def add_adalora_adapter(layer: AdaLoraLayer, adapter_name: str, config: AdaLoraConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = AdaLoraLayer
make_layer = make_adalora_layer
add_adapter = add_adalora_adapter
