"""add_weighted_adapter: the combined adapter gives the same outputs as HF PEFT's.

Both libraries get identical adapters "a" and "b" (copied tensor by tensor), combine them with
the same arguments, activate the result and compare logits. DARE prunes at random: it is
checked against PEFT under the same seed, and at density 1 against linear / TIES.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    copy_adapter_state,
    image_batch,
    max_diff,
    randomize_adapters,
    run,
    tiny_cnn,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)

from onnx_peft import LoraConfig, get_peft_model
from onnx_peft.errors import AdapterConfigError

peft = pytest.importorskip("peft")

TOL = 1e-5

# kind -> (base builder, inputs, config of "a", config of "b"); same rank, different alphas and
# overlapping targets, so some layers hold only one of the two adapters.
MODELS = {
    "llama": (tiny_llama, token_ids,
              dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
              dict(r=4, lora_alpha=2, target_modules=["v_proj", "o_proj", "embed_tokens"])),
    "gpt2": (tiny_gpt2, token_ids,
             dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn"]),
             dict(r=4, lora_alpha=4, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"])),
    "cnn": (tiny_cnn, image_batch,
            dict(r=3, lora_alpha=3, target_modules=["conv1", "conv2", "fc"]),
            dict(r=3, lora_alpha=6, target_modules=["conv2", "fc"])),
}

DETERMINISTIC = [
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("svd", {"svd_rank": 2}),
    ("svd", {"svd_clamp": 0.9}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.7, "majority_sign_method": "frequency"}),
    ("ties_svd", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.4}),
    ("magnitude_prune_svd", {"density": 0.4}),
]


def _pair(kind: str):
    """Ours and PEFT's model with identical adapters "a" and "b"."""
    build, _, cfg_a, cfg_b = MODELS[kind]
    ours = get_peft_model(build(), LoraConfig(**cfg_a), adapter_name="a")
    ours.add_adapter("b", LoraConfig(**cfg_b))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**cfg_a), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(**cfg_b))
    randomize_adapters(theirs, seed=11)
    copy_adapter_state(theirs, ours)
    return ours, theirs.eval()


def _combine_both(kind, combination_type, weights=(0.7, -0.4), seed=None, **kwargs):
    ours, theirs = _pair(kind)
    for model in (ours, theirs):
        if seed is not None:
            torch.manual_seed(seed)
        model.add_weighted_adapter(["a", "b"], list(weights), "mix", combination_type=combination_type, **kwargs)
        model.set_adapter("mix")
    return ours, theirs


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("combination_type,kwargs", DETERMINISTIC, ids=lambda v: str(v))
def test_combined_adapter_outputs_equal_peft(kind, combination_type, kwargs):
    ours, theirs = _combine_both(kind, combination_type, **kwargs)
    x = MODELS[kind][1]()

    assert max_diff(run(ours, x), run(theirs, x)) <= TOL


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_outputs_equal_peft_under_the_same_seed(combination_type):
    ours, theirs = _combine_both("llama", combination_type, density=0.6, seed=123)
    x = token_ids()

    assert max_diff(run(ours, x), run(theirs, x)) <= TOL


@pytest.mark.parametrize("dare,exact", [("dare_linear", "linear"), ("dare_ties", "ties"),
                                        ("dare_linear_svd", "svd")])
def test_dare_with_density_one_equals_its_exact_counterpart(dare, exact):
    ours, _ = _pair("llama")
    ours.add_weighted_adapter(["a", "b"], [0.7, -0.4], "dare", combination_type=dare, density=1.0)
    ours.add_weighted_adapter(["a", "b"], [0.7, -0.4], "exact", combination_type=exact, density=1.0)
    x = token_ids()

    ours.set_adapter("dare")
    out_dare = run(ours, x)
    ours.set_adapter("exact")

    assert max_diff(out_dare, run(ours, x)) <= TOL


def test_dare_prunes_about_one_minus_density_of_each_factor():
    ours, _ = _pair("llama")
    torch.manual_seed(0)

    ours.add_weighted_adapter(["a"], [1.0], "single", combination_type="linear")
    ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "dare", combination_type="dare_linear", density=0.3)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj  # holds only "a"
    dense = layer.lora_A["single"].weight
    sparse = layer.lora_A["dare"].weight

    assert sparse.shape == dense.shape
    kept = (sparse != 0).float().mean().item()
    assert 0.2 < kept < 0.4
    nonzero = sparse != 0
    assert max_diff(sparse[nonzero], dense[nonzero] / 0.3) <= TOL


@pytest.mark.parametrize("combination_type,expected_r", [("linear", 4), ("cat", 8), ("svd", 4)])
def test_combined_config_rank_alpha_and_targets_equal_peft(combination_type, expected_r):
    ours, theirs = _combine_both("llama", combination_type)

    mine, their = ours.peft_config["mix"], theirs.peft_config["mix"]
    assert (mine.r, mine.lora_alpha) == (their.r, their.lora_alpha) == (expected_r, expected_r)
    assert set(mine.target_modules) == set(their.target_modules)


def test_combined_adapter_is_frozen_and_inactive_until_selected():
    ours, _ = _pair("llama")

    ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="cat")

    assert ours.active_adapters == ["a"]
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".mix." in n)


def test_cat_is_the_exact_sum_of_weighted_deltas():
    ours, _ = _pair("gpt2")
    ours.add_weighted_adapter(["a", "b"], [0.5, 2.0], "mix", combination_type="cat")
    layer = ours.base_model.model.transformer.h[1].attn.c_attn

    expected = 0.5 * layer.get_delta_weight("a") + 2.0 * layer.get_delta_weight("b")

    assert max_diff(layer.get_delta_weight("mix"), expected) <= TOL


def test_same_rank_methods_refuse_adapters_of_different_rank():
    ours = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    ours.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"]))

    with pytest.raises(AdapterConfigError, match=r"one rank, got \[2, 4\]"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="linear")
    assert "mix" not in ours.peft_config


@pytest.mark.parametrize("combination_type,kwargs,message", [
    ("ties", {}, "needs density"),
    ("ties", {"density": 0.5, "majority_sign_method": "median"}, "majority_sign_method"),
    ("blend", {}, "unknown combination_type 'blend'"),
])
def test_bad_arguments_are_typed_errors_and_add_nothing(combination_type, kwargs, message):
    ours, _ = _pair("llama")
    params = sorted(n for n, _ in ours.named_parameters())

    with pytest.raises(AdapterConfigError, match=message):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type=combination_type, **kwargs)

    assert "mix" not in ours.peft_config
    assert sorted(n for n, _ in ours.named_parameters()) == params


def test_unknown_adapter_and_weight_count_are_typed_errors():
    ours, _ = _pair("llama")

    with pytest.raises(AdapterConfigError, match="'zzz'"):
        ours.add_weighted_adapter(["a", "zzz"], [1.0, 1.0], "mix")
    with pytest.raises(AdapterConfigError, match="2 adapters but 1 weights"):
        ours.add_weighted_adapter(["a", "b"], [1.0], "mix")


def test_dora_adapters_cannot_be_combined():
    ours = get_peft_model(tiny_llama(), LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]), adapter_name="a")
    ours.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))

    with pytest.raises(AdapterConfigError, match="DoRA"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="linear")


def test_ia3_weighted_adapter_equals_peft():
    """PEFT supports add_weighted_adapter for IA3 too: the weighted sum of the scaling vectors."""
    import peft
    from tiny_models import TOL, perturb_trainable, tiny_llama

    import onnx_peft

    ids = torch.tensor([[5, 6, 7, 8]])
    kwargs_a = dict(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    kwargs_b = dict(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])
    theirs = peft.get_peft_model(tiny_llama(), peft.IA3Config(**kwargs_a))
    theirs.add_adapter("b", peft.IA3Config(**kwargs_b))
    perturb_trainable(theirs, select=("ia3_l",), around=1.0)
    ours = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.IA3Config(**kwargs_a))
    ours.add_adapter("b", onnx_peft.IA3Config(**kwargs_b))
    ours.load_state_dict(theirs.state_dict())
    theirs.add_weighted_adapter(["default", "b"], [0.7, 0.5], "mix")
    ours.add_weighted_adapter(["default", "b"], [0.7, 0.5], "mix")
    theirs.set_adapter("mix")
    ours.set_adapter("mix")
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max() <= TOL
    assert sorted(ours.peft_config["mix"].target_modules) == ["down_proj", "q_proj", "v_proj"]
