"""EVA: initialize LoRA's A from the principal directions of each layer's inputs
(Paischer et al., 2024, "Explained Variance Adaptation", arXiv:2410.07170).

For every adapted Linear, the inputs ``x [tokens, in]`` seen on a dataloader are fed to an
incremental PCA (incremental_pca.py) with ``round(r * rho)`` components until the top
components stop moving (cosine similarity to the previous batch's >= ``tau``). Then the
rank budget ``sum(r)`` is redistributed: the ``sum(r)`` components with the largest explained
variance ratio, over all layers, win, so a layer gets between 0 and ``r * rho`` ranks::

    A [r_layer, in] = top r_layer components (rows)      B [out, r_layer] = 0

A layer that gets rank 0 loses its adapter. Layers that see the same input (q/k/v) share one
PCA. ``adjust_scaling_factors`` keeps ``alpha / r`` constant (alpha *= r_new / r). The new ranks
and alphas go into the config's ``rank_pattern`` / ``alpha_pattern``, so the saved adapter loads
in PEFT and here like any LoRA. Use: ``get_peft_model(model, LoraConfig(init_lora_weights="eva",
eva_config=EvaConfig(...)))`` then ``initialize_lora_eva_weights(peft_model, dataloader)``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from itertools import cycle
from typing import Any

import torch
from torch import nn

from ...errors import AdapterConfigError, DataError
from .incremental_pca import IncrementalPCA

_RHO_LIMIT = 1000  # above this, rho is capped so r * rho stays below the largest weight dimension


@dataclasses.dataclass
class EvaConfig:
    """PEFT's EvaConfig: ``rho`` (>= 1, max rank r * rho), ``tau`` (convergence cosine threshold),
    ``use_label_mask`` / ``label_mask_value`` (skip tokens whose label is -100), ``whiten``
    (divide components by sqrt of their singular values), ``adjust_scaling_factors``."""

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if not self.rho >= 1.0:
            raise AdapterConfigError(f"EvaConfig.rho must be >= 1.0, got {self.rho!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise AdapterConfigError(f"EvaConfig.tau must be in [0, 1], got {self.tau!r}")


def forward_fn_dict(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Mapping[str, torch.Tensor], peft_config: Any) -> torch.Tensor:
    """Token positions ``[n, 2]`` (batch, position) that count: attended, and labelled unless the
    label is ``label_mask_value``."""
    if not isinstance(model_input, Mapping):
        raise DataError(f"EVA's default input preparation needs dict batches (input_ids, attention_mask, labels), "
                        f"got {type(model_input).__name__}; pass prepare_model_inputs_fn")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = _eva_config(peft_config)
    if eva.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: torch.Tensor, layer_name: str) -> torch.Tensor:
    """The layer input ``[batch, seq, in]`` at the kept positions: ``[n, in]``."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if not isinstance(x, torch.Tensor):
        raise DataError(f"EVA: layer {layer_name} got a {type(x).__name__} input; pass prepare_layer_inputs_fn")
    return x[model_input.T.unbind()]


def _eva_config(peft_config: Any) -> EvaConfig:
    eva = getattr(peft_config, "eva_config", None)
    return EvaConfig(**eva) if isinstance(eva, Mapping) else (eva or EvaConfig())


class _Hook:
    """Forward hook on one layer: prepares its input ``[n, in]`` and hashes it (first pass) or
    feeds it to the layer's incremental PCA."""

    def __init__(self, name: str, prepare: Callable, n_components: int = 0, tau: float = 1.0) -> None:
        self.name, self.prepare, self.tau = name, prepare, tau
        self.model_input: Any = None
        self.hashes: list[int] = []
        self.pca = IncrementalPCA(n_components) if n_components else None
        self.converged = torch.zeros(n_components, dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        x = self.prepare(inputs, self.model_input, self.name)
        if self.pca is None:
            self.hashes.append(hash(tuple(x.reshape(-1).cpu().tolist())))
            return
        if x.shape[0] < self.pca.n_components:  # too few tokens in this batch for a step
            return
        previous = None if self.pca.components_ is None else self.pca.components_.clone()
        self.pca.partial_fit(x)
        if previous is not None:
            self.converged = nn.functional.cosine_similarity(self.pca.components_, previous) >= self.tau


def _move(inputs: Any, device: torch.device | None) -> Any:
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _move(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_move(v, device) for v in inputs)
    return inputs


def _eva_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT-style full names (``base_model.model.<path>``) of the LoRA Linear layers EVA serves."""
    from ..lora import Linear

    return {f"base_model.model.{path}": layer for path, layer in model.base_model.model.named_modules()
            if isinstance(layer, Linear)}


def _rank_distribution(hooks: dict[str, _Hook], layer_hook: dict[str, str], same_input: dict[str, str],
                       budget: int, max_components: dict[str, int]) -> dict[str, int]:
    """Give the ``budget`` largest explained-variance ratios over all layers one rank each."""
    ratios = {k: h.pca.explained_variance_ratio_[: max_components[k]] for k, h in hooks.items()}
    keys, values = zip(*[(layer, v) for layer, hook in layer_hook.items() for v in ratios[hook]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget])
    ranks = {layer: counts.get(layer, 0) for layer in layer_hook}
    for layer, hook_layer in same_input.items():  # the layer holding the PCA keeps the larger rank
        if ranks[hook_layer] < ranks[layer]:
            ranks[hook_layer], ranks[layer] = ranks[layer], ranks[hook_layer]
    return ranks


@torch.no_grad()
def get_eva_state_dict(model: nn.Module, dataloader: Iterable, peft_config: Any = None,
                       forward_fn: Callable = forward_fn_dict,
                       prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
                       prepare_layer_inputs_fn: Callable = prepare_layer_inputs_fn_language_modeling,
                       adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """EVA's A for every LoRA Linear of ``model`` (a PeftModel): ``{full name: [rank, in]}``,
    the rank after redistribution (0: the layer loses its adapter). Runs with adapters disabled."""
    config = peft_config or model.peft_config[adapter_name]
    eva = _eva_config(config)
    if not hasattr(dataloader, "__len__") or len(dataloader) == 0:
        raise DataError("EVA needs a non-empty dataloader with a length (a DataLoader or a list of batches)")
    rho = eva.rho
    if rho > _RHO_LIMIT:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.r)
    layers = _eva_layers(model)
    if not layers:
        raise AdapterConfigError("EVA found no LoRA Linear layer in the model; EVA initializes Linear/Conv1D "
                                 "targets only (not Embedding or convolutions)")
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    device = next(iter(devices)) if len(devices) == 1 else None
    prepare_inputs = prepare_model_inputs_fn or (lambda batch, _config: batch)
    training = model.training
    model.eval()
    max_components = {n: round(config.rank_for(n.removeprefix("base_model.model.")) * rho) for n in layers}
    budget = sum(config.rank_for(n.removeprefix("base_model.model.")) for n in layers)
    with model.disable_adapter():
        # 1. one forward pass to find layers that see the same input (their PCA is shared)
        first = _move(next(iter(dataloader)), device)
        hooks = {n: _Hook(n, prepare_layer_inputs_fn) for n in layers}
        for hook in hooks.values():
            hook.model_input = prepare_inputs(first, config)
        handles = [layers[n].register_forward_hook(h) for n, h in hooks.items()]
        forward_fn(model, first)
        for handle in handles:
            handle.remove()
        groups = defaultdict(list)
        for name, hook in hooks.items():
            groups[hook.hashes[0]].append(name)
        same_input = {other: names[0] for names in groups.values() if len(names) > 1 for other in names[1:]}
        for names in groups.values():
            widest = max(max_components[n] for n in names)
            for n in names:
                max_components[n] = widest
        # 2. incremental PCA per distinct input until the components each layer needs converge
        hooks = {n: _Hook(n, prepare_layer_inputs_fn, max_components[n], eva.tau) for n in layers
                 if n not in same_input}
        handles = {n: layers[n].register_forward_hook(h) for n, h in hooks.items()}
        layer_hook = {**{n: n for n in hooks}, **same_input}
        done = dict.fromkeys(hooks, False)
        ranks = dict(max_components)
        for batch in cycle(dataloader):
            batch = _move(batch, device)
            model_input = prepare_inputs(batch, config)
            for name, hook in hooks.items():
                converged = bool(torch.all(hook.converged[: ranks[name]]))
                if not done[name] and converged and handles[name] is not None:
                    handles[name].remove()
                    handles[name], done[name] = None, True
                    continue
                if done[name] and not converged:  # a rank grew past the converged components
                    handles[name] = layers[name].register_forward_hook(hook)
                    done[name] = False
                hook.model_input = model_input
            if all(done.values()):
                break
            forward_fn(model, batch)
            if all(h.pca.components_ is not None for h in hooks.values()):
                ranks = _rank_distribution(hooks, layer_hook, same_input, budget, max_components)
    model.train(training)
    state = {}
    for name, rank in ranks.items():
        hook = hooks[layer_hook[name]]
        components = hook.pca.components_[:rank]
        if eva.whiten:
            components = components / hook.pca.singular_values_[:rank].sqrt().reshape(-1, 1)
        state[name] = components if device is None else components.to(device)
    return state


@torch.no_grad()
def initialize_lora_eva_weights(model: nn.Module, dataloader: Iterable | None = None,
                                eva_state_dict: dict[str, torch.Tensor] | None = None,
                                forward_fn: Callable = forward_fn_dict,
                                prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
                                prepare_layer_inputs_fn: Callable = prepare_layer_inputs_fn_language_modeling,
                                adapter_name: str = "default") -> nn.Module:
    """Set every LoRA Linear's A of ``adapter_name`` to its EVA components (B = 0), resizing
    layers to their redistributed rank; ranks and alphas go to the config's patterns."""
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is None:
        raise AdapterConfigError(f"initialize_lora_eva_weights needs a PeftModel holding adapter {adapter_name!r}")
    if len(model.active_adapters) > 1:
        raise AdapterConfigError("initialize_lora_eva_weights works with one active adapter; "
                                 f"active: {model.active_adapters}")
    if config.init_lora_weights != "eva":
        raise AdapterConfigError(f"initialize_lora_eva_weights needs LoraConfig(init_lora_weights='eva'), "
                                 f"adapter {adapter_name!r} has {config.init_lora_weights!r}")
    if eva_state_dict is None:
        if dataloader is None:
            raise DataError("initialize_lora_eva_weights needs a dataloader or an eva_state_dict")
        eva_state_dict = get_eva_state_dict(model, dataloader, None, forward_fn, prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn, adapter_name)
    _load_eva_state_dict(model, dict(eva_state_dict), adapter_name, config)
    return model


def _load_eva_state_dict(model: nn.Module, eva_state: dict[str, torch.Tensor], adapter_name: str, config: Any) -> None:
    from ..lora import Embedding, Linear, LoraLayer

    eva = _eva_config(config)
    rank_pattern, alpha_pattern, targets = {}, {}, []
    base = model.base_model.model
    for path, layer in list(base.named_modules()):
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.r:
            continue
        r, alpha = config.rank_for(path), config.alpha_for(path)
        components = eva_state.pop(f"base_model.model.{path}", None)
        if components is None:  # not EVA-initialized (PEFT warns and uses the default init)
            if isinstance(layer, Linear):
                layer.update_layer(adapter_name, r, alpha, float(config.lora_dropout), True, config.use_rslora,
                                   config.use_dora)
            elif not isinstance(layer, Embedding):
                raise AdapterConfigError(f"EVA cannot initialize module {path} ({type(layer).__name__})")
            rank = r
        else:
            rank = components.shape[0]
            if rank == 0:  # EVA gave this layer no rank: it loses its adapter
                parent, _, child = path.rpartition(".")
                setattr(base.get_submodule(parent) if parent else base, child, layer.base_layer)
                continue
            if rank != r and eva.adjust_scaling_factors:
                alpha = alpha * rank / r
            if rank != r:
                layer.update_layer(adapter_name, rank, alpha, float(config.lora_dropout), "eva", config.use_rslora,
                                   config.use_dora)
            layer.lora_A[adapter_name].weight.copy_(components)
        targets.append(path)
        if rank != config.r:
            rank_pattern[path] = rank
        if alpha != config.lora_alpha:
            alpha_pattern[path] = alpha
    config.target_modules, config.rank_pattern, config.alpha_pattern = targets, rank_pattern, alpha_pattern
    model.set_adapter(model.active_adapters)  # new A/B tensors: refresh which ones train
