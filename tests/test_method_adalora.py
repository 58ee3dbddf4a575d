"""AdaLoRA against HF PEFT on the tiny models: checkpoints both ways (before and after rank
allocation), the budget schedule and masks, the orthogonal regularisation, merging, training,
errors and the ``lora`` slot tensors the ONNX graph uses (fp32, <= 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_cases.adalora import CASES
from tiny_models import (
    TOL,
    assert_merge_verbs,
    assert_round_trip,
    image_batch,
    max_diff,
    peft_and_ours,
    perturb_trainable,
    run,
    saved_keys,
    tiny_cnn,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)

import onnx_peft
from onnx_peft.convert import PeftAdapter
from onnx_peft.errors import AdapterConfigError, OnnxPeftError
from onnx_peft.tuners.adalora import AdaLoraLayer, RankAllocator

peft = pytest.importorskip("peft")

BUILDERS = {"llama": (tiny_llama, token_ids), "gpt2": (tiny_gpt2, token_ids), "cnn": (tiny_cnn, image_batch)}
# the conformance cases, plus Conv2d (torch only: the ONNX slots are for linear layers)
TORCH_CASES = {**CASES, "adalora-cnn": dict(model="cnn", kwargs=dict(init_r=3, target_r=1, total_step=10,
                                                                    target_modules=["conv1", "conv2", "fc"]))}
# a schedule with every phase: warm-up (steps 0-1), budgeting (2-6), final (7-10)
SCHEDULE = dict(init_r=4, target_r=2, total_step=10, tinit=1, tfinal=3, deltaT=2, lora_alpha=6,
                target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM")


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Seeded noise on every trainable tensor (a fresh AdaLoRA adapter is a no-op: E = 0)."""
    perturb_trainable(model, seed, 0.3)


def _build(case: str):
    spec = TORCH_CASES[case]
    builder, inputs = BUILDERS[spec["model"]]
    return builder, inputs(), spec["kwargs"]


def _pair(kwargs: dict, builder=tiny_llama):
    """The same perturbed adapter in PEFT and here (PEFT's trainable values copied over by name)."""
    return peft_and_ours(builder, peft.AdaLoraConfig(**kwargs), onnx_peft.AdaLoraConfig(**kwargs), strict=False)


def _train_with_allocation(model, x, steps: int = 11) -> list[float]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for step in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _plain_pattern(pattern: dict) -> dict:
    return {k.removesuffix(".default"): list(v) for k, v in pattern.items()}


# -- (a) checkpoints both ways -------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_peft_saved_adapter_loads_here_with_same_logits(case, tmp_path):
    builder, x, kwargs = _build(case)
    theirs = peft.get_peft_model(builder(), peft.AdaLoraConfig(**kwargs))
    _perturb(theirs)

    assert_round_trip(theirs, tmp_path, onnx_peft.PeftModel.from_pretrained, builder, x, changes_by=1e-3)


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_adapter_saved_here_loads_in_peft_with_same_logits_and_keys(case, tmp_path):
    builder, x, kwargs = _build(case)
    ours = onnx_peft.get_peft_model(builder(), onnx_peft.AdaLoraConfig(**kwargs))
    _perturb(ours)
    peft.get_peft_model(builder(), peft.AdaLoraConfig(**kwargs)).save_pretrained(tmp_path / "theirs")

    assert_round_trip(ours, tmp_path / "ours", peft.PeftModel.from_pretrained, builder, x,
                      same_keys_as=tmp_path / "theirs")


# -- rank allocation and regularisation, step by step with PEFT -----------------------------------
def test_budget_schedule_equals_peft():
    theirs, ours = _pair(SCHEDULE)
    layers = {k: m for k, m in ours.base_model.model.named_modules() if isinstance(m, AdaLoraLayer)}

    allocator = RankAllocator(ours.peft_config["default"], "default", layers)

    assert (allocator.init_bgt, allocator.target_bgt) == (16, 8)
    for step in range(12):
        assert allocator.budget_schedule(step) == theirs.base_model.rankallocator.budget_schedule(step), step


def test_loss_includes_peft_orthogonal_regularisation():
    theirs, ours = _pair(SCHEDULE)
    x = token_ids()

    loss = ours(input_ids=x, labels=x).loss
    with torch.no_grad():
        plain = ours.base_model.model(input_ids=x).logits
        lm_loss = torch.nn.functional.cross_entropy(plain[:, :-1].reshape(-1, plain.shape[-1]), x[:, 1:].reshape(-1))

    assert abs(loss.item() - theirs(input_ids=x, labels=x).loss.item()) <= TOL
    assert loss.item() - lm_loss.item() > 0.1   # orth_reg_weight 0.5 times a non-trivial penalty


def test_training_with_allocation_gives_peft_masks_pattern_and_weights():
    theirs, ours = _pair(SCHEDULE)
    x = token_ids()

    their_losses = _train_with_allocation(theirs, x)
    our_losses = _train_with_allocation(ours, x)

    assert np.allclose(our_losses, their_losses, atol=1e-5)
    pattern = ours.peft_config["default"].rank_pattern
    assert pattern == _plain_pattern(theirs.peft_config["default"].rank_pattern)
    assert all(sum(kept) <= 4 for kept in pattern.values()) and sum(map(sum, pattern.values())) == 8
    ours_params = dict(ours.named_parameters())
    for name, param in theirs.named_parameters():
        if ".lora_" in name:
            assert max_diff(ours_params[name], param) <= TOL, name
    assert max_diff(run(ours, x), run(theirs, x)) <= TOL


def test_allocated_adapter_saves_kept_triplets_and_loads_both_ways(tmp_path):
    theirs, ours = _pair(SCHEDULE)
    x = token_ids()
    _train_with_allocation(theirs, x)
    _train_with_allocation(ours, x)

    assert_round_trip(theirs, tmp_path / "theirs", onnx_peft.PeftModel.from_pretrained, tiny_llama, x)
    assert_round_trip(ours, tmp_path / "ours", peft.PeftModel.from_pretrained, tiny_llama, x,
                      same_keys_as=tmp_path / "theirs")
    assert saved_keys(tmp_path / "ours")["base_model.model.model.layers.0.self_attn.q_proj.lora_A"][0] < 4


def test_state_dict_round_trip_after_allocation_keeps_the_outputs():
    _, ours = _pair(SCHEDULE)
    x = token_ids()
    _train_with_allocation(ours, x)
    expected = run(ours, x)
    state = ours.state_dict()
    _perturb(ours, seed=5)

    ours.load_state_dict(state)

    assert state["base_model.model.model.layers.0.mlp.down_proj.lora_E.default"].shape[0] < 4
    assert max_diff(run(ours, x), expected) <= TOL


def test_update_and_allocate_needs_a_trainable_adapter(tmp_path):
    peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**SCHEDULE)).save_pretrained(tmp_path)
    ours = onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)

    with pytest.raises(OnnxPeftError, match="trainable AdaLoRA adapter"):
        ours.base_model.update_and_allocate(0)


# -- (b) merging ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(case):
    builder, x, kwargs = _build(case)
    ours = onnx_peft.get_peft_model(builder(), onnx_peft.AdaLoraConfig(**kwargs))
    _perturb(ours)
    assert_merge_verbs(ours, x, AdaLoraLayer)


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_numpy_merged_weight_equals_the_torch_merged_weight(case, tmp_path):
    builder, _, kwargs = _build(case)
    model = onnx_peft.get_peft_model(builder(), onnx_peft.AdaLoraConfig(**kwargs))
    _perturb(model)
    model.save_pretrained(tmp_path)
    adapter = PeftAdapter.read("a", tmp_path)
    layers = {k: m for k, m in model.base_model.model.named_modules() if isinstance(m, AdaLoraLayer)}
    base = {k: m.base_layer.weight.detach().clone() for k, m in layers.items()}

    model.merge_adapter()

    assert sorted(adapter.modules) == sorted(layers)
    for module, layer in layers.items():
        flip = layer.fan_in_fan_out
        merged, _ = adapter.merged_weight(module, (base[module].T if flip else base[module]).numpy(), None)
        torch_merged = layer.base_layer.weight.detach()
        assert np.abs(merged - (torch_merged.T if flip else torch_merged).numpy()).max() <= TOL, module


# -- (c) training --------------------------------------------------------------------------------
def test_a_few_training_steps_lower_the_loss_and_touch_only_adalora_tensors():
    _, ours = _pair(SCHEDULE)
    before = {k: v.detach().clone() for k, v in ours.base_model.model.state_dict().items()}
    x = token_ids()

    losses = _train_with_allocation(ours, x, steps=6)

    changed = {k for k, v in ours.base_model.model.state_dict().items() if not torch.equal(v, before[k])}
    assert losses[-1] < losses[0] - 0.05
    assert changed and all(any(f".{n}.default" in k for n in ("lora_A", "lora_E", "lora_B")) for k in changed)


# -- (d) errors ----------------------------------------------------------------------------------
def test_an_embedding_target_is_refused_naming_the_module():
    with pytest.raises(AdapterConfigError, match=r"model\.embed_tokens .*Embedding.*AdaLoRA.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_llama(), onnx_peft.AdaLoraConfig(total_step=5, target_modules=["embed_tokens"]))


@pytest.mark.parametrize("fields, named", [
    (dict(), "total_step"), (dict(total_step=10, use_dora=True), "use_dora"),
    (dict(total_step=10, tinit=6, tfinal=4), "tinit"), (dict(total_step=10, beta1=1.0), "beta1"),
    (dict(total_step=10, orth_reg_weight=-1), "orth_reg_weight"), (dict(total_step=10, init_r=0), "init_r")])
def test_a_bad_config_field_is_refused_naming_it(fields, named):
    with pytest.raises(AdapterConfigError, match=f"AdaLoraConfig.{named}"):
        onnx_peft.AdaLoraConfig(target_modules=["q_proj"], **fields)


def test_a_second_trainable_adapter_is_refused():
    model = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.AdaLoraConfig(total_step=5, target_modules=["q_proj"]))

    with pytest.raises(AdapterConfigError, match="one adapter at a time"):
        model.add_adapter("other", onnx_peft.AdaLoraConfig(total_step=5, target_modules=["v_proj"]))
    model.add_adapter("frozen", onnx_peft.AdaLoraConfig(total_step=5, target_modules=["v_proj"], inference_mode=True))


# -- (e) the lora slots --------------------------------------------------------------------------
@pytest.mark.parametrize("case, module", [("adalora-llama", "model.layers.1.mlp.down_proj"),
                                          ("adalora-gpt2", "transformer.h.0.attn.c_attn")])
def test_lora_slots_reproduce_the_peft_layer_output(case, module, tmp_path):
    builder, _, kwargs = _build(case)
    theirs = peft.get_peft_model(builder(), peft.AdaLoraConfig(**kwargs))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    layer = theirs.base_model.model.get_submodule(module)
    weight = layer.get_base_layer().weight.detach()
    weight = (weight.T if layer.fan_in_fan_out else weight).numpy()            # [out, in]
    bias = layer.get_base_layer().bias
    x = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(3))

    slots = PeftAdapter.read("a", tmp_path).slot_tensors(module, lambda: weight)

    a, b = slots["lora"]["lora_A.weight"], slots["lora"]["lora_B.weight"]
    y = x.numpy() @ weight.T + (x.numpy() @ a) @ b
    if bias is not None:
        y = y + bias.detach().numpy()
    with torch.no_grad():
        expected = layer(x).numpy()
    assert np.abs(y - expected).max() <= TOL


def test_lora_slots_of_an_allocated_adapter_have_the_kept_rank(tmp_path):
    theirs, _ = _pair(SCHEDULE)
    x = token_ids()
    _train_with_allocation(theirs, x)
    theirs.save_pretrained(tmp_path)
    module = "model.layers.0.self_attn.q_proj"
    kept = sum(theirs.peft_config["default"].rank_pattern[f"{module}.lora_E"])
    layer = theirs.base_model.model.get_submodule(module)
    weight = layer.get_base_layer().weight.detach().numpy()
    h = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(4))

    slots = PeftAdapter.read("a", tmp_path).slot_tensors(module, lambda: weight)

    a, b = slots["lora"]["lora_A.weight"], slots["lora"]["lora_B.weight"]
    assert a.shape == (weight.shape[1], kept) and b.shape == (kept, weight.shape[0])
    with torch.no_grad():
        expected = layer(h).numpy()
    assert np.abs(h.numpy() @ weight.T + (h.numpy() @ a) @ b - expected).max() <= TOL
