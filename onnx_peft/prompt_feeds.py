"""Prompt-learning adapters at run time, torch-free: from files to the graph's prompt inputs.

A prompt-ready model (export/prompt_spec.py) records its prompt inputs in ``metadata_props``
under ``PROMPT_KEY`` (a :class:`PromptLayout`). An adapter of a prompt method is then constant
tensors, in files as in graphs under the input names::

    prompt_embeds  [tasks, p, hidden]   (tasks = 1 except multitask prompt tuning)
    prefix.N.key / prefix.N.value  [1, kv_heads, q, head_dim]   N = 0 .. layers - 1

:func:`prompt_inputs` lays out one adapter per row (or one for all), left-padding shorter
prompts and prefixes and masking the padding, so each row equals its own single run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import IncompatibleAdapterError, RuntimeSessionError

PROMPT_KEY = "onnx_peft.prompt"
PROMPT_EMBEDS, PROMPT_MASK, PREFIX_MASK = "prompt_embeds", "prompt_mask", "prefix_mask"
PROMPT_INPUT_NAMES = (PROMPT_EMBEDS, PROMPT_MASK, PREFIX_MASK)


def prefix_names(layers: int) -> list[str]:
    return [f"prefix.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


@dataclass
class PromptLayout:
    """What a prompt-ready graph takes. ``prefix_via``: "inputs" (``prefix.*`` graph inputs),
    "past" (causal-lm-with-past: the prefix is fed as the initial ``past_key_values.*``) or ""
    (the task has no prefix path)."""

    hidden: int
    dtype: str
    task: str
    prefix_via: str = ""
    layers: int = 0
    heads: int = 0
    head_dim: int = 0
    max_positions: int = 0  # the model's position limit (0: none known)

    def check_length(self, rows: Sequence[PromptAdapter | None], tokens: int) -> None:
        """Refuse a batch whose virtual tokens + prefix + ``tokens`` pass the model's positions."""
        if not self.max_positions:
            return
        worst = max(rows, key=lambda r: 0 if r is None else r.length, default=None)
        longest = max((0 if r is None else r.length for r in rows), default=0)
        if longest + tokens > self.max_positions:
            raise RuntimeSessionError(
                f"{worst.label if worst is not None else 'the input'}: {longest} virtual tokens + {tokens} tokens "
                f"= {longest + tokens} positions, the model has {self.max_positions}; shorten the input")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> PromptLayout | None:
        text = metadata.get(PROMPT_KEY)
        if not text:
            return None
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: nesting past the limit
            raise IncompatibleAdapterError(f"corrupt {PROMPT_KEY} metadata in the model ({type(exc).__name__}: "
                                           f"{str(exc)[:120]}); export it again") from None


@dataclass
class PromptAdapter:
    """One prompt-learning adapter: ``values`` is ``[tasks, p, hidden]`` (kind "prompt") or
    ``[2 * layers, kv_heads, q, head_dim]`` (kind "prefix": keys and values interleaved)."""

    kind: str
    values: np.ndarray
    label: str = "adapter"
    # heads trained in full (SEQ_CLS): {"classifier.weight": array}; from a PEFT dir the weight
    # is [out, in] until :meth:`fit_heads` lays it out as the model's full-weight slot
    heads: dict[str, np.ndarray] = field(default_factory=dict)
    heads_laid_out: bool = True

    def fit_heads(self, contract: Any) -> None:
        """Lay the heads out as ``contract``'s full-weight slots (transposed where "in_out")."""
        if self.heads_laid_out or not self.heads:
            self.heads_laid_out = True
            return
        slots = contract.slot_map() if contract is not None else {}
        for name, array in list(self.heads.items()):
            slot = slots.get(name)
            if slot is None:
                raise IncompatibleAdapterError(
                    f"{self.label}: trains {name.rsplit('.', 1)[0]!r} in full but the model has no slot for it; "
                    "export the model with this adapter (export --mode inputs)")
            if slot.layout == "in_out" and array.ndim == 2:
                self.heads[name] = np.ascontiguousarray(array.T)
        self.heads_laid_out = True

    @property
    def length(self) -> int:
        return int(self.values.shape[1 if self.kind == "prompt" else 2])

    @property
    def tasks(self) -> int:
        return int(self.values.shape[0]) if self.kind == "prompt" else 1

    def tensors(self) -> dict[str, np.ndarray]:
        """The adapter under the graph's input names (what ``.onnx_adapter`` files hold), masks
        included, so ONNX Runtime's own LoraAdapter can feed a file as it is."""
        ones = np.ones((self.values.shape[0] if self.kind == "prompt" else 1, self.length), dtype=np.int64)
        if self.kind == "prompt":
            return {PROMPT_EMBEDS: self.values, PROMPT_MASK: ones, **self.heads}
        layers = self.values.shape[0] // 2
        return {**{name: self.values[i][None] for i, name in enumerate(prefix_names(layers))}, PREFIX_MASK: ones,
                **self.heads}

    def check(self, layout: PromptLayout) -> None:
        """Refuse an adapter made for another model, naming the mismatch in model terms."""
        if self.kind == "prompt" and self.values.shape[2] != layout.hidden:
            raise IncompatibleAdapterError(
                f"{self.label}: virtual tokens of width {self.values.shape[2]}, the model's hidden size is "
                f"{layout.hidden}; the adapter was trained for another base model")
        if self.kind == "prefix":
            if not layout.prefix_via:
                raise IncompatibleAdapterError(
                    f"{self.label}: a prefix-tuning adapter needs a model that takes a KV prefix; this {layout.task} "
                    "model does not (export it with task causal-lm-with-past, causal-lm or feature-extraction)")
            want = (2 * layout.layers, layout.heads, layout.head_dim)
            got = (self.values.shape[0], self.values.shape[1], self.values.shape[3])
            if got != want:
                raise IncompatibleAdapterError(
                    f"{self.label}: prefix for {got[0] // 2} layers x {got[1]} kv heads x head_dim {got[2]}, "
                    f"the model has {want[0] // 2} x {want[1]} x {want[2]}; the adapter was trained for another base model")

    def prompt_rows(self, task: int | None) -> np.ndarray:
        """``[p, hidden]`` of one task (task None = the only one)."""
        if self.tasks == 1 and task in (None, 0):
            return self.values[0]
        if task is None:
            raise RuntimeSessionError(f"{self.label} is a multitask prompt ({self.tasks} tasks): pass task_ids")
        if not 0 <= int(task) < self.tasks:
            raise RuntimeSessionError(f"{self.label}: task id {task} is out of range (0..{self.tasks - 1})")
        return self.values[int(task)]


def adapter_from_tensors(tensors: Mapping[str, np.ndarray], label: str) -> PromptAdapter | None:
    """A prompt adapter if ``tensors`` hold graph prompt inputs (files), else None."""
    heads = {k: np.asarray(v) for k, v in tensors.items() if k.endswith((".weight", ".bias"))}
    if PROMPT_EMBEDS in tensors:
        extra = sorted(set(tensors) - {PROMPT_EMBEDS, PROMPT_MASK} - set(heads))
        values = np.asarray(tensors[PROMPT_EMBEDS])
        if extra or values.ndim != 3:
            raise IncompatibleAdapterError(f"{label}: a prompt adapter holds prompt_embeds [tasks, p, hidden] (and "
                                           f"trained heads) only; got {list(values.shape)} and {extra}")
        return PromptAdapter("prompt", values, label, heads)
    keys = [k for k in tensors if k.startswith("prefix.")]
    if not keys:
        return None
    layers = len(keys) // 2
    if sorted(keys) != sorted(prefix_names(layers)) or \
            len(tensors) != len(keys) + (PREFIX_MASK in tensors) + len(heads):
        raise IncompatibleAdapterError(f"{label}: a prefix adapter holds prefix.N.key/value for N = 0..layers-1 only")
    parts = [np.asarray(tensors[name]) for name in prefix_names(layers)]
    if any(p.ndim != 4 or p.shape[0] != 1 or p.shape != parts[0].shape for p in parts):
        raise IncompatibleAdapterError(f"{label}: prefix tensors must all be [1, kv_heads, q, head_dim]")
    return PromptAdapter("prefix", np.concatenate(parts, axis=0), label, heads)


def adapter_from_peft(config: Any, tensors: Mapping[str, np.ndarray], dtype: str, label: str) -> PromptAdapter:
    """A PEFT prompt-learning checkpoint -> :class:`PromptAdapter` in the model's dtype."""
    from .methods.base import method_for
    from .methods.prompt_learning import prefix_pairs

    method = method_for(config)
    saved = list(config.modules_to_save or ())
    grouped = method.group(tensors, source=label, saved_modules=saved)
    shared = grouped.shared
    heads = {f"{module}.{part}": np.ascontiguousarray(np.asarray(value, dtype=dtype))
             for module, parts in grouped.full.items() for part, value in parts.items()}
    if method.kind == "prefix":
        flat = method.virtual_tokens(config, shared, source=label)
        pairs = prefix_pairs(config, flat)
        values = np.stack([t for pair in pairs for t in pair])
    else:
        values = np.stack([method.virtual_tokens(config, shared, task=t if method.tasks(config) > 1 else None,
                                                 source=label) for t in range(method.tasks(config))])
    return PromptAdapter(method.kind, np.ascontiguousarray(values.astype(dtype)), label, heads, not heads)


def _left_pad(rows: Sequence[np.ndarray | None], length: int, axis: int, template: tuple[int, ...],
              dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Stack ``rows`` (None = nothing) left-padded to ``length`` along ``axis``; plus the
    ``[len(rows), length]`` int64 mask of real entries."""
    shape = list(template)
    shape[axis] = length
    out = np.zeros((len(rows), *shape), dtype=dtype)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        if row is None or row.shape[axis] == 0:
            continue
        n = row.shape[axis]
        index = [slice(None)] * len(shape)
        index[axis] = slice(length - n, length)
        out[(i, *index)] = row
        mask[i, length - n:] = 1
    return out, mask


def prompt_inputs(layout: PromptLayout, rows: Sequence[PromptAdapter | None], tasks: Sequence[int | None],
                  with_prefix_inputs: bool) -> dict[str, np.ndarray]:
    """The prompt (and prefix) inputs for a batch whose row ``i`` uses ``rows[i]``; one shared row
    (prompt_batch 1) when every row uses the same adapter and task."""
    shared = len({(id(r), t) for r, t in zip(rows, tasks)}) == 1
    if shared:
        rows, tasks = rows[:1], tasks[:1]
    dtype = np.dtype(layout.dtype)
    prompts = [r.prompt_rows(t) if r is not None and r.kind == "prompt" else None for r, t in zip(rows, tasks)]
    length = max((p.shape[0] for p in prompts if p is not None), default=0)
    embeds, mask = _left_pad(prompts, length, 0, (0, layout.hidden), dtype)
    feeds = {PROMPT_EMBEDS: embeds, PROMPT_MASK: mask}
    if with_prefix_inputs:
        feeds.update(prefix_inputs(layout, rows, "prefix."))
    return feeds


def prefix_inputs(layout: PromptLayout, rows: Sequence[PromptAdapter | None], prefix: str) -> dict[str, np.ndarray]:
    """``{prefix}N.key/value [rows, kv_heads, Q, head_dim]`` (left-padded) and ``prefix_mask``."""
    prefixes = [r.values if r is not None and r.kind == "prefix" else None for r in rows]
    length = max((p.shape[2] for p in prefixes if p is not None), default=0)
    cube, mask = _left_pad(prefixes, length, 2, (2 * layout.layers, layout.heads, 0, layout.head_dim),
                           np.dtype(layout.dtype))
    names = [f"{prefix}{i}.{kind}" for i in range(layout.layers) for kind in ("key", "value")]
    return {**{name: np.ascontiguousarray(cube[:, i]) for i, name in enumerate(names)}, PREFIX_MASK: mask}


def task_list(task_ids: Any, batch: int) -> list[int | None]:
    """``task_ids`` (None, one int, or one per row) -> one entry per row."""
    if task_ids is None:
        return [None] * batch
    ids = np.asarray(task_ids).reshape(-1)
    if not np.issubdtype(ids.dtype, np.integer):
        raise RuntimeSessionError(f"task_ids must be integers, got {ids.dtype}")
    if ids.size == 1:
        return [int(ids[0])] * batch
    if ids.size != batch:
        raise RuntimeSessionError(f"task_ids has {ids.size} entries but the batch has {batch} rows")
    return [int(t) for t in ids]


@dataclass
class GenerationStart:
    """What a decode loop on a causal-lm-with-past graph needs from prompt adapters.

    ``feeds``: the prompt inputs of the first step (prefill); ``past``: the initial
    ``past_key_values.*`` (prefix rows, left-padded; the others empty and masked);
    ``prefix_mask [b, Q]`` and ``prompt_mask [b, P]`` precede the tokens' mask from then on;
    token positions are ``offsets[i]`` (the row's prompt or prefix length) plus the count of
    real tokens before, except prompt rows, which count every token as PEFT does (``by_index``).
    """

    feeds: dict[str, np.ndarray]
    past: dict[str, np.ndarray]
    prefix_mask: np.ndarray
    prompt_mask: np.ndarray
    offsets: np.ndarray
    by_index: np.ndarray

    def positions(self, token_mask: np.ndarray) -> np.ndarray:
        """``[b, tokens]`` positions of all tokens so far (prompt and prefix excluded)."""
        counted = np.cumsum(token_mask, axis=1) - 1
        counted[token_mask == 0] = 1
        indexed = np.broadcast_to(np.arange(token_mask.shape[1]), token_mask.shape)
        return np.where(self.by_index[:, None], indexed, counted) + self.offsets[:, None]


def generation_start(layout: PromptLayout, rows: Sequence[PromptAdapter | None], tasks: Sequence[int | None]
                     ) -> GenerationStart:
    batch = len(rows)
    feeds = prompt_inputs(layout, rows, tasks, with_prefix_inputs=False)
    prompt_mask = np.broadcast_to(feeds[PROMPT_MASK], (batch, feeds[PROMPT_MASK].shape[1])).copy()
    prefix = prefix_inputs(layout, rows, "past_key_values.")
    prefix_mask = prefix.pop(PREFIX_MASK)
    is_prompt = np.array([r is not None and r.kind == "prompt" for r in rows])
    offsets = prompt_mask.sum(1) + prefix_mask.sum(1)
    return GenerationStart(feeds, prefix, prefix_mask, prompt_mask, offsets.astype(np.int64), is_prompt)


def convert_prompt_adapter(adapter: Any, model_path: Any, output_path: Any, dtype: str | None, format: Any,
                           allow_pickle: bool) -> bool:
    """convert-adapters for prompt-learning adapters (a PEFT dir, or a file of prompt inputs):
    write the graph's prompt inputs, checked against ``model_path``'s prompt layout when given.
    Returns False (nothing written) for any other adapter."""
    from pathlib import Path

    from .config import CONFIG_NAME, AdapterConfig
    from .convert import numpy_dtype
    from .formats import load_adapter_file, read_peft_adapter, save_adapter_file
    from .methods.base import method_for

    adapter = Path(adapter)
    if adapter.is_dir() and (adapter / CONFIG_NAME).is_file():
        config = AdapterConfig.from_pretrained(adapter)
        if not getattr(method_for(config), "is_prompt_learning", False):
            return False
        config, tensors = read_peft_adapter(adapter, allow_pickle=allow_pickle)
        prompt = adapter_from_peft(config, tensors, "float32", str(adapter))
    elif adapter.is_file() and adapter.suffix in (".onnx_adapter", ".safetensors", ".npz"):
        tensors, _ = load_adapter_file(adapter)
        prompt = adapter_from_tensors(tensors, str(adapter))
        if prompt is None:
            return False
    else:
        return False
    layout = None
    if model_path is not None:
        from .graph.io import load_model

        layout = PromptLayout.from_metadata(load_model(model_path).metadata_props)
    target = numpy_dtype(dtype) if dtype is not None else np.dtype(layout.dtype if layout is not None else "float32")
    prompt.values = prompt.values.astype(target)
    if model_path is not None:
        if layout is None:
            raise IncompatibleAdapterError(f"{adapter} is a prompt-learning adapter and {model_path} takes no prompt "
                                           "inputs; export the base with it (export --mode inputs)")
        prompt.check(layout)
    save_adapter_file(output_path, prompt.tensors(), "", format)
    return True
