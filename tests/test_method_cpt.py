"""CPT (Context-aware Prompt Tuning) against HF PEFT, on numbers: checkpoints both ways, the prompt
PEFT prepends, greedy generation, CPT's own loss and projected training, config errors, and the
ONNX prompt inputs (fp32, <= 1e-5).

The adapter holds two in-context examples (types 1-4 and 5-8: input template, input, output
template, label); its projection caps are wide enough for a perturbed delta to move the logits and
tight enough that some rows are clipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import (
    TOL,
    VOCAB,
    changed_since,
    max_diff,
    saved_keys,
    snapshot,
    tiny_llama,
    token_ids,
)

import onnx_peft
from onnx_peft.checkpoint import load_adapter_weights
from onnx_peft.config import AdapterConfig
from onnx_peft.errors import AdapterConfigError
from onnx_peft.methods.base import method_for
from onnx_peft.methods.cpt import CPTConfig
from onnx_peft.tuners.cpt import epsilons

peft = pytest.importorskip("peft")

KWARGS = dict(task_type="CAUSAL_LM", cpt_token_ids=[3, 5, 7, 9, 11, 13, 17, 19, 23],
              cpt_mask=[1] * 9, cpt_tokens_type_mask=[1, 2, 2, 3, 4, 5, 6, 7, 8],
              opt_projection_epsilon=2.0, opt_projection_format_epsilon=1.0)
P = len(KWARGS["cpt_token_ids"])
DELTA = "prompt_encoder.default.delta_embedding.weight"
TABLE = "prompt_encoder.default.embedding.weight"
# the input's own examples: template 1, input 2, template 3, label 4; type 0 = not part of one
INPUT_TYPES = torch.tensor([[1, 2, 2, 3, 4, 4, 5, 6, 7, 8], [1, 2, 3, 4, 4, 0, 5, 6, 7, 8]])


def _perturb_delta(model, seed: int, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    delta = dict(model.named_parameters())[DELTA]
    with torch.no_grad():
        delta.add_(torch.randn(delta.shape, generator=generator) * scale)


def _peft(seed: int = 0, **overrides):
    model = peft.get_peft_model(tiny_llama(), peft.CPTConfig(**{**KWARGS, **overrides}))
    _perturb_delta(model, seed)
    return model.eval()


def _ours(seed: int = 0, **overrides):
    model = onnx_peft.get_peft_model(tiny_llama(), CPTConfig(**{**KWARGS, **overrides}))
    _perturb_delta(model, seed)
    return model.eval()


def _copy_cpt_params(src, dst) -> None:
    """``dst`` takes ``src``'s prompt table and delta (both have PEFT's module names)."""
    params = dict(dst.named_parameters())
    with torch.no_grad():
        for name in (TABLE, DELTA):
            params[name].copy_(dict(src.named_parameters())[name])


def _logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cpt") / "peft"
    model = _peft(seed=1)
    model.save_pretrained(folder)
    return folder, model


# -- checkpoints both ways -----------------------------------------------------------------------
def test_peft_saved_adapter_loads_here_with_same_logits(peft_dir):
    folder, trained = peft_dir
    ids = token_ids()
    loaded = onnx_peft.PeftModel.from_pretrained(tiny_llama(), folder)

    ours = _logits(loaded, ids)
    assert ours.shape == (2, P + 7, VOCAB)  # the virtual tokens' logits too, as PEFT's
    assert max_diff(ours, _logits(trained, ids)) <= TOL
    assert max_diff(ours, _logits(peft.PeftModel.from_pretrained(tiny_llama(), folder), ids)) <= TOL
    # the trained delta really moves the output: a fresh adapter (delta 0) gives other logits
    assert max_diff(ours, _logits(_ours(seed=1, opt_projection_epsilon=0.0, opt_projection_format_epsilon=0.0),
                                  ids)) > 1e-3


def test_adapter_saved_here_loads_in_peft_with_same_logits(tmp_path):
    ours = _ours(seed=2)
    ours.save_pretrained(tmp_path)
    ids = token_ids()

    assert max_diff(_logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path), ids), _logits(ours, ids)) <= TOL
    assert max_diff(_logits(onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path), ids),
                    _logits(ours, ids)) <= TOL


def test_saved_keys_shapes_and_config_equal_peft(tmp_path, peft_dir):
    _ours(seed=1).save_pretrained(tmp_path)

    assert saved_keys(tmp_path) == saved_keys(peft_dir[0]) == {"prompt_embeddings": (P, 32)}
    ours, theirs = AdapterConfig.from_pretrained(tmp_path), AdapterConfig.from_pretrained(peft_dir[0])
    theirs.extra.clear()  # PEFT's bookkeeping (peft_version, auto_mapping)
    assert ours.to_dict() == theirs.to_dict()  # every CPT and prompt-learning field, incl. token_dim


def test_virtual_tokens_of_the_saved_tensors_are_the_prompt_peft_prepends(peft_dir):
    folder, trained = peft_dir
    config = AdapterConfig.from_pretrained(folder)
    method = method_for(config)
    shared = method.group(load_adapter_weights(folder), source=str(folder)).shared

    tokens = method.virtual_tokens(config, shared)
    assert method.kind == "prompt" and tokens.shape == (P, 32) and tokens.dtype == np.float32
    with torch.no_grad():
        # the training model re-projects its delta at every call: equal up to float rounding
        assert float(np.abs(tokens - trained.get_prompt(batch_size=1)[0].numpy()).max()) <= 1e-7
        reloaded = peft.PeftModel.from_pretrained(tiny_llama(), folder)
        assert np.array_equal(tokens, reloaded.get_prompt(batch_size=1)[0].numpy())


def test_saved_prompt_is_table_plus_projected_delta():
    model = _ours(seed=3)
    config = model.peft_config["default"]
    params = dict(model.named_parameters())

    prompt = model.adapter_state_dict("default")["prompt_embeddings"]
    delta = prompt - params[TABLE]
    eps = epsilons(config)
    norms = delta.norm(dim=1)
    assert torch.all(norms <= eps * (1 + 1e-5))
    assert torch.all(norms[torch.tensor([4, 8])] <= 1e-9)  # label rows: no delta
    assert norms.max() > 0.1  # the input/template rows do move


def test_greedy_generate_equals_greedy_decoding_by_peft_forwards(peft_dir):
    """PEFT 0.21's own generate re-injects the prompt at every step under transformers 5 (whose
    cache kwarg is ``cache``), so the reference is greedy decoding by full PEFT forwards."""
    folder, _ = peft_dir
    ids = token_ids(2, 5)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), folder)
    expected = ids
    with torch.no_grad():
        for _ in range(6):
            logits = theirs(input_ids=expected, attention_mask=torch.ones_like(expected)).logits[:, -1]
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
        ours = onnx_peft.PeftModel.from_pretrained(tiny_llama(), folder).generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0,
            eos_token_id=None)

    assert torch.equal(ours, expected)


# -- training: CPT's loss and the projected delta ----------------------------------------------------
@pytest.mark.parametrize("loss_type", ["none", "decay"])
def test_loss_with_labels_and_input_type_mask_equals_peft(loss_type):
    overrides = dict(opt_weighted_loss_type=loss_type, opt_loss_decay_factor=0.5)
    theirs, ours = _peft(seed=4, **overrides).train(), _ours(**overrides).train()
    _copy_cpt_params(theirs, ours)
    ids = token_ids(2, 10)
    mask = torch.ones_like(ids)

    # PEFT shifts input_type_mask in place: give it its own copy
    peft_out = theirs(input_ids=ids, attention_mask=mask, labels=ids, input_type_mask=INPUT_TYPES.clone())
    types = INPUT_TYPES.clone()
    our_out = ours(input_ids=ids, attention_mask=mask, labels=ids, input_type_mask=types)

    assert torch.equal(types, INPUT_TYPES)  # ours leaves the caller's tensor alone
    assert abs(our_out.loss.item() - peft_out.loss.item()) <= TOL
    assert max_diff(our_out.logits, peft_out.logits) <= TOL


def test_decay_weights_change_the_loss():
    ids = token_ids(2, 10)
    losses = [_ours(seed=5, opt_weighted_loss_type=kind, opt_loss_decay_factor=0.5)(
        input_ids=ids, labels=ids, input_type_mask=INPUT_TYPES).loss.item() for kind in ("none", "decay")]
    assert abs(losses[0] - losses[1]) > 1e-4


def test_default_input_type_mask_equals_peft():
    theirs, ours = _peft(seed=6).train(), _ours().train()
    _copy_cpt_params(theirs, ours)
    ids = token_ids(2, 6)

    expected = theirs(input_ids=ids, labels=ids).loss.item()
    assert abs(ours(input_ids=ids, labels=ids).loss.item() - expected) <= TOL
    embeds = tiny_llama().get_input_embeddings()(ids)
    assert abs(ours(inputs_embeds=embeds, labels=ids).loss.item() - expected) <= TOL


def test_only_the_delta_is_trainable_as_in_peft():
    theirs = peft.get_peft_model(tiny_llama(), peft.CPTConfig(**KWARGS))
    ours = onnx_peft.get_peft_model(tiny_llama(), CPTConfig(**KWARGS))

    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad} == {DELTA}
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0] == P * 32


def test_optimizer_steps_follow_peft_train_only_the_delta_and_lower_the_loss():
    theirs = peft.get_peft_model(tiny_llama(), peft.CPTConfig(**KWARGS)).train()
    ours = onnx_peft.get_peft_model(tiny_llama(), CPTConfig(**KWARGS)).train()
    before = snapshot(ours)
    ids = token_ids(2, 10)

    def steps(model):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        losses = []
        for _ in range(5):
            loss = model(input_ids=ids, labels=ids, input_type_mask=INPUT_TYPES.clone()).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    our_losses, peft_losses = steps(ours), steps(theirs)
    assert np.allclose(our_losses, peft_losses, rtol=0, atol=TOL)
    assert our_losses[-1] < our_losses[0]
    assert changed_since(ours, before) == {DELTA}
    delta = dict(ours.named_parameters())[DELTA]
    assert torch.all(delta[torch.tensor([4, 8])] == 0)  # label rows get no gradient
    with torch.no_grad():
        assert max_diff(ours.get_prompt(1), theirs.get_prompt(1)) <= TOL


# -- config --------------------------------------------------------------------------------------
def test_config_defaults_equal_peft():
    ours = CPTConfig(task_type="CAUSAL_LM").to_dict()
    theirs = peft.CPTConfig(task_type="CAUSAL_LM").to_dict()
    for name in ("cpt_token_ids", "cpt_mask", "cpt_tokens_type_mask", "opt_weighted_loss_type",
                 "opt_loss_decay_factor", "opt_projection_epsilon", "opt_projection_format_epsilon",
                 "tokenizer_name_or_path", "num_virtual_tokens"):
        assert ours[name] == theirs[name], name


@pytest.mark.parametrize("overrides, field", [
    ({"task_type": "SEQ_CLS"}, "task_type"),
    ({"task_type": None}, "task_type"),
    ({"cpt_token_ids": []}, "cpt_token_ids"),
    ({"cpt_token_ids": [1, -2, 3]}, "cpt_token_ids"),
    ({"cpt_mask": [1, 1]}, "cpt_mask"),
    ({"cpt_tokens_type_mask": [1, 2, 2, 3, 4, 5, 6, 7]}, "cpt_tokens_type_mask"),
    ({"cpt_tokens_type_mask": [1, 2, 2, 3, 4, 5, 6, 7, "8"]}, "cpt_tokens_type_mask"),
    ({"opt_weighted_loss_type": "exponential"}, "opt_weighted_loss_type"),
    ({"opt_loss_decay_factor": float("nan")}, "opt_loss_decay_factor"),
    ({"opt_projection_epsilon": -0.1}, "opt_projection_epsilon"),
    ({"opt_projection_format_epsilon": "0.1"}, "opt_projection_format_epsilon"),
])
def test_bad_config_field_is_named(overrides, field):
    with pytest.raises(AdapterConfigError, match=f"CPTConfig.{field}"):
        CPTConfig(**{**KWARGS, **overrides})


def test_token_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(AdapterConfigError, match="cpt_token_ids.*vocabulary has 64"):
        onnx_peft.get_peft_model(tiny_llama(), CPTConfig(**{**KWARGS, "cpt_token_ids": [1, 2, 3, 4, 5, 6, 7, 8, 64]}))


def test_num_virtual_tokens_follows_the_token_ids_as_peft():
    config = CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[4, 5, 6], num_virtual_tokens=10)
    assert config.num_virtual_tokens == peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[4, 5, 6],
                                                       num_virtual_tokens=10).num_virtual_tokens == 3
    assert config.cpt_mask == config.cpt_tokens_type_mask == [1, 1, 1]


# -- ONNX --------------------------------------------------------------------------------------------
def test_onnx_prompt_inputs_serve_the_peft_adapter(peft_dir, tmp_path):
    from onnx_peft.runtime import AdapterSession

    folder, trained = peft_dir
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    out = onnx_peft.export(base, tmp_path / "onnx", adapters={"c": folder}, mode="inputs", task="causal-lm",
                           quiet=True)
    session = AdapterSession(out)
    session.load_adapter("c", folder)
    ids = token_ids()
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones(ids.shape, dtype=np.int64)}

    logits = session.run(["logits"], feeds, adapter="c")[0]
    expected = _logits(trained, ids)[:, P:].numpy()
    assert logits.shape == expected.shape
    assert float(np.abs(logits.astype(np.float64) - expected).max()) <= TOL
