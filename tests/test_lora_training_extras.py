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


# -- CorDA ----------------------------------------------------------------------------------------
def _corda_samples() -> list[torch.Tensor]:
    """Eight calibration samples of 12 tokens; CorDA runs one sample per forward."""
    generator = torch.Generator().manual_seed(4)
    from tests.tiny_models import VOCAB

    return [torch.randint(0, VOCAB, (1, 12), generator=generator) for _ in range(8)]


def _corda_models(make_model, targets, method: str, theirs_cache=None, ours_cache=None):
    """The same base model CorDA-initialized by PEFT and by us (same calibration samples)."""
    from peft.tuners.lora.corda import preprocess_corda as peft_preprocess

    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda", rank_pattern={"v_proj": 2})
    models = []
    for lib, preprocess, cache in ((peft, peft_preprocess, theirs_cache), (onnx_peft, onnx_peft.preprocess_corda,
                                                                           ours_cache)):
        base = make_model()
        corda_config = (peft.tuners.lora.config.CordaConfig if lib is peft else onnx_peft.CordaConfig)
        config = lib.LoraConfig(**kwargs, corda_config=corda_config(corda_method=method, cache_file=cache))

        def run_model(base=base):
            for ids in _corda_samples():
                base(input_ids=ids)

        preprocess(base, config, run_model=run_model)
        models.append(lib.get_peft_model(base, config))
    return models


def _assert_corda_equal(theirs, ours) -> float:
    a, b = theirs.state_dict(), ours.state_dict()
    assert a.keys() == b.keys()
    worst = max(max_diff(a[k], b[k]) for k in a)  # lora_A, lora_B and the residual base weights
    assert worst <= 1e-4, worst
    from tests.tiny_models import run

    assert max_diff(run(theirs, token_ids()), run(ours, token_ids())) <= TOL
    return worst


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_init_equals_peft(method):
    theirs, ours = _corda_models(tiny_llama, ["q_proj", "v_proj", "down_proj"], method)
    _assert_corda_equal(theirs, ours)
    layer = ours.base_model.model.model.layers[0].self_attn.v_proj
    assert layer.lora_A["default"].weight.shape == (2, 32) and not hasattr(layer.base_layer, "eigens")
    # residual + s * B @ A is the original weight
    original = tiny_llama().model.layers[0].self_attn.v_proj.weight
    assert max_diff(layer.base_layer.weight + layer.get_delta_weight("default"), original) <= 1e-5


def test_corda_conv1d_and_cache_file_read_by_both_libraries(tmp_path):
    from tests.tiny_models import tiny_gpt2

    cache = str(tmp_path / "corda" / "cache.pt")
    theirs, ours = _corda_models(tiny_gpt2, ["c_attn", "c_fc"], "ipm", theirs_cache=cache)
    _assert_corda_equal(theirs, ours)
    # ours reads the cache PEFT wrote: no run_model needed
    model = tiny_gpt2()
    config = onnx_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights="corda",
                                  corda_config=onnx_peft.CordaConfig(cache_file=cache))
    onnx_peft.preprocess_corda(model, config)
    ours = onnx_peft.get_peft_model(model, config)
    _assert_corda_equal(theirs, ours)

    # a trained CorDA adapter reloads in PEFT on a base rebuilt from the same cache (and back in ours)
    from peft.tuners.lora.corda import preprocess_corda as peft_preprocess

    from tests.tiny_models import perturb_trainable, run

    perturb_trainable(ours, seed=1)
    ours.save_pretrained(tmp_path / "adapter")
    rebuilt = tiny_gpt2()
    peft_preprocess(rebuilt, peft.LoraConfig.from_pretrained(tmp_path / "adapter"))
    loaded = peft.PeftModel.from_pretrained(rebuilt, tmp_path / "adapter")
    assert max_diff(run(loaded, token_ids()), run(ours, token_ids())) <= TOL
    rebuilt = tiny_gpt2()
    onnx_peft.preprocess_corda(rebuilt, onnx_peft.AdapterConfig.from_pretrained(tmp_path / "adapter"))
    loaded = onnx_peft.PeftModel.from_pretrained(rebuilt, tmp_path / "adapter")
    assert max_diff(run(loaded, token_ids()), run(ours, token_ids())) <= TOL


def test_corda_refuses_missing_preprocessing_and_bad_config():
    from onnx_peft.errors import DataError

    config = onnx_peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="corda")
    assert config.corda_config["corda_method"] == "ipm"  # PEFT's default CordaConfig
    with pytest.raises(AdapterConfigError, match="preprocess_corda"):
        onnx_peft.get_peft_model(tiny_llama(), config)
    with pytest.raises(DataError, match="run_model"):
        onnx_peft.preprocess_corda(tiny_llama(), config)
    model = tiny_llama()
    with pytest.raises(DataError, match="batch size 1"):
        onnx_peft.preprocess_corda(model, config, run_model=lambda: model(input_ids=token_ids(batch=2)))
    with pytest.raises(AdapterConfigError, match="corda_method"):
        onnx_peft.CordaConfig(corda_method="xpm")


# -- LoRA-GA --------------------------------------------------------------------------------------
def _loraga_models(make_model, targets, **ga):
    """The same base model LoRA-GA-initialized by PEFT and by us (same gradients, same torch seed
    for the randomized SVD)."""
    from peft.tuners.lora.config import LoraGAConfig as PeftLoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga as peft_preprocess

    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="lora_ga")
    models = []
    for lib, preprocess, ga_config in ((peft, peft_preprocess, PeftLoraGAConfig),
                                       (onnx_peft, onnx_peft.preprocess_loraga, onnx_peft.LoraGAConfig)):
        base = make_model()
        config = lib.LoraConfig(**kwargs, lora_ga_config=ga_config(**ga))

        def train_step(base=base):
            for seed in range(2):
                ids = token_ids(batch=2, seq=6 + seed)
                base(input_ids=ids, labels=ids).loss.backward()

        preprocess(base, config, train_step)
        torch.manual_seed(7)
        models.append(lib.get_peft_model(base, config))
    return models


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("ArBr", "weight_svd"), ("random", "gd_scale")])
def test_loraga_init_equals_peft(direction, scale):
    theirs, ours = _loraga_models(tiny_llama, ["q_proj", "v_proj", "down_proj"], direction=direction, scale=scale)
    _assert_corda_equal(theirs, ours)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().max() > 0 and not hasattr(layer.base_layer, "_peft_loraga_grad")
    original = tiny_llama().model.layers[0].self_attn.q_proj.weight
    assert max_diff(layer.base_layer.weight + layer.get_delta_weight("default"), original) <= 1e-5


def test_loraga_conv1d_cache_and_load_without_gradients(tmp_path):
    from tests.tiny_models import tiny_gpt2

    theirs, ours = _loraga_models(tiny_gpt2, ["c_attn", "c_fc"], direction="A2rBr", scale="stable")
    _assert_corda_equal(theirs, ours)
    # the gradient cache round-trips; without gradients (a saved adapter loading) the init is LoRA's
    model, cache = tiny_gpt2(), str(tmp_path / "grads.pt")
    config = onnx_peft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="lora_ga",
                                  lora_ga_config=onnx_peft.LoraGAConfig())
    onnx_peft.preprocess_loraga(model, config, lambda: model(input_ids=token_ids(), labels=token_ids()).loss.backward(),
                                cache_file=cache)
    grads = {n: m._peft_loraga_grad.clone() for n, m in model.named_modules() if hasattr(m, "_peft_loraga_grad")}
    reloaded = tiny_gpt2()
    onnx_peft.preprocess_loraga(reloaded, config, train_step=lambda: None, cache_file=cache)
    assert all(torch.equal(dict(reloaded.named_modules())[n]._peft_loraga_grad, g) for n, g in grads.items())
    plain = onnx_peft.get_peft_model(tiny_gpt2(), config)
    assert all(not v.any() for k, v in plain.state_dict().items() if "lora_B" in k)
    with pytest.raises(AdapterConfigError, match="direction"):
        onnx_peft.LoraGAConfig(direction="BA")
    with pytest.raises(AdapterConfigError, match="lora_ga_config"):
        onnx_peft.preprocess_loraga(tiny_gpt2(), onnx_peft.LoraConfig(r=4, target_modules=["c_attn"]), lambda: None)
