"""Adapters move both ways between HF PEFT and onnx-peft with the same outputs (fp32, <= 1e-5).

Each case: create an adapter with one library, give it random weights (fresh LoRA is a
no-op), save it, load it into a fresh copy of the base model with the other library, and
compare logits. The saved tensor keys and shapes must match too.
"""

from __future__ import annotations

import pytest
from tiny_models import (
    image_batch,
    max_diff,
    randomize_adapters,
    run,
    saved_keys,
    tiny_bert_cls,
    tiny_cnn,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)

import onnx_peft

peft = pytest.importorskip("peft")

TOL = 1e-5

# name -> (base builder, input builder, LoraConfig kwargs shared by both libraries)
CASES = {
    "llama-all-linear": (tiny_llama, token_ids, dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "llama-rslora-patterns": (tiny_llama, token_ids, dict(
        r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"down_proj": 3})),
    "llama-dora": (tiny_llama, token_ids, dict(r=4, lora_alpha=8, use_dora=True,
                                               target_modules=["q_proj", "o_proj", "up_proj"])),
    "llama-embedding": (tiny_llama, token_ids, dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "k_proj"])),
    "llama-embedding-dora": (tiny_llama, token_ids, dict(r=4, lora_alpha=4, use_dora=True,
                                                         target_modules=["embed_tokens"])),
    "llama-regex": (tiny_llama, token_ids, dict(r=2, lora_alpha=4,
                                                target_modules=r".*layers\.1\.mlp\.(gate|up)_proj")),
    "llama-layers-to-transform": (tiny_llama, token_ids, dict(
        r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")),
    "llama-exclude": (tiny_llama, token_ids, dict(r=2, target_modules="all-linear",
                                                  exclude_modules=["o_proj", "down_proj"])),
    "llama-lm-head-saved": (tiny_llama, token_ids, dict(r=2, target_modules=["q_proj"],
                                                        modules_to_save=["lm_head"])),
    "gpt2-conv1d": (tiny_gpt2, token_ids, dict(r=4, lora_alpha=8, fan_in_fan_out=True,
                                               target_modules=["c_attn", "c_proj", "c_fc"])),
    "gpt2-conv1d-dora": (tiny_gpt2, token_ids, dict(r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True,
                                                    target_modules=["c_attn", "c_fc"])),
    "gpt2-conv1d-fan-in-fan-out-unset": (tiny_gpt2, token_ids, dict(r=2, target_modules=["c_proj"])),
    "llama-fan-in-fan-out-on-linear": (tiny_llama, token_ids, dict(r=2, fan_in_fan_out=True,
                                                                   target_modules=["q_proj", "up_proj"])),
    # PiSSA/OLoRA re-run on load (as PEFT does), so the base becomes the trained-on residual
    "llama-pissa": (tiny_llama, token_ids, dict(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                target_modules=["q_proj", "down_proj"])),
    "llama-olora": (tiny_llama, token_ids, dict(r=4, lora_alpha=8, init_lora_weights="olora",
                                                target_modules=["k_proj", "up_proj"])),
    "gpt2-pissa": (tiny_gpt2, token_ids, dict(r=4, fan_in_fan_out=True, init_lora_weights="pissa",
                                              target_modules=["c_attn"])),
    "gpt2-embedding": (tiny_gpt2, token_ids, dict(r=3, lora_alpha=6, target_modules=["wte", "wpe"])),
    "gpt2-bias-all": (tiny_gpt2, token_ids, dict(r=2, fan_in_fan_out=True, bias="all", target_modules=["c_attn"])),
    "gpt2-bias-lora-only": (tiny_gpt2, token_ids, dict(r=2, fan_in_fan_out=True, bias="lora_only",
                                                       target_modules=["c_attn"])),
    "bert-seq-cls": (tiny_bert_cls, token_ids, dict(r=4, lora_alpha=8, task_type="SEQ_CLS",
                                                    target_modules=["query", "value"], modules_to_save=["classifier"])),
    "bert-seq-cls-implicit-head": (tiny_bert_cls, token_ids, dict(r=4, task_type="SEQ_CLS",
                                                                  target_modules=["query", "value"])),
    "cnn-conv": (tiny_cnn, image_batch, dict(r=3, lora_alpha=6, target_modules=["conv1", "conv2", "conv1d", "fc"])),
    "cnn-conv-dora": (tiny_cnn, image_batch, dict(r=3, lora_alpha=6, use_dora=True,
                                                  target_modules=["conv1", "conv2", "conv1d", "fc"])),
}


def _peft_config(kwargs: dict) -> peft.LoraConfig:
    return peft.LoraConfig(**kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_saved_here_loads_in_peft_with_same_outputs(case, tmp_path):
    build, inputs, kwargs = CASES[case]
    ours = onnx_peft.get_peft_model(build(), onnx_peft.LoraConfig(**kwargs))
    randomize_adapters(ours, seed=1)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(build(), tmp_path).eval()

    x = inputs()
    assert max_diff(run(ours, x), run(theirs, x)) <= TOL
    assert max_diff(run(ours, x), run(build(), x)) > 1e-3  # the adapter really changes the output


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_saved_by_peft_loads_here_with_same_outputs(case, tmp_path):
    build, inputs, kwargs = CASES[case]
    theirs = peft.get_peft_model(build(), _peft_config(kwargs))
    randomize_adapters(theirs, seed=2)
    theirs.save_pretrained(tmp_path)

    ours = onnx_peft.PeftModel.from_pretrained(build(), tmp_path).eval()

    x = inputs()
    assert max_diff(run(ours, x), run(theirs.eval(), x)) <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_tensor_keys_and_shapes_equal_peft(case, tmp_path):
    build, _, kwargs = CASES[case]
    onnx_peft.get_peft_model(build(), onnx_peft.LoraConfig(**kwargs)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(build(), _peft_config(kwargs)).save_pretrained(tmp_path / "peft")

    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "peft")


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_modules_are_adapted_as_in_peft(case):
    build, _, kwargs = CASES[case]
    ours = onnx_peft.get_peft_model(build(), onnx_peft.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(build(), _peft_config(kwargs))

    assert sorted(n for n, _ in ours.named_parameters()) == sorted(n for n, _ in theirs.named_parameters())
    trainable_ours = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    trainable_theirs = sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    assert trainable_ours == trainable_theirs


@pytest.mark.parametrize("case", sorted(CASES))
def test_print_trainable_parameters_matches_peft(case, capsys):
    build, _, kwargs = CASES[case]
    onnx_peft.get_peft_model(build(), onnx_peft.LoraConfig(**kwargs)).print_trainable_parameters()
    ours = capsys.readouterr().out
    peft.get_peft_model(build(), _peft_config(kwargs)).print_trainable_parameters()
    theirs = capsys.readouterr().out

    assert ours == theirs
    assert ours.startswith("trainable params: ")


@pytest.mark.parametrize("case", ["llama-dora", "gpt2-conv1d", "gpt2-conv1d-dora", "cnn-conv", "cnn-conv-dora",
                                  "llama-embedding-dora", "bert-seq-cls"])
def test_merged_weights_equal_peft_merged_weights(case, tmp_path):
    build, inputs, kwargs = CASES[case]
    theirs = peft.get_peft_model(build(), _peft_config(kwargs))
    randomize_adapters(theirs, seed=3)
    theirs.save_pretrained(tmp_path)
    ours = onnx_peft.PeftModel.from_pretrained(build(), tmp_path)

    merged_ours = ours.merge_and_unload().state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()

    assert merged_ours.keys() == merged_theirs.keys()
    for key in merged_ours:
        assert max_diff(merged_ours[key], merged_theirs[key]) <= TOL, key


def test_config_written_here_is_read_by_peft_with_same_fields(tmp_path):
    kwargs = CASES["llama-rslora-patterns"][2]
    onnx_peft.get_peft_model(tiny_llama(), onnx_peft.LoraConfig(**kwargs)).save_pretrained(tmp_path)

    loaded = peft.PeftConfig.from_pretrained(tmp_path)

    assert loaded.peft_type == peft.PeftType.LORA
    assert (loaded.r, loaded.lora_alpha, loaded.use_rslora) == (4, 16, True)
    assert loaded.rank_pattern == kwargs["rank_pattern"]
    assert loaded.alpha_pattern == kwargs["alpha_pattern"]
    assert set(loaded.target_modules) == set(kwargs["target_modules"])
    assert loaded.inference_mode is True


def test_two_adapters_saved_by_peft_load_into_subfolders_here(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.add_adapter("other", peft.LoraConfig(r=3, target_modules=["v_proj"]))
    randomize_adapters(theirs, seed=4)
    theirs.save_pretrained(tmp_path)

    ours = onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ours.load_adapter(tmp_path / "other", adapter_name="other")
    ours.set_adapter("other")
    theirs.set_adapter("other")

    x = token_ids()
    assert max_diff(run(ours, x), run(theirs.eval(), x)) <= TOL


def test_shared_default_fields_equal_peft_defaults():
    ours, theirs = onnx_peft.LoraConfig(), peft.LoraConfig()
    for name in ("r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "init_lora_weights",
                 "use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
                 "modules_to_save", "target_modules", "exclude_modules", "inference_mode"):
        assert getattr(ours, name) == getattr(theirs, name), name
