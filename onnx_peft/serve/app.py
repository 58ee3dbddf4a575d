"""The HTTP routes of ``onnx-peft serve``: OpenAI-style completions, classification,
embeddings, health, metrics, admin. What each does is :class:`.service.Service`.

    POST /v1/completions      {"model": ADAPTER|"base", "prompt": TEXT|[ids]|[...], "max_tokens": N, "stream": bool}
    POST /v1/classify         {"model": ..., "input": TEXT|[ids]|[...]}  -> logits, label per input
    POST /v1/embeddings       {"model": ..., "input": ...}  -> mean of last_hidden_state over the tokens
    GET  /v1/models, /health, /metrics
    POST /admin/adapters      {"name": ..., "path": ...}    load (409 if the name is taken)
    DELETE /admin/adapters/{name}                           unload, after the requests using it

Errors answer ``{"error": {"message", "type", "code"}}``: unknown adapter 404 (with ``loaded``),
malformed body 422, too many prompts or tokens 413, an endpoint the task lacks 404, a model
failure 400 naming the cause. Importing this module needs fastapi (``onnx-peft[serve]``);
:func:`onnx_peft.serve.serve` checks for it first and says so.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import OnnxPeftError
from .config import ServeConfig
from .deploy import Deployment
from .gate import UnknownAdapter
from .metrics import Metrics
from .schemas import CompletionRequest, InputRequest, LoadAdapterRequest
from .service import ENDPOINT_TASKS, ServeError, Service, adapter_of, error_answer


def add_error_handlers(app: FastAPI) -> None:
    """ServeError / UnknownAdapter / OnnxPeftError -> ``{"error": {...}}`` with their status."""
    async def answer(request: Request, exc: Exception):
        status, body = error_answer(exc)
        return JSONResponse(body, status_code=status)

    for kind in (ServeError, UnknownAdapter, OnnxPeftError):
        app.add_exception_handler(kind, answer)


def add_request_metrics(app: FastAPI, service: Service) -> None:
    """Count every model route's answers by adapter and code; latency of the 200s. A name that
    is not loaded counts as "other", so clients cannot grow the series without bound."""
    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        if request.url.path in ENDPOINT_TASKS:
            seconds = time.perf_counter() - start if response.status_code == 200 else None
            adapter = getattr(request.state, "adapter", None)
            if adapter is not None and adapter not in service.session.adapters:
                adapter = "other"
            service.metrics.request(request.url.path, adapter, response.status_code, seconds)
        return response


def create_app(deployment: Deployment, config: ServeConfig | None = None, metrics: Metrics | None = None,
               before_run: Any = None) -> FastAPI:
    """A FastAPI app over ``deployment``; ``before_run(jobs)`` is the batcher's test hook."""
    service = Service(deployment, config, metrics, before_run)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await service.close()

    app = FastAPI(title="onnx-peft", lifespan=lifespan)
    app.state.service, app.state.metrics = service, service.metrics
    add_error_handlers(app)
    add_request_metrics(app, service)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        request.state.adapter = adapter_of(body.model)
        answer = await service.completions(body)
        if isinstance(answer, dict):
            return answer
        return StreamingResponse(answer, media_type="text/event-stream")

    @app.post("/v1/classify")
    async def classify(request: Request, body: InputRequest):
        request.state.adapter = adapter_of(body.model)
        return await service.classify(body)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request, body: InputRequest):
        request.state.adapter = adapter_of(body.model)
        return await service.embeddings(body)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "onnx-peft"}
                                           for n in ["base", *service.gate.names()]]}

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/admin/adapters", status_code=201)
    async def load(body: LoadAdapterRequest):
        await service.load(body.name, body.path)
        return {"loaded": service.gate.names()}

    @app.delete("/admin/adapters/{name}")
    async def unload(name: str):
        await service.unload(name)
        return {"unloaded": name, "loaded": service.gate.names()}

    return app
