"""DeLoRA against HF PEFT, on numbers: checkpoints both ways (with the frozen ``delora_w_norm``),
merge verbs, training, errors, and ``lora`` slot tensors with the normalisation folded in
(fp32, <= 1e-5). The cases are those of ``method_cases/delora.py`` (Llama Linears, one rank and
lambda everywhere, or per module through rank_pattern / lambda_pattern)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_cases.delora import CASES
from tiny_models import (
    TOL,
    assert_merge_verbs,
    assert_round_trip,
    assert_training_changes_only,
    max_diff,
    perturb_trainable,
    run,
    saved_keys,
    tiny_llama,
    token_ids,
)

import onnx_peft
from onnx_peft.checkpoint import load_adapter_weights
from onnx_peft.errors import AdapterConfigError, IncompatibleAdapterError
from onnx_peft.methods.base import method_for
from onnx_peft.methods.delora import DeloraConfig
from onnx_peft.tuners.delora import DeloraLayer

peft = pytest.importorskip("peft")

METHOD = method_for("DELORA")


def _ours(case: str, seed: int = 0):
    model = onnx_peft.get_peft_model(tiny_llama(), DeloraConfig(**CASES[case]["kwargs"]))
    perturb_trainable(model, seed)  # B starts at zero: a fresh adapter is a no-op
    return model


def _peft(case: str, seed: int = 0):
    model = peft.get_peft_model(tiny_llama(), peft.DeloraConfig(**CASES[case]["kwargs"]))
    perturb_trainable(model, seed)
    return model.eval()


def _layers(model) -> dict[str, DeloraLayer]:
    return {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, DeloraLayer)}


# -- (a) checkpoints both ways ---------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_loads_here_with_same_logits(case, tmp_path):
    assert_round_trip(_peft(case, seed=1), tmp_path, onnx_peft.PeftModel.from_pretrained, tiny_llama,
                      token_ids(), changes_by=1e-3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_saved_here_loads_in_peft_with_same_logits(case, tmp_path):
    assert_round_trip(_ours(case, seed=2), tmp_path, peft.PeftModel.from_pretrained, tiny_llama, token_ids(),
                      changes_by=1e-3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_keys_and_shapes_equal_peft(case, tmp_path):
    _ours(case).save_pretrained(tmp_path / "ours")
    _peft(case).save_pretrained(tmp_path / "peft")

    keys = saved_keys(tmp_path / "ours")
    assert keys == saved_keys(tmp_path / "peft")
    assert {k.rsplit(".", 1)[1] for k in keys} == {"delora_A", "delora_B", "delora_lambda", "delora_w_norm"}


def test_patterns_set_rank_and_lambda_per_module():
    model = onnx_peft.get_peft_model(tiny_llama(), DeloraConfig(**CASES["delora-llama-patterns"]["kwargs"]))
    layers = _layers(model)

    down, q, up = (layers[f"model.layers.0.{m}"] for m in ("mlp.down_proj", "self_attn.q_proj", "mlp.up_proj"))
    assert down.delora_A["default"].shape == (4, 64) and up.delora_A["default"].shape == (2, 32)
    assert q.delora_lambda["default"].item() == 9.0 and up.delora_lambda["default"].item() == 4.0
    base_norm = torch.linalg.norm(tiny_llama().get_submodule("model.layers.0.mlp.up_proj").weight, dim=0)
    assert torch.allclose(up.delora_w_norm["default"], base_norm)


def test_fresh_adapter_is_a_no_op_and_w_norm_is_not_trained():
    model = onnx_peft.get_peft_model(tiny_llama(), DeloraConfig(**CASES["delora-llama"]["kwargs"]))

    x = token_ids()
    assert max_diff(run(model, x), run(tiny_llama(), x)) == 0.0
    assert not any("delora_w_norm" in name for name, p in model.named_parameters())


# -- (b) merging -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(case):
    assert_merge_verbs(_ours(case), token_ids(), DeloraLayer, restores_state_to=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_merged_weight_on_numpy_equals_the_torch_and_peft_merge(case):
    model, theirs = _ours(case, seed=3), _peft(case, seed=3)
    config = model.peft_config["default"]
    layers = _layers(model)
    before = {path: layer.weight.detach().numpy().copy() for path, layer in layers.items()}

    model.merge_adapter()
    theirs.merge_adapter()

    for path, layer in layers.items():
        parts = {k: getattr(layer, k)["default"].detach().numpy() for k in METHOD.tensor_names}
        w, b = METHOD.merged_weight(config, path, before[path], None, parts, {})
        assert isinstance(w, np.ndarray) and b is None
        assert np.abs(w - layer.weight.detach().numpy()).max() <= 1e-6
        peft_weight = theirs.base_model.model.get_submodule(path).get_base_layer().weight.detach().numpy()
        assert np.abs(w - peft_weight).max() <= 1e-6
        assert np.abs(w - before[path]).max() > 1e-3


def test_two_active_adapters_add_up_and_merge_to_the_same_output():
    model = _ours("delora-llama", seed=0)
    model.add_adapter("other", DeloraConfig(**CASES["delora-llama"]["kwargs"]))
    perturb_trainable(model, seed=6, select=(".other",))
    model.set_adapter(["default", "other"])
    x = token_ids()
    both = run(model, x)

    model.merge_adapter()

    assert max_diff(run(model, x), both) <= TOL
    assert max_diff(both, run(_ours("delora-llama"), x)) > 1e-3


# -- (c) training ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_lowers_the_loss_and_changes_only_delora_params(case):
    assert_training_changes_only(lambda: _ours(case), (".delora_A.", ".delora_B.", ".delora_lambda."), lr=1e-2)


# -- (d) errors --------------------------------------------------------------------------------
def test_unsupported_module_type_raises_naming_module_and_types():
    with pytest.raises(AdapterConfigError, match=r"model\.embed_tokens \(Embedding\).*DeLoRA.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_llama(), DeloraConfig(target_modules=["embed_tokens"]))


@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "r"),
    (dict(rank_pattern={"q_proj": 2.5}), "rank_pattern"),
    (dict(delora_lambda="big"), "delora_lambda"),
    (dict(lambda_pattern={"q_proj": float("nan")}), "lambda_pattern"),
    (dict(module_dropout=1.5), "module_dropout"),
    (dict(bias="lora_only"), "bias"),
])
def test_bad_config_field_raises_naming_it(kwargs, field):
    with pytest.raises(AdapterConfigError, match=f"DeloraConfig.{field}"):
        DeloraConfig(target_modules=["q_proj"], **kwargs)


def test_checkpoint_whose_rank_disagrees_with_the_config_is_refused():
    config = DeloraConfig(r=4, target_modules=["q_proj"])
    parts = {"delora_A": np.zeros((2, 32), np.float32), "delora_B": np.zeros((32, 2), np.float32),
             "delora_lambda": np.ones(1, np.float32), "delora_w_norm": np.ones(32, np.float32)}

    with pytest.raises(IncompatibleAdapterError, match=r"q_proj has delora_A \[2, 32\].*r=4"):
        METHOD.slot_tensors(config, "model.layers.0.self_attn.q_proj", parts, {}, lambda: None)


# -- (e) slot tensors --------------------------------------------------------------------------
@pytest.mark.parametrize("case, module", [
    ("delora-llama", "model.layers.1.self_attn.v_proj"),
    ("delora-llama-patterns", "model.layers.0.self_attn.q_proj"),
    ("delora-llama-patterns", "model.layers.1.mlp.down_proj"),
])
def test_lora_slots_reproduce_the_peft_layer_output(case, module, tmp_path):
    theirs = _peft(case, seed=4)
    theirs.save_pretrained(tmp_path)
    config = onnx_peft.AdapterConfig.from_pretrained(tmp_path)
    grouped = METHOD.group(load_adapter_weights(tmp_path))
    layer = theirs.base_model.model.get_submodule(module)
    weight = layer.get_base_layer().weight.detach().numpy()
    x = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(0))

    slots = METHOD.slot_tensors(config, module, grouped.modules[module], grouped.shared, lambda: weight)

    assert set(slots) == {"lora"}
    a, b = slots["lora"]["lora_A.weight"], slots["lora"]["lora_B.weight"]
    r = config.rank_for(module)
    assert a.shape == (weight.shape[1], r) and b.shape == (r, weight.shape[0])
    xn = x.numpy()
    with torch.no_grad():
        expected = layer(x).numpy()
    assert np.abs(xn @ weight.T + (xn @ a) @ b - expected).max() <= TOL
    assert np.abs(xn @ weight.T - expected).max() > 1e-3
