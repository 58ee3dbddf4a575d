"""X-LoRA in PyTorch: LoRA experts mixed per token by a classifier, in two passes of one model.

::

    x ─► model (experts scaled by scaling_pass_value, no grad) ─► h = hidden_states[-1]
         classifier(h) ─► softmax(./T) ─► scalings [batch, seq, n_layers, n_experts]
    x ─► model, each adapted layer l:  y = base(x) + sum_i lora_i(x * w[..., l, i] * g)

The two passes are forward hooks on the transformers model itself (:class:`TwoPassForward`),
so ``PeftModel.forward`` / ``generate`` and an ONNX trace of the transformers model all run both
(``export(mode="in-graph")`` gets the whole computation in one graph). The layers are
:class:`onnx_peft.tuners.lora.Linear` with the experts as LoRA adapters ``"0"``, ``"1"``, ...
(PEFT's names); only the per-token weighting of ``x`` is new. The classifier is
``base_model.internal_xlora_classifier.<adapter>`` (PEFT's key without the adapter name).

KV cache: the scalings pass attends to its own past keys/values, not the adapted pass's, so an
X-LoRA model's cache holds both: per layer ``[batch, 2 * kv_heads, seq, head_dim]``, the adapted
pass's heads first. The model returns and takes that packed cache, so ``generate`` and a
``causal-lm-with-past`` ONNX graph (Optimum's layout, twice the heads) decode token by token with
the same numbers as PEFT's ``generate``, which recomputes the whole sequence (``use_cache=False``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_adapter_weights, save_adapter_dir
from ..config import CONFIG_NAME, AdapterConfig
from ..errors import AdapterConfigError, CheckpointError
from ..methods.base import PEFT_PREFIX, method_for
from ..methods.lora import LoraConfig
from ..methods.xlora import NO_STATIC_FORM, XLoraConfig
from .base import linear_layout
from .lora import Linear, add_lora_adapter

CLASSIFIER = "internal_xlora_classifier"


# -- the classifier ----------------------------------------------------------------------------
class XLoraClassifier(nn.Module):
    """hidden ``[batch, seq, hidden]`` -> scalings ``[batch, seq, n_layers, n_experts]``.

    ``layers`` is PEFT's Sequential (same indices, so the same checkpoint keys): one Linear for
    ``xlora_depth=1``, else Linear, ReLU, [Dropout], ... , Linear; it predicts one score per
    expert (per layer and expert with ``layerwise_scalings``).
    """

    def __init__(self, config: XLoraConfig, n_experts: int, n_layers: int) -> None:
        super().__init__()
        self.config, self.n_experts, self.n_layers = config, n_experts, n_layers
        outputs = n_experts * n_layers if config.layerwise_scalings else n_experts
        size, dropout = config.xlora_size, float(config.xlora_dropout_p)
        layers: list[nn.Module] = []
        width = config.hidden_size
        for _ in range(config.xlora_depth - 1):
            layers += [nn.Linear(width, size), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
            width = size
        self.layers = nn.Sequential(*layers, nn.Linear(width, outputs))
        self.latest: torch.Tensor | None = None  # the last scalings (PEFT's get_latest_scalings)
        self.expert_configs: list[LoraConfig] = []  # what save_pretrained writes next to each expert

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.layers(hidden.to(self.layers[0].weight.dtype))
        batch, seq = hidden.shape[0], hidden.shape[1]
        if not self.config.layerwise_scalings:  # one score per expert, the same at every layer
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(batch, seq, self.n_layers, self.n_experts)
        if self.config.enable_softmax:
            scalings = torch.softmax(scalings / self.config.softmax_temperature, dim=-1)
        return scalings


def expert_weights(scalings: torch.Tensor, config: XLoraConfig) -> torch.Tensor:
    """scalings ``[..., n_experts]`` -> what each expert's input is multiplied by: the top-k
    mask (``top_k_lora``), the softmax over the kept experts (``enable_softmax_topk``), times
    ``global_scaling_weight``."""
    if config.top_k_lora is not None:
        top = torch.topk(scalings, k=config.top_k_lora, dim=-1).indices
        keep = torch.zeros_like(scalings, dtype=torch.bool).scatter(-1, top, True)
        scalings = scalings * keep.to(scalings.dtype)
    if config.enable_softmax_topk:
        kept = scalings != 0
        scalings = torch.softmax(scalings.masked_fill(~kept, float("-inf")), dim=-1).masked_fill(~kept, 0.0)
    return scalings * config.global_scaling_weight


# -- the layer ---------------------------------------------------------------------------------
class XLoraLinear(Linear):
    """A LoRA Linear (or Conv1D) whose adapters are the experts ``"0"``, ``"1"``, ...:
    ``y = base(x) + sum_i s_i B_i A_i (x * w_i)`` with ``w [batch, seq, n_experts]`` set by the
    two-pass hooks (``expert_weights``; None outside them: every expert at weight 1, as PEFT)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool, adapter_name: str,
                 trainable_experts: bool) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        self.xlora_adapter = adapter_name
        self.trainable_experts = trainable_experts
        self.expert_weights: torch.Tensor | None = None

    def experts(self) -> list[str]:
        return sorted(self.r, key=int)

    def adapter_names(self) -> list[str]:
        return [self.xlora_adapter] if self.r else []

    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        active = self.xlora_adapter in names
        for container in (self.lora_A, self.lora_B):
            container.requires_grad_(trainable and active and self.trainable_experts)
        self.active_adapters = [self.xlora_adapter] if active else []

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name == self.xlora_adapter:
            for expert in self.experts():
                super().delete_adapter(expert)
            self.active_adapters = []

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise AdapterConfigError(f"{type(self.base_layer).__name__} layer of X-LoRA adapter "
                                 f"{self.xlora_adapter!r}: {NO_STATIC_FORM}")

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.xlora_adapter not in self.active_adapters:
            return result
        weights = self.expert_weights
        for expert in self.experts():
            scaled = x if weights is None else x * weights[..., int(expert)].unsqueeze(-1)
            result = self._add_adapter_output(expert, scaled, result)
        return result


# -- the two passes ----------------------------------------------------------------------------
class TwoPassForward:
    """Forward hooks on the transformers model: before its forward, the scalings pass and the
    classifier set every X-LoRA layer's ``expert_weights``; after it, the KV caches of both
    passes are packed into the one the model returns (module docstring)."""

    def __init__(self, classifier: XLoraClassifier, adapter_name: str) -> None:
        self.classifier, self.adapter_name = classifier, adapter_name
        self.handles: list[Any] = []
        self.scalings_cache: Any = None

    def attach(self, model: nn.Module) -> None:
        self.handles = [model.register_forward_pre_hook(self.before, with_kwargs=True),
                        model.register_forward_hook(self.after, with_kwargs=True)]

    def _layers(self, model: nn.Module) -> list[XLoraLinear]:
        return [m for m in model.modules() if isinstance(m, XLoraLinear) and m.xlora_adapter == self.adapter_name]

    def before(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        layers = self._layers(model)
        if not layers:  # unloaded: the hooks go with the layers
            for handle in self.handles:
                handle.remove()
            return None
        if layers[0].disable_adapters or self.adapter_name not in layers[0].active_adapters:
            return None
        cache_key = "cache" if "cache" in kwargs else "past_key_values"
        adapted_cache, scalings_cache = unpack_cache(kwargs.get(cache_key), model.config)
        inputs = args[0] if args else kwargs.get("input_ids")
        inputs = inputs if inputs is not None else kwargs["inputs_embeds"]
        config = self.classifier.config
        dummy = torch.full((inputs.shape[0], inputs.shape[1], len(layers), self.classifier.n_experts),
                           float(config.scaling_pass_value), dtype=self.classifier.layers[-1].weight.dtype,
                           device=inputs.device)
        self._set(layers, expert_weights(dummy, config))
        scalings_kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
        scalings_kwargs.update({cache_key: scalings_cache, "output_hidden_states": True, "return_dict": True})
        with torch.no_grad():
            scalings_out = model.forward(*args, **scalings_kwargs)  # forward, not __call__: no hooks
        scalings = self.classifier(scalings_out.hidden_states[-1])
        self.classifier.latest = scalings
        self._set(layers, expert_weights(scalings, config))
        self.scalings_cache = getattr(scalings_out, "past_key_values", None)
        return args, {**kwargs, cache_key: adapted_cache} if cache_key in kwargs else kwargs

    def after(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        scalings_cache, self.scalings_cache = self.scalings_cache, None
        for layer in self._layers(model):
            layer.expert_weights = None
        adapted_cache = getattr(output, "past_key_values", None)
        if adapted_cache is None or scalings_cache is None:
            return None
        output.past_key_values = pack_cache(adapted_cache, scalings_cache, model.config)
        return output

    @staticmethod
    def _set(layers: list[XLoraLinear], weights: torch.Tensor) -> None:
        for number, layer in enumerate(layers):  # layer number = order in the model, as PEFT counts
            layer.expert_weights = weights[:, :, number, :]


def _filled(cache: Any) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(getattr(layer, "is_initialized", True) and getattr(layer, "keys", None) is not None
                                for layer in layers)


def unpack_cache(cache: Any, config: Any) -> tuple[Any, Any]:
    """A packed X-LoRA cache -> ``(adapted pass's cache, scalings pass's cache)``; a fresh (or
    no) cache -> ``(cache, None)``: the scalings pass then makes its own."""
    if cache is None or not _filled(cache):
        return cache, None
    from ..export.spec import cache_tensors, make_cache

    tensors = cache_tensors(cache)
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    if heads is not None and tensors[0].shape[1] != 2 * heads:
        raise AdapterConfigError(
            f"the KV cache has {tensors[0].shape[1]} heads; an X-LoRA model's cache holds both passes' "
            f"keys/values ({2 * heads} heads): pass the cache the X-LoRA model returned")
    halves = [t.chunk(2, dim=1) for t in tensors]
    pairs = [(halves[i][side], halves[i + 1][side]) for side in (0, 1) for i in range(0, len(halves), 2)]
    layers = len(halves) // 2
    return make_cache(config, pairs[:layers]), make_cache(config, pairs[layers:])


def pack_cache(adapted: Any, scalings: Any, config: Any) -> Any:
    """Both passes' caches as one: per layer ``[batch, 2 * kv_heads, seq, head_dim]``."""
    from ..export.spec import cache_tensors, make_cache

    joined = [torch.cat([a, s], dim=1) for a, s in zip(cache_tensors(adapted), cache_tensors(scalings))]
    return make_cache(config, [(joined[i], joined[i + 1]) for i in range(0, len(joined), 2)])


# -- the experts -------------------------------------------------------------------------------
@dataclasses.dataclass
class Expert:
    """One LoRA expert: its folder, config and ``{module path: {"lora_A.weight": A, ...}}``."""

    index: int
    path: Path
    config: LoraConfig
    modules: dict[str, dict[str, Any]]


def _read_expert(index: int, name: str, path: str | Path) -> Expert:
    path = Path(path)
    source = f"X-LoRA expert {name!r} ({path})"
    config = AdapterConfig.from_pretrained(path)
    if not isinstance(config, LoraConfig):
        raise AdapterConfigError(f"{source} is a {config.peft_type} adapter; X-LoRA experts are LoRA adapters")
    refused = {"use_dora": config.use_dora, "bias": config.bias != "none", "modules_to_save": config.modules_to_save,
               "trainable_token_indices": config.trainable_token_indices,
               "init_lora_weights": isinstance(config.init_lora_weights, str)
               and config.init_lora_weights != "gaussian"}
    for field_name, bad in refused.items():
        if bad:
            raise AdapterConfigError(f"{source}: LoraConfig.{field_name}={getattr(config, field_name)!r} is not "
                                     "supported in an X-LoRA expert (plain LoRA on Linear layers only, as PEFT)")
    tensors = load_adapter_weights(path)
    stray = next((k for k in tensors if CLASSIFIER in k or k.startswith("base_model.lora_model.")), None)
    if stray is not None:
        raise CheckpointError(
            f"{source} holds {stray!r}: it is a copy of a whole X-LoRA model (PEFT's X-LoRA save_pretrained "
            "writes these subfolders), not a LoRA expert; pass the experts' own folders with "
            "PeftModel.from_pretrained(model, xlora_dir, adapters={name: lora_dir, ...})")
    grouped = method_for("LORA").group(tensors, source=str(path))
    return Expert(index, path, config, grouped.modules)


def read_experts(config: XLoraConfig) -> list[Expert]:
    return [_read_expert(i, name, path) for i, (name, path) in enumerate(config.adapters.items())]


def _expert_paths(model: nn.Module, experts: list[Expert]) -> list[str]:
    """The modules any expert adapts, in model order (which numbers the layers)."""
    wanted = {module for expert in experts for module in expert.modules}
    present = {name for name, _ in model.named_modules()}
    for expert in experts:
        missing = next((m for m in sorted(expert.modules) if m not in present), None)
        if missing is not None:
            raise CheckpointError(f"X-LoRA expert {expert.path}: module {missing!r} is not in "
                                  f"{type(model).__name__}; the expert was trained on another model")
    return [name for name, _ in model.named_modules() if name in wanted]


def _wrap(module: nn.Module, path: str, adapter_name: str, config: XLoraConfig, experts: list[Expert]) -> XLoraLinear:
    supported = "nn.Linear, transformers Conv1D"
    layer = XLoraLinear(module, linear_layout(module, path, "X-LoRA", supported), adapter_name,
                        config.use_trainable_adapters)
    for expert in experts:
        parts = expert.modules.get(path)
        if parts is None:
            continue
        key = str(expert.index)
        add_lora_adapter(layer, key, dataclasses.replace(expert.config, init_lora_weights=False), path)
        with torch.no_grad():
            for holder, suffix in ((layer.lora_A[key], "lora_A.weight"), (layer.lora_B[key], "lora_B.weight")):
                value = torch.from_numpy(parts[suffix].astype("float32"))
                if tuple(value.shape) != tuple(holder.weight.shape):
                    raise CheckpointError(f"X-LoRA expert {expert.path}: {path}.{suffix} has shape "
                                          f"{list(value.shape)}, the layer expects {list(holder.weight.shape)}")
                holder.weight.copy_(value)
    return layer


# -- the tuner seam ----------------------------------------------------------------------------
def select_targets(model: nn.Module, config: XLoraConfig) -> list[str]:
    """Every module an expert adapts (the experts' checkpoints say which)."""
    return _expert_paths(model, read_experts(config))


def before_inject(base_model: nn.Module, adapter_name: str, config: XLoraConfig) -> None:
    """Wrap the experts' modules (loaded from their folders), then put the classifier on
    ``base_model`` and the two-pass hooks on the transformers model."""
    model = base_model.model
    if CLASSIFIER in base_model._modules and len(getattr(base_model, CLASSIFIER)):
        raise AdapterConfigError(f"this model already holds X-LoRA adapter {next(iter(getattr(base_model, CLASSIFIER)))!r}; "
                                 "one model holds one X-LoRA adapter, as in PEFT")
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is not None and hidden != config.hidden_size:
        raise AdapterConfigError(f"XLoraConfig.hidden_size={config.hidden_size} but {type(model).__name__} has "
                                 f"hidden_size {hidden}")
    experts = read_experts(config)
    paths = _expert_paths(model, experts)
    for path in paths:
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _wrap(model.get_submodule(path), path, adapter_name, config, experts))
    reference = next(model.parameters())
    classifier = XLoraClassifier(config, len(experts), len(paths)).to(reference.device, reference.dtype)
    classifier.requires_grad_(not config.inference_mode)
    classifier.expert_configs = [expert.config for expert in experts]
    if CLASSIFIER not in base_model._modules:
        base_model.add_module(CLASSIFIER, nn.ModuleDict())
    getattr(base_model, CLASSIFIER)[adapter_name] = classifier
    TwoPassForward(classifier, adapter_name).attach(model)
    base_model.eval()  # as PEFT's XLoraModel: a new X-LoRA model starts in eval mode


def make_layer(module: nn.Module, adapter_name: str, config: XLoraConfig, module_path: str) -> XLoraLinear:
    """``module`` wrapped with the experts that adapt it (before_inject has done this already for
    every target; this serves a module added later)."""
    return _wrap(module, module_path, adapter_name, config, read_experts(config))


def add_adapter(layer: XLoraLinear, adapter_name: str, config: XLoraConfig, module_path: str) -> None:
    if layer.xlora_adapter != adapter_name:
        raise AdapterConfigError(f"module {module_path} already belongs to X-LoRA adapter {layer.xlora_adapter!r}; "
                                 "one model holds one X-LoRA adapter, as in PEFT")


def config_for_load(config: XLoraConfig, model_id: str | Path, adapters: dict[str, str] | None = None,
                    **kwargs: Any) -> XLoraConfig:
    """The experts to load with a saved X-LoRA folder: ``adapters`` where given (PEFT's
    ``from_pretrained(..., adapters=...)``), else, as PEFT documents, the folder's own copies
    ``<model_id>/<i>`` (written by :func:`save_extra`) in place of the saved paths."""
    if adapters is None:
        folder = Path(model_id)
        adapters = {name: str(folder / str(i)) if (folder / str(i) / CONFIG_NAME).is_file() else path
                    for i, (name, path) in enumerate(config.adapters.items())}
    return dataclasses.replace(config, adapters=dict(adapters))


def save_extra(peft_model: nn.Module, adapter_name: str, directory: Path) -> None:
    """Each expert as a PEFT LoRA folder ``directory/<i>`` (where PEFT writes them; trained
    experts of ``use_trainable_adapters`` keep their training)."""
    classifier = getattr(peft_model.base_model, CLASSIFIER)[adapter_name]
    layers = {name: m for name, m in peft_model.base_model.model.named_modules()
              if isinstance(m, XLoraLinear) and m.xlora_adapter == adapter_name}
    for index, expert_config in enumerate(classifier.expert_configs):
        key, tensors = str(index), {}
        for path, layer in layers.items():
            if key in layer.r:
                tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[key].weight.detach().cpu().contiguous()
                tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[key].weight.detach().cpu().contiguous()
        save_adapter_dir(Path(directory) / key, dataclasses.replace(expert_config, inference_mode=True), tensors)


Layer = XLoraLinear
