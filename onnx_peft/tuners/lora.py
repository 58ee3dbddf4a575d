"""LoRA layers for nn.Linear, transformers' Conv1D, nn.Embedding and nn.Conv1d/2d/3d.

::

    x ──► base_layer (frozen W) ─────────────────────┐
    │                                                 (+) ──► y
    └──► dropout ──► lora_A [r, in] ──► lora_B [out, r] ──► * s

DoRA (``use_dora``) is a strategy object, :class:`DoraMagnitude`, that the same layers call:
``y = f * (x W^T + s x A^T B^T) + bias`` with ``f = m / ||W + s B A||_row`` (the norm is
treated as a constant in backward, as in the DoRA paper and PEFT). All weight math comes from
:mod:`onnx_peft.methods.lora`, shared with the ONNX passes.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterConfigError
from ..methods.lora import (
    LoraConfig,
    lora_delta_weight,
    lora_embedding_delta_weight,
    lora_scaling,
    row_norm,
)
from ..quant.layers import is_quantized_linear
from .base import AdapterLayer, linear_layout


class DoraMagnitude(nn.Module):
    """DoRA's learned magnitude ``m`` (one per output channel), stored as ``weight``.

    Shape follows PEFT so checkpoints match: ``[out]`` for Linear/Embedding,
    ``[1, out, 1, ...]`` for convolutions.
    """

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)

    def factor(self, weight_out_first: torch.Tensor, delta_out_first: torch.Tensor) -> torch.Tensor:
        """``m / ||W + dW||_row`` as a ``[out]`` vector; the norm is detached."""
        norm = row_norm(weight_out_first + delta_out_first).detach()
        return self.weight.reshape(-1) / norm


class LoraLayer(AdapterLayer):
    """Per-adapter LoRA state shared by the Linear, Embedding and Conv variants."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.fan_in_fan_out = False
        self._dora_factor_cache: dict[str, torch.Tensor] = {}

    # -- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights: bool | str, use_rslora: bool, use_dora: bool,
                     loftq_config: dict | None = None) -> None:
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_scaling(r, lora_alpha, use_rslora)
        self.use_dora[adapter_name] = use_dora
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._create_weights(adapter_name, r, init_lora_weights)
        self._loftq_config = loftq_config or {}
        self._init_weights(adapter_name, init_lora_weights)
        self._move_to_base(adapter_name)
        if use_dora:
            with torch.no_grad():
                weight, delta = self._out_first(adapter_name)
                if getattr(self, "_ephemeral_gpu_offload", False) and weight.device.type == "cpu" and torch.cuda.is_available():
                    norm = row_norm((weight + delta).cuda()).to(weight.device)  # LoraRuntimeConfig
                else:
                    norm = row_norm(weight + delta)
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm.reshape(self._magnitude_shape()))
            self._move_to_base(adapter_name)

    def _move_to_base(self, adapter_name: str) -> None:
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                item = container[adapter_name]
                if isinstance(item, nn.Parameter):
                    item.data = item.data.to(weight.device, dtype or item.dtype)
                else:
                    item.to(weight.device, dtype)

    def _magnitude_shape(self) -> tuple[int, ...]:
        return (-1,)

    @abc.abstractmethod
    def _create_weights(self, adapter_name: str, r: int, init: bool | str) -> None:
        """Create the (uninitialised) A and B tensors of ``adapter_name`` with rank ``r``."""

    def _init_weights(self, adapter_name: str, init: bool | str) -> None:
        if init is False:
            return
        if isinstance(init, str) and (init in ("olora", "loftq", "corda") or init.startswith("pissa")):
            self._init_from_base_weight(adapter_name, init)
            return
        if init == "lora_ga" and hasattr(self.base_layer, "_peft_loraga_grad"):  # else the default init, as PEFT
            from .lora_init.loraga import loraga_init

            loraga_init(self, adapter_name, getattr(self, "_lora_ga_config", None))
            return
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init == "gaussian":
            nn.init.normal_(A, std=1 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)

    def _init_from_base_weight(self, adapter_name: str, init: str) -> None:
        raise AdapterConfigError(
            f"init_lora_weights={init!r} needs a Linear layer; {type(self.base_layer).__name__} is not one"
        )

    # -- math ------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * B @ A`` in the base weight's own layout."""
        return lora_delta_weight(
            self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight, self.scaling[adapter_name],
            base_shape=tuple(self.base_weight().shape), fan_in_fan_out=self.fan_in_fan_out,
        )

    def _out_first(self, adapter_name: str, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Base weight and delta as ``[out, ...]`` (the orientation DoRA norms rows of)."""
        weight = self.base_weight() if weight is None else weight
        delta = self.get_delta_weight(adapter_name)
        if self.fan_in_fan_out:
            return weight.T, delta.T
        return weight, delta

    def _from_out_first(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        if not self.use_dora.get(adapter_name):
            return super().merged_weight(adapter_name, weight)
        w, delta = self._out_first(adapter_name, weight)
        factor = self.lora_magnitude_vector[adapter_name].factor(w, delta).detach()
        self._dora_factor_cache[adapter_name] = factor
        shape = (-1,) + (1,) * (w.dim() - 1)
        return self._from_out_first((w + delta) * factor.reshape(shape))

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        if not self.use_dora.get(adapter_name):
            return super().unmerged_weight(adapter_name, weight)
        w, delta = self._out_first(adapter_name, weight)
        factor = self._dora_factor_cache.pop(adapter_name)
        shape = (-1,) + (1,) * (w.dim() - 1)
        return self._from_out_first(w / factor.reshape(shape) - delta)

    def _adapters_to_run(self) -> list[str]:
        return [n for n in self.active_adapters if n in self.r]

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``y = base(x) + sum over active adapters of s B(A(dropout(x)))`` (or its DoRA form)."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self._adapters_to_run():
            result = self._add_adapter_output(name, x, result)
        return result

    def _add_adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + s * B(A(dropout(x))), or its DoRA form. Shared by Linear and Conv."""
        A, B = self.lora_A[name], self.lora_B[name]
        dropout, scaling = self.lora_dropout[name], self.scaling[name]
        x = x.to(A.weight.dtype)
        if not self.use_dora[name]:
            return result + (B(A(dropout(x))) * scaling).to(result.dtype)
        weight, delta = self._out_first(name)
        factor = self.lora_magnitude_vector[name].factor(weight, delta.detach())
        view = (1, -1) + (1,) * (result.dim() - 2) if self._channels_dim() == 1 else (-1,)
        if isinstance(dropout, nn.Identity) or not self.training:
            base_result = result
            if self.bias is not None:
                base_result = base_result - self.bias.reshape(view)
        else:
            x = dropout(x)
            base_result = self._base_without_bias(x)
        dora = (factor.reshape(view) - 1) * base_result + factor.reshape(view) * B(A(x)) * scaling
        return result + dora.to(result.dtype)

    def _channels_dim(self) -> int:
        return -1

    @abc.abstractmethod
    def _base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """``x W`` without the bias (DoRA rescales it when dropout is active in training)."""

    def __repr__(self) -> str:
        return f"lora.{type(self).__name__}({self.base_layer!r})"


class Linear(LoraLayer):
    """LoRA on ``nn.Linear`` (weight ``[out, in]``) or GPT-2's ``Conv1D`` (weight ``[in, out]``,
    ``fan_in_fan_out=True``). x: ``[..., in]`` -> ``[..., out]``."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        if self.quantized:  # a packed 4/8-bit weight's shape says nothing about the layer
            from ..quant.layers import linear_features

            self.in_features, self.out_features = linear_features(base_layer)
            return
        shape = base_layer.weight.shape
        self.in_features, self.out_features = (shape[0], shape[1]) if fan_in_fan_out else (shape[1], shape[0])

    def _create_weights(self, adapter_name: str, r: int, init: bool | str) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)

    def _init_from_base_weight(self, adapter_name: str, init: str) -> None:
        """PiSSA (principal singular vectors), OLoRA (QR) or LoftQ (alternating NF4 quantization and
        SVD, onnx_peft.quant.loftq): A, B from W; W keeps the residual (LoftQ: its quantized form)."""
        if init == "corda":  # A, B from preprocess_corda's eigens (tuners/lora_init/corda.py)
            from .lora_init.corda import corda_init

            corda_init(self, adapter_name)
            return
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        if init == "loftq":
            from ..quant.loftq import apply_loftq

            self.set_base_weight(apply_loftq(self.base_layer, self.lora_A[adapter_name], self.lora_B[adapter_name],
                                             scaling, self._loftq_config, self.fan_in_fan_out))
            return
        base = self.base_weight()
        weight = (base.T if self.fan_in_fan_out else base).detach().to(torch.float32)
        if init == "olora":
            Q, R = torch.linalg.qr(weight)
            lora_A, lora_B = R[:r].contiguous(), Q[:, :r].contiguous()
        else:
            if init == "pissa":
                U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
                U, S, Vh = U[:, :r], S[:r], Vh[:r]
            else:
                niter = int(init.split("_niter_")[-1])
                U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
                Vh = V.T
            S = S / scaling
            lora_A = torch.diag(torch.sqrt(S)) @ Vh
            lora_B = U @ torch.diag(torch.sqrt(S))
        self.lora_A[adapter_name].weight.data = lora_A
        self.lora_B[adapter_name].weight.data = lora_B
        residual = weight - scaling * lora_B @ lora_A
        self.set_base_weight(residual.T if self.fan_in_fan_out else residual)

    def _base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base_weight()
        return F.linear(x, weight.T if self.fan_in_fan_out else weight)


class Embedding(LoraLayer):
    """LoRA on ``nn.Embedding`` (weight ``[num_embeddings, dim]``).

    PEFT's layout: ``lora_embedding_A [r, num_embeddings]``, ``lora_embedding_B [dim, r]``;
    ids ``[...]`` -> ``[..., dim]``.
    """

    def _create_weights(self, adapter_name: str, r: int, init: bool | str) -> None:
        num, dim = self.base_layer.weight.shape
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, num))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(dim, r))

    def _init_weights(self, adapter_name: str, init: bool | str) -> None:
        if init is False:
            return
        if isinstance(init, str) and init != "gaussian":
            super()._init_from_base_weight(adapter_name, init)
        nn.init.zeros_(self.lora_embedding_A[adapter_name])
        nn.init.normal_(self.lora_embedding_B[adapter_name])

    def _adapters_to_run(self) -> list[str]:
        return [n for n in self.active_adapters if n in self.lora_embedding_A]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return lora_embedding_delta_weight(
            self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name], self.scaling[adapter_name]
        )

    def _out_first(self, adapter_name: str, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # DoRA norms an embedding per output dimension: rows of W^T [dim, num].
        weight = self.base_layer.weight if weight is None else weight
        return weight.T, self.get_delta_weight(adapter_name).T

    def _from_out_first(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    def _base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self._embed(x, self.base_layer.weight)  # an embedding has no bias

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, table, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def _add_adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B, scaling = self.lora_embedding_A[name], self.lora_embedding_B[name], self.scaling[name]
        lora = (self._embed(x, A.T) @ B.T) * scaling
        if not self.use_dora[name]:
            return result + lora.to(result.dtype)
        weight, delta = self._out_first(name)
        factor = self.lora_magnitude_vector[name].factor(weight, delta.detach())
        return (result * factor + factor * lora).to(result.dtype)


class Conv(LoraLayer):
    """LoRA on ``nn.Conv1d/2d/3d``: lora_A is a conv with the base kernel, stride, padding and
    dilation; lora_B a 1x1 conv. x: ``[batch, in, *spatial]`` -> ``[batch, out, *spatial']``.

    A grouped base (``groups = g > 1``, depthwise included) is adapted as PEFT does: lora_A stays a
    full conv ``in -> r`` (weight ``[r, in, *k]``) and lora_B is grouped like the base
    (``[out, r / g, 1...]``, ``groups=g``), so r must be a multiple of g. Such an update mixes
    channels across groups, which the grouped base weight ``[out, in / g, *k]`` cannot hold: it
    stays unmerged (PEFT refuses to merge it too), and DoRA, which needs the merged weight's
    norm, is refused.
    """

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights: bool | str, use_rslora: bool, use_dora: bool,
                     loftq_config: dict | None = None) -> None:
        groups = self.base_layer.groups
        if groups > 1 and r % groups:
            raise AdapterConfigError(
                f"LoRA on a grouped {type(self.base_layer).__name__} (groups={groups}) needs a rank that is a "
                f"multiple of {groups}, got r={r}; choose r (or rank_pattern for this module) as a multiple of "
                f"{groups}, or leave the module out (exclude_modules)")
        if groups > 1 and use_dora:
            raise AdapterConfigError(
                f"DoRA on a grouped {type(self.base_layer).__name__} (groups={groups}) needs the merged weight, "
                "which a grouped convolution cannot hold; use plain LoRA (use_dora=False) or exclude the module")
        super().update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora,
                             loftq_config)

    def _create_weights(self, adapter_name: str, r: int, init: bool | str) -> None:
        base = self.base_layer
        conv = type(base)
        self.lora_A[adapter_name] = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                         base.dilation, bias=False)
        ones = (1,) * len(base.kernel_size)
        self.lora_B[adapter_name] = conv(r, base.out_channels, ones, ones, groups=base.groups, bias=False)

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        self._refuse_grouped_merge()
        return super().merged_weight(adapter_name, weight)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        self._refuse_grouped_merge()
        return super().get_delta_weight(adapter_name)

    def _refuse_grouped_merge(self) -> None:
        groups = self.base_layer.groups
        if groups > 1:
            raise AdapterConfigError(
                f"LoRA on a grouped {type(self.base_layer).__name__} (groups={groups}) cannot be merged: its update "
                "mixes channels across groups, which the grouped weight cannot hold (PEFT refuses too); keep the "
                "adapter unmerged (export --mode in-graph)")

    def _magnitude_shape(self) -> tuple[int, ...]:
        return (1, -1) + (1,) * len(self.base_layer.kernel_size)

    def _channels_dim(self) -> int:
        return 1

    def _base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return base._conv_forward(x, base.weight, None)


def make_lora_layer(module: nn.Module, adapter_name: str, config: LoraConfig, module_path: str) -> LoraLayer:
    """Wrap ``module`` in the LoRA layer for its type and create ``adapter_name`` on it."""
    layer: LoraLayer
    if isinstance(module, nn.Embedding):
        layer = Embedding(module)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        layer = Conv(module)
    elif is_quantized_linear(module):  # QLoRA: a 4/8-bit base (ours or bitsandbytes')
        layer = Linear(module)
    else:  # nn.Linear or Conv1D; anything else raises
        supported = ("nn.Linear, nn.Embedding, nn.Conv1d/2d/3d, transformers Conv1D, 4/8-bit linears "
                     "(onnx_peft.quantize_model, bitsandbytes)")
        layer = Linear(module, fan_in_fan_out=linear_layout(module, module_path, "LoRA", supported))
    add_lora_adapter(layer, adapter_name, config, module_path)
    return layer


def add_lora_adapter(layer: LoraLayer, adapter_name: str, config: LoraConfig, module_path: str) -> None:
    layer._lora_ga_config = getattr(config, "lora_ga_config", None)  # read by init "lora_ga" (tuners/lora_init/loraga.py)
    layer._ephemeral_gpu_offload = config.runtime_config.ephemeral_gpu_offload
    layer.update_layer(
        adapter_name, r=config.rank_for(module_path), lora_alpha=config.alpha_for(module_path),
        lora_dropout=float(config.lora_dropout), init_lora_weights=config.init_lora_weights,
        use_rslora=config.use_rslora, use_dora=config.use_dora, loftq_config=config.loftq_config,
    )


def before_inject(base_model: nn.Module, adapter_name: str, config: LoraConfig) -> None:
    """``trainable_token_indices``: the named embeddings (a list: the input embedding) train those
    rows too, kept in ``<embedding>.token_adapter`` as PEFT keeps them (tuners/trainable_tokens.py)."""
    tokens = config.trainable_token_indices
    if tokens is None:
        return
    from .trainable_tokens import TiedTokensLayer, wrap_tokens

    model = base_model.model
    if not isinstance(tokens, dict):
        inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        path = next((n for n, m in model.named_modules() if m is inputs), None) if inputs is not None else None
        tokens = {path or "embed_tokens": tokens}
    for name, indices in tokens.items():
        paths = [p for p, _ in model.named_modules() if p == name or p.endswith("." + name)]
        paths = [p for p in paths if not _inside_wrapper(model, p)]
        if len(paths) != 1:
            raise AdapterConfigError(
                f"LoraConfig.trainable_token_indices names {name!r}, which matches {len(paths) or 'no'} module(s) "
                f"of {type(model).__name__}{': ' + ', '.join(paths[:3]) if paths else ''}; name one embedding")
        if isinstance(model.get_submodule(paths[0]), TiedTokensLayer):
            continue  # a head tied to an embedding listed too: it follows that embedding's rows
        wrap_tokens(model, paths[0], adapter_name, list(indices), True, lora_style=True)


def _inside_wrapper(model: nn.Module, path: str) -> bool:
    """True for a module inside an adapter layer (``embed_tokens.base_layer``): not a target."""
    module = model
    for part in path.split(".")[:-1]:
        module = getattr(module, part)
        if isinstance(module, AdapterLayer):
            return True
    return False


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = LoraLayer
make_layer = make_lora_layer
add_adapter = add_lora_adapter
