"""onnx-peft serve: every route against a direct AdapterSession reference, batching across
adapters (one run for concurrent requests, each its own row), the error codes, and an unload
that waits for the requests using the adapter. Deployments and references are opened on every ONNX
Runtime device (``ort_device``: CPU, and CUDA where onnxruntime-gpu has it); the exports are shared.

Deploys: tiny Llama (causal-lm-with-past, LoRA adapters a/b/c, a word-level tokenizer.json),
tiny BERT classifier (sequence-classification) and encoder (feature-extraction), adapters x/y.
Requests go through httpx's ASGI transport (no socket), with the app's lifespan around them.
"""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tiny_models import VOCAB, tiny_bert_cls, tiny_llama  # noqa: E402

from onnx_peft.runtime import AdapterSession  # noqa: E402
from onnx_peft.serve import ServeConfig, open_deployment  # noqa: E402
from onnx_peft.serve.app import create_app  # noqa: E402

EOS = 2
PROMPTS = {"a": [5, 9, 3, 7, 1], "b": [4, 8, 2, 6], "c": [11, 12], None: [7, 7, 7]}


def _adapters(folder, build, targets, names, task_type=None):
    dirs = {}
    for i, name in enumerate(names):
        torch.manual_seed(20 + i)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                 task_type=task_type)
        peft.get_peft_model(build(), config).save_pretrained(folder / name)
        dirs[name] = folder / name
    return dirs


def _word_tokenizer(folder):
    """tokenizer.json with words w0..w63 = ids 0..63, and eos w2 in tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": f"w{EOS}"}))


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    """The Llama deploy folder's model.onnx (exported once, served on every device)."""
    from onnx_peft.export import export

    folder = tmp_path_factory.mktemp("serve_llama")
    dirs = _adapters(folder, tiny_llama, ["q_proj", "v_proj"], ["a", "b", "c"])
    path = export(tiny_llama(), folder / "deploy", adapters=dirs, task="causal-lm-with-past", mode="inputs", quiet=True)
    _word_tokenizer(path.parent)
    return path


@pytest.fixture(scope="module")
def llama(llama_export, ort_device):
    """(deployment, reference session) on ``ort_device``."""
    path = llama_export
    deployment = open_deployment(path.parent, device=ort_device)
    reference = AdapterSession(path, device=ort_device)  # the slot model, one request at a time
    for name in "abc":
        reference.load_adapter(name, path.parent / "adapters" / f"{name}.onnx_adapter")
    yield deployment, reference
    deployment.close()


@pytest.fixture(scope="module")
def bert_exports(tmp_path_factory):
    """task -> model.onnx of the classifier and the encoder, adapters x/y beside each."""
    from onnx_peft.export import export

    folder = tmp_path_factory.mktemp("serve_bert")
    dirs = _adapters(folder, tiny_bert_cls, ["query", "value"], ["x", "y"])
    return {task: export(model, folder / task, adapters=dirs, task=task, mode="inputs", quiet=True)
            for task, model in [("sequence-classification", tiny_bert_cls()),
                                ("feature-extraction", tiny_bert_cls().bert)]}


@pytest.fixture(scope="module")
def bert(bert_exports, ort_device):
    """task -> (deployment, reference session) on ``ort_device``."""
    out = {}
    for task, path in bert_exports.items():
        reference = AdapterSession(path, device=ort_device)
        for name in ("x", "y"):
            reference.load_adapter(name, path.parent / "adapters" / f"{name}.onnx_adapter")
        out[task] = (open_deployment(path.parent, device=ort_device), reference)
    yield out
    for deployment, _ in out.values():
        deployment.close()


def call(app, requests):
    """Run ``async requests(client)`` against ``app`` with its lifespan; returns what it returns."""
    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://serve", timeout=30) as client:
                return await requests(client)
    return asyncio.run(main())


def reference_tokens(reference, adapter, prompt, max_tokens):
    out = reference.generate(np.array([prompt]), max_tokens, adapter=adapter, eos_token_id=EOS)[0, len(prompt):]
    tokens = out.tolist()
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


def runs(app) -> int:
    return app.state.metrics.runs


# -- completions ---------------------------------------------------------------------------------
def test_concurrent_requests_for_different_adapters_share_one_run(llama):
    deployment, reference = llama
    assert deployment.mixes_rows  # the slot export was turned into a MultiAdapter model at start
    app = create_app(deployment, ServeConfig(max_wait_ms=500, max_batch_size=8))

    async def requests(client):
        bodies = [{"model": name or "base", "prompt": prompt, "max_tokens": 6 + i}
                  for i, (name, prompt) in enumerate(PROMPTS.items())]
        return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    answers = call(app, requests)
    assert runs(app) == 1 and app.state.metrics.batch_rows.sum == len(PROMPTS)
    for i, ((name, prompt), answer) in enumerate(zip(PROMPTS.items(), answers)):
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        assert choice["token_ids"] == reference_tokens(reference, name, prompt, 6 + i), name
        assert choice["text"] == " ".join(f"w{t}" for t in choice["token_ids"])


def test_text_prompts_several_rows_and_usage(llama):
    deployment, reference = llama
    app = create_app(deployment, ServeConfig(max_wait_ms=0))
    body = {"model": "b", "prompt": ["w5 w9 w3", "w4 w8"], "max_tokens": 5}
    answer = call(app, lambda client: client.post("/v1/completions", json=body)).json()
    assert [c["token_ids"] for c in answer["choices"]] == [
        reference_tokens(reference, "b", [5, 9, 3], 5), reference_tokens(reference, "b", [4, 8], 5)]
    assert answer["usage"]["prompt_tokens"] == 5 and answer["object"] == "text_completion"


def test_stream_sends_each_token_as_an_event(llama):
    deployment, reference = llama
    app = create_app(deployment)
    body = {"model": "c", "prompt": PROMPTS["c"], "max_tokens": 8, "stream": True}
    answer = call(app, lambda client: client.post("/v1/completions", json=body))
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in answer.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    tokens = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    assert tokens == reference_tokens(reference, "c", PROMPTS["c"], 8)
    assert all(len(c["choices"][0]["token_ids"]) == 1 for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_batching_off_runs_each_request_alone(llama):
    deployment, reference = llama
    app = create_app(deployment, ServeConfig(max_wait_ms=200, batching=False))

    async def requests(client):
        return await asyncio.gather(*(client.post("/v1/completions", json={"model": n, "prompt": PROMPTS[n],
                                                                           "max_tokens": 4}) for n in "abc"))
    answers = call(app, requests)
    assert runs(app) == 3
    assert [a.json()["choices"][0]["token_ids"] for a in answers] == [
        reference_tokens(reference, n, PROMPTS[n], 4) for n in "abc"]


# -- errors --------------------------------------------------------------------------------------
def test_error_codes(llama):
    deployment, _ = llama
    app = create_app(deployment, ServeConfig(max_batch_size=4, max_prompt_tokens=16, max_new_tokens=32))

    async def requests(client):
        post = lambda body, path="/v1/completions": client.post(path, json=body)  # noqa: E731
        return {
            "unknown": await post({"model": "nope", "prompt": [1, 2]}),
            "no prompt": await post({"model": "a"}),
            "bad ids": await post({"model": "a", "prompt": [1, -3]}),
            "not json": await client.post("/v1/completions", content=b"{", headers={"content-type": "application/json"}),
            "empty": await post({"model": "a", "prompt": []}),
            "five prompts": await post({"model": "a", "prompt": [[1]] * 5}),
            "long prompt": await post({"model": "a", "prompt": list(range(17))}),
            "many tokens": await post({"model": "a", "prompt": [1], "max_tokens": 33}),
            "wrong endpoint": await post({"model": "a", "input": [1, 2]}, "/v1/classify"),
            "stream unknown": await post({"model": "nope", "prompt": [1], "stream": True}),
            "stream two prompts": await post({"model": "a", "prompt": [[1], [2]], "stream": True}),
        }
    answers = call(app, requests)
    codes = {k: v.status_code for k, v in answers.items()}
    assert codes == {"unknown": 404, "no prompt": 422, "bad ids": 422, "not json": 422, "empty": 422,
                     "five prompts": 413, "long prompt": 413, "many tokens": 413, "wrong endpoint": 404,
                     "stream unknown": 404, "stream two prompts": 422}
    error = answers["unknown"].json()["error"]
    assert error["loaded"] == ["a", "b", "c"] and "'nope'" in error["message"]
    assert "/v1/completions" in answers["wrong endpoint"].json()["error"]["message"]
    metrics = call(app, lambda client: client.get("/metrics")).text
    assert 'onnx_peft_serve_requests_total{endpoint="/v1/completions",adapter="other",code="404"} 2' in metrics  # "nope", plain and streamed


# -- admin ---------------------------------------------------------------------------------------
def test_unload_waits_for_the_request_using_the_adapter_then_reload(llama):
    deployment, reference = llama
    entered, release = threading.Event(), threading.Event()

    def hold(jobs):  # the batcher's worker thread: the run of "a" is about to start
        entered.set()
        assert release.wait(10)

    app = create_app(deployment, ServeConfig(max_wait_ms=0), before_run=hold)
    path = deployment.adapter_paths["a"]

    async def requests(client):
        running = asyncio.create_task(client.post("/v1/completions", json={"model": "a", "prompt": PROMPTS["a"],
                                                                           "max_tokens": 5}))
        assert await asyncio.to_thread(entered.wait, 10)
        unloading = asyncio.create_task(client.delete("/admin/adapters/a"))
        await asyncio.sleep(0.3)
        waited = not unloading.done()
        refused = await client.post("/v1/completions", json={"model": "a", "prompt": [1]})
        release.set()
        answered, unloaded = await running, await unloading
        gone = await client.post("/v1/completions", json={"model": "a", "prompt": [1]})
        reloaded = await client.post("/admin/adapters", json={"name": "a", "path": path})
        taken = await client.post("/admin/adapters", json={"name": "a", "path": path})
        health = (await client.get("/health")).json()
        return waited, refused, answered, unloaded, gone, reloaded, taken, health

    waited, refused, answered, unloaded, gone, reloaded, taken, health = call(app, requests)
    assert waited and refused.status_code == 404 and refused.json()["error"]["loaded"] == ["b", "c"]
    assert answered.status_code == 200
    assert answered.json()["choices"][0]["token_ids"] == reference_tokens(reference, "a", PROMPTS["a"], 5)
    assert unloaded.status_code == 200 and unloaded.json()["loaded"] == ["b", "c"]
    assert gone.status_code == 404
    assert reloaded.status_code == 201 and taken.status_code == 409
    assert sorted(health["adapters"]) == ["a", "b", "c"] and health["task"] == "causal-lm-with-past"
    assert app.state.metrics.adapter_loads["a"] == 2


def test_health_models_and_metrics(llama, ort_device):
    deployment, _ = llama
    app = create_app(deployment)

    async def requests(client):
        await client.post("/v1/completions", json={"model": "a", "prompt": [3, 4], "max_tokens": 2})
        return [await client.get(p) for p in ("/health", "/v1/models", "/metrics")]

    health, models, metrics = call(app, requests)
    assert health.json()["mixes_adapters"] and health.json()["tokenizer"]
    assert health.json()["provider"] == {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[ort_device]
    assert [m["id"] for m in models.json()["data"]] == ["base", *deployment.session.adapters]
    text = metrics.text
    assert 'onnx_peft_serve_requests_total{endpoint="/v1/completions",adapter="a",code="200"} 1' in text
    assert 'onnx_peft_serve_request_seconds_count{adapter="a"} 1' in text
    assert "onnx_peft_serve_runs_total 1" in text and 'onnx_peft_serve_batch_rows_bucket{le="+Inf"} 1' in text


# -- classification and embeddings ---------------------------------------------------------------
def _forward_reference(reference, adapter, rows, output):
    values = []
    for row in rows:
        ids = np.array([row])
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        feeds = {k: v for k, v in feeds.items() if k in reference.input_names}
        values.append(reference.run([output], feeds, adapter=adapter)[0][0])
    return values


def test_classify_and_embeddings_equal_the_session_row_by_row(bert):
    rows = [[5, 9, 3, 7, 1], [4, 8], [11, 12, 13]]
    for task, path, output in [("sequence-classification", "/v1/classify", "logits"),
                               ("feature-extraction", "/v1/embeddings", "last_hidden_state")]:
        deployment, reference = bert[task]
        app = create_app(deployment, ServeConfig(max_wait_ms=300))

        async def requests(client, path=path):
            return await asyncio.gather(client.post(path, json={"model": "x", "input": rows}),
                                        client.post(path, json={"model": "y", "input": rows[0]}),
                                        client.post(path, json={"model": "base", "input": rows[1:]}))
        answers = call(app, requests)
        assert runs(app) == 1, task
        for answer, adapter, chosen in zip(answers, ["x", "y", None], [rows, rows[:1], rows[1:]]):
            assert answer.status_code == 200, answer.text
            expected = _forward_reference(reference, adapter, chosen, output)
            for item, want in zip(answer.json()["data"], expected):
                got = item["logits"] if task == "sequence-classification" else item["embedding"]
                want = want if task == "sequence-classification" else want.mean(axis=0)
                assert np.abs(np.array(got) - want).max() <= 1e-5, (task, adapter)
                if task == "sequence-classification":
                    assert item["label"] == int(np.argmax(want))


def test_cli_serve_has_help_on_every_flag():
    from onnx_peft.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["serve"]
    flags = {o for a in sub._actions for o in a.option_strings}
    assert {"--adapter", "--host", "--port", "--max-wait-ms", "--max-batch-size"} <= flags
    assert all(a.help for a in sub._actions)


def test_cli_serve_answers_on_loopback(llama, ort_device):
    """`onnx-peft serve DEPLOY_DIR --port P` in a subprocess: health, then a completion."""
    import socket
    import subprocess
    import sys
    import time

    deployment, reference = llama
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "onnx_peft.cli", "--quiet", "serve", str(deployment.folder),
                                "--port", str(port), "--max-wait-ms", "1", "--device", ort_device],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read().decode()
            try:
                health = httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert health.json()["adapters"] == ["a", "b", "c"]
        answer = httpx.post(f"{url}/v1/completions", json={"model": "b", "prompt": "w4 w8 w2 w6", "max_tokens": 5},
                            timeout=30).json()
        assert answer["choices"][0]["token_ids"] == reference_tokens(reference, "b", PROMPTS["b"], 5)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serving_needs_no_torch(llama_export):
    """A deploy box runs ONNX Runtime alone: open the folder and build the app with torch blocked."""
    import subprocess
    import sys

    folder = llama_export.parent
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from onnx_peft.serve import open_deployment\nfrom onnx_peft.serve.app import create_app\n"
            f"d = open_deployment({str(folder)!r}); create_app(d)\n"
            "print(d.task, d.mixes_rows, d.codec is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["causal-lm-with-past", "True", "True"]
