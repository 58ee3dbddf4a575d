"""What torch.onnx traces for each task: input names, example tensors, dynamic dims, and the
forward that maps flat tensors to the model's outputs.

``causal-lm-with-past`` uses Optimum's flat layout (``past_key_values.N.key/value`` in,
``present.N.key/value`` out) so one model serves prefill (past length 0) and decode; the KV
cache section is the only place that knows transformers' Cache API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import OnnxPeftError, require_torch

# Example sizes for tracing. All >= 2 and distinct, so torch.export keeps each dim symbolic.
_BATCH, _SEQUENCE, _PAST = 2, 3, 4

# --------------------------------------------------------------------------------------------
# The module that torch.onnx traces
# --------------------------------------------------------------------------------------------


def _task_module_class() -> type:
    torch = require_torch()

    class _TaskModule(torch.nn.Module):
        """Calls ``forward_fn(model, *tensors)`` and shares ``model``'s children, not wraps them.

        Sharing ``_modules``/``_parameters``/``_buffers`` makes every submodule's qualified name
        the same as in ``model``, so the exported name scopes are real module paths
        (``model.layers.0.self_attn.q_proj``), not ``wrapper.model.layers...``.
        """

        def __init__(self, model: Any, forward_fn: Callable[..., tuple]) -> None:
            super().__init__()
            object.__setattr__(self, "_modules", model._modules)
            object.__setattr__(self, "_parameters", model._parameters)
            object.__setattr__(self, "_buffers", model._buffers)
            object.__setattr__(self, "_wrapped", model)
            object.__setattr__(self, "_forward_fn", forward_fn)

        def forward(self, *tensors: Any) -> tuple:
            return self._forward_fn(self._wrapped, *tensors)

    return _TaskModule


@dataclass
class ExportSpec:
    """What to trace: example tensors, names, dynamic dims, and the forward that uses them."""

    input_names: list[str]
    output_names: list[str]
    args: tuple
    dims: list[dict[int, str]]  # per input: axis -> dim name
    forward: Callable[..., tuple]
    info: dict[str, Any] = field(default_factory=dict)

    def dynamic_shapes(self) -> tuple:
        """For ``torch.export``: one tuple (the ``*tensors`` argument) of per-input dim maps."""
        from torch.export import Dim

        cache: dict[str, Any] = {}
        dims = tuple({axis: cache.setdefault(name, Dim(name.replace(" ", "_"))) for axis, name in d.items()}
                     for d in self.dims)
        return (dims,)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """For the TorchScript exporter, including outputs."""
        axes = dict(zip(self.input_names, self.dims))
        axes.update(self.info.get("output_dims", {}))
        return axes


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _example_ids(model: Any, batch: int, seq: int) -> Any:
    torch = require_torch()
    vocab = int(getattr(_text_config(model), "vocab_size", 100) or 100)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(low=min(3, vocab - 1), high=vocab, size=(batch, seq), generator=generator)


def _accepts(model: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _encoder_spec(model: Any, task: str) -> ExportSpec:
    torch = require_torch()
    ids = _example_ids(model, _BATCH, _SEQUENCE)
    names = ["input_ids", "attention_mask"]
    args = [ids, torch.ones_like(ids)]
    backbone = model.base_model if task == "feature-extraction" else model
    if _accepts(backbone, "token_type_ids") and getattr(_text_config(model), "type_vocab_size", 0):
        names.append("token_type_ids")
        args.append(torch.zeros_like(ids))
    dims = [{0: "batch", 1: "sequence"} for _ in names]
    if task == "causal-lm":
        output, out_dims = "logits", {0: "batch", 1: "sequence"}
    elif task == "feature-extraction":
        output, out_dims = "last_hidden_state", {0: "batch", 1: "sequence"}
    else:
        output, out_dims = "logits", {0: "batch"}
    keys = list(names)

    def forward(model: Any, *tensors: Any) -> tuple:
        kwargs = dict(zip(keys, tensors))
        if task == "feature-extraction":
            return (model.base_model(**kwargs).last_hidden_state,)
        if task == "causal-lm":
            kwargs["use_cache"] = False
        return (model(**kwargs).logits,)

    return ExportSpec(names, [output], tuple(args), dims, forward, {"output_dims": {output: out_dims}})


# -- KV cache: the only place that knows transformers' Cache API ------------------------------


def make_cache(config: Any, pairs: Sequence[tuple[Any, Any]]) -> Any:
    """A transformers DynamicCache holding ``pairs`` of (key, value) per layer.

    transformers >= 4.56 (5.x included) take the pairs and the config in the constructor;
    older versions build one from the legacy tuple format.
    """
    from transformers.cache_utils import DynamicCache

    try:
        return DynamicCache(list(pairs), config=config)
    except TypeError:  # pragma: no cover - transformers < 4.56
        return DynamicCache.from_legacy_cache(tuple(pairs))


def cache_tensors(cache: Any) -> list[Any]:
    """Flatten a cache to ``[key0, value0, key1, value1, ...]`` (each [batch, heads, seq, dim])."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    if hasattr(cache, "key_cache"):  # pragma: no cover - older DynamicCache
        return [t for pair in zip(cache.key_cache, cache.value_cache) for t in pair]
    return [t for pair in cache for t in pair[:2]]  # pragma: no cover - legacy tuples


def _with_past_spec(model: Any) -> ExportSpec:
    """Optimum's decoder layout: one graph for prefill (past_sequence = 0) and decode."""
    torch = require_torch()
    with torch.no_grad():
        probe = model(input_ids=_example_ids(model, 1, 2), use_cache=True)
    shapes = [tuple(t.shape) for t in cache_tensors(probe.past_key_values)]
    if not shapes:
        raise OnnxPeftError(f"{type(model).__name__} returned no KV cache; export it with task='causal-lm'")
    num_layers = len(shapes) // 2
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(1)
    past = [torch.randn((_BATCH, s[1], _PAST, s[3]), generator=generator).to(dtype) for s in shapes]
    ids = _example_ids(model, _BATCH, _SEQUENCE)
    mask = torch.ones((_BATCH, _PAST + _SEQUENCE), dtype=torch.int64)
    positions = torch.arange(_PAST, _PAST + _SEQUENCE, dtype=torch.int64).expand(_BATCH, -1).contiguous()
    kv_names = [f"{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    input_names = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv_names]
    output_names = ["logits"] + [f"present.{n}" for n in kv_names]
    dims = [{0: "batch", 1: "sequence"}, {0: "batch", 1: "total_sequence"}, {0: "batch", 1: "sequence"}]
    dims += [{0: "batch", 2: "past_sequence"} for _ in kv_names]
    output_dims = {"logits": {0: "batch", 1: "sequence"}}
    output_dims.update({f"present.{n}": {0: "batch", 2: "total_sequence"} for n in kv_names})
    config = model.config

    def forward(model: Any, input_ids: Any, attention_mask: Any, position_ids: Any, *flat: Any) -> tuple:
        cache = make_cache(config, [(flat[2 * i], flat[2 * i + 1]) for i in range(num_layers)])
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True)
        return (out.logits, *cache_tensors(out.past_key_values))

    info = {"num_layers": num_layers, "num_kv_heads": shapes[0][1], "head_dim": shapes[0][3],
            "output_dims": output_dims}
    return ExportSpec(input_names, output_names, (ids, mask, positions, *past), dims, forward, info)


def export_spec(model: Any, task: str) -> ExportSpec:
    """The trace spec of ``task`` for a transformers model (adapter layers may be inside)."""
    if task == "causal-lm-with-past":
        return _with_past_spec(model)
    return _encoder_spec(model, task)
