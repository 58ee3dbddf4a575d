"""OFT against HF PEFT 0.21 on tiny Llama: same logits both ways, same checkpoint keys, exact
merge, training moves only OFT tensors, clear errors, and ``rotate_in`` slots that reproduce
PEFT's layer output. fp32, tolerance 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_cases.oft import CASES
from tiny_models import (
    TOL,
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
from torch import nn

import onnx_peft
from onnx_peft.errors import AdapterConfigError
from onnx_peft.methods.base import method_for
from onnx_peft.methods.oft import cayley, coft_project, skew_symmetric

peft = pytest.importorskip("peft")
from peft.tuners.oft.layer import OFTRotationModule  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Seeded noise on every OFT tensor (a fresh OFT adapter is the identity rotation)."""
    perturb_trainable(model, seed, scale, select=(".oft_R.",))


def ours(kwargs: dict, base: nn.Module | None = None) -> onnx_peft.PeftModel:
    model = onnx_peft.get_peft_model(base or tiny_llama(), onnx_peft.OFTConfig(**kwargs))
    randomize(model)
    return model


def theirs(kwargs: dict, base: nn.Module | None = None):
    model = peft.get_peft_model(base or tiny_llama(), peft.OFTConfig(**kwargs))
    randomize(model)
    return model


# -- the Cayley transform ------------------------------------------------------------------
@pytest.mark.parametrize("neumann", [True, False])
@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 7])
def test_numpy_cayley_equals_peft(neumann, terms):
    block, rows = 8, 4
    vec = torch.randn(rows, block * (block - 1) // 2, generator=torch.Generator().manual_seed(terms)) * 0.2
    module = OFTRotationModule(rows, vec.shape[1], block, rows * block, use_cayley_neumann=neumann,
                               num_cayley_neumann_terms=terms)
    expected = module._cayley_batch(vec, block, neumann, terms).numpy()
    got = cayley(skew_symmetric(vec.numpy(), block), terms if neumann else None)
    assert np.abs(got - expected).max() <= TOL
    if not neumann:  # the exact transform is orthogonal
        assert np.abs(got @ got.swapaxes(1, 2) - np.eye(block)).max() <= TOL


def test_numpy_coft_projection_equals_peft():
    vec = torch.randn(4, 28, generator=torch.Generator().manual_seed(0)) * 0.1
    vec[0] *= 1e-3  # inside the eps ball: kept as is
    module = OFTRotationModule(4, 28, 8, 32, coft=True, eps=0.05)
    expected = module._project_batch(vec, eps=0.05).numpy()
    assert np.abs(coft_project(vec.numpy(), 0.05) - expected).max() <= 1e-7
    assert np.array_equal(coft_project(vec.numpy(), 0.05)[0], vec.numpy()[0])


# -- (a) checkpoints move both ways --------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_loads_with_same_logits(tmp_path, case):
    # changes_by: the adapter does something
    assert_round_trip(theirs(CASES[case]["kwargs"]), tmp_path, onnx_peft.PeftModel.from_pretrained, tiny_llama,
                      token_ids(), changes_by=1e-3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_saved_adapter_loads_in_peft_with_same_logits_and_keys(tmp_path, case):
    kwargs = CASES[case]["kwargs"]
    theirs(kwargs).save_pretrained(tmp_path / "peft")
    assert_round_trip(ours(kwargs), tmp_path / "ours", peft.PeftModel.from_pretrained, tiny_llama, token_ids(),
                      same_keys_as=tmp_path / "peft")


def test_non_dividing_block_size_is_moved_to_the_nearest_divisor_like_peft(tmp_path):
    kwargs = dict(oft_block_size=7, target_modules=["q_proj", "down_proj"])  # 7 does not divide 32 or 64: 8
    model = ours(kwargs)
    model.save_pretrained(tmp_path / "ours")
    theirs(kwargs).save_pretrained(tmp_path / "peft")
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "peft")
    assert saved_keys(tmp_path / "ours")["base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight"] == (4, 28)


# -- (b) merging ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(case):
    model, ids = ours(CASES[case]["kwargs"]), token_ids()
    weight = model.base_model.model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    unmerged = run(model, ids)
    model.merge_adapter()
    assert max_diff(run(model, ids), unmerged) <= TOL
    model.unmerge_adapter()
    assert max_diff(run(model, ids), unmerged) <= TOL
    assert max_diff(model.base_model.model.model.layers[0].self_attn.o_proj.weight, weight) <= TOL
    plain = model.merge_and_unload()
    assert max_diff(run(plain, ids), unmerged) <= TOL
    assert not any("oft_" in name for name, _ in plain.named_parameters())


@pytest.mark.parametrize("case", sorted(CASES))
def test_numpy_merged_weight_equals_torch_merged_weight_and_peft_merge(case):
    kwargs = CASES[case]["kwargs"]
    model, reference = ours(kwargs), theirs(kwargs)
    path = f"model.layers.1.{'self_attn.v_proj' if 'v_proj' in kwargs['target_modules'] else 'mlp.up_proj'}"
    layer = model.base_model.model.get_submodule(path)
    config = model.peft_config["default"]
    parts = {"oft_R.weight": layer.oft_R["default"].weight.detach().numpy().copy()}
    weight = layer.base_layer.weight.detach().numpy().copy()
    merged_np, bias = method_for(config).merged_weight(config, path, weight, None, parts, {})
    merged_torch = layer.merged_weight("default", layer.base_layer.weight.detach())
    assert bias is None and np.abs(merged_np - merged_torch.numpy()).max() <= TOL
    peft_layer = reference.base_model.model.get_submodule(path)
    peft_layer.merge()
    assert np.abs(merged_np - peft_layer.base_layer.weight.detach().numpy()).max() <= TOL


# -- (c) training --------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_lowers_the_loss_and_changes_only_oft_tensors(case):
    model = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.OFTConfig(**CASES[case]["kwargs"]))
    before = snapshot(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".oft_R." in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.Adam(trainable, lr=2e-2)
    losses = train_steps(model, token_ids(4, 12), optimizer, steps=6)
    assert losses[-1] < losses[0] - 1e-3
    changed = changed_since(model, before)
    assert changed and all(".oft_R." in n for n in changed)


# -- (d) errors ----------------------------------------------------------------------------
def test_conv1d_target_is_refused_naming_module_method_and_supported_types():
    with pytest.raises(AdapterConfigError, match=r"transformer\.h\.0\.attn\.c_attn.*OFT.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_gpt2(), onnx_peft.OFTConfig(oft_block_size=8, target_modules=["c_attn"]))


@pytest.mark.parametrize("kwargs, field", [
    (dict(r=4, oft_block_size=8), "oft_block_size"),
    (dict(r=0, oft_block_size=0), "oft_block_size"),
    (dict(oft_block_size=-8), "oft_block_size"),
    (dict(bias="lora_only"), "bias"),
    (dict(module_dropout=1.5), "module_dropout"),
    (dict(num_cayley_neumann_terms=0), "num_cayley_neumann_terms"),
    (dict(coft=True, eps=0.0), "eps"),
])
def test_bad_config_field_is_a_typed_error_naming_it(kwargs, field):
    with pytest.raises(AdapterConfigError, match=field):
        onnx_peft.OFTConfig(target_modules=["q_proj"], **kwargs)


def test_checkpoint_for_another_layer_size_is_refused_by_the_method():
    config = onnx_peft.OFTConfig(oft_block_size=8, target_modules=["q_proj"])
    parts = {"oft_R.weight": np.zeros((4, 28), np.float32)}  # 4 blocks of 8 = 32 inputs
    with pytest.raises(onnx_peft.OnnxPeftError, match="q_proj.*48 inputs"):
        method_for(config).merged_weight(config, "q_proj", np.zeros((8, 48), np.float32), None, parts, {})


# -- (e) slots -----------------------------------------------------------------------------
def _rotate_in(x: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """The ``rotate_in`` form: ``x [.., n b]`` -> per block ``x_k R_k``."""
    n, b, _ = rotation.shape
    return np.einsum("...nk,nkc->...nc", x.reshape(*x.shape[:-1], n, b), rotation).reshape(x.shape)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rotate_in_slots_reproduce_the_peft_layer_output(case):
    kwargs = dict(CASES[case]["kwargs"], target_modules=["0"])
    torch.manual_seed(3)
    reference = theirs(kwargs, nn.Sequential(nn.Linear(32, 12)))
    layer = reference.base_model.model[0]
    weight, bias = (t.detach().numpy() for t in (layer.base_layer.weight, layer.base_layer.bias))
    config = onnx_peft.OFTConfig(**kwargs)
    parts = {"oft_R.weight": layer.oft_R["default"].weight.detach().numpy().copy()}
    slots = method_for(config).slot_tensors(config, "0", parts, {}, lambda: weight)
    assert set(slots) == {"rotate_in"}
    rotation = slots["rotate_in"]["rotation.weight"]
    assert rotation.dtype == np.float32 and rotation.shape == (4, 8, 8)
    x = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)
    expected = layer(torch.from_numpy(x)).detach().numpy()
    assert np.abs(_rotate_in(x, rotation) @ weight.T + bias - expected).max() <= TOL
