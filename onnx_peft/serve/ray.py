"""The same routes on a Ray Serve cluster, adapters multiplexed over replicas (``onnx-peft[ray]``).

Why Ray Serve's model multiplexing: a request names its adapter (``model``); the ingress
passes it on as the multiplexed model id, so Ray routes the request to a replica that already
holds that adapter, a replica loads an adapter the first time it is asked for, and evicts the
least recently used one beyond ``adapters_per_replica``. Replicas scale with Ray's autoscaling
(``autoscaling_config``) like any deployment. Inside a replica the single-machine
:class:`~.service.Service` batches its concurrent requests across the adapters it holds::

    client --HTTP--> Ingress (FastAPI routes; adapter names -> paths)
                        --handle.options(multiplexed_model_id=ADAPTER)-->
                     AdapterReplica x N  (AdapterSession + batcher; LRU of adapters_per_replica)

Deploy (on a running cluster, ``ray start --head`` / ``ray.init(address="auto")``)::

    from ray import serve
    from onnx_peft.serve.ray import build_app
    serve.run(build_app("deploy/", num_replicas=2, adapters_per_replica=4), route_prefix="/")

A request whose replica dies under it is sent once more (generation is deterministic; a
second failure answers 503). Every replica must see ``deploy/`` at the same path (shared disk, or the same files on every
node). Admin on Ray: ``POST /admin/adapters`` registers a name -> path (replicas load it when
first asked); ``DELETE /admin/adapters/NAME`` stops routing it (replicas drop it by LRU, after
their requests for it are answered).
"""

# No ``from __future__ import annotations`` here: serve.ingress rebuilds the routes from the
# methods and needs their annotations as real classes (else a body is taken for a query field).
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import MissingDependencyError

try:
    from ray import serve
    from ray.exceptions import ActorUnavailableError, RayActorError
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise MissingDependencyError("onnx_peft.serve.ray needs Ray Serve: pip install onnx-peft[ray]") from exc

from .config import ServeConfig
from .deploy import folder_adapters, open_deployment
from .gate import UnknownAdapter
from .metrics import Metrics
from .schemas import CompletionRequest, InputRequest, LoadAdapterRequest
from .service import ServeError, Service, adapter_of, error_answer


class _HeldAdapter:
    """What the multiplexer caches per adapter. Ray calls ``model.__del__()`` (awaited when it is
    a coroutine) on LRU eviction: the adapter is unloaded after the requests using it. The hook
    is an instance attribute, so Python's own finalizer never sees a coroutine."""

    def __init__(self, service: Service, name: str):
        self.service, self.name = service, name
        self.__del__ = self._unload

    async def _unload(self) -> None:
        await self.service.unload(self.name)


@serve.deployment
class AdapterReplica:
    """One AdapterSession, adapters loaded on demand (multiplexed), at most ``adapters_per_replica``."""

    def __init__(self, deploy_dir: str, adapters_per_replica: int = 4, config: dict | None = None,
                 adapters: dict[str, str] | None = None, session: dict | None = None):
        deployment = open_deployment(deploy_dir, adapters, preload=False, **(session or {}))
        self.paths = dict(deployment.adapter_paths)
        self.service = Service(deployment, ServeConfig(**(config or {})))
        self.loads: list[str] = []

        async def load(name: str) -> _HeldAdapter:
            return await self._load(name)

        self._adapter = serve.multiplexed(max_num_models_per_replica=adapters_per_replica)(load)

    async def _load(self, name: str) -> _HeldAdapter:
        path = self.paths.get(name)
        if path is None:
            raise UnknownAdapter(name, sorted(self.paths))
        await self.service.gate.wait_gone(name)  # an eviction of it may still be draining
        await self.service.load(name, path)
        self.loads.append(name)
        return _HeldAdapter(self.service, name)

    async def _hold(self, path: str | None) -> None:
        """Load the request's adapter (its multiplexed model id) unless it is here already."""
        name = serve.get_multiplexed_model_id()
        if name:
            if path is not None:
                self.paths[name] = path
            await self._adapter(name)  # Service takes its gate before the next await: no eviction between

    async def call(self, route: str, body: dict, path: str | None = None) -> tuple[int, dict]:
        """``(status, answer)`` of ``route`` ("completions", "classify", "embeddings")."""
        try:
            await self._hold(path)
            request = CompletionRequest(**body) if route == "completions" else InputRequest(**body)
            return 200, await getattr(self.service, route)(request)
        except Exception as exc:
            answer = error_answer(exc)
            if answer is None:
                raise
            return answer

    async def stream(self, body: dict, path: str | None = None):
        """``(status, answer)`` first (an error ends it), then the SSE lines."""
        try:
            await self._hold(path)
            lines = await self.service.completions(CompletionRequest(**body))
        except Exception as exc:
            answer = error_answer(exc)
            if answer is None:
                raise
            yield answer
            return
        yield 200, {}
        async for line in lines:
            yield line

    def stats(self) -> dict:
        """This replica's id, the adapters it loaded (in order), those it holds, its model runs."""
        return {"replica": serve.get_replica_context().replica_id.unique_id, "loads": list(self.loads),
                "held": self.service.session.adapters, "runs": self.service.metrics.runs}


ingress_app = FastAPI(title="onnx-peft (Ray Serve)")


@ingress_app.exception_handler(ServeError)
@ingress_app.exception_handler(UnknownAdapter)
async def _errors(request: Request, exc: Exception):
    status, body = error_answer(exc)
    return JSONResponse(body, status_code=status)


@serve.deployment
@serve.ingress(ingress_app)
class Ingress:
    """The HTTP routes; adapters by name -> path (the folder's, plus those registered by admin)."""

    def __init__(self, replica: Any, deploy_dir: str, adapters: dict[str, str] | None = None):
        self.replica = replica
        self.paths = {**folder_adapters(Path(deploy_dir)), **dict(adapters or {})}
        self.metrics = Metrics()

    def _route(self, model: str):
        name = adapter_of(model)
        if name is not None and name not in self.paths:
            raise UnknownAdapter(name, sorted(self.paths))
        return name, self.replica.options(multiplexed_model_id=name or "")

    async def _call(self, route: str, endpoint: str, body: Any):
        start = time.perf_counter()
        name, handle = self._route(body.model)
        for attempt in range(2):  # a replica that died under the request: once more on another
            try:
                status, answer = await handle.call.remote(route, body.model_dump(), self.paths.get(name))
                break
            except (RayActorError, ActorUnavailableError) as exc:
                if attempt:
                    status, answer = 503, {"error": {"message": f"the replica serving {body.model!r} failed "
                                                                f"twice ({type(exc).__name__}); retry later",
                                                     "type": "replica_unavailable", "code": 503}}
        self.metrics.request(endpoint, name, status, time.perf_counter() - start if status == 200 else None)
        return answer if status == 200 else JSONResponse(answer, status_code=status)

    @ingress_app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        if not body.stream:
            return await self._call("completions", "/v1/completions", body)
        name, handle = self._route(body.model)
        lines = handle.options(stream=True).stream.remote(body.model_dump(), self.paths.get(name))
        status, answer = await lines.__anext__()
        self.metrics.request("/v1/completions", name, status)
        if status != 200:
            return JSONResponse(answer, status_code=status)
        return StreamingResponse(lines, media_type="text/event-stream")

    @ingress_app.post("/v1/classify")
    async def classify(self, body: InputRequest):
        return await self._call("classify", "/v1/classify", body)

    @ingress_app.post("/v1/embeddings")
    async def embeddings(self, body: InputRequest):
        return await self._call("embeddings", "/v1/embeddings", body)

    @ingress_app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "onnx-peft"}
                                           for n in ["base", *self.paths]]}

    @ingress_app.get("/health")
    async def health(self):
        return {"status": "ok", "adapters": sorted(self.paths)}

    @ingress_app.get("/metrics")
    async def prometheus(self):
        """The ingress's request counts and latencies; per-replica batching is in Ray's own metrics."""
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @ingress_app.post("/admin/adapters", status_code=201)
    async def load(self, body: LoadAdapterRequest):
        if body.name == "base" or body.name in self.paths:
            raise ServeError(409, f"adapter name {body.name!r} is taken; unload it first", "conflict")
        self.paths[body.name] = body.path
        return {"loaded": sorted(self.paths)}

    @ingress_app.delete("/admin/adapters/{name}")
    async def unload(self, name: str):
        if name not in self.paths:
            raise UnknownAdapter(name, sorted(self.paths))
        del self.paths[name]
        return {"unloaded": name, "loaded": sorted(self.paths)}


def build_app(deploy_dir: str | os.PathLike, num_replicas: int | str = 2, adapters_per_replica: int = 4,
              config: ServeConfig | None = None, adapters: dict[str, str] | None = None,
              replica_options: dict | None = None, autoscaling_config: dict | None = None,
              session: dict | None = None):
    """The Ray Serve application: ``serve.run(build_app("deploy/"), route_prefix="/")``.

    ``num_replicas``: AdapterReplica count (or ``autoscaling_config`` instead);
    ``replica_options``: Ray actor options of each replica (e.g. ``{"num_cpus": 1, "num_gpus": 1}``);
    ``session``: each replica's AdapterSession keywords (``device``, ``provider_options``, ``tf32``,
    ``strategy``), e.g. ``{"device": "cuda", "strategy": "merge"}``."""
    config = config or ServeConfig()
    scaling = {"autoscaling_config": autoscaling_config} if autoscaling_config else {"num_replicas": num_replicas}
    replica = AdapterReplica.options(ray_actor_options=replica_options or {"num_cpus": 1}, **scaling).bind(
        str(deploy_dir), adapters_per_replica, vars(config), adapters, session)
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(replica, str(deploy_dir), adapters)
