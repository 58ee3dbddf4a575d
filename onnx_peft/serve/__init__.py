"""Serving a deploy folder over HTTP: ``onnx-peft serve DEPLOY_DIR`` (FastAPI + uvicorn).

Concurrent requests for different adapters share one MultiAdapter run (:mod:`.batcher`); text
goes through the folder's ``tokenizer.json`` (:mod:`.tokenizer`); ``/metrics`` is Prometheus
text (:mod:`.metrics`). :mod:`.ray` runs the same routes on a Ray Serve cluster.

Layout: :mod:`.deploy` (the folder opened), :mod:`.batcher`, :mod:`.streaming` (token-by-token
decoding), :mod:`.gate` (unload waits for requests), :mod:`.schemas` (request bodies),
:mod:`.app` (routes), :mod:`.config` (settings, :func:`serve`). Only :mod:`.app` and
:mod:`.ray` import fastapi; nothing here imports torch (a deploy box runs ONNX Runtime alone).
"""

from __future__ import annotations

from .config import ServeConfig, serve
from .deploy import Deployment, open_deployment
from .metrics import Metrics

__all__ = ["Deployment", "Metrics", "ServeConfig", "open_deployment", "serve"]
