"""Llama-Adapter (ADAPTION_PROMPT) against HF PEFT, on numbers: forward and greedy generate,
checkpoints both ways, training, the refusal to merge, config errors, and the ONNX export
(in-graph logits, and decoding with the KV cache in AdapterSession), fp32 <= 1e-5.

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
from onnx_peft.errors import AdapterConfigError
from onnx_peft.methods.adaption_prompt import AdaptionPromptConfig
from onnx_peft.methods.base import method_for
from onnx_peft.runtime import AdapterSession
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
    torch.manual_seed(0)
    model = onnx_peft.get_peft_model(tiny_llama(), AdaptionPromptConfig(**KWARGS)).train()
    before = snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)

    losses = train_steps(model, token_ids(batch=4, seq=8), optimizer, steps=8)

    changed = changed_since(model, before)
    assert losses[-1] < losses[0] - 1e-3
    assert changed == {k for k in before if ".adaption_prompt." in k or ".adaption_gate." in k}
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
        METHOD.slot_tensors(config, "model.layers.1.self_attn", parts, {}, lambda: None)
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


# -- ONNX ------------------------------------------------------------------------------------
def test_in_graph_export_runs_like_torch_and_decodes_like_peft(tmp_path):
    theirs = _peft(seed=4)
    ours = _ours_like(theirs)
    feeds = {"input_ids": PROMPTS, "attention_mask": MASK}
    with torch.no_grad():
        expected = ours(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()

    path = onnx_peft.export(ours, tmp_path / "lm", task="causal-lm", quiet=True)
    logits = AdapterSession(path).run(["logits"], feeds)[0]
    decoder = onnx_peft.export(ours, tmp_path / "past", task="causal-lm-with-past", quiet=True)
    tokens = AdapterSession(decoder).generate(PROMPTS, 6, attention_mask=MASK, pad_token_id=0)

    assert np.abs(logits - expected)[MASK.astype(bool)].max() <= TOL
    assert np.array_equal(tokens, _generate(theirs))
