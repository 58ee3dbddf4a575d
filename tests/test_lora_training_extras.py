"""LoRA training extras against HF PEFT on tiny_llama: the LoRA+ and LoRA-FA optimizers and the
data-driven EVA initialization (onnx_peft.optimizers, onnx_peft.tuners.lora_init)."""

from __future__ import annotations

import pytest
import torch

import onnx_peft
from onnx_peft.errors import AdapterConfigError
from tests.tiny_models import TOL, max_diff, peft_and_ours, tiny_llama, token_ids

peft = pytest.importorskip("peft")


def _loss(model) -> torch.Tensor:
    ids = token_ids(batch=2, seq=7)
    return model(input_ids=ids, labels=ids).loss


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_params(theirs, ours, tol: float) -> None:
    a, b = dict(theirs.named_parameters()), dict(ours.named_parameters())
    assert a.keys() == b.keys()
    worst = max(max_diff(a[n], b[n]) for n in a)
    assert worst <= tol, worst


# -- LoRA+ ----------------------------------------------------------------------------------------
def _loraplus_configs():
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True,
                  modules_to_save=["lm_head"])
    return peft.LoraConfig(**kwargs), onnx_peft.LoraConfig(**kwargs)


def test_loraplus_groups_and_step_equal_peft():
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    from onnx_peft.optimizers import create_loraplus_optimizer

    theirs, ours = peft_and_ours(tiny_llama, *_loraplus_configs())
    settings = dict(lr=1e-3, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.1, loraplus_lr_embedding=1e-4)
    opt_theirs = peft_loraplus(theirs, torch.optim.AdamW, **settings)
    opt_ours = create_loraplus_optimizer(ours, torch.optim.AdamW, **settings)

    names_theirs = {id(p): n for n, p in theirs.named_parameters()}
    groups_theirs = [([names_theirs[id(p)] for p in g["params"]], g["lr"], g["weight_decay"])
                     for g in opt_theirs.param_groups]
    groups_ours = [(g["param_names"], g["lr"], g["weight_decay"]) for g in opt_ours.param_groups]
    assert groups_ours == groups_theirs
    # A: lora_A + lm_head; embedding: its lora_embedding_A/B; B: lora_B + DoRA magnitudes (1-D)
    assert [len(g[0]) for g in groups_ours[:3]] == [5, 2, 9] and groups_ours[2][1] == 16e-3

    for model, opt in ((theirs, opt_theirs), (ours, opt_ours)):
        model.train()
        before = _trainable(model)
        _loss(model).backward()
        opt.step()
        assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if "lora_B" in n)
    _assert_same_params(theirs, ours, TOL)


def test_loraplus_rejects_a_model_without_trainable_params():
    from onnx_peft.optimizers import create_loraplus_optimizer

    with pytest.raises(AdapterConfigError, match="no trainable parameter"):
        create_loraplus_optimizer(tiny_llama().requires_grad_(False), torch.optim.AdamW, lr=1e-3,
                                  loraplus_lr_ratio=4.0)


# -- LoRA-FA --------------------------------------------------------------------------------------
def test_lorafa_three_steps_equal_peft(monkeypatch):
    import peft.optimizers.lorafa as peft_lorafa

    from onnx_peft.optimizers import create_lorafa_optimizer

    # PEFT runs the projection under bf16 autocast when bf16 is available; compare the math in fp32
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
    kwargs = dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                  rank_pattern={"down_proj": 2}, modules_to_save=["lm_head"])
    theirs, ours = peft_and_ours(tiny_llama, peft.LoraConfig(**kwargs), onnx_peft.LoraConfig(**kwargs))
    opt_theirs = peft_lorafa.create_lorafa_optimizer(theirs, r=4, lora_alpha=16, lr=1e-2, weight_decay=0.01)
    opt_ours = create_lorafa_optimizer(ours, r=4, lora_alpha=16, lr=1e-2, weight_decay=0.01)

    start = _trainable(ours)
    assert not any("lora_A" in n for n in start)  # A is frozen
    for model, opt in ((theirs, opt_theirs), (ours, opt_ours)):
        model.train()
        for _ in range(3):
            opt.zero_grad()
            _loss(model).backward()
            opt.step()
    moved = max(max_diff(start[n], p) for n, p in ours.named_parameters() if n in start)
    assert moved > 1e-2
    _assert_same_params(theirs, ours, TOL)


def test_lorafa_refuses_dora_and_a_wrong_rslora_flag():
    from onnx_peft.optimizers import create_lorafa_optimizer

    dora = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(AdapterConfigError, match="DoRA"):
        create_lorafa_optimizer(dora, r=4, lora_alpha=8, lr=1e-3)
    plain = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(AdapterConfigError, match="use_rslora"):
        create_lorafa_optimizer(plain, r=4, lora_alpha=8, lr=1e-3, use_rslora=True)


# -- EVA ------------------------------------------------------------------------------------------
_EVA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _eva_batches() -> list[dict[str, torch.Tensor]]:
    """Six LM batches of 4 x 16 tokens, with padding and masked labels (both skipped by EVA)."""
    from tests.tiny_models import VOCAB

    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(6):
        ids = torch.randint(0, VOCAB, (4, 16), generator=generator)
        labels, mask = ids.clone(), torch.ones_like(ids)
        labels[:, :3], mask[0, -4:] = -100, 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def _eva_models(**eva):
    from peft.tuners.lora.eva import initialize_lora_eva_weights as peft_initialize

    kwargs = dict(r=4, lora_alpha=8, target_modules=_EVA_TARGETS, init_lora_weights="eva")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs, eva_config=peft.EvaConfig(**eva)))
    peft_initialize(theirs, _eva_batches(), show_progress_bar=False)
    ours = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.LoraConfig(**kwargs, eva_config=onnx_peft.EvaConfig(**eva)))
    onnx_peft.initialize_lora_eva_weights(ours, _eva_batches())
    return theirs, ours


def test_eva_init_equals_peft_ranks_and_components(tmp_path):
    theirs, ours = _eva_models(rho=2.0, tau=0.99)
    a_theirs = {k: v for k, v in theirs.state_dict().items() if "lora_A" in k}
    a_ours = {k: v for k, v in ours.state_dict().items() if "lora_A" in k}
    assert {k: v.shape for k, v in a_ours.items()} == {k: v.shape for k, v in a_theirs.items()}
    worst = max(max_diff(a_theirs[k], a_ours[k]) for k in a_theirs)
    assert worst <= 1e-4, worst
    ranks = {v.shape[0] for v in a_ours.values()}
    assert len(ranks) > 1 and max(ranks) <= 8  # redistributed, capped at r * rho
    assert all(not v.any() for k, v in ours.state_dict().items() if "lora_B" in k)  # B = 0

    c_theirs, c_ours = theirs.peft_config["default"], ours.peft_config["default"]
    assert c_ours.rank_pattern == c_theirs.rank_pattern and c_ours.rank_pattern
    assert c_ours.alpha_pattern == c_theirs.alpha_pattern  # alpha scaled with the rank
    assert sorted(c_ours.target_modules) == sorted(c_theirs.target_modules)

    # the EVA-initialized adapter, trained a little, loads in PEFT with the same logits
    from tests.tiny_models import perturb_trainable, run, token_ids

    perturb_trainable(ours, seed=1, select=("lora_B",))
    ours.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert max_diff(run(loaded, token_ids()), run(ours, token_ids())) <= TOL


def test_eva_refuses_other_inits_and_bad_config():
    model = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(AdapterConfigError, match="init_lora_weights='eva'"):
        onnx_peft.initialize_lora_eva_weights(model, _eva_batches())
    with pytest.raises(AdapterConfigError, match="rho"):
        onnx_peft.EvaConfig(rho=0.5)
