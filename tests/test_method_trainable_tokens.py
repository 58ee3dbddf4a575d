"""Trainable Tokens (and LoRA's ``trainable_token_indices``) against HF PEFT, on numbers:
checkpoints both ways, merge verbs, training, errors, the ``tokens`` slot tensors, the ``tokens``
form on an embedding lookup and on a tied head (plain and per row), and a LoRA adapter with token
rows through the ONNX paths on GPT-2, whose lm_head is tied to ``wte`` (fp32, <= 1e-5).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from method_cases.trainable_tokens import CASES
from tiny_models import (
    TOL,
    assert_merge_verbs,
    assert_round_trip,
    changed_since,
    max_diff,
    perturb_trainable,
    run,
    saved_keys,
    snapshot,
    tiny_gpt2,
    tiny_llama,
    token_ids,
    train_steps,
)

import onnx_peft
from onnx_peft.errors import AdapterConfigError, IncompatibleAdapterError, OnnxPeftError
from onnx_peft.graph.branch import graft, ungraft
from onnx_peft.graph.modules import find_linear_sites
from onnx_peft.graph.op_sites import find_embedding_sites
from onnx_peft.methods.base import method_for
from onnx_peft.methods.forms import FORMS, default_array
from onnx_peft.methods.trainable_tokens import TrainableTokensConfig
from onnx_peft.tuners.trainable_tokens import TiedTokensLayer, TrainableTokensLayer

peft = pytest.importorskip("peft")

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
METHOD = method_for("TRAINABLE_TOKENS")
LORA_CASES = {  # LoRA adapters training token rows too: a list (the input embedding), a dict
    "lora-tokens-gpt2": dict(model="gpt2", kwargs=dict(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                       trainable_token_indices=[2, 7, 11])),
    "lora-tokens-llama": dict(model="llama", kwargs=dict(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                         trainable_token_indices={"embed_tokens": [1, 6]})),
}
ALL = {**CASES, **LORA_CASES}


def _ids() -> torch.Tensor:
    ids = token_ids(batch=2, seq=7)
    ids[0, :4] = torch.tensor([2, 7, 5, 17])  # every case's tokens show up
    ids[1, :2] = torch.tensor([1, 11])
    return ids


def _builder(case: str):
    return MODELS[ALL[case]["model"]]


def _config(case: str, library):
    name = "LoraConfig" if case in LORA_CASES else "TrainableTokensConfig"
    return getattr(library, name)(**ALL[case]["kwargs"])


def _ours(case: str, seed: int = 0):
    model = onnx_peft.get_peft_model(_builder(case)(), _config(case, onnx_peft))
    perturb_trainable(model, seed)
    return model


def _peft(case: str, seed: int = 0):
    model = peft.get_peft_model(_builder(case)(), _config(case, peft))
    perturb_trainable(model, seed)
    return model.eval()


# -- (a) checkpoints both ways ---------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(ALL))
def test_peft_saved_adapter_loads_here_with_same_logits(case, tmp_path):
    assert_round_trip(_peft(case, seed=1), tmp_path, onnx_peft.PeftModel.from_pretrained, _builder(case), _ids(),
                      changes_by=1e-3)


@pytest.mark.parametrize("case", sorted(ALL))
def test_adapter_saved_here_loads_in_peft_with_same_logits(case, tmp_path):
    assert_round_trip(_ours(case, seed=2), tmp_path, peft.PeftModel.from_pretrained, _builder(case), _ids(),
                      changes_by=1e-3)


@pytest.mark.parametrize("case", sorted(ALL))
def test_saved_keys_and_shapes_equal_peft(case, tmp_path):
    # save_embedding_layers=False: PEFT never saves the base embedding next to token rows, but
    # PeftModel._embedding_tensors (model.py) still does when target_modules names embed_tokens
    _ours(case).save_pretrained(tmp_path / "ours", save_embedding_layers=False)
    _peft(case).save_pretrained(tmp_path / "peft")

    keys = saved_keys(tmp_path / "ours")
    assert keys == saved_keys(tmp_path / "peft")
    rows = {k: s for k, s in keys.items() if k.endswith("trainable_tokens_delta")}
    indices = ALL[case]["kwargs"].get("token_indices") or ALL[case]["kwargs"]["trainable_token_indices"]
    count = len(indices if isinstance(indices, list) else next(iter(indices.values())))
    assert rows and all(shape == (count, 32) for shape in rows.values())
    # PEFT's TrainableTokens saves the tied head's rows too; its LoRA wrapper does not
    assert ("base_model.model.lm_head.trainable_tokens_delta" in keys) == (case == "trainable_tokens-gpt2")


def test_default_save_holds_no_base_embedding(tmp_path):
    _ours("trainable_tokens-llama").save_pretrained(tmp_path)
    assert not any(k.endswith(".weight") for k in saved_keys(tmp_path))


def test_fresh_adapter_is_a_no_op_and_only_its_rows_differ_from_the_base():
    model = onnx_peft.get_peft_model(tiny_llama(), TrainableTokensConfig(**CASES["trainable_tokens-llama"]["kwargs"]))
    x = _ids()
    assert max_diff(run(model, x), run(tiny_llama(), x)) == 0.0

    perturb_trainable(model, 0)
    layer = model.base_model.model.model.embed_tokens
    changed = (layer.replaced_table(["default"]) != layer.base_layer.weight).any(-1).nonzero().flatten().tolist()
    assert changed == [3, 5, 9, 17]


def test_tied_head_follows_the_embedding_rows():
    model = _ours("trainable_tokens-gpt2")
    head = model.base_model.model.lm_head
    assert isinstance(head, TiedTokensLayer)
    hidden = torch.randn(1, 3, 32)
    table = model.base_model.model.transformer.wte.replaced_table(["default"])
    with torch.no_grad():
        assert max_diff(head(hidden), hidden @ table.T) <= TOL


# -- (b) merging -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(ALL))
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(case):
    # rows are written back exactly; LoRA's W + dW - dW rounds
    assert_merge_verbs(_ours(case), _ids(), (TrainableTokensLayer, TiedTokensLayer),
                       restores_state_to=1e-6 if case in LORA_CASES else 0.0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_merged_weight_on_numpy_equals_the_torch_merge(case):
    model = _ours(case)
    config = model.peft_config["default"]
    path, layer = next((n, m) for n, m in model.base_model.model.named_modules() if isinstance(m, TrainableTokensLayer))
    table = layer.base_layer.weight.detach().numpy().copy()
    rows = layer.deltas["default"].detach().numpy().copy()

    model.merge_adapter()

    merged, _ = METHOD.merged_weight(config, path, table, None, {"trainable_tokens_delta": rows}, {})
    assert isinstance(merged, np.ndarray)
    assert np.abs(merged - layer.base_layer.weight.detach().numpy()).max() == 0.0
    assert np.abs(merged[config.token_indices] - rows).max() == 0.0
    head = model.base_model.model.get_output_embeddings()
    tied = CASES[case]["model"] == "gpt2"
    assert (np.abs(head.weight.detach().numpy() - merged).max() == 0.0) == tied


def test_adapters_training_the_same_token_cannot_run_together():
    model = _ours("trainable_tokens-llama")
    model.add_adapter("other", TrainableTokensConfig(token_indices=[5, 40], target_modules=["embed_tokens"]))
    model.set_adapter(["default", "other"])

    with pytest.raises(OnnxPeftError, match="both train token 5"):
        run(model, _ids())


def test_two_adapters_with_disjoint_tokens_merge_like_they_run():
    model = _ours("trainable_tokens-gpt2", seed=0)
    model.add_adapter("other", TrainableTokensConfig(token_indices=[5, 40], target_modules=["wte"]))
    perturb_trainable(model, seed=3, select=(".other",))
    model.set_adapter(["default", "other"])
    x = _ids()
    both = run(model, x)

    model.merge_adapter()

    assert max_diff(run(model, x), both) <= TOL
    assert max_diff(both, run(_ours("trainable_tokens-gpt2"), x)) > 1e-3


# -- (c) training ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["trainable_tokens-gpt2", "lora-tokens-llama"])
def test_training_lowers_the_loss_and_changes_only_adapter_tensors(case):
    torch.manual_seed(0)
    model = _ours(case).train()
    before = snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)

    losses = train_steps(model, _ids(), optimizer, steps=6)

    changed = changed_since(model, before)
    assert losses[-1] < losses[0] - 1e-3
    assert changed == {k for k in before if ".trainable_tokens_delta." in k or ".lora_" in k}


# -- (d) errors --------------------------------------------------------------------------------
def test_unsupported_module_type_raises_naming_module_and_types():
    with pytest.raises(AdapterConfigError, match=r"model\.layers\.0\.self_attn\.q_proj \(Linear\).*TrainableTokens.*nn\.Embedding"):
        onnx_peft.get_peft_model(tiny_llama(), TrainableTokensConfig(token_indices=[1], target_modules=["q_proj"]))


@pytest.mark.parametrize("indices, message", [([1, -2], "negative"), ([3, 3], "twice"), ("1,2", "list of token ids")])
def test_bad_token_indices_raise_naming_the_field(indices, message):
    with pytest.raises(AdapterConfigError, match=f"TrainableTokensConfig.token_indices.*{message}"):
        TrainableTokensConfig(token_indices=indices, target_modules=["embed_tokens"])
    with pytest.raises(AdapterConfigError, match=f"LoraConfig.trainable_token_indices.*{message}"):
        onnx_peft.LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": indices})


def test_token_outside_the_vocabulary_and_unknown_embedding_are_named():
    with pytest.raises(AdapterConfigError, match="model.embed_tokens: token id 64 is outside"):
        onnx_peft.get_peft_model(tiny_llama(), TrainableTokensConfig(token_indices=[64], target_modules=["embed_tokens"]))
    with pytest.raises(AdapterConfigError, match="trainable_token_indices names 'tok_emb'.*no module"):
        onnx_peft.get_peft_model(tiny_llama(), onnx_peft.LoraConfig(target_modules=["q_proj"],
                                                                    trainable_token_indices={"tok_emb": [1]}))


def test_rows_that_disagree_with_the_config_are_refused():
    with pytest.raises(IncompatibleAdapterError, match="model.embed_tokens has 2 trained token rows.*3 token ids"):
        METHOD.slot_tensors(TrainableTokensConfig(token_indices=[1, 2, 3]), "model.embed_tokens",
                            {"trainable_tokens_delta": np.ones((2, 32), np.float32)}, {}, lambda: None)


# -- (e) slot tensors --------------------------------------------------------------------------
def test_tokens_slots_are_exact_against_the_peft_embedding_and_tied_head():
    model = _peft("trainable_tokens-gpt2", seed=3)
    inner = model.base_model.model
    config = TrainableTokensConfig(**CASES["trainable_tokens-gpt2"]["kwargs"])
    rows = inner.transformer.wte.trainable_tokens_delta["default"].detach().numpy()
    slots = METHOD.slot_tensors(config, "transformer.wte", {"trainable_tokens_delta": rows}, {}, lambda: None)["tokens"]
    table = inner.transformer.wte.base_layer.weight.detach().numpy()
    ids = _ids().numpy()
    hidden = np.random.default_rng(0).standard_normal((2, 7, 32)).astype(np.float32)

    hot = (ids[..., None] == slots["trainable_tokens.indices"]).astype(np.float32)      # [b, s, k]
    y = table[ids]
    embedded = y - y * hot.sum(-1, keepdims=True) + hot @ slots["trainable_tokens.rows"]
    cols = (slots["trainable_tokens.indices"][:, None] == np.arange(64)).astype(np.float32)  # [k, vocab]
    logits = hidden @ table.T
    logits = logits - logits * cols.sum(0) + (hidden @ slots["trainable_tokens.rows"].T) @ cols
    with torch.no_grad():
        assert np.abs(embedded - inner.transformer.wte(torch.from_numpy(ids)).numpy()).max() <= TOL
        assert np.abs(logits - inner.lm_head(torch.from_numpy(hidden)).numpy()).max() <= TOL
    assert slots["trainable_tokens.indices"].dtype == np.int64


# -- (f) the tokens form on an embedding lookup and on a tied head ----------------------------
VOCAB, HID = 10, 4


def _tied_model() -> ir.Model:
    """ids [b, s] -> Gather(E [VOCAB, HID]) -> h -> MatMul(h, E^T) -> y [b, s, VOCAB]."""
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(0).standard_normal((VOCAB, HID)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb.weight", "ids"], ["h"], name="/emb/Gather"),
             helper.make_node("MatMul", ["h", "head.weight"], ["y"], name="/head/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", VOCAB])],
                              [numpy_helper.from_array(table, "emb.weight"),
                               numpy_helper.from_array(np.ascontiguousarray(table.T), "head.weight")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9
    return ir.from_proto(proto)


def _run_ids(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"ids": ids})[0]


def _value(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def test_tokens_form_plain_and_per_row_on_embedding_and_head_and_ungraft_restores_them():
    rng = np.random.default_rng(1)
    model = _tied_model()
    graph = model.graph
    ids = np.array([[1, 4, 2, 4], [3, 0, 4, 9]], np.int64)
    base = _run_ids(model, ids)
    table = graph.initializers["emb.weight"].const_value.numpy()
    slots = {"trainable_tokens.indices": np.array([4, 9], np.int64),
             "trainable_tokens.rows": rng.standard_normal((2, HID)).astype(np.float32)}
    new_table = table.copy()
    new_table[[4, 9]] = slots["trainable_tokens.rows"]
    expected = new_table[ids] @ new_table.T
    sites = {**find_embedding_sites(model), **find_linear_sites(model)}
    assert set(sites) == {"emb", "head"}

    for module in ("emb", "head"):
        graft(graph, sites[module], [(FORMS["tokens"], {k: _value(graph, f"{module}.{k}", v) for k, v in slots.items()})])
    assert np.abs(_run_ids(model, ids) - expected).max() <= TOL
    assert ungraft(graph, "emb") > 0 and ungraft(graph, "head") > 0
    np.testing.assert_array_equal(_run_ids(model, ids), base)

    padded = {"trainable_tokens.indices": np.stack([default_array((2,), "minus_one", np.int64), slots[
        "trainable_tokens.indices"]]), "trainable_tokens.rows": np.stack([np.zeros((2, HID), np.float32),
                                                                          slots["trainable_tokens.rows"]])}
    sites = {**find_embedding_sites(model), **find_linear_sites(model)}
    for module in ("emb", "head"):
        graft(graph, sites[module], [(FORMS["tokens"], {k: _value(graph, f"{module}.{k}.rows", v)
                                                        for k, v in padded.items()})], batched=True)
    out = _run_ids(model, ids)
    assert np.abs(out[0] - base[0]).max() <= TOL  # row 0: ids -1 match no token
    assert np.abs(out[1] - expected[1]).max() <= TOL


# -- (g) LoRA + token rows through the ONNX paths, tied head included ------------------------
def test_lora_with_token_rows_on_tied_gpt2_through_insert_merge_convert_session_and_banks(tmp_path):
    from onnx_peft import export
    from onnx_peft.convert import convert_adapters
    from onnx_peft.passes.insert_adapters import insert_adapters
    from onnx_peft.passes.merge_adapters import merge_adapters
    from onnx_peft.passes.multi_adapter import multi_adapter
    from onnx_peft.runtime import AdapterSession

    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    adapter = _peft("lora-tokens-gpt2", seed=5)
    adapter.save_pretrained(tmp_path / "a")
    ids = _ids().numpy()
    expected, plain = run(adapter, _ids()).numpy(), run(copy.deepcopy(base), _ids()).numpy()
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    base_onnx = export(tmp_path / "base", tmp_path / "base_onnx", task="causal-lm", quiet=True)

    merged = AdapterSession(merge_adapters(base_onnx, tmp_path / "merged" / "model.onnx", tmp_path / "a"))
    assert np.abs(merged.run(["logits"], feeds)[0] - expected).max() <= TOL
    model = insert_adapters(base_onnx, {"a": tmp_path / "a"}, tmp_path / "inserted")
    session = AdapterSession(model)
    session.load_adapter("dir", tmp_path / "a")  # the head's slots mirror the embedding's rows
    assert np.abs(session.run(["logits"], feeds, adapter="dir")[0] - expected).max() <= TOL
    assert np.abs(session.run(["logits"], feeds)[0] - plain).max() <= TOL
    converted = convert_adapters(tmp_path / "a", model, output_path=tmp_path / "a.onnx_adapter")
    banks = AdapterSession(multi_adapter(model, tmp_path / "multi"))
    banks.load_adapter("a", converted)
    rows = banks.run(["logits"], feeds, adapter=["a", None])[0]
    assert np.abs(rows[0] - expected[0]).max() <= TOL
    assert np.abs(rows[1] - plain[1]).max() <= TOL


def test_target_modules_default_to_the_input_embedding():
    import peft

    theirs = peft.get_peft_model(tiny_llama(), peft.TrainableTokensConfig(token_indices=[1, 2]))
    ours = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.TrainableTokensConfig(token_indices=[1, 2]))
    assert ours.peft_config["default"].target_modules in (theirs.peft_config["default"].target_modules,
                                                          [theirs.peft_config["default"].target_modules])
