"""Full-weight slots: a classifier head trained in full (PEFT ``modules_to_save``) is served as
swappable ``classifier.weight`` / ``classifier.bias`` slots whose defaults are the base head.

A tiny BertForSequenceClassification (hidden 32, 2 layers, 4 labels) gets LoRA adapters with
their own heads (onnx_peft tuners and Hugging Face PEFT); one export with mode="inputs" must
reproduce each PyTorch forward within 1e-5, per run and per batch row, on every ONNX Runtime device
(``ort_device``; the tests that export a model of their own run on the default device).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
ir = pytest.importorskip("onnx_ir")

from onnx_peft.errors import AdapterConfigError, IncompatibleAdapterError  # noqa: E402
from onnx_peft.export import adapter_num_labels, export  # noqa: E402
from onnx_peft.formats import load_adapter_file  # noqa: E402
from onnx_peft.graph.contract import read_contract  # noqa: E402
from onnx_peft.methods.lora import LoraConfig  # noqa: E402
from onnx_peft.model import get_peft_model  # noqa: E402
from onnx_peft.passes.extract_adapters import ExtractAdapters  # noqa: E402
from onnx_peft.passes.multi_adapter import multi_adapter  # noqa: E402
from onnx_peft.runtime import AdapterSession  # noqa: E402

ATOL = 1e-5
VOCAB = 100
LABELS = 4


def _base(num_labels: int = LABELS):
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                                     num_labels=num_labels)
    return transformers.BertForSequenceClassification(config).eval()


def _randomize_head(peft_model, seed: int) -> None:
    head = peft_model.base_model.model.classifier.modules_to_save["default"]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
        head.bias.copy_(torch.randn(head.bias.shape, generator=generator))


def _feeds(batch: int = 3, seq: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _torch_logits(model, feeds) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Base folder, adapters a/b (own heads), c (LoRA only), one export with all three."""
    root = tmp_path_factory.mktemp("mts")
    _base().save_pretrained(root / "base")
    models, dirs = {}, {}
    for name, seed, seq_cls in (("a", 1, True), ("b", 2, True), ("c", 3, False)):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False,
                            task_type="SEQ_CLS" if seq_cls else None)
        model = get_peft_model(_base(), config).eval()
        if seq_cls:
            _randomize_head(model, 100 + seed)
        model.save_pretrained(root / name)
        models[name], dirs[name] = model, root / name
    path = export(root / "base", root / "out", adapters=dirs, task="sequence-classification", mode="inputs",
                  quiet=True)
    return path, dirs, models


def test_single_adapter_runs_match_each_peft_model_and_no_adapter_is_the_base(served, ort_device):
    path, dirs, models = served
    session = AdapterSession(path, device=ort_device)
    info = json.loads((path.parent / "export_info.json").read_text())
    for name in models:
        session.load_adapter(name, path.parent / info["adapters"][name])
    feeds = _feeds()
    (base,) = session.run(["logits"], feeds)
    assert np.abs(base - _torch_logits(_base(), feeds)).max() <= ATOL
    for name, model in models.items():
        (got,) = session.run(["logits"], feeds, adapter=name)
        assert np.abs(got - _torch_logits(model, feeds)).max() <= ATOL, name
    # the heads really differ: a's head on b's input is not b's output
    assert np.abs(session.run(["logits"], feeds, adapter="a")[0]
                  - session.run(["logits"], feeds, adapter="b")[0]).max() > 0.1


def test_the_contract_and_adapter_files_hold_the_head_in_the_graphs_layout(served):
    path, dirs, models = served
    contract = read_contract(ir.load(path).metadata_props)
    slots = contract.slot_map()
    weight, bias = slots["classifier.weight"], slots["classifier.bias"]
    assert (weight.method, weight.module, bias.method) == ("modules_to_save", "classifier", "modules_to_save")
    assert weight.layout in ("in_out", "out_in") and bias.shape == (LABELS,)
    head = models["a"].base_model.model.classifier.modules_to_save["default"]
    tensors, _ = load_adapter_file(path.parent / "adapters" / "a.onnx_adapter")
    want = head.weight.detach().numpy()
    np.testing.assert_array_equal(tensors["classifier.weight"], want.T if weight.layout == "in_out" else want)
    np.testing.assert_array_equal(tensors["classifier.bias"], head.bias.detach().numpy())
    c_tensors, _ = load_adapter_file(path.parent / "adapters" / "c.onnx_adapter")
    assert not any(k.startswith("classifier.") for k in c_tensors)  # c keeps the base head


def test_peft_dirs_load_directly_into_the_session(served, ort_device):
    path, dirs, models = served
    session = AdapterSession(path, device=ort_device)
    session.load_adapter("a", dirs["a"])
    feeds = _feeds(seed=4)
    (got,) = session.run(["logits"], feeds, adapter="a")
    assert np.abs(got - _torch_logits(models["a"], feeds)).max() <= ATOL


def test_multi_adapter_mixes_heads_per_row_and_id_0_is_the_base(served, tmp_path, ort_device):
    path, dirs, models = served
    multi = multi_adapter(path, tmp_path / "multi")
    graph = ir.load(multi).graph
    inputs = {v.name: v for v in graph.inputs}
    assert "classifier.weight.bank" in inputs and "classifier.bias.bank" in inputs
    assert "classifier.weight" not in inputs
    session = AdapterSession(multi, device=ort_device)
    for name in ("a", "b", "c"):
        session.load_adapter(name, path.parent / "adapters" / f"{name}.onnx_adapter")
    feeds = _feeds(batch=4, seed=5)
    rows = ["a", None, "b", "c"]
    (mixed,) = session.run(["logits"], feeds, adapter=rows)
    for i, name in enumerate(rows):
        row = {k: v[i:i + 1] for k, v in feeds.items()}
        (alone,) = session.run(["logits"], row, adapter=name)
        want = _torch_logits(models[name] if name else _base(), row)
        assert np.abs(mixed[i:i + 1] - alone).max() <= ATOL, name
        assert np.abs(mixed[i:i + 1] - want).max() <= ATOL, name
    session.unload_adapter("a")  # rebuilt banks keep the others at their rows
    (after,) = session.run(["logits"], feeds, adapter=[None, None, "b", "c"])
    np.testing.assert_allclose(after[2:], mixed[2:], atol=ATOL, rtol=0)


def test_an_adapter_from_hugging_face_peft_serves_its_head(served, tmp_path, ort_device):
    peft = pytest.importorskip("peft")
    path, _, _ = served
    torch.manual_seed(7)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"],
                             init_lora_weights=False)
    model = peft.get_peft_model(_base(), config).eval()
    _randomize_head(model, 77)
    model.save_pretrained(tmp_path / "hf")
    session = AdapterSession(path, device=ort_device)
    session.load_adapter("hf", tmp_path / "hf")
    feeds = _feeds(seed=6)
    (got,) = session.run(["logits"], feeds, adapter="hf")
    assert np.abs(got - _torch_logits(model, feeds)).max() <= ATOL


def test_exporting_a_peft_model_keeps_the_base_head_in_the_graph_and_its_own_in_the_file(served, tmp_path):
    _, _, models = served
    model = models["b"]
    wrapper = model.base_model.model.classifier
    path = export(model, tmp_path / "out", task="sequence-classification", mode="inputs", quiet=True)
    assert model.base_model.model.classifier is wrapper  # the model passed in is left as it was
    session = AdapterSession(path)
    session.load_adapter("b", path.parent / "adapters" / "default.onnx_adapter")
    feeds = _feeds(seed=9)
    (got,) = session.run(["logits"], feeds, adapter="b")
    assert np.abs(got - _torch_logits(model, feeds)).max() <= ATOL
    (base,) = session.run(["logits"], feeds)
    assert np.abs(base - _torch_logits(_base(), feeds)).max() <= ATOL


def test_llama_score_head_without_bias_on_a_rank_3_input(tmp_path):
    """LlamaForSequenceClassification: ``score`` (no bias) runs on [batch, seq, hidden] as a MatMul
    with a pre-transposed weight, so its slot is in_out; per-row banks handle the rank-3 input."""
    def llama():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                          max_position_embeddings=64, num_labels=3, pad_token_id=0)
        return transformers.LlamaForSequenceClassification(config).eval()

    llama().save_pretrained(tmp_path / "base")
    torch.manual_seed(5)
    model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False, task_type="SEQ_CLS")).eval()
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "s")
    path = export(tmp_path / "base", tmp_path / "out", adapters={"s": tmp_path / "s"},
                  task="sequence-classification", mode="inputs", quiet=True)
    slots = read_contract(ir.load(path).metadata_props).slot_map()
    assert "score.weight" in slots and "score.bias" not in slots
    multi = AdapterSession(multi_adapter(path, tmp_path / "multi"))
    multi.load_adapter("s", tmp_path / "s")
    feeds = {k: v for k, v in _feeds(batch=2, seed=10).items() if k != "token_type_ids"}
    feeds["attention_mask"][:] = 1
    (mixed,) = multi.run(["logits"], feeds, adapter=["s", None])
    assert np.abs(mixed[:1] - _torch_logits(model, {k: v[:1] for k, v in feeds.items()})).max() <= ATOL
    assert np.abs(mixed[1:] - _torch_logits(llama(), {k: v[1:] for k, v in feeds.items()})).max() <= ATOL


def test_non_linear_modules_to_save_are_refused_naming_the_module(tmp_path):
    _base().save_pretrained(tmp_path / "base")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query"], init_lora_weights=False,
                        task_type="SEQ_CLS", modules_to_save=["word_embeddings"])
    get_peft_model(_base(), config).save_pretrained(tmp_path / "emb")
    with pytest.raises(AdapterConfigError, match="word_embeddings"):
        export(tmp_path / "base", tmp_path / "out", adapters={"emb": tmp_path / "emb"},
               task="sequence-classification", mode="inputs", quiet=True)
    assert not (tmp_path / "out").exists()


def test_num_labels_come_from_the_adapters_and_must_agree(tmp_path):
    for name, count in (("x", 4), ("y", 4), ("z", 5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "labels.json").write_text(json.dumps({"id2label": {str(i): f"l{i}" for i in range(count)}}))
    assert adapter_num_labels({"x": tmp_path / "x", "y": tmp_path / "y"}) == 4
    with pytest.raises(AdapterConfigError, match=r"x has 4.*z has 5"):
        adapter_num_labels({"x": tmp_path / "x", "z": tmp_path / "z"})


def test_a_base_with_other_num_labels_is_loaded_with_the_adapters_head_size(served, tmp_path):
    _, dirs, models = served
    _base(num_labels=2).save_pretrained(tmp_path / "base2")
    path = export(tmp_path / "base2", tmp_path / "out", adapters={"a": dirs["a"]},
                  task="sequence-classification", mode="inputs", quiet=True)
    session = AdapterSession(path)
    session.load_adapter("a", dirs["a"])
    feeds = _feeds(seed=8)
    (got,) = session.run(["logits"], feeds, adapter="a")
    assert got.shape == (3, LABELS)
    # the encoder is the same as a's base; only the (re-initialised) base head differs, and a replaces it
    assert np.abs(got - _torch_logits(models["a"], feeds)).max() <= ATOL


# -- the passes on hand-written graphs: MatMul + Add (layout in_out), rank-3 input, zero bias ---

_GRAPH = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[batch, seq, 4] x) => (float[batch, seq, 3] y) <float[4, 3] W = {1,2,3,4,5,6,7,8,9,10,11,12},
                                                        float[3] B = {0.5, -1, 2}> {
    h = MatMul (x, W)
    y = Add (h, B)
}
"""

_NO_BIAS = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[batch, 4] x) => (float[batch, 3] y) <float[3, 4] W = {1,2,3,4,5,6,7,8,9,10,11,12}> {
    y = Gemm <transB: int = 1> (x, W)
}
"""


def _parse(text: str):
    """The graph of ``text`` with its initializers named as a torch module's (the parser takes no dots)."""
    model = ir.from_onnx_text(text)
    for short, name in (("W", "head.weight"), ("B", "head.bias")):
        if short in model.graph.initializers:
            model.graph.initializers[short].name = name
    return model


def _save(model, path):
    from onnx_peft.graph.io import save_model

    return save_model(model, path)


def test_extract_makes_matmul_add_weights_slots_with_base_defaults(tmp_path, ort_device, ort_providers):
    import onnxruntime as ort

    model = _parse(_GRAPH)
    result = ExtractAdapters(full_weight_modules=["head"])(model)
    assert result.modified
    contract = read_contract(model.metadata_props)
    slots = contract.slot_map()
    assert slots["head.weight"].layout == "in_out" and slots["head.weight"].shape == (4, 3)
    assert slots["head.bias"].shape == (3,) and contract.fingerprint
    path = _save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    weight = np.arange(1, 13, dtype=np.float32).reshape(4, 3)
    bias = np.array([0.5, -1, 2], np.float32)
    session = ort.InferenceSession(str(path), providers=ort_providers)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight + bias, atol=ATOL, rtol=0)
    other_w, other_b = weight[::-1].copy(), -bias
    got = session.run(None, {"x": x, "head.weight": other_w, "head.bias": other_b})[0]
    np.testing.assert_allclose(got, x @ other_w + other_b, atol=ATOL, rtol=0)

    multi = multi_adapter(path, tmp_path / "multi")
    session = AdapterSession(multi, device=ort_device)
    session.load_adapter("o", {"head.weight": other_w, "head.bias": other_b})
    got = session.run(["y"], {"x": x}, adapter=["o", None])[0]
    np.testing.assert_allclose(got[0], x[0] @ other_w + other_b, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[1], x[1] @ weight + bias, atol=ATOL, rtol=0)


def test_a_bias_the_exporter_dropped_gets_a_zero_default_slot(tmp_path, ort_device):
    model = _parse(_NO_BIAS)
    ExtractAdapters(full_weight_modules=["head"], full_weight_biases=["head"])(model)
    slots = read_contract(model.metadata_props).slot_map()
    assert slots["head.weight"].layout == "out_in" and slots["head.bias"].shape == (3,)
    path = _save(model, tmp_path / "m.onnx")
    session = AdapterSession(path, device=ort_device)
    x = np.ones((2, 4), np.float32)
    weight = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(session.run(["y"], {"x": x})[0], x @ weight.T, atol=ATOL, rtol=0)
    with pytest.raises(IncompatibleAdapterError, match="missing tensor 'head.bias'"):
        session.load_adapter("w_only", {"head.weight": weight})
    session.load_adapter("full", {"head.weight": weight, "head.bias": np.array([1, 2, 3], np.float32)})
    np.testing.assert_allclose(session.run(["y"], {"x": x}, adapter="full")[0], x @ weight.T + [1, 2, 3],
                               atol=ATOL, rtol=0)


def test_contract_json_stays_readable_both_ways():
    from onnx_peft.graph.contract import Contract, Slot

    lora = Contract([Slot("q.lora_A.weight", "float32", (4, "lora_r.q"), "q")], fingerprint="f")
    assert "layout" not in lora.to_json()  # LoRA-only contracts are written as before
    head = Contract([Slot("head.weight", "float32", (4, 3), "head", "modules_to_save", "in_out")])
    assert Contract.from_json(head.to_json()).slots == head.slots
    old = '{"version": 1, "fingerprint": "f", "slots": [{"name": "q.lora_A.weight", "dtype": "float32", ' \
          '"shape": [4, "lora_r.q"], "module": "q", "method": "lora", "future_field": 1}]}'
    assert Contract.from_json(old).slots == lora.slots


def test_merge_strategy_swaps_lora_and_heads_and_no_adapter_is_the_base(served, ort_device):
    """strategy="merge": LoRA folded into the weights on swap, the head fed as the slot is."""
    path, dirs, models = served
    session = AdapterSession(path, device=ort_device, strategy="merge")
    for name in models:
        session.load_adapter(name, dirs[name])
    feeds = _feeds(seed=3)
    for _ in range(2):
        for name, model in models.items():
            (got,) = session.run(["logits"], feeds, adapter=name)
            assert np.abs(got - _torch_logits(model, feeds)).max() <= ATOL, name
        (base,) = session.run(["logits"], feeds)
        assert np.abs(base - _torch_logits(_base(), feeds)).max() <= ATOL
