"""Token-by-token decoding for ``stream=true``: the same greedy loop as
:meth:`AdapterSession.generate`, yielding each token as it is chosen.

Why a loop of its own: ``generate`` returns when the whole row is done; a streamed request
wants its first token after the prefill. Streamed requests run one row each, outside the
batcher (their steps would otherwise wait for the slowest row of a batch). Greedy only;
a sampled stream, and prompt-learning adapters (whose virtual tokens ``generate`` lays out),
decode whole through ``generate`` and then send the tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


def stream_tokens(session: Any, ids: np.ndarray, max_new_tokens: int, adapter: str | None,
                  eos_token_id: int | None, sampling: tuple | None = None) -> Iterator[int]:
    """Yield the new tokens of one prompt ``ids [length]``, stopping after ``eos_token_id``."""
    ids = np.asarray(ids, np.int64)[None, :]
    if sampling is not None or session.prompt_layout is not None:
        temperature, top_p, seed = sampling or (1.0, 1.0, None)
        out = session.generate(ids, max_new_tokens, adapter=adapter, eos_token_id=eos_token_id,
                               do_sample=sampling is not None, temperature=temperature, top_p=top_p, seed=seed)
        for token in out[0, ids.shape[1]:].tolist():
            yield int(token)
            if token == eos_token_id:
                return
        return
    past_names = [n for n in session.input_names if n.startswith("past_key_values.")]
    present_names = ["present." + n[len("past_key_values."):] for n in past_names]
    past = {}
    for name in past_names:  # [batch, heads, past, head_dim] with past = 0 at prefill
        shape = session._inputs[name].shape
        past[name] = np.zeros((1, shape[1], 0, shape[3]), dtype=session._inputs[name].dtype)
    current, total = ids, ids.shape[1]
    for _ in range(int(max_new_tokens)):
        feeds: dict[str, Any] = {"input_ids": current, **past}
        if "attention_mask" in session.input_names:
            feeds["attention_mask"] = np.ones((1, total), np.int64)
        if "position_ids" in session.input_names:
            feeds["position_ids"] = np.arange(total - current.shape[1], total, dtype=np.int64)[None, :]
        logits, *presents = session.run(["logits", *present_names], feeds, adapter=adapter)
        token = int(np.asarray(logits[0, -1], np.float32).argmax())
        yield token
        if token == eos_token_id:
            return
        current = np.array([[token]], np.int64)
        total += 1
        past = dict(zip(past_names, presents))
