"""onnx_peft.serve.ray on a local Ray instance (2 CPUs, loopback): 2 replicas holding 2 adapters
each serve bounded traffic over 6 adapters; every answer equals a single AdapterSession's, and
multiplexed routing keeps adapter loads low. Skipped when Ray Serve is not installed (it is the
``onnx-peft[ray]`` extra, not part of ``[test]``).
"""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from tiny_models import tiny_llama  # noqa: E402

from onnx_peft.runtime import AdapterSession  # noqa: E402

NAMES = [f"n{i}" for i in range(6)]


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    from onnx_peft.export import export

    folder = tmp_path_factory.mktemp("serve_ray")
    dirs = {}
    for i, name in enumerate(NAMES):
        torch.manual_seed(40 + i)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft.get_peft_model(tiny_llama(), config).save_pretrained(folder / name)
        dirs[name] = folder / name
    return export(tiny_llama(), folder / "deploy", adapters=dirs, task="causal-lm-with-past", mode="inputs",
                  quiet=True).parent


@pytest.fixture(scope="module")
def cluster():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def served(deploy, cluster):
    """The app on 2 replicas x 2 adapters; (url, expected tokens by adapter, prompts)."""
    from onnx_peft.serve.ray import build_app

    serve.run(build_app(deploy, num_replicas=2, adapters_per_replica=2, replica_options={"num_cpus": 0.5},
                        session={"device": "cpu"}),
              name="adapters", route_prefix="/")
    reference = AdapterSession(deploy / "model.onnx")
    rng = np.random.default_rng(0)
    prompts = {name: rng.integers(3, 60, 5).tolist() for name in NAMES}
    expected = {}
    for name in NAMES:
        reference.load_adapter(name, deploy / "adapters" / f"{name}.onnx_adapter")
        expected[name] = reference.generate(np.array([prompts[name]]), 6, adapter=name)[0, 5:].tolist()
    return cluster, expected, prompts


def test_two_replicas_multiplex_six_adapters(served):
    cluster, expected, prompts = served

    async def traffic():
        async with httpx.AsyncClient(base_url=cluster, timeout=60) as client:
            async def ask(name):
                r = await client.post("/v1/completions", json={"model": name, "prompt": prompts[name], "max_tokens": 6})
                return name, r
            answers = []
            # each adapter's first request alone (its replica then reports holding it), then
            # concurrent waves over adapters that fit the 4 slots; then the other two adapters come in
            for phase in (NAMES[:4], NAMES[2:]):
                for name in phase:
                    answers.append(await ask(name))
                    await asyncio.sleep(0.3)
                for _ in range(2):
                    answers += await asyncio.gather(*(ask(n) for n in phase for _ in range(3)))
            unknown = await client.post("/v1/completions", json={"model": "nope", "prompt": [1]})
            bad = await client.post("/v1/completions", json={"model": "n0"})
            stream = await client.post("/v1/completions", json={"model": "n1", "prompt": prompts["n1"],
                                                                "max_tokens": 6, "stream": True})
            return answers, unknown, bad, stream

    answers, unknown, bad, stream = asyncio.run(traffic())
    for name, answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["token_ids"] == expected[name], name
    assert unknown.status_code == 404 and unknown.json()["error"]["loaded"] == NAMES
    assert bad.status_code == 422
    assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")

    replica = serve.get_deployment_handle("AdapterReplica", app_name="adapters")
    stats = {}
    for _ in range(40):  # calls go to either replica; collect both
        s = replica.stats.remote().result()
        stats[s["replica"]] = s
        if len(stats) == 2:
            break
    loads = [n for s in stats.values() for n in s["loads"]]
    assert all(len(s["held"]) <= 2 for s in stats.values())
    # 56 requests over 6 adapters on 2 x 2 slots: a load per request would be 56, perfect routing 6.
    # Ray's router sends a model id to a replica that holds it when one is free, so under concurrent
    # traffic some adapters are loaded twice or three times (10-17 measured on 2 loaded cores);
    # a third of the requests bounds that away from thrashing.
    assert len(loads) <= 56 // 3, stats
    assert sorted(set(loads)) == NAMES


def test_a_replica_killed_mid_traffic_loses_no_request(served):
    """Every request answers: the right tokens, or an error response; none hangs or vanishes."""
    cluster, expected, prompts = served
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "AdapterReplica" in a["name"]]
    assert len(replicas) == 2
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])

    async def traffic():
        async with httpx.AsyncClient(base_url=cluster, timeout=90) as client:
            async def ask(name, delay):
                await asyncio.sleep(delay)
                r = await client.post("/v1/completions", json={"model": name, "prompt": prompts[name], "max_tokens": 6})
                return name, r

            async def kill():
                await asyncio.sleep(0.3)
                ray.kill(victim, no_restart=True)

            asks = [ask(NAMES[i % 4], 0.05 * i) for i in range(24)]
            *answers, _ = await asyncio.gather(*asks, kill())
            return answers

    answers = asyncio.run(traffic())
    assert len(answers) == 24
    for name, answer in answers:
        if answer.status_code == 200:
            assert answer.json()["choices"][0]["token_ids"] == expected[name], name
        else:
            assert answer.status_code >= 500 and answer.content, answer.text
    assert sum(a.status_code == 200 for _, a in answers) >= 20  # the survivor (and the retry) carried them
