"""onnx_peft.export: ONNX Runtime (CPU, fp32) must reproduce the PyTorch forward within 1e-5.

Tiny Llama, GPT-2 and BERT models are built from configs, saved with save_pretrained, and
exported once per module (exports are the slow part: a few seconds each).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
ir = pytest.importorskip("onnx_ir")

from onnx_peft.errors import ModelFileError, OnnxPeftError  # noqa: E402
from onnx_peft.export import export  # noqa: E402

ATOL = 1e-5
VOCAB = 100
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"


# -- model builders ----------------------------------------------------------------------------


def _peft_api():
    """onnx_peft's own tuners once they exist; Hugging Face PEFT (same API) until then."""
    try:
        from onnx_peft.methods.lora import LoraConfig
        from onnx_peft.model import get_peft_model
    except ImportError:
        peft = pytest.importorskip("peft")
        return peft.get_peft_model, peft.LoraConfig
    return get_peft_model, LoraConfig


def _tiny(kind: str, seq_cls: bool = False):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                          max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=VOCAB,
                                         n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                                         num_labels=3)
        model = (transformers.BertForSequenceClassification if seq_cls else transformers.BertModel)(config)
    return model.eval()


TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"]}
TASKS = {"llama": "causal-lm", "gpt2": "causal-lm", "bert": "feature-extraction"}


def _lora(model, kind: str, r: int = 4, alpha: int = 8, seed: int = 1, targets=None):
    get_peft_model, LoraConfig = _peft_api()
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or TARGETS[kind],
                        init_lora_weights=False, fan_in_fan_out=kind == "gpt2")
    return get_peft_model(model, config).eval()


def _feeds(session, batch: int = 2, seq: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding on row 1 exercises the mask
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


def _torch_out(model, feeds, key: str) -> np.ndarray:
    kwargs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        try:
            out = model(**kwargs, **({"use_cache": False} if key == "logits" else {}))
        except TypeError:  # transformers 4.x encoders (BertForSequenceClassification) take no use_cache
            out = model(**kwargs)
    return getattr(out, key).numpy()


def _run(path: Path, model, key: str) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = _feeds(session)
    diff = np.abs(session.run([key], feeds)[0] - _torch_out(model, feeds, key))
    if diff.ndim == 3:  # per token: padded positions hold no defined value, compare the rest
        diff = diff[feeds["attention_mask"].astype(bool)]
    return float(diff.max())


def _node_count(path: Path) -> int:
    return sum(1 for _ in ir.load(path).graph.all_nodes())


# -- fixtures: one export per (model, mode), shared by the tests of this module ----------------


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Saved base models: {kind: folder}."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for kind in ("llama", "gpt2", "bert"):
        _tiny(kind).save_pretrained(root / kind)
        out[kind] = root / kind
    return out


@pytest.fixture(scope="module")
def exports(dirs, tmp_path_factory):
    """{(kind, mode): (model.onnx, torch model to compare with)}."""
    root = tmp_path_factory.mktemp("exports")
    cache: dict = {}

    def get(kind: str, mode: str):
        if (kind, mode) not in cache:
            base = _auto_load(dirs[kind])
            if mode == "base":
                path = export(dirs[kind], root / f"{kind}-base", task=TASKS[kind], quiet=True)
                cache[kind, mode] = (path, base)
            else:
                peft_model = _lora(base, kind)
                kwargs = {"external_data": True} if kind == "bert" and mode == "merged" else {}
                path = export(peft_model, root / f"{kind}-{mode}", task=TASKS[kind], mode=mode, quiet=True, **kwargs)
                cache[kind, mode] = (path, peft_model)
        return cache[kind, mode]

    return get


def _auto_load(folder: Path):
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, config.architectures[0])
    return cls.from_pretrained(folder).float().eval()


def _key(kind: str) -> str:
    return "last_hidden_state" if kind == "bert" else "logits"


# -- base, in-graph and merged parity ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_base_export_matches_torch(exports, kind):
    path, model = exports(kind, "base")
    assert _run(path, model, _key(kind)) <= ATOL
    info = json.loads((path.parent / "export_info.json").read_text())
    assert info["task"] == TASKS[kind] and info["exporter"] == "dynamo"
    assert [i["name"] for i in info["inputs"]][:2] == ["input_ids", "attention_mask"]
    assert info["inputs"][0]["shape"] == ["batch", "sequence"]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_in_graph_lora_matches_peft_forward(exports, kind):
    path, peft_model = exports(kind, "in-graph")
    assert _run(path, peft_model, _key(kind)) <= ATOL
    base_path, base = exports(kind, "base")
    # the adapter really changes the output (B is non-zero), so parity above is not vacuous
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = _feeds(session)
    assert np.abs(session.run([_key(kind)], feeds)[0] - _torch_out(base, feeds, _key(kind))).max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_merged_export_matches_merged_model_with_base_node_count(exports, kind):
    path, peft_model = exports(kind, "merged")
    import copy

    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    assert _run(path, merged, _key(kind)) <= ATOL
    assert _node_count(path) == _node_count(exports(kind, "base")[0])
    # the model passed in was not merged: it still has its adapter branches
    assert any(name.endswith("lora_A") for name, _ in peft_model.named_modules())


def test_external_data_is_written_next_to_the_model(exports):
    path, _ = exports("bert", "merged")  # exported with external_data=True
    data = path.parent / "model.onnx.data"
    weights = sum(p.numel() for p in _tiny("bert").parameters()) * 4
    assert data.is_file() and data.stat().st_size >= weights // 2  # the big tensors live there
    assert json.loads((path.parent / "export_info.json").read_text())["external_data"] is True


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_module_path_of_every_adapted_layer_is_recoverable(exports, kind):
    path, peft_model = exports(kind, "in-graph")
    inner = peft_model.base_model.model
    adapted = [name for name, module in inner.named_modules() if hasattr(module, "lora_A")]
    assert adapted
    model = ir.load(path)
    scopes = set()
    for node in model.graph.all_nodes():
        scope = node.metadata_props.get(NAME_SCOPES)
        if scope:
            scopes.update(json.loads(scope.replace("'", '"')))
    folded = " ".join(v.metadata_props.get(FOLDED_FROM, "") for v in model.graph.initializers.values())
    for module in adapted:
        assert f"{module}.lora_A.default" in scopes and f"{module}.lora_B.default" in scopes, module
        assert f"{module}.lora_A.default.weight" in folded, module


# -- causal-lm-with-past ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def with_past(request, tmp_path_factory):
    """A LoRA-wrapped decoder exported with task auto (= causal-lm-with-past, like Optimum)."""
    model = _lora(_tiny(request.param), request.param, seed=3)
    path = export(model, tmp_path_factory.mktemp("past") / "out", quiet=True)
    return path, model, request.param


def _past_feeds(session, ids, past=None, past_len=0):
    batch, seq = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((batch, past_len + seq), np.int64),
             "position_ids": np.tile(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, 1))}
    for i, value in enumerate(session.get_inputs()[3:]):
        _, heads, _, head_dim = value.shape
        feeds[value.name] = past[i] if past is not None else np.zeros((batch, heads, 0, head_dim), np.float32)
    return feeds


def test_with_past_prefill_then_decode_matches_torch_cache(with_past):
    from onnx_peft.export import cache_tensors

    path, model, kind = with_past
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert session.get_inputs()[3].name == "past_key_values.0.key"
    ids = np.random.default_rng(5).integers(3, VOCAB, size=(2, 7)).astype(np.int64)

    prefill = session.run(None, _past_feeds(session, ids[:, :6]))
    decode = session.run(None, _past_feeds(session, ids[:, 6:], past=prefill[1:], past_len=6))

    with torch.no_grad():
        step1 = model(input_ids=torch.from_numpy(ids[:, :6]), use_cache=True)
        step2 = model(input_ids=torch.from_numpy(ids[:, 6:]), past_key_values=step1.past_key_values,
                      use_cache=True)
        full = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert np.abs(prefill[0] - full[:, :6]).max() <= ATOL
    assert np.abs(decode[0] - step2.logits.numpy()).max() <= ATOL
    assert np.abs(decode[0][:, -1] - full[:, -1]).max() <= ATOL
    for got, want in zip(decode[1:], cache_tensors(step2.past_key_values)):
        assert got.shape == tuple(want.shape) and np.abs(got - want.numpy()).max() <= ATOL
    info = json.loads((path.parent / "export_info.json").read_text())
    assert info["task"] == "causal-lm-with-past"
    assert (info["num_layers"], info["num_kv_heads"], info["head_dim"]) == (2, 2 if kind == "llama" else 4, 8)


# -- inputs / external: adapters as swappable slots --------------------------------------------


@pytest.fixture(scope="module")
def lora_dirs(dirs, tmp_path_factory):
    """Two adapters of different ranks and targets on the tiny Llama, saved as PEFT folders."""
    root = tmp_path_factory.mktemp("adapters")
    models = {}
    for name, r, targets, seed in (("a", 4, ["q_proj", "v_proj"], 11), ("b", 2, ["q_proj", "v_proj"], 12),
                                   ("c", 2, ["v_proj", "down_proj"], 13)):
        models[name] = _lora(_auto_load(dirs["llama"]), "llama", r=r, alpha=2 * r, seed=seed, targets=targets)
        models[name].save_pretrained(root / name)
    return {name: root / name for name in models}, models


def _serve_adapters(dirs, lora_dirs, tmp_path, names):
    from onnx_peft.formats import load_adapter_file

    folders, models = lora_dirs
    folders = {name: folders[name] for name in names}
    path = export(dirs["llama"], tmp_path / "out", adapters=folders, task="causal-lm", mode="inputs", quiet=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = _feeds(session)
    valid = feeds["attention_mask"].astype(bool)
    # no adapter fed: the plain base model
    base = _auto_load(dirs["llama"])
    assert np.abs(session.run(["logits"], feeds)[0] - _torch_out(base, feeds, "logits"))[valid].max() <= ATOL
    info = json.loads((path.parent / "export_info.json").read_text())
    assert info["adapters"] == {name: f"adapters/{name}.onnx_adapter" for name in names}
    for name in names:
        model = models[name]
        tensors, _ = load_adapter_file(path.parent / info["adapters"][name])
        got = session.run(["logits"], {**feeds, **tensors})[0]
        assert np.abs(got - _torch_out(model, feeds, "logits"))[valid].max() <= ATOL, name


def test_inputs_mode_serves_adapters_of_different_ranks_and_targets_from_one_model(dirs, lora_dirs, tmp_path):
    _serve_adapters(dirs, lora_dirs, tmp_path, ["a", "b", "c"])


def test_external_mode_keeps_the_adapter_of_a_peft_model(lora_dirs, tmp_path):
    from onnx_peft.formats import load_adapter_file

    _, models = lora_dirs
    path = export(models["a"], tmp_path / "out", task="causal-lm", mode="external", quiet=True)
    assert _run(path, models["a"], "logits") <= ATOL
    info = json.loads((path.parent / "export_info.json").read_text())
    adapter = path.parent / info["adapters"]["default"]
    tensors, _ = load_adapter_file(adapter)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert not (path.parent / ".extracted").exists()


# -- dtype and exporter fallback ---------------------------------------------------------------


def test_fp16_export_has_fp16_outputs_and_leaves_the_model_fp32(dirs, tmp_path):
    model = _auto_load(dirs["bert"])
    path = export(model, tmp_path / "out", task="feature-extraction", dtype="fp16", quiet=True)
    assert next(model.parameters()).dtype == torch.float32
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = _feeds(session)
    got = session.run(["last_hidden_state"], feeds)[0]
    assert got.dtype == np.float16
    # fp16 rounding of a unit-scale hidden state: a few 1e-3, far below any real error
    assert np.abs(got.astype(np.float32) - _torch_out(model, feeds, "last_hidden_state")).max() < 2e-2


def test_torchscript_fallback_is_logged_and_never_writes_a_wrong_model(dirs, tmp_path, monkeypatch, caplog):
    real_export = torch.onnx.export

    def dynamo_fails(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    model = _auto_load(dirs["bert"])
    out = tmp_path / "out"
    try:
        path = export(model, out, task="feature-extraction", quiet=True)
    except OnnxPeftError as exc:  # transformers 5.x: TorchScript mis-traces BERT's mask
        assert "TorchScript" in str(exc) and "simulated dynamo failure" in str(exc)
        assert not out.exists()
    else:
        assert json.loads((out / "export_info.json").read_text())["exporter"] == "torchscript"
        assert _run(path, model, "last_hidden_state") <= ATOL
    assert "falling back to the TorchScript exporter" in caplog.text


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_exports_a_sequence_classifier_folder(tmp_path):
    from onnx_peft.cli import main

    model = _tiny("bert", seq_cls=True)
    model.save_pretrained(tmp_path / "clf")
    out = tmp_path / "onnx"
    assert main(["--quiet", "export", str(tmp_path / "clf"), "-o", str(out)]) == 0
    info = json.loads((out / "export_info.json").read_text())
    assert info["task"] == "sequence-classification" and info["mode"] == "in-graph"
    assert _run(out / "model.onnx", model, "logits") <= ATOL
    assert not list(tmp_path.glob(".*tmp"))  # no temporary folder left behind


def test_cli_bad_model_dir_exits_1_with_one_line_error(tmp_path, capsys):
    from onnx_peft.cli import main

    assert main(["export", str(tmp_path / "missing"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err and "config.json" in err
    assert not (tmp_path / "out").exists()


def test_python_errors_name_the_problem(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelFileError, match="PEFT adapter folder"):
        export(tmp_path / "adapter", tmp_path / "out")
    with pytest.raises(OnnxPeftError, match="unknown mode"):
        export(tmp_path / "adapter", tmp_path / "out", mode="fused")
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == ["adapter"]
