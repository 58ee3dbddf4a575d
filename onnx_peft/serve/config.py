"""Server settings, and :func:`serve`, the one call behind ``onnx-peft serve``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import MissingDependencyError


@dataclass
class ServeConfig:
    """``max_wait_ms``: how long the first request of a batch waits for company;
    ``max_batch_size``: rows per model run, and per request (more answers 413);
    ``batching=False`` runs every request alone (the benchmark's baseline);
    ``max_prompt_tokens`` / ``max_new_tokens``: per-prompt limits (more answers 413);
    ``unload_timeout``: seconds an unload waits for runs (None: as long as they take)."""

    max_wait_ms: float = 5.0
    max_batch_size: int = 16
    batching: bool = True
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 1024
    stream_threads: int = 4
    unload_timeout: float | None = None


def require_server():
    """Import fastapi and uvicorn, or say which extra installs them."""
    try:
        import fastapi
        import uvicorn
    except ImportError as exc:
        raise MissingDependencyError("onnx-peft serve needs FastAPI and uvicorn: pip install onnx-peft[serve]") from exc
    return fastapi, uvicorn


def serve(deploy_dir: str | os.PathLike, adapters: Mapping[str, str] | None = None, host: str = "127.0.0.1",
          port: int = 8000, config: ServeConfig | None = None, mix_adapters: bool = True,
          eos_token_id: int | None = None, **session: Any) -> None:
    """Open ``deploy_dir`` and answer HTTP on ``host:port`` until interrupted. ``session``:
    :func:`~onnx_peft.serve.deploy.open_deployment`'s AdapterSession keywords (``device``,
    ``provider_options``, ``tf32``, ``strategy``, ``base_session``, ``providers``, ``session_options``)."""
    _, uvicorn = require_server()
    from .app import create_app
    from .deploy import open_deployment

    deployment = open_deployment(deploy_dir, adapters, mix_adapters=mix_adapters, eos_token_id=eos_token_id,
                                 **session)
    try:
        uvicorn.run(create_app(deployment, config), host=host, port=port, log_level="warning")
    finally:
        deployment.close()
