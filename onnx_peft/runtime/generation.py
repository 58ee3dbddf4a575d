"""Generation with the KV cache of causal-lm-with-past models, sampling, example feeds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import RuntimeSessionError
from .state import _numpy_dtype


class AdapterGeneration:
    """The decode loop of :class:`~onnx_peft.runtime.AdapterSession`."""

    # -- generation ----------------------------------------------------------------------------
    def _picker(self) -> Any:
        """The next-token picker for this model's logits dtype (runtime/picking.py), cached."""
        from .picking import Picker, picker_model

        meta = next(o for o in self._session.get_outputs() if o.name == "logits")
        dtype = _numpy_dtype(meta.type) or np.dtype(np.float32)
        picker = self._pickers.get(dtype.name)
        if picker is None:
            options = self._ort.SessionOptions()
            options.log_severity_level = 3
            picker = Picker(self._create_session(picker_model(dtype), self._plan, options))
            self._pickers[dtype.name] = picker
        return picker

    def _decoder_io(self) -> tuple[list[str], list[str], list[str]]:
        """(past inputs, present outputs, missing) of a causal-lm-with-past model."""
        past = [n for n in self._inputs if n.startswith("past_key_values.")]
        present = ["present." + n[len("past_key_values."):] for n in past]
        missing = [n for n in ("input_ids", "logits") if n not in self._inputs and n not in self.output_names]
        missing += [n for n in present if n not in self.output_names]
        return past, present, missing

    def generate(self, input_ids: Any, max_new_tokens: int, adapter: str | Sequence[str | None] | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | Sequence[int] | None = None, attention_mask: Any = None,
                 pad_token_id: int | None = None, seed: int | None = None, task_ids: Any = None) -> np.ndarray:
        """Decode with the KV cache of a causal-lm-with-past model; returns ``[batch, prompt + new]``.

        ``input_ids [batch, prompt]`` int64, left padded where ``attention_mask`` is 0.
        ``adapter``: one name for all rows, or one per row (MultiAdapter models; prompt-ready
        models with prompt-learning adapters: virtual tokens go in at prefill, a prefix is the
        initial past, masks and positions as PEFT builds them). ``task_ids``: multitask prompts. Greedy unless
        ``do_sample`` (then temperature / top_k / top_p, numpy RNG seeded by ``seed``). Rows that
        produced ``eos_token_id`` continue with ``pad_token_id`` (default: the first eos id).
        The adapters stay referenced for the whole call, so unloading one waits for it.
        """
        past_names, present_names, missing = self._decoder_io()
        if missing or not past_names:
            raise RuntimeSessionError(
                f"{self.model_path.name} is not a causal LM with past key/values (missing "
                f"{missing or ['past_key_values.*']}); export it with task causal-lm-with-past")
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise RuntimeSessionError(f"input_ids must be a non-empty [batch, length] integer array, got {ids.dtype} {list(ids.shape)}")
        ids = ids.astype(np.int64)
        batch = ids.shape[0]
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64).reshape(ids.shape)
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) < 0:
            raise RuntimeSessionError(f"max_new_tokens must be >= 0, got {max_new_tokens!r}")
        eos = [] if eos_token_id is None else [int(eos_token_id)] if np.isscalar(eos_token_id) else [int(e) for e in eos_token_id]
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        if isinstance(adapter, (list, tuple)) and len(adapter) != batch:
            raise RuntimeSessionError(f"adapter list has {len(adapter)} entries but the batch has {batch} rows")
        rng = np.random.default_rng(seed)
        past = {}
        for name in past_names:
            spec = self._inputs[name]
            dims = [d for i, d in enumerate(spec.shape) if i not in (0, 2)]
            if len(spec.shape) != 4 or not all(isinstance(d, int) for d in dims):
                raise RuntimeSessionError(f"input {name!r} has shape {list(spec.shape)}; need [batch, heads, past, head_dim] with fixed heads/head_dim")
            past[name] = np.zeros((batch, dims[0], 0, dims[1]), dtype=spec.dtype)
        tokens, current = ids, ids
        finished = np.zeros(batch, dtype=bool)
        outputs = ["logits", *present_names]
        picker = self._picker()
        with self._using(self._names_of(adapter)) as held:
            start = self._generation_start(adapter, batch, held[0], task_ids, ids.shape[1] + int(max_new_tokens))
            if start is not None:
                past.update(start.past)
            for step in range(int(max_new_tokens)):
                feeds: dict[str, Any] = {"input_ids": current, **past}
                if "attention_mask" in self._inputs:
                    feeds["attention_mask"] = mask if start is None else np.concatenate(
                        [start.prefix_mask, *([start.prompt_mask] if step else []), mask], axis=1)
                if "position_ids" in self._inputs:
                    if start is None:
                        positions = np.cumsum(mask, axis=1) - 1
                        positions[mask == 0] = 1
                    else:
                        positions = start.positions(mask)
                    feeds["position_ids"] = positions[:, -current.shape[1]:]
                prompt = None if start is None else (start.feeds if step == 0 else {})
                logits, *presents = self._run(outputs, feeds, adapter if start is None else None,
                                              keep_on_device=[*present_names, "logits"], held=held,
                                              prompt_feeds=prompt)
                picked = picker.pick(logits, greedy=not do_sample)  # on the device: ids (or last logits) cross
                chosen = _sample(picked, rng, temperature, top_k, top_p) if do_sample else picked
                chosen = np.where(finished, pad, chosen).astype(np.int64)
                tokens = np.concatenate([tokens, chosen[:, None]], axis=1)
                finished |= np.isin(chosen, eos)
                if finished.all():
                    break
                current = chosen[:, None]
                mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
                past = dict(zip(past_names, presents))
        return tokens


def _sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """One token per row from ``logits [batch, vocab]``: temperature, then top-k, then top-p."""
    if temperature <= 0:
        raise RuntimeSessionError(f"temperature must be > 0, got {temperature}")
    logits = logits.astype(np.float64) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1)
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        drop = np.cumsum(probs, axis=-1) - probs > top_p  # keep the smallest set reaching top_p
        sorted_logits[drop] = -np.inf
        logits = np.full_like(logits, -np.inf)
        np.put_along_axis(logits, order, sorted_logits, axis=-1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)


def example_feeds(session: Any, batch: int = 1, sequence: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic feeds for every required input of ``session`` (benchmarks, smoke tests).

    Symbolic dims: batch -> ``batch``, past/cache dims -> 0, total/attention dims -> ``sequence``,
    others -> ``sequence``. ``input_ids`` draw from the logits' vocab when it is fixed (else 100),
    ``attention_mask`` is ones, ``position_ids`` count up, other ints are zeros, floats normal.
    """
    rng = np.random.default_rng(seed)
    vocab = 100
    for output in session._session.get_outputs():
        if output.name == "logits" and output.shape and isinstance(output.shape[-1], int):
            vocab = output.shape[-1]
    feeds: dict[str, np.ndarray] = {}
    for name, spec in session._inputs.items():
        if not spec.required or name in session._managed or name == session._ids_input:
            continue
        shape = []
        for i, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif i == 0:
                shape.append(batch)
            elif "past" in str(dim):
                shape.append(0)
            else:
                shape.append(sequence)
        dtype = spec.dtype or np.dtype(np.float32)
        if name == "input_ids":
            feeds[name] = rng.integers(0, vocab, shape).astype(dtype)
        elif name == "attention_mask":
            feeds[name] = np.ones(shape, dtype)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        elif np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            feeds[name] = np.zeros(shape, dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds
