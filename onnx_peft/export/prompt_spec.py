"""The input side of the export spec: graphs that take prompt-learning adapters as inputs.

A prompt-ready graph is the base model plus optional inputs whose defaults are empty, so with
no adapter it computes exactly the base (``p = q = 0``)::

    prompt_embeds  [prompt_batch, p, hidden]          virtual tokens, prepended to the embeddings
    prompt_mask    [prompt_batch, p]        int64     1 = real virtual token, 0 = padding (left)
    prefix.N.key / prefix.N.value  [prompt_batch, kv_heads, q, head_dim]   (no-past graphs only)
    prefix_mask    [prompt_batch, q]        int64

``prompt_batch`` is 1 (one adapter for the batch) or the batch (one per row: shorter prompts and
prefixes are left-padded and masked, so each row equals its own single run). Positions follow
PEFT: virtual tokens count (row ``i``'s tokens start at its prompt length ``p_i``), a prefix
shifts the tokens by its length ``q_i``. Outputs drop the virtual tokens: ``logits [b, s, vocab]``
as the base's. ``causal-lm-with-past`` graphs take no prefix inputs: a prefix *is* a past, fed
through ``past_key_values.*`` by the runtime; their ``position_ids`` cover the real tokens, the
graph numbers the virtual ones and inserts ``prompt_mask`` after the past's columns of
``attention_mask`` (the cache order: past, virtual tokens, tokens).
"""

from __future__ import annotations

from typing import Any

from ..errors import ExportError, require_torch
from .spec import ExportSpec, _accepts, cache_tensors, export_spec, make_cache

_PROMPT, _PREFIX, _PROMPT_BATCH = 5, 6, 7  # distinct example sizes keep every dim symbolic

PROMPT_INPUTS = ("prompt_embeds", "prompt_mask")
PREFIX_MASK = "prefix_mask"


def prefix_input_names(num_layers: int) -> list[str]:
    return [f"prefix.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def prefix_geometry(model: Any) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of the prefix a PEFT prefix-tuning adapter gives this model."""
    from ..methods.prefix_tuning import PrefixTuningConfig

    config = PrefixTuningConfig(num_virtual_tokens=1)
    config.prepare(model.config)
    return config.num_layers, config.num_attention_heads, config.token_dim // config.num_attention_heads


def _rows(values: Any, batch: Any) -> Any:
    """``[prompt_batch, ...]`` -> ``[batch, ...]``: row ``min(i, prompt_batch - 1)`` for row ``i``."""
    torch = require_torch()
    index = torch.clamp(torch.arange(batch, device=values.device), max=values.shape[0] - 1)
    return values.index_select(0, index)


def _prompt_positions(prompt_mask: Any) -> Any:
    """``[b, p]`` mask -> positions of the virtual tokens: 0.. for the real ones, 0 for padding."""
    return (prompt_mask.cumsum(1) - 1).clamp(min=0)


def prompt_ready_spec(model: Any, task: str) -> ExportSpec:
    """The export spec of ``task`` with prompt inputs (and prefix inputs where the task allows)."""
    if task == "causal-lm-with-past":
        return _with_past(model)
    return _encoder(model, task)


def _example_prompt(model: Any) -> tuple[Any, Any]:
    torch = require_torch()
    hidden = model.get_input_embeddings().weight.shape[1]
    dtype = model.get_input_embeddings().weight.dtype
    generator = torch.Generator().manual_seed(2)
    embeds = torch.randn((_PROMPT_BATCH, _PROMPT, hidden), generator=generator).to(dtype)
    return embeds, torch.ones((_PROMPT_BATCH, _PROMPT), dtype=torch.int64)


def _encoder(model: Any, task: str) -> ExportSpec:
    torch = require_torch()
    base = export_spec(model, task)  # the base's inputs, names and output
    backbone = model.base_model if task == "feature-extraction" else model
    cache_arg = next((n for n in ("cache", "past_key_values") if _accepts(backbone, n)), None)
    with_prefix = cache_arg is not None
    names = list(base.input_names) + list(PROMPT_INPUTS)
    args = list(base.args) + list(_example_prompt(model))
    dims = list(base.dims) + [{0: "prompt_batch", 1: "prompt_sequence"}] * 2
    num_layers = 0
    if with_prefix:
        num_layers, heads, head_dim = prefix_geometry(model)
        generator = torch.Generator().manual_seed(3)
        dtype = model.get_input_embeddings().weight.dtype
        names += prefix_input_names(num_layers) + [PREFIX_MASK]
        args += [torch.randn((_PROMPT_BATCH, heads, _PREFIX, head_dim), generator=generator).to(dtype)
                 for _ in range(2 * num_layers)]
        args.append(torch.ones((_PROMPT_BATCH, _PREFIX), dtype=torch.int64))
        dims += [{0: "prompt_batch", 2: "prefix_sequence"}] * (2 * num_layers) + [{0: "prompt_batch", 1: "prefix_sequence"}]
    keys = list(base.input_names)
    config = model.config

    def forward(model: Any, *tensors: Any) -> tuple:
        kwargs = dict(zip(keys, tensors))
        prompt_embeds, prompt_mask = tensors[len(keys)], tensors[len(keys) + 1]
        ids, mask = kwargs.pop("input_ids"), kwargs.pop("attention_mask")
        batch, total = ids.shape[0], prompt_embeds.shape[1] + ids.shape[1]
        prompt_mask = _rows(prompt_mask, batch)
        embeds = torch.cat([_rows(prompt_embeds, batch).to(model.get_input_embeddings().weight.dtype),
                            model.get_input_embeddings()(ids)], dim=1)
        pad = prompt_embeds.shape[1] - prompt_mask.sum(1, keepdim=True)
        positions = torch.arange(total, device=ids.device)[None] - pad
        mask = torch.cat([prompt_mask.to(mask.dtype), mask], dim=1)
        if "token_type_ids" in kwargs:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([torch.zeros_like(prompt_mask).to(types.dtype), types], dim=1)
        if num_layers:
            flat = tensors[len(keys) + 2: len(keys) + 2 + 2 * num_layers]
            prefix_mask = _rows(tensors[-1], batch)
            positions = positions + prefix_mask.sum(1, keepdim=True)
            mask = torch.cat([prefix_mask.to(mask.dtype), mask], dim=1)
            kwargs[cache_arg] = make_cache(config, [(_rows(flat[2 * i], batch), _rows(flat[2 * i + 1], batch))
                                                            for i in range(num_layers)])
        kwargs.update(inputs_embeds=embeds, attention_mask=mask, position_ids=positions.clamp(min=0))
        start = prompt_embeds.shape[1]
        if task == "feature-extraction":
            return (model.base_model(**kwargs).last_hidden_state[:, start:],)
        if task == "causal-lm":
            return (model(use_cache=False, **kwargs).logits[:, start:],)
        return (model(**kwargs).logits,)

    info = dict(base.info, prompt={"prefix_layers": num_layers})
    return ExportSpec(names, base.output_names, tuple(args), dims, forward, info)


def _with_past(model: Any) -> ExportSpec:
    torch = require_torch()
    base = export_spec(model, "causal-lm-with-past")
    names = base.input_names[:3] + list(PROMPT_INPUTS) + base.input_names[3:]
    args = base.args[:3] + _example_prompt(model) + base.args[3:]
    dims = base.dims[:3] + [{0: "prompt_batch", 1: "prompt_sequence"}] * 2 + base.dims[3:]
    dims[1] = {0: "batch", 1: "mask_sequence"}  # past + this step's tokens, virtual ones included
    num_layers = base.info["num_layers"]
    config = model.config

    def forward(model: Any, input_ids: Any, attention_mask: Any, position_ids: Any, prompt_embeds: Any,
                prompt_mask: Any, *flat: Any) -> tuple:
        batch = input_ids.shape[0]
        prompt_mask = _rows(prompt_mask, batch)
        embedding = model.get_input_embeddings()
        embeds = torch.cat([_rows(prompt_embeds, batch).to(embedding.weight.dtype), embedding(input_ids)], dim=1)
        positions = torch.cat([_prompt_positions(prompt_mask), position_ids], dim=1)
        # the cache holds [past (a prefix, earlier steps), virtual tokens, this step's tokens]
        past = flat[0].shape[2]
        mask = torch.cat([attention_mask[:, :past], prompt_mask.to(attention_mask.dtype), attention_mask[:, past:]],
                         dim=1)
        cache = make_cache(config, [(flat[2 * i], flat[2 * i + 1]) for i in range(num_layers)])
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True)
        return (out.logits[:, prompt_embeds.shape[1]:], *cache_tensors(out.past_key_values))

    info = dict(base.info, prompt={"prefix_layers": 0})
    return ExportSpec(names, base.output_names, tuple(args), dims, forward, info)


def check_prompt_model(model: Any) -> None:
    """Prompt inputs need the model to take ``inputs_embeds`` and ``position_ids``."""
    if not (_accepts(model, "inputs_embeds") and _accepts(model, "position_ids")):
        raise ExportError(f"{type(model).__name__} takes no inputs_embeds/position_ids; prompt-learning adapters "
                          "cannot be given to it as inputs")
