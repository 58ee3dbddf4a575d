"""What each route does, without HTTP: the single-machine app (:mod:`.app`) and each Ray Serve
replica (:mod:`.ray`) call the same :class:`Service`.

Request bodies come in as the :mod:`.schemas` models; answers go out as JSON-ready dicts (or,
for ``stream=true``, an async iterator of server-sent-event lines). Failures raise
:class:`ServeError` (or :class:`~.gate.UnknownAdapter`, :class:`~onnx_peft.errors.OnnxPeftError`);
:func:`error_answer` turns any of them into ``(status, {"error": {...}})``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import OnnxPeftError
from .batcher import Batcher, Job
from .config import ServeConfig
from .deploy import Deployment
from .gate import AdapterGate, UnknownAdapter
from .metrics import Metrics
from .schemas import CompletionRequest, InputRequest
from .streaming import stream_tokens

ENDPOINT_TASKS = {"/v1/completions": "causal-lm-with-past", "/v1/classify": "sequence-classification",
                  "/v1/embeddings": "feature-extraction"}


class ServeError(Exception):
    """An HTTP error answer: ``status``, a message that says what to send instead, extra fields."""

    def __init__(self, status: int, message: str, kind: str, **extra: Any):
        super().__init__(message)
        self.status, self.kind, self.extra = status, kind, extra


def error_answer(exc: BaseException) -> tuple[int, dict] | None:
    """``(status, {"error": {"message", "type", "code", ...}})`` of a user-facing failure, else None."""
    if isinstance(exc, ServeError):
        return exc.status, {"error": {"message": str(exc), "type": exc.kind, "code": exc.status, **exc.extra}}
    if isinstance(exc, UnknownAdapter):
        return 404, {"error": {"message": str(exc), "type": "adapter_not_found", "code": 404, "loaded": exc.loaded}}
    if isinstance(exc, OnnxPeftError):
        return 400, {"error": {"message": str(exc), "type": type(exc).__name__, "code": 400}}
    return None


def adapter_of(model: str) -> str | None:
    """The ``model`` field as an adapter name; ``"base"`` is none."""
    return None if model == "base" else model


class Service:
    """The routes of one session: batching, limits, tokenizer, adapters held while in use."""

    def __init__(self, deployment: Deployment, config: ServeConfig | None = None, metrics: Metrics | None = None,
                 before_run: Any = None):
        self.deployment = deployment
        self.config = config = config or ServeConfig()
        self.metrics = metrics or Metrics()
        self.session = deployment.session
        for name in self.session.adapters:
            self.metrics.adapter_loaded(name)
        self.batcher = Batcher(deployment, config.max_wait_ms, config.max_batch_size, self.metrics, before_run,
                               config.batching)
        self.gate = AdapterGate(lambda: self.session.adapters)
        self.streams = ThreadPoolExecutor(config.stream_threads, thread_name_prefix="onnx-peft-stream")

    async def close(self) -> None:
        await self.batcher.close()
        self.streams.shutdown(wait=True)

    # -- requests ------------------------------------------------------------------------------
    def rows_of(self, prompt: Any) -> list[np.ndarray]:
        """Token rows of a ``prompt``/``input`` field, checked against the limits (413) and the tokenizer."""
        config, codec = self.config, self.deployment.codec
        items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not items:
            raise ServeError(422, "empty prompt: send a text, a list of token ids, or a list of them", "invalid_request")
        if len(items) > config.max_batch_size:
            raise ServeError(413, f"{len(items)} prompts in one request; this server takes at most "
                                  f"{config.max_batch_size} (--max-batch-size): split the request", "too_large")
        rows = []
        for item in items:
            if isinstance(item, str):
                if codec is None:
                    raise ServeError(422, f"{self.deployment.folder} ships no tokenizer.json: send token ids, or "
                                          "save the tokenizer there (tokenizer.save_pretrained)", "invalid_request")
                item = codec.encode(item)
            if not item:
                raise ServeError(422, "a prompt has no tokens", "invalid_request")
            if len(item) > config.max_prompt_tokens:
                raise ServeError(413, f"a prompt has {len(item)} tokens; this server takes at most "
                                      f"{config.max_prompt_tokens}", "too_large")
            rows.append(np.asarray(item, np.int64))
        return rows

    def require_task(self, path: str) -> None:
        if self.deployment.task != ENDPOINT_TASKS[path]:
            other = next(p for p, t in ENDPOINT_TASKS.items() if t == self.deployment.task)
            raise ServeError(404, f"this deployment is a {self.deployment.task} model: use {other}", "wrong_endpoint")

    def text_of(self, tokens: list[int]) -> str:
        return self.deployment.codec.decode(tokens) if self.deployment.codec is not None else ""

    async def completions(self, body: CompletionRequest) -> dict | AsyncIterator[str]:
        """The answer dict, or (``stream``) an async iterator of SSE lines."""
        self.require_task("/v1/completions")
        adapter = adapter_of(body.model)
        rows = self.rows_of(body.prompt)
        if body.max_tokens > self.config.max_new_tokens:
            raise ServeError(413, f"max_tokens {body.max_tokens} is over this server's limit "
                                  f"{self.config.max_new_tokens}", "too_large")
        sampling = None if body.temperature == 0 else (body.temperature, body.top_p, body.seed)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            if len(rows) != 1:
                raise ServeError(422, "stream=true takes one prompt per request", "invalid_request")
            self.gate.check(adapter)  # 404 now; the stream holds the adapter once it starts
            return self._stream(rows[0], body.max_tokens, adapter, sampling, head)
        async with self.gate.use(adapter):
            new = await self.batcher.submit(Job("generate", rows, adapter, max_new_tokens=body.max_tokens,
                                                sampling=sampling))
        eos, choices = self.deployment.eos_token_id, []
        for i, tokens in enumerate(new):
            tokens = tokens.tolist()
            stopped = eos is not None and tokens[-1:] == [eos]
            tokens = tokens[:-1] if stopped else tokens
            choices.append({"index": i, "text": self.text_of(tokens), "token_ids": tokens, "logprobs": None,
                            "finish_reason": "stop" if stopped else "length"})
        prompt_tokens, completion = sum(len(r) for r in rows), sum(len(c["token_ids"]) for c in choices)
        return {**head, "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                                      "total_tokens": prompt_tokens + completion}}

    async def _stream(self, ids: np.ndarray, max_tokens: int, adapter: str | None, sampling,
                      head: dict) -> AsyncIterator[str]:
        """SSE chunks ``data: {...choices: [{text, token_ids: [t]}]}``, then ``data: [DONE]``.

        The adapter is held from the first chunk on (a response never started holds nothing)."""
        try:
            use = self.gate.use(adapter)
        except UnknownAdapter as exc:  # unloaded between the request and its first chunk
            yield f"data: {json.dumps(error_answer(exc)[1])}\n\n"
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done, eos = object(), self.deployment.eos_token_id

        def work() -> None:
            try:
                for token in stream_tokens(self.session, ids, max_tokens, adapter, eos, sampling):
                    loop.call_soon_threadsafe(queue.put_nowait, token)
                loop.call_soon_threadsafe(queue.put_nowait, done)
            except Exception as exc:  # sent as an error event
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        try:
            loop.run_in_executor(self.streams, work)
            tokens: list[int] = []
            text, finish = "", "length"
            while (item := await queue.get()) is not done:
                if isinstance(item, Exception):
                    yield f"data: {json.dumps({'error': {'message': str(item), 'type': type(item).__name__}})}\n\n"
                    return
                if item == eos:
                    finish = "stop"
                    continue
                tokens.append(item)
                full = self.text_of(tokens)
                delta, text = full[len(text):], full
                chunk = {**head, "choices": [{"index": 0, "text": delta, "token_ids": [item], "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            final = {**head, "choices": [{"index": 0, "text": "", "token_ids": [], "finish_reason": finish}]}
            yield f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n"
        finally:
            await use.release()

    async def _forward(self, body: InputRequest, path: str, output: str) -> tuple[str | None, list[np.ndarray]]:
        self.require_task(path)
        adapter = adapter_of(body.model)
        rows = self.rows_of(body.input)
        async with self.gate.use(adapter):
            return adapter, await self.batcher.submit(Job("forward", rows, adapter, output=output))

    async def classify(self, body: InputRequest) -> dict:
        adapter, logits = await self._forward(body, "/v1/classify", "logits")
        labels = self.deployment.labels
        names = labels.get(adapter, labels.get(None))
        data = []
        for i, row in enumerate(logits):
            label = int(np.argmax(row))
            item = {"index": i, "logits": row.tolist(), "label": label}
            if names is not None and len(names) == len(row):
                item["label_name"] = names[label]
            data.append(item)
        return {"object": "list", "model": body.model, "data": data}

    async def embeddings(self, body: InputRequest) -> dict:
        """One vector per input: ``last_hidden_state`` averaged over the input's tokens."""
        _, states = await self._forward(body, "/v1/embeddings", "last_hidden_state")
        data = [{"object": "embedding", "index": i, "embedding": state.mean(axis=0).tolist()}
                for i, state in enumerate(states)]
        tokens = sum(len(s) for s in states)
        return {"object": "list", "model": body.model, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # -- adapters ------------------------------------------------------------------------------
    def health(self) -> dict:
        return {"status": "ok", "task": self.deployment.task, "adapters": self.gate.names(),
                "mixes_adapters": self.deployment.mixes_rows, "tokenizer": self.deployment.codec is not None,
                "provider": self.session.provider}

    async def load(self, name: str, path: str) -> None:
        if name == "base" or name in self.session.adapters:
            raise ServeError(409, f"adapter name {name!r} is taken; unload it first "
                                  f"(DELETE /admin/adapters/{name}) or pick another", "conflict")
        await asyncio.to_thread(self.session.load_adapter, name, path)
        self.deployment.adapter_paths[name] = path
        self.metrics.adapter_loaded(name)

    async def unload(self, name: str) -> None:
        """Refuse new requests for ``name``, wait for the accepted ones, then unload it."""
        await self.gate.drain(name)
        try:
            await asyncio.to_thread(self.session.unload_adapter, name, self.config.unload_timeout)
        finally:
            await self.gate.drained(name)
        self.deployment.adapter_paths.pop(name, None)
