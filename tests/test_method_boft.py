"""BOFT against HF PEFT 0.21 on tiny Llama: same logits both ways, same checkpoint keys, exact
merge, training moves only BOFT tensors, clear errors, and ``rotate_in`` + ``dora`` slots that
reproduce PEFT's layer output. fp32, tolerance 1e-5.

PEFT builds butterflies with more than one factor only where its CUDA extension (``fbd_cuda``)
compiles, and silently falls back to one factor elsewhere. Here its block-diagonal kernel is
replaced by ``torch.block_diag`` (what the kernel computes), so PEFT's own butterfly code runs
on CPU and the multi-factor cases compare against it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_cases.boft import CASES
from tiny_models import (
    TOL,
    assert_round_trip,
    changed_since,
    max_diff,
    perturb_trainable,
    run,
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
from onnx_peft.methods.boft import boft_blocks, butterfly_matrix, butterfly_permutations
from onnx_peft.tuners.boft import block_dropout

peft = pytest.importorskip("peft")
import peft.tuners.boft.layer as peft_boft  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(autouse=True)
def peft_butterfly(monkeypatch):
    """PEFT's CUDA block-diagonal kernel, on CPU: ``[m, D, b, b]`` -> ``[m, D b, D b]``."""
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(peft_boft.FastBlockDiag, "apply",
                        staticmethod(lambda blocks: torch.stack([torch.block_diag(*f) for f in blocks])))


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Seeded noise on every BOFT tensor (fresh BOFT is the identity rotation and scale 1)."""
    perturb_trainable(model, seed, scale, select=(".boft_R.", ".boft_s."))


def ours(kwargs: dict, base: nn.Module | None = None) -> onnx_peft.PeftModel:
    model = onnx_peft.get_peft_model(base or tiny_llama(), onnx_peft.BOFTConfig(**kwargs))
    randomize(model)
    return model


def theirs(kwargs: dict, base: nn.Module | None = None):
    model = peft.get_peft_model(base or tiny_llama(), peft.BOFTConfig(**kwargs))
    randomize(model)
    return model


# -- the butterfly -------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(boft_block_size=4), dict(boft_block_size=4, boft_n_butterfly_factor=3),
                                    dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=2),
                                    dict(boft_block_size=2, boft_n_butterfly_factor=4)])
def test_numpy_butterfly_equals_peft(kwargs):
    layer = peft_boft.Linear(nn.Linear(32, 8), "default", peft.BOFTConfig(target_modules=["x"], **kwargs))
    torch.manual_seed(0)
    layer.boft_R["default"].data.normal_(0, 0.3)
    rot = layer.boft_R["default"].detach().numpy()
    m, d, b, _ = rot.shape
    assert m == kwargs.get("boft_n_butterfly_factor", 1)
    perms = butterfly_permutations(32, d, b, m)
    assert all(np.array_equal(p, np.argmax(P.numpy(), 1)) for p, P in zip(perms, layer.boft_P))
    expected, _ = layer.get_delta_weight("default")
    got = butterfly_matrix(boft_blocks(rot))
    assert np.abs(got - expected.detach().numpy()).max() <= TOL
    assert np.abs(got @ got.T - np.eye(32)).max() <= TOL  # a rotation


def test_block_dropout_makes_some_blocks_of_one_factor_the_identity():
    torch.manual_seed(0)
    blocks = boft_blocks(torch.randn(3, 8, 4, 4))
    dropped = block_dropout(blocks, 0.5)
    same = (dropped == blocks).flatten(2).all(-1)                       # [m, D]
    assert int((~same).sum()) == 4 and int((~same).any(1).sum()) == 1
    assert torch.equal(dropped[~same], torch.eye(4).expand(4, 4, 4))


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


# -- (b) merging ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(case):
    model, ids = ours(CASES[case]["kwargs"]), token_ids()
    layer = model.base_model.model.model.layers[0].mlp.down_proj if "down_proj" in str(CASES[case]) \
        else model.base_model.model.model.layers[0].self_attn.o_proj
    weight = layer.weight.detach().clone()
    unmerged = run(model, ids)
    model.merge_adapter()
    assert max_diff(run(model, ids), unmerged) <= TOL
    model.unmerge_adapter()
    assert max_diff(run(model, ids), unmerged) <= TOL
    assert max_diff(layer.weight, weight) <= TOL
    plain = model.merge_and_unload()
    assert max_diff(run(plain, ids), unmerged) <= TOL
    assert not any("boft_" in name for name, _ in plain.named_parameters())


@pytest.mark.parametrize("case", sorted(CASES))
def test_numpy_merged_weight_equals_torch_merged_weight_and_peft_merge(case):
    kwargs = CASES[case]["kwargs"]
    model, reference = ours(kwargs), theirs(kwargs)
    path = "model.layers.1.self_attn.o_proj" if "o_proj" in kwargs["target_modules"] else "model.layers.1.self_attn.v_proj"
    layer = model.base_model.model.get_submodule(path)
    config = model.peft_config["default"]
    parts = {k: getattr(layer, k)["default"].detach().numpy().copy() for k in ("boft_R", "boft_s")}
    weight = layer.base_layer.weight.detach().numpy().copy()
    merged_np, bias = method_for(config).merged_weight(config, path, weight, None, parts, {})
    merged_torch = layer.merged_weight("default", layer.base_layer.weight.detach())
    assert bias is None and np.abs(merged_np - merged_torch.numpy()).max() <= TOL
    peft_layer = reference.base_model.model.get_submodule(path)
    peft_layer.merge()
    assert np.abs(merged_np - peft_layer.base_layer.weight.detach().numpy()).max() <= TOL


# -- (c) training --------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_lowers_the_loss_and_changes_only_boft_tensors(case):
    model = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.BOFTConfig(**CASES[case]["kwargs"]))
    before = snapshot(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".boft_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.Adam(trainable, lr=2e-2)
    losses = train_steps(model, token_ids(4, 12), optimizer, steps=6)
    assert losses[-1] < losses[0] - 1e-3
    changed = changed_since(model, before)
    assert {n.split(".")[-2] for n in changed} == {"boft_R", "boft_s"}


# -- (d) errors ----------------------------------------------------------------------------
def test_conv1d_target_is_refused_naming_module_method_and_supported_types():
    with pytest.raises(AdapterConfigError, match=r"transformer\.h\.0\.attn\.c_attn.*BOFT.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_gpt2(), onnx_peft.BOFTConfig(target_modules=["c_attn"]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(boft_block_size=5), r"q_proj.*boft_block_size=5 does not divide"),
    (dict(boft_block_size=0, boft_block_num=6), r"q_proj.*boft_block_num=6 does not divide"),
    (dict(boft_block_size=0, boft_block_num=2, boft_n_butterfly_factor=3), r"q_proj.*multiple of 2\^2"),
    (dict(boft_block_size=16, boft_n_butterfly_factor=3), r"q_proj.*boft_n_butterfly_factor=3"),
])
def test_layout_that_does_not_fit_a_module_is_refused_naming_it(kwargs, message):
    with pytest.raises(AdapterConfigError, match=message):
        onnx_peft.get_peft_model(tiny_llama(), onnx_peft.BOFTConfig(target_modules=["q_proj"], **kwargs))


@pytest.mark.parametrize("kwargs, field", [
    (dict(boft_block_size=4, boft_block_num=8), "boft_block_num"),
    (dict(boft_block_size=0), "boft_block_size"),
    (dict(boft_n_butterfly_factor=0), "boft_n_butterfly_factor"),
    (dict(bias="lora_only"), "bias"),
    (dict(boft_dropout=-0.1), "boft_dropout"),
])
def test_bad_config_field_is_a_typed_error_naming_it(kwargs, field):
    with pytest.raises(AdapterConfigError, match=field):
        onnx_peft.BOFTConfig(target_modules=["q_proj"], **kwargs)


# -- (e) slots -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_rotate_in_and_dora_slots_reproduce_the_peft_layer_output(case):
    kwargs = dict(CASES[case]["kwargs"], target_modules=["0"])
    torch.manual_seed(3)
    reference = theirs(kwargs, nn.Sequential(nn.Linear(32, 12)))
    layer = reference.base_model.model[0]
    weight, bias = (t.detach().numpy() for t in (layer.base_layer.weight, layer.base_layer.bias))
    config = onnx_peft.BOFTConfig(**kwargs)
    parts = {k: getattr(layer, k)["default"].detach().numpy().copy() for k in ("boft_R", "boft_s")}
    slots = method_for(config).slot_tensors(config, "0", parts, {}, lambda: weight)
    assert method_for(config).features(config, "0", parts) == (32, 12)
    rotation, factor = slots["rotate_in"]["rotation.weight"], slots["dora"]["dora_factor"]
    # one butterfly factor is block-diagonal: its blocks, not a dense [32, 32] rotation
    blocks, size = rotation.shape[0], rotation.shape[1]
    assert set(slots) == {"rotate_in", "dora"} and blocks * size == 32 and blocks > 1 and factor.shape == (12,)
    x = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)
    rotated = np.einsum("...nk,nkc->...nc", x.reshape(2, 5, blocks, size), rotation).reshape(x.shape)
    y = rotated @ weight.T + bias                          # rotate_in, then the base Linear
    y = (y - bias) * factor + bias                        # dora: scale the output without its bias
    expected = layer(torch.from_numpy(x)).detach().numpy()
    assert np.abs(y - expected).max() <= TOL
