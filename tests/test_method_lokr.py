"""LoKr against HF PEFT on numbers: checkpoints both ways, merging, the numpy math (factorization,
Kronecker product), the dense slot, training (with rank and module dropout) and user errors.

Fresh LoKr adapters are no-ops (``lokr_w1 = 0``), so every test perturbs all adapter tensors.
The cases reach every factor layout: w1 whole or split (decompose_both), w2 whole, split, a
CP core (use_effective_conv2d), 4-d (Conv2d) and 3-d (Conv1d, PEFT's kron of a 2-d and a 3-d).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from method_cases.lokr import CASES as ONNX_CASES
from tiny_models import (
    TOL,
    adapter_arrays,
    assert_round_trip,
    changed_since,
    image_batch,
    max_diff,
    peft_and_ours,
    perturb_trainable,
    run,
    snapshot,
    tiny_cnn,
    tiny_gpt2,
    tiny_llama,
    token_ids,
    train_steps,
)

import onnx_peft
from onnx_peft.errors import AdapterConfigError, IncompatibleAdapterError
from onnx_peft.methods.base import method_for
from onnx_peft.methods.lokr import LoKrConfig, factorization, kron
from onnx_peft.tuners.lokr import LoKrLayer

peft = pytest.importorskip("peft")

METHOD = method_for("LOKR")

# name -> (base builder, inputs, LoKrConfig kwargs shared by both libraries); the Llama ones are
# the ONNX conformance suite's (method_cases/lokr.py), here with a saved lm_head as well
CASES = {
    "linear": (tiny_llama, token_ids, ONNX_CASES["lokr-llama"]["kwargs"]),
    "decomposed-patterns": (tiny_llama, token_ids, dict(ONNX_CASES["lokr-llama-decomposed"]["kwargs"],
                                                     modules_to_save=["lm_head"])),
    "factor-lycoris-init": (tiny_llama, token_ids, dict(
        r=2, decompose_factor=4, init_weights="lycoris", rank_dropout_scale=True,
        target_modules=["gate_proj", "k_proj"], layers_to_transform=[0], layers_pattern="layers")),
    "conv": (tiny_cnn, image_batch, dict(r=2, alpha=4, target_modules=["conv1", "conv2", "conv1d", "fc"],
                                         rank_pattern={"conv2": 1})),
    # not conv1d: PEFT's torch.kron fails on its rank-1 CP kernel [3, 4, 3, 1] (a view error)
    "conv-effective": (tiny_cnn, image_batch, dict(r=1, use_effective_conv2d=True, target_modules=["conv1", "conv2"])),
}


ADAPTER_TENSORS = ("lokr_", "modules_to_save")  # every adapter tensor, same names in both libraries


def perturb(model: torch.nn.Module, seed: int) -> None:
    perturb_trainable(model, seed, select=ADAPTER_TENSORS)


def pair(kwargs: dict, build=tiny_llama, seed: int = 0):
    """(PEFT's, ours) adapters of ``kwargs`` holding the same perturbed tensors (same module tree)."""
    return peft_and_ours(build, peft.LoKrConfig(**kwargs), LoKrConfig(**kwargs), seed, select=ADAPTER_TENSORS)


def numpy_parts(layer: torch.nn.Module) -> dict[str, np.ndarray]:
    return adapter_arrays(layer, METHOD.tensor_names)


# -- (a) checkpoints both ways ------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_saved_by_peft_loads_here_with_same_logits(case, tmp_path):
    build, inputs, kwargs = CASES[case]
    theirs = peft.get_peft_model(build(), peft.LoKrConfig(**kwargs))
    perturb(theirs, seed=1)

    # changes_by: the adapter really changes the output
    assert_round_trip(theirs.eval(), tmp_path, onnx_peft.PeftModel.from_pretrained, build, inputs(), changes_by=1e-3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_saved_here_loads_in_peft_with_same_logits_keys_and_shapes(case, tmp_path):
    build, inputs, kwargs = CASES[case]
    ours = onnx_peft.get_peft_model(build(), LoKrConfig(**kwargs))
    perturb(ours, seed=2)
    reference = peft.get_peft_model(build(), peft.LoKrConfig(**kwargs))
    reference.save_pretrained(tmp_path / "peft")

    assert_round_trip(ours.eval(), tmp_path / "ours", peft.PeftModel.from_pretrained, build, inputs(),
                      same_keys_as=tmp_path / "peft")
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in reference.named_parameters() if p.requires_grad)


def test_config_fields_and_defaults_equal_peft(tmp_path):
    kwargs = CASES["decomposed-patterns"][2]
    onnx_peft.get_peft_model(tiny_llama(), LoKrConfig(**kwargs)).save_pretrained(tmp_path)

    loaded = peft.PeftConfig.from_pretrained(tmp_path)

    assert loaded.peft_type == peft.PeftType.LOKR
    assert (loaded.r, loaded.alpha, loaded.decompose_both) == (1, 2, True)
    assert (loaded.rank_pattern, loaded.alpha_pattern) == ({"v_proj": 3}, {"layers.1.mlp.down_proj": 3})
    ours, theirs = LoKrConfig(), peft.LoKrConfig()
    for f in dataclasses.fields(LoKrConfig):
        if f.name != "extra":
            assert getattr(ours, f.name) == getattr(theirs, f.name), f.name


@pytest.mark.parametrize("init", [True, "lycoris"])
def test_fresh_adapter_is_a_no_op(init):
    config = LoKrConfig(r=1, decompose_both=True, init_weights=init, target_modules=["q_proj", "up_proj"])
    model = onnx_peft.get_peft_model(tiny_llama(), config)
    assert max_diff(run(model, token_ids()), run(tiny_llama(), token_ids())) == 0.0


# -- the numpy math -------------------------------------------------------------------------------
def test_factorization_equals_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dimension in (1, 2, 6, 7, 12, 32, 64, 96, 127, 128, 256, 768, 1000):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


@pytest.mark.parametrize("a_shape,b_shape", [((2, 3), (4, 5)), ((2, 3, 1, 1), (4, 5, 3, 3)), ((2, 3), (4, 5, 3)),
                                             ((3,), (2, 2))])
def test_kron_equals_torch_kron_on_tensors_and_numpy(a_shape, b_shape):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(a_shape, generator=generator), torch.randn(b_shape, generator=generator)

    expected = torch.kron(a, b)

    assert torch.equal(kron(a, b), expected)
    assert np.array_equal(kron(a.numpy(), b.numpy()), expected.numpy())


# -- (b) merging ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["linear", "conv", "conv-effective"])
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(case):
    build, inputs, kwargs = CASES[case]
    model = onnx_peft.get_peft_model(build(), LoKrConfig(**kwargs))
    perturb(model, seed=3)
    x = inputs()
    unmerged = run(model, x)

    model.merge_adapter()
    merged = run(model, x)
    with model.disable_adapter():
        disabled = run(model, x)
    model.merge_adapter()
    remerged = run(model, x)
    model.unmerge_adapter()
    again = run(model, x)
    plain = model.merge_and_unload()

    assert max_diff(merged, unmerged) <= TOL
    assert max_diff(disabled, run(build(), x)) <= TOL  # disabling unmerges
    assert max_diff(remerged, unmerged) <= TOL
    assert max_diff(again, unmerged) <= TOL
    assert max_diff(run(plain, x), unmerged) <= TOL
    assert not any(isinstance(m, LoKrLayer) for m in plain.modules())


@pytest.mark.parametrize("case", ["decomposed-patterns", "conv", "conv-effective"])
def test_numpy_merged_weight_equals_the_torch_merged_weight(case):
    build, _, kwargs = CASES[case]
    _, ours = pair(kwargs, build, seed=4)
    config = ours.peft_config["default"]
    layers = {path: m for path, m in ours.base_model.model.named_modules() if isinstance(m, LoKrLayer)}
    before = {path: m.base_layer.weight.detach().numpy().copy() for path, m in layers.items()}

    ours.merge_adapter()

    for path, layer in layers.items():
        merged, bias = METHOD.merged_weight(config, path, before[path], None, numpy_parts(layer), {})
        assert np.abs(merged - layer.base_layer.weight.detach().numpy()).max() <= TOL, path
        assert bias is None


# -- (c) training ---------------------------------------------------------------------------------
def test_a_plain_training_loop_lowers_the_loss_and_changes_only_adapter_tensors():
    model = onnx_peft.get_peft_model(tiny_llama(), LoKrConfig(r=4, alpha=8, target_modules="all-linear"))
    model.train()
    before = snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = train_steps(model, token_ids(batch=4, seq=12), optimizer, steps=6)

    assert losses[-1] < losses[0] - 0.05
    changed = changed_since(model, before)
    assert changed and all(".lokr_" in n for n in changed)
    assert any(".lokr_w1." in n for n in changed) and any(".lokr_w2." in n for n in changed)


def test_training_forward_with_rank_and_module_dropout_equals_peft_under_one_seed():
    kwargs = dict(r=4, alpha=8, rank_dropout=0.5, module_dropout=0.3, rank_dropout_scale=True,
                  target_modules=["q_proj", "down_proj"])
    theirs, ours = pair(kwargs, seed=5)
    ours.train()
    theirs.train()
    ids = token_ids()

    torch.manual_seed(7)
    ours_loss = ours(input_ids=ids, labels=ids).loss
    torch.manual_seed(7)
    theirs_loss = theirs(input_ids=ids, labels=ids).loss
    ours_loss.backward()
    theirs_loss.backward()
    with torch.no_grad():
        no_dropout_loss = ours.eval()(input_ids=ids, labels=ids).loss

    assert abs(ours_loss.item() - theirs_loss.item()) <= TOL
    assert abs(ours_loss.item() - no_dropout_loss.item()) > 1e-4  # the dropouts did something
    peft_grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert grads.keys() == peft_grads.keys()
    assert all(max_diff(grads[n], peft_grads[n]) <= TOL for n in grads)


# -- (d) errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("build,target", [(tiny_llama, "embed_tokens"), (tiny_gpt2, "c_attn")])
def test_a_module_type_peft_does_not_support_raises_naming_it(build, target):
    with pytest.raises(AdapterConfigError, match=rf"{target} \(\w+\) cannot take a LOKR adapter; supported: nn.Linear"):
        onnx_peft.get_peft_model(build(), LoKrConfig(target_modules=[target]))


@pytest.mark.parametrize("kwargs,field", [
    (dict(r=0), "LoKrConfig.r"), (dict(rank_pattern={"q_proj": -1}), "rank_pattern"),
    (dict(alpha="8"), "LoKrConfig.alpha"), (dict(rank_dropout=1.5), "LoKrConfig.rank_dropout"),
    (dict(module_dropout=-0.1), "LoKrConfig.module_dropout"), (dict(init_weights="gaussian"), "init_weights"),
    (dict(decompose_factor=2.5), "LoKrConfig.decompose_factor"),
    (dict(layers_pattern="layers"), "layers_pattern"),
])
def test_a_bad_config_field_raises_naming_it(kwargs, field):
    with pytest.raises(AdapterConfigError, match=field):
        LoKrConfig(target_modules=["q_proj"], **kwargs)


def test_factors_of_another_rank_than_the_config_raise():
    _, ours = pair(CASES["decomposed-patterns"][2])
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj

    with pytest.raises(IncompatibleAdapterError, match="r=2"):
        METHOD.slot_tensors(LoKrConfig(r=2), "model.layers.0.self_attn.q_proj", numpy_parts(layer), {}, None)


# -- (e) the dense slot ---------------------------------------------------------------------------
@pytest.mark.parametrize("case,path", [("decomposed-patterns", "model.layers.1.self_attn.v_proj"),
                                       ("decomposed-patterns", "model.layers.1.mlp.down_proj"),
                                       ("factor-lycoris-init", "model.layers.0.mlp.gate_proj"),
                                       ("conv", "fc")])  # fc has a bias
def test_dense_slot_reproduces_the_peft_layer(case, path):
    build, _, kwargs = CASES[case]
    theirs, _ = pair(kwargs, build, seed=6)
    layer = theirs.base_model.model.get_submodule(path)
    weight = layer.base_layer.weight.detach().numpy()
    bias = layer.base_layer.bias
    config = LoKrConfig(**kwargs)

    slots = METHOD.slot_tensors(config, path, numpy_parts(layer), {}, lambda: weight)
    D = slots["dense"]["delta.weight"]
    x = np.random.default_rng(0).standard_normal((2, 5, weight.shape[1])).astype(np.float32)
    y = x @ weight.T + (0 if bias is None else bias.detach().numpy()) + x @ D
    with torch.no_grad():
        expected = layer(torch.from_numpy(x)).numpy()

    assert list(slots) == ["dense"] and D.shape == (weight.shape[1], weight.shape[0]) and D.dtype == np.float32
    assert METHOD.features(config, path, numpy_parts(layer)) == (weight.shape[1], weight.shape[0])
    assert np.abs(y - expected).max() <= TOL
    assert np.abs(x @ D).max() > 1e-3


def test_an_effective_conv_adapter_has_no_dense_slot():
    _, ours = pair(CASES["conv-effective"][2], tiny_cnn)
    with pytest.raises(IncompatibleAdapterError, match="conv1 has a LOKR convolution update"):
        METHOD.slot_tensors(ours.peft_config["default"], "conv1", numpy_parts(ours.base_model.model.conv1), {}, None)
