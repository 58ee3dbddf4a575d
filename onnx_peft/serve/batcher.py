"""Dynamic batching: concurrent requests, any adapters, one model run.

Why: the MultiAdapter model takes one adapter per row, so sixteen requests for sixteen
adapters cost one run instead of sixteen. Requests wait in an asyncio queue; the collector
takes the first one, then everything compatible that arrives within ``max_wait_ms`` (or is
already queued) up to ``max_batch_size`` rows, and runs the batch on one worker thread while
the next batch queues. Each job gets back only its own rows::

    jobs  a:[5 9 3]  b:[4 8]  a:[7]      ->  input_ids [3, 3] (padded), adapter=["a", "b", "a"]
    run   -> logits [3, ...]             ->  a gets row 0, b row 1, a row 2

Compatible: same kind and output; generation also needs greedy decoding (a sampled request
runs alone, so its seed alone decides its tokens); a model without per-row adapters runs one
group per adapter.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .deploy import Deployment
from .metrics import Metrics

_ids = itertools.count()


@dataclass
class Job:
    """One request: ``rows`` of token ids (1-D int64 each) for one ``adapter`` (None = base).

    ``kind``: "generate" (``max_new_tokens``, ``sampling``) or "forward" (``output`` by name).
    The result is one array per row: new tokens, or the row's output cut to its length."""

    kind: str
    rows: list[np.ndarray]
    adapter: str | None
    output: str = "logits"
    max_new_tokens: int = 0
    sampling: tuple | None = None  # (temperature, top_p, seed); None = greedy
    future: asyncio.Future | None = None
    key: tuple = field(init=False)

    def __post_init__(self):
        unique = next(_ids) if self.sampling is not None else None
        self.key = (self.kind, self.output, unique)


class Batcher:
    """Groups :class:`Job` s into model runs; ``before_run(jobs)`` is a test hook (worker thread).
    ``batching=False``: one job per run (rows of one request still share it)."""

    def __init__(self, deployment: Deployment, max_wait_ms: float = 5.0, max_batch_size: int = 16,
                 metrics: Metrics | None = None, before_run: Callable[[list[Job]], None] | None = None,
                 batching: bool = True):
        self.deployment = deployment
        self.batching = batching
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.max_batch_size = max(1, int(max_batch_size))
        self.metrics = metrics or Metrics()
        self.before_run = before_run
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="onnx-peft-batch")

    async def submit(self, job: Job) -> list[np.ndarray]:
        """Queue ``job`` and wait for its rows' results (exceptions come back as raised)."""
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._collect())
        job.future = asyncio.get_running_loop().create_future()
        await self._queue.put(job)
        return await job.future

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            await self._queue.put(None)
            await self._task
        self._executor.shutdown(wait=True)

    # -- collecting ----------------------------------------------------------------------------
    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        carry: deque[Job] = deque()
        closing = False
        while not (closing and not carry):
            first = carry.popleft() if carry else await self._queue.get()
            if first is None:
                closing = True
                continue
            batch, rows = [first], len(first.rows)
            for job in list(carry):  # earlier arrivals first
                if self._fits(first, job, rows):
                    carry.remove(job)
                    batch.append(job)
                    rows += len(job.rows)
            deadline = loop.time() + self.max_wait
            while rows < self.max_batch_size and not closing:
                try:
                    job = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if job is None:
                    closing = True
                elif self._fits(first, job, rows):
                    batch.append(job)
                    rows += len(job.rows)
                else:
                    carry.append(job)
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as exc:  # the hook failed: every job answers with it, the loop goes on
                results = [exc] * len(batch)
            for job, result in zip(batch, results):
                if job.future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _fits(self, first: Job, job: Job, rows: int) -> bool:
        if not self.batching or job.key != first.key or job.sampling is not None or rows + len(job.rows) > self.max_batch_size:
            return False
        return self.deployment.mixes_rows or job.adapter == first.adapter

    # -- running (worker thread) ---------------------------------------------------------------
    def _run_batch(self, batch: list[Job]) -> list[Any]:
        if self.before_run is not None:
            self.before_run(batch)
        groups = [batch] if self.deployment.mixes_rows else [
            [j for j in batch if j.adapter == a] for a in dict.fromkeys(j.adapter for j in batch)]
        results: dict[int, Any] = {}
        for group in groups:
            try:
                outputs = self._run_group(group)
                for job, out in zip(group, outputs):
                    results[id(job)] = out
            except Exception as exc:  # every job of the group answers with the error
                for job in group:
                    results[id(job)] = exc
        return [results[id(job)] for job in batch]

    def _run_group(self, group: list[Job]) -> list[list[np.ndarray]]:
        rows = [r for job in group for r in job.rows]
        adapters = [job.adapter for job in group for _ in job.rows]
        adapter: Any = adapters[0] if len(set(adapters)) == 1 else adapters
        session = self.deployment.session
        self.metrics.run(len(rows))
        if group[0].kind == "generate":
            ids, mask = pad(rows, left=True)
            temperature, top_p, seed = group[0].sampling or (1.0, 1.0, None)
            out = session.generate(ids, max(j.max_new_tokens for j in group), adapter=adapter,
                                   attention_mask=mask, eos_token_id=self.deployment.eos_token_id,
                                   do_sample=group[0].sampling is not None, temperature=temperature,
                                   top_p=top_p, seed=seed)
            limits = [job.max_new_tokens for job in group for _ in job.rows]
            per_row = [cut(out[i, ids.shape[1]:], limits[i], self.deployment.eos_token_id) for i in range(len(rows))]
            return _split(group, per_row)
        ids, mask = pad(rows, left=False)
        feeds = forward_feeds(session, ids, mask)
        value = np.asarray(session.run([group[0].output], feeds, adapter=adapter)[0])
        lengths = [len(r) for r in rows]
        per_row = [value[i, :lengths[i]] if value.ndim == 3 else value[i] for i in range(len(rows))]
        return _split(group, per_row)


def _split(group: list[Job], per_row: list[np.ndarray]) -> list[list[np.ndarray]]:
    out, start = [], 0
    for job in group:
        out.append(per_row[start:start + len(job.rows)])
        start += len(job.rows)
    return out


def pad(rows: list[np.ndarray], left: bool) -> tuple[np.ndarray, np.ndarray]:
    """``ids, attention_mask [batch, longest]`` int64, padded with 0 on the left (decoding) or right."""
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[i, span] = row
        mask[i, span] = 1
    return ids, mask


def forward_feeds(session: Any, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The feeds an encoder / classifier takes: ids, mask, zero token types, positions."""
    feeds = {"input_ids": ids}
    extra = {"attention_mask": mask, "token_type_ids": np.zeros_like(ids),
             "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0)}
    feeds.update({k: v for k, v in extra.items() if k in session.input_names})
    return feeds


def cut(tokens: np.ndarray, max_new_tokens: int, eos: int | None) -> np.ndarray:
    """A row's own new tokens: its ``max_new_tokens``, and nothing after its first eos."""
    tokens = np.asarray(tokens[:max_new_tokens], np.int64)
    if eos is not None:
        hits = np.flatnonzero(tokens == eos)
        if hits.size:
            tokens = tokens[:hits[0] + 1]
    return tokens
