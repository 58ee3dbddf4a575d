"""Llama-Adapter (ADAPTION_PROMPT) against HF PEFT, on numbers: forward and greedy generate,
checkpoints both ways, training, the refusal to merge, config errors, and the ONNX export
(in-graph; and mode "inputs": prompts and gates as graph inputs, adapters of any adapter_len
swapped per run in AdapterSession, no adapter = the base), fp32 <= 1e-5, greedy tokens equal.

tiny_llama has grouped-query attention (4 query heads, 2 KV heads), so the prompt keys and
values are repeated per group as in PEFT.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import (
    TOL,
    assert_training_changes_only,
    max_diff,
    perturb_trainable,
    run,
    saved_keys,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)

import onnx_peft
from onnx_peft.convert import convert_adapters
from onnx_peft.errors import AdapterConfigError, IncompatibleAdapterError, RuntimeSessionError
from onnx_peft.methods.adaption_prompt import AdaptionPromptConfig
from onnx_peft.methods.base import method_for
from onnx_peft.runtime import AdapterSession, example_feeds
from onnx_peft.tuners.adaption_prompt import AdaptedAttention

peft = pytest.importorskip("peft")

KWARGS = dict(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM")
METHOD = method_for("ADAPTION_PROMPT")
# left-padded prompts: row 1 starts with two padding tokens
PROMPTS = np.array([[5, 9, 14, 3, 22, 7], [0, 0, 31, 8, 17, 40]], np.int64)
MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], np.int64)


def _peft(seed: int = 0, **kwargs):
    """PEFT's model with prompts and gates moved off their init (a zero gate is a no-op)."""
    model = peft.get_peft_model(tiny_llama(), peft.AdaptionPromptConfig(**{**KWARGS, **kwargs}))
    perturb_trainable(model, seed, scale=0.5)
    return model.eval()


def _ours_like(theirs, **kwargs):
    """Ours, holding PEFT's adapter tensors (copied by PEFT checkpoint key)."""
    ours = onnx_peft.get_peft_model(tiny_llama(), AdaptionPromptConfig(**{**KWARGS, **kwargs}))
    state = theirs.state_dict()
    with torch.no_grad():
        for key, tensor in ours.adapter_state_dict("default").items():
            tensor.copy_(state[key])
    return ours.eval()


def _generate(model, new: int = 6) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(torch.from_numpy(PROMPTS), attention_mask=torch.from_numpy(MASK), max_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    return out.numpy()


# -- PyTorch parity --------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 2])
def test_forward_and_greedy_generate_equal_peft(layers):
    theirs = _peft(adapter_layers=layers)
    ours = _ours_like(theirs, adapter_layers=layers)
    x = token_ids()

    assert max_diff(run(ours, x), run(theirs, x)) <= TOL
    assert max_diff(run(ours, x), run(tiny_llama(), x)) > 1e-2  # the prompts really change the output
    assert np.array_equal(_generate(ours), _generate(theirs))


def _tiny_mistral() -> torch.nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return MistralForCausalLM(config).eval()


def test_mistral_forward_equals_peft():
    theirs = peft.get_peft_model(_tiny_mistral(), peft.AdaptionPromptConfig(**KWARGS))
    perturb_trainable(theirs, 6, scale=0.5)
    ours = onnx_peft.get_peft_model(_tiny_mistral(), AdaptionPromptConfig(**KWARGS))
    with torch.no_grad():
        for key, tensor in ours.adapter_state_dict("default").items():
            tensor.copy_(theirs.state_dict()[key])
    x = token_ids()

    assert max_diff(run(ours, x), run(theirs, x)) <= TOL
    assert max_diff(run(ours, x), run(_tiny_mistral(), x)) > 1e-2


def test_wraps_the_top_layers_attention_with_peft_shapes():
    model = onnx_peft.get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=5, adapter_layers=1))
    shapes = {k: tuple(v.shape) for k, v in model.adapter_state_dict("default").items()}

    assert shapes == {"base_model.model.model.layers.1.self_attn.adaption_prompt": (1, 5, 32),
                      "base_model.model.model.layers.1.self_attn.adaption_gate": (1,)}
    assert model.peft_config["default"].target_modules == "self_attn"  # filled in as PEFT does
    assert max_diff(run(model, token_ids()), run(tiny_llama(), token_ids())) == 0.0  # zero gate: a no-op


def test_disable_switch_and_delete_adapters():
    ours = _ours_like(_peft(seed=1))
    ours.add_adapter("other", AdaptionPromptConfig(**KWARGS))
    perturb_trainable(ours, 5, scale=0.5, select=(".other",))
    x = token_ids()
    first = run(ours, x)

    with ours.disable_adapter():
        assert max_diff(run(ours, x), run(tiny_llama(), x)) == 0.0
    ours.set_adapter("other")
    assert max_diff(run(ours, x), first) > 1e-2
    ours.delete_adapter("other")
    assert max_diff(run(ours, x), first) == 0.0


# -- checkpoints both ways -------------------------------------------------------------------
def test_peft_saved_adapter_loads_here_with_same_logits_keys_and_config(tmp_path):
    theirs = _peft(seed=2)
    theirs.save_pretrained(tmp_path / "peft")
    ours = onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")

    assert max_diff(run(ours, token_ids()), run(theirs, token_ids())) <= TOL
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "peft")
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    fields = ("peft_type", "target_modules", "adapter_len", "adapter_layers", "task_type")
    assert {f: ours_config[f] for f in fields} == {f: peft_config[f] for f in fields}


def test_adapter_saved_here_loads_in_peft_with_same_logits(tmp_path):
    ours = _ours_like(_peft(seed=3))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)

    assert max_diff(run(theirs, token_ids()), run(ours, token_ids())) <= TOL
    assert max_diff(run(theirs, token_ids()), run(tiny_llama(), token_ids())) > 1e-2


# -- training --------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_changes_only_prompts_and_gates():
    changed = assert_training_changes_only(
        lambda: onnx_peft.get_peft_model(tiny_llama(), AdaptionPromptConfig(**KWARGS)),
        (".adaption_prompt.", ".adaption_gate."), lr=5e-2)
    assert len(changed) == 4  # prompt and gate of both layers


# -- no merged form --------------------------------------------------------------------------
def test_merging_is_refused_in_torch_in_the_method_and_in_merged_export(tmp_path):
    model = _ours_like(_peft())
    config = model.peft_config["default"]
    parts = {"adaption_prompt": np.zeros((1, 3, 32), np.float32), "adaption_gate": np.zeros(1, np.float32)}

    with pytest.raises(AdapterConfigError, match="cannot be merged.*'in-graph' or 'inputs'"):
        model.merge_and_unload()
    with pytest.raises(AdapterConfigError, match="model.layers.1.self_attn.*cannot be merged"):
        METHOD.merged_weight(config, "model.layers.1.self_attn", None, None, parts, {})
    with pytest.raises(AdapterConfigError, match="cannot be merged"):
        onnx_peft.export(model, tmp_path / "merged", task="causal-lm", mode="merged", quiet=True)
    assert max_diff(run(model, token_ids()), run(_ours_like(_peft()), token_ids())) == 0.0  # model untouched


# -- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(adapter_len=0, adapter_layers=1), "adapter_len"),
    (dict(adapter_len=2, adapter_layers=None), "adapter_layers"),
    (dict(adapter_len=2, adapter_layers=1, target_modules=["self_attn"]), "target_modules"),
    (dict(adapter_len=2, adapter_layers=1, target_modules="all-linear"), "target_modules"),
])
def test_bad_config_field_raises_naming_it(kwargs, field):
    with pytest.raises(AdapterConfigError, match=f"AdaptionPromptConfig.{field}"):
        AdaptionPromptConfig(**kwargs)


def test_unsupported_model_too_many_layers_and_wrong_module_raise_clearly():
    with pytest.raises(AdapterConfigError, match="model types llama, mistral.*'gpt2'"):
        onnx_peft.get_peft_model(tiny_gpt2(), AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    with pytest.raises(AdapterConfigError, match="adapter_layers=3.*2 modules named 'self_attn'"):
        onnx_peft.get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=2, adapter_layers=3))
    base = tiny_llama()
    with pytest.raises(AdapterConfigError, match=r"model\.layers\.1\.mlp \(LlamaMLP\).*q_proj"):
        onnx_peft.get_peft_model(base, AdaptionPromptConfig(adapter_len=2, adapter_layers=1, target_modules="mlp"))
    assert not any(isinstance(m, AdaptedAttention) for m in base.modules())  # nothing left half-wrapped


# -- ONNX: in-graph ---------------------------------------------------------------------------
def _torch_logits(model, feeds) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(feeds["input_ids"])).logits.numpy()


def test_in_graph_export_runs_like_torch(tmp_path):
    """Decoding with the KV cache is checked on the slot model below (the same traced forward)."""
    ours = _ours_like(_peft(seed=4))
    feeds = {"input_ids": PROMPTS, "attention_mask": MASK}
    with torch.no_grad():
        expected = ours(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()

    path = onnx_peft.export(ours, tmp_path / "lm", task="causal-lm", quiet=True)
    logits = AdapterSession(path).run(["logits"], feeds)[0]

    assert AdapterSession(path).contract.slots == []  # the prompts are constants of the graph
    assert np.abs(logits - expected)[MASK.astype(bool)].max() <= TOL


# -- ONNX: mode "inputs" (slots) ---------------------------------------------------------------
SLOTS = ("model.layers.0.self_attn.adaption_prompt", "model.layers.0.self_attn.adaption_gate",
         "model.layers.1.self_attn.adaption_prompt", "model.layers.1.self_attn.adaption_gate")


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    """A base folder and two PEFT-saved adapters (5 prompt tokens on both layers; 1 token on the
    top layer only) exported together with mode 'inputs', with the KV cache."""
    root = tmp_path_factory.mktemp("adaption_inputs")
    tiny_llama().save_pretrained(root / "base")
    adapters = {"long": _peft(seed=5, adapter_len=5), "short": _peft(seed=6, adapter_len=1, adapter_layers=1)}
    for name, model in adapters.items():
        model.save_pretrained(root / name)
    path = onnx_peft.export(root / "base", root / "deploy", adapters={n: root / n for n in adapters},
                            task="causal-lm-with-past", mode="inputs", quiet=True)
    return root, path, adapters


def test_inputs_export_swaps_adapters_of_any_length_and_no_adapter_is_the_base(deploy):
    root, path, adapters = deploy
    session = AdapterSession(path)
    session.load_adapter("long", root / "deploy" / "adapters" / "long.onnx_adapter")
    session.load_adapter("short", root / "short")  # a PEFT dir, converted at load
    feeds = example_feeds(session, batch=2, sequence=6)

    slots = {s.name: (s.shape, s.method, s.default) for s in session.contract.slots}
    assert slots == {name: ((1, f"adapter_len.{name.rsplit('.', 1)[0]}", 32) if name.endswith("prompt") else (1,),
                            "adaption_prompt", "zeros") for name in SLOTS}
    assert sorted(p.name for p in (root / "deploy" / "adapters").iterdir()) == ["long.onnx_adapter",
                                                                                 "short.onnx_adapter"]
    assert session.input_names == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")]
    for name, model in [("long", adapters["long"]), ("short", adapters["short"]), (None, tiny_llama())]:
        got = session.run(["logits"], feeds, adapter=name)[0]
        assert max_diff(torch.from_numpy(got), torch.from_numpy(_torch_logits(model, feeds))) <= TOL, name


def test_inputs_export_decodes_each_adapter_like_peft_generate(deploy):
    root, path, adapters = deploy
    session = AdapterSession(path)
    for name in adapters:
        session.load_adapter(name, root / name)

    for name, model in [*adapters.items(), (None, tiny_llama())]:
        tokens = session.generate(PROMPTS, 6, adapter=name, attention_mask=MASK, pad_token_id=0)
        assert np.array_equal(tokens, _generate(model)), name


def _other_llama(hidden: int = 32, layers: int = 2, bias: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_bias=bias)
    return LlamaForCausalLM(config).eval()


def test_an_adapter_of_another_model_raises_naming_the_slot(deploy, tmp_path):
    _, path, _ = deploy
    session = AdapterSession(path)
    wider = peft.get_peft_model(_other_llama(hidden=64), peft.AdaptionPromptConfig(**KWARGS))
    wider.save_pretrained(tmp_path / "wider")
    deeper = peft.get_peft_model(_other_llama(layers=3), peft.AdaptionPromptConfig(**{**KWARGS, "adapter_layers": 1}))
    deeper.save_pretrained(tmp_path / "deeper")

    with pytest.raises(IncompatibleAdapterError,
                       match=r"'model\.layers\.\d\.self_attn\.adaption_prompt' has shape \[1, 3, 64\].*\[1, 'adapter_len"):
        session.load_adapter("wider", tmp_path / "wider")
    with pytest.raises(IncompatibleAdapterError, match=r"'model\.layers\.2\.self_attn\.adaption_\w+' matches no slot"):
        session.load_adapter("deeper", tmp_path / "deeper")
    with pytest.raises(IncompatibleAdapterError, match="adaption_prompt' has shape"):
        convert_adapters(tmp_path / "wider", path, output_path=tmp_path / "wider.onnx_adapter")
    assert session.adapters == []


def test_convert_adapters_writes_a_slot_file_and_rows_cannot_mix_adapters(deploy, tmp_path):
    root, path, adapters = deploy
    written = convert_adapters(root / "short", path, output_path=tmp_path / "short.onnx_adapter")
    session = AdapterSession(path)
    session.load_adapter("short", written)
    session.load_adapter("long", root / "long")
    feeds = example_feeds(session, batch=2, sequence=6)

    got = session.run(["logits"], feeds, adapter=["short", "short"])[0]
    assert max_diff(torch.from_numpy(got), torch.from_numpy(_torch_logits(adapters["short"], feeds))) <= TOL
    with pytest.raises(RuntimeSessionError, match="one adapter per run"):
        session.run(["logits"], feeds, adapter=["short", "long"])


def test_inputs_export_of_a_peft_model_writes_its_adapter_and_takes_others(tmp_path):
    theirs = _peft(seed=7)
    ours = _ours_like(theirs)
    other = _peft(seed=8, adapter_len=4)
    other.save_pretrained(tmp_path / "other")
    before = run(ours, token_ids())

    path = onnx_peft.export(ours, tmp_path / "deploy", task="causal-lm", mode="inputs", quiet=True)
    session = AdapterSession(path)
    session.load_adapter("default", tmp_path / "deploy" / "adapters" / "default.onnx_adapter")
    session.load_adapter("other", tmp_path / "other")
    feeds = {"input_ids": token_ids().numpy(), "attention_mask": np.ones((2, 7), np.int64)}

    assert json.loads((tmp_path / "deploy" / "export_info.json").read_text())["exporter"] == "dynamo"
    for name, model in [("default", theirs), ("other", other), (None, tiny_llama())]:
        got = session.run(["logits"], feeds, adapter=name)[0]
        assert max_diff(torch.from_numpy(got), run(model, token_ids())) <= TOL, name
    assert max_diff(run(ours, token_ids()), before) == 0.0  # the model passed in is unchanged


def test_inputs_export_refuses_what_it_cannot_serve(tmp_path):
    """external and quantize modes, mixed methods, Hugging Face's PeftModel (its layers are not
    ours: export the saved folder), two active adapters, and an o_proj bias (an empty prompt
    would still add it)."""
    _peft(seed=1).save_pretrained(tmp_path / "ap")
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    ours = _ours_like(_peft())

    with pytest.raises(AdapterConfigError, match="mode 'external' serves LoRA adapters only.*mode='inputs'"):
        onnx_peft.export(ours, tmp_path / "x", task="causal-lm", mode="external", quiet=True)
    with pytest.raises(AdapterConfigError, match="quantize= is not supported with Llama-Adapter"):
        onnx_peft.export(ours, tmp_path / "x", task="causal-lm", mode="inputs", quantize="int4", quiet=True)
    with pytest.raises(AdapterConfigError, match=r"adapters \['lora'\] are not Llama-Adapter"):
        onnx_peft.export(tiny_llama(), tmp_path / "x", adapters={"ap": tmp_path / "ap", "lora": tmp_path / "lora"},
                         task="causal-lm", mode="inputs", quiet=True)
    with pytest.raises(AdapterConfigError, match="no onnx-peft Llama-Adapter layers.*adapters=DIR"):
        onnx_peft.export(_peft(), tmp_path / "x", task="causal-lm", mode="inputs", quiet=True)
    ours.add_adapter("other", AdaptionPromptConfig(**KWARGS))
    ours.set_adapter(["default", "other"])
    with pytest.raises(AdapterConfigError, match=r"adapters \['default', 'other'\] are active together"):
        onnx_peft.export(ours, tmp_path / "x", task="causal-lm", mode="inputs", quiet=True)
    biased = onnx_peft.get_peft_model(_other_llama(bias=True), AdaptionPromptConfig(**KWARGS))
    with pytest.raises(AdapterConfigError, match=r"model\.layers\.0\.self_attn\.o_proj has a bias.*mode='in-graph'"):
        onnx_peft.export(biased, tmp_path / "x", task="causal-lm", mode="inputs", quiet=True)
    assert not (tmp_path / "x").exists()
